"""The language-model dataset artifact: token blocks stored once, read memory-mapped.

A folder holds ``tokens.npy`` ``[N, L]`` (int32 token ids), ``targets.npy`` ``[N, L]`` (next-token labels, ``-100`` where there is none),
``blocks.parquet`` (one row per block: ``sample_id``, ``split``, ``row``, ``tokens``; checked with
pandera), ``dataset.json`` (vocabulary, block length, tokenizer) and ``tokenizer/`` (the
tokenizer, saved with ``save_pretrained``). Blocks are stored grouped by split (train, val,
test), so a split is a slice of the memory map: a corpus larger than memory trains.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandera.polars as pa
import polars as pl
import torch

from kdflow.data.dataset import SPLITS, Dataset
from kdflow.errors import ArtifactError, DataError

TOKENS, TARGETS, TABLE, META, TOKENIZER = "tokens.npy", "targets.npy", "blocks.parquet", "dataset.json", "tokenizer"

BLOCKS_SCHEMA = pa.DataFrameSchema(
    {
        "sample_id": pa.Column(pl.String, unique=True, nullable=False),
        "split": pa.Column(pl.String, pa.Check.isin(list(SPLITS)), nullable=False),
        "row": pa.Column(pl.Int64, pa.Check.ge(0), unique=True, nullable=False),
        "tokens": pa.Column(pl.Int64, pa.Check.ge(1), nullable=False),
    },
    strict=True,
)


@dataclass
class TokenBlocks(Dataset):
    """A ``Dataset`` of token blocks: ``features`` ``[N, L]`` ids, ``labels`` ``[N, L]`` next-token
    targets, both memory-mapped when loaded; splits are contiguous slices (no copy)."""

    tokenizer: Any = None  # the tokenizer object (at prepare), else loaded from ``tokenizer_dir``
    tokenizer_dir: Path | None = None
    split_rows: dict[str, tuple[int, int]] = field(default_factory=dict)

    def split(self, name: str) -> TokenBlocks:
        start, stop = self.split_rows.get(name, (0, 0))
        return TokenBlocks(
            features=self.features[start:stop], labels=self.labels[start:stop],
            sample_ids=self.sample_ids[start:stop], splits=self.splits[start:stop],
            num_classes=self.num_classes, modality=self.modality, meta=dict(self.meta),
            tokenizer=self.tokenizer, tokenizer_dir=self.tokenizer_dir, split_rows={name: (0, stop - start)},
        )

    def frame(self) -> pl.DataFrame:
        real = (self.labels != -100).sum(dim=1) + 1  # tokens of a block: its labels, plus the first
        return pl.DataFrame({"sample_id": self.sample_ids, "split": self.splits,
                             "row": np.arange(len(self), dtype=np.int64), "tokens": real.numpy().astype(np.int64)})

    def validate(self, where: str = "dataset") -> None:
        BLOCKS_SCHEMA.validate(self.frame(), lazy=False)
        if len(self) and (int(self.features.min()) < 0 or int(self.features.max()) >= self.num_classes):
            raise DataError(f"{where}: token ids outside [0, {self.num_classes}) (vocabulary {self.num_classes})")
        if self.features.shape != self.labels.shape:
            raise DataError(f"{where}: tokens {tuple(self.features.shape)} and targets {tuple(self.labels.shape)} differ")

    def load_tokenizer(self) -> Any:
        """The tokenizer the blocks were made with."""
        if self.tokenizer is None and self.tokenizer_dir is not None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir, local_files_only=True,
                                                           trust_remote_code=False)
        return self.tokenizer


def ordered(tokens: np.ndarray, targets: np.ndarray, splits: list[str], ids: list[str], vocab: int,
            meta: dict[str, Any], tokenizer: Any) -> TokenBlocks:
    """Blocks regrouped train, val, test (each keeping its order) as a ``TokenBlocks``."""
    order = [i for s in SPLITS for i, x in enumerate(splits) if x == s]
    bounds, start = {}, 0
    for s in SPLITS:
        n = sum(1 for x in splits if x == s)
        bounds[s] = (start, start + n)
        start += n
    return TokenBlocks(
        features=torch.from_numpy(np.ascontiguousarray(tokens[order])), labels=torch.from_numpy(targets[order]),
        sample_ids=[ids[i] for i in order], splits=[splits[i] for i in order], num_classes=vocab,
        modality="text", meta=meta, tokenizer=tokenizer, split_rows=bounds,
    )


def save_blocks(ds: TokenBlocks, folder: Path) -> None:
    """Validate and write ``ds`` (whose splits are contiguous, as ``ordered`` makes them)."""
    folder = Path(folder)
    ds.validate(str(folder))
    np.save(folder / TOKENS, ds.features.numpy().astype(np.int32))  # int32: embeddings read it as is
    np.save(folder / TARGETS, ds.labels.numpy().astype(np.int32))
    ds.frame().write_parquet(folder / TABLE)
    bounds = {s: list(ds.split_rows.get(s, (0, 0))) for s in SPLITS}
    meta = {"num_classes": ds.num_classes, "modality": "text", "seq_len": int(ds.features.shape[1]),
            "split_rows": bounds, "meta": ds.meta}
    (folder / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if ds.tokenizer is not None:
        ds.tokenizer.save_pretrained(folder / TOKENIZER)
    elif ds.tokenizer_dir is not None:
        shutil.copytree(ds.tokenizer_dir, folder / TOKENIZER)


def load_blocks(folder: Path) -> TokenBlocks:
    """Read ``save_blocks``'s folder; tokens and targets stay memory-mapped (copy-on-write)."""
    folder = Path(folder)
    missing = [f for f in (TOKENS, TARGETS, TABLE, META, TOKENIZER) if not (folder / f).exists()]
    if missing:
        raise ArtifactError(f"{folder}: token-block artifact is incomplete, missing {missing}")
    meta = json.loads((folder / META).read_text())
    try:
        tokens = np.load(folder / TOKENS, mmap_mode="c")
        targets = np.load(folder / TARGETS, mmap_mode="c")
    except (ValueError, OSError) as exc:
        raise ArtifactError(f"{folder}: unreadable token arrays ({exc})") from None
    frame = BLOCKS_SCHEMA.validate(pl.read_parquet(folder / TABLE)).sort("row")
    if tokens.ndim != 2 or len(frame) != tokens.shape[0]:
        raise ArtifactError(f"{folder}: {TABLE} lists {len(frame)} blocks, {TOKENS} holds {tokens.shape}")
    return TokenBlocks(
        features=torch.from_numpy(tokens), labels=torch.from_numpy(targets), sample_ids=frame["sample_id"].to_list(),
        splits=frame["split"].to_list(), num_classes=int(meta["num_classes"]), modality="text",
        meta=meta.get("meta", {}), tokenizer_dir=folder / TOKENIZER,
        split_rows={s: tuple(v) for s, v in meta["split_rows"].items()},
    )
