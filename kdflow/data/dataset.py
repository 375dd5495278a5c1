"""The dataset artifact: ``samples.parquet`` + ``tensors.safetensors`` + ``dataset.json``.

One row per sample in ``samples.parquet`` (``sample_id``, ``split``, ``label``, ``row``), where
``row`` indexes the first axis of the ``features`` tensor. Graphs (``GraphFeatures``) are stored
as ``graph.x`` (node features), ``graph.edge_index``, ``graph.node_offsets``, ``graph.edge_offsets``
and optional ``graph.edge_attr`` / ``graph.root_mask``; their table adds ``num_nodes`` and
``num_edges``. Condensed datasets use the same format and may carry label extras (soft labels,
per-sample distances, sample weights) as extra tensors.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file

from kdflow.data.graph_features import GraphFeatures

SPLITS = ("train", "val", "test")
SAMPLES_FILE = "samples.parquet"
TENSORS_FILE = "tensors.safetensors"
META_FILE = "dataset.json"


@dataclass
class Dataset:
    """An in-memory dataset: features, labels and per-sample metadata.

    Attributes:
        features: float32 tensor, images ``[N, C, H, W]``, sequences ``[N, C, L]``, tabular ``[N, D]``;
            graphs a ``GraphFeatures`` (``N`` graphs, shape ``(N, F)`` with ``F`` node features).
        labels: int64 tensor ``[N]``.
        sample_ids: ``N`` unique strings.
        splits: ``N`` split names from ``SPLITS``.
        num_classes: number of classes.
        modality: ``image``, ``sequence``, ``tabular`` or ``graph``.
        extras: label extras keyed by name, each with first axis ``N``.
        meta: free-form JSON-able metadata (source, normalisation, ...).
    """

    features: torch.Tensor | GraphFeatures
    labels: torch.Tensor
    sample_ids: list[str]
    splits: list[str]
    num_classes: int
    modality: str
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape[1:])

    def select(self, mask: np.ndarray | torch.Tensor) -> Dataset:
        """Rows where ``mask`` is true (or the given integer indices), same metadata."""
        idx = torch.as_tensor(np.asarray(mask))
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        rows = idx.tolist()
        return Dataset(
            features=self.features[idx],
            labels=self.labels[idx],
            sample_ids=[self.sample_ids[i] for i in rows],
            splits=[self.splits[i] for i in rows],
            num_classes=self.num_classes,
            modality=self.modality,
            extras={k: v[idx] for k, v in self.extras.items()},
            meta=dict(self.meta),
        )

    def split(self, name: str) -> Dataset:
        """The rows of one split (``train``, ``val`` or ``test``)."""
        return self.select(np.array([s == name for s in self.splits], dtype=bool))

    def frame(self) -> pl.DataFrame:
        """The per-sample table (graphs add ``num_nodes`` and ``num_edges``)."""
        columns = {
            "sample_id": self.sample_ids,
            "split": self.splits,
            "label": self.labels.numpy().astype(np.int64),
            "row": np.arange(len(self), dtype=np.int64),
        }
        if isinstance(self.features, GraphFeatures):
            columns["num_nodes"] = self.features.num_nodes.cpu().numpy()
            columns["num_edges"] = self.features.num_edges.cpu().numpy()
        return pl.DataFrame(columns)

    def validate(self, where: str = "dataset") -> None:
        """Raise ``DataError`` naming the column and offending rows if anything is broken."""
        from kdflow.errors import DataError
        from schemas.frames import validate_graphs, validate_samples, validate_tensors  # pandera: ~1 s to import

        if isinstance(self.features, GraphFeatures) != (self.modality == "graph"):
            kind = type(self.features).__name__
            raise DataError(f"{where}: modality {self.modality!r} does not fit features {kind} "
                            "(graphs need modality 'graph' and GraphFeatures)")
        validate_samples(self.frame(), self.num_classes, where=where)
        if isinstance(self.features, GraphFeatures):
            validate_graphs(self.features, self.labels, self.num_classes, self.extras, where=where)
        else:
            validate_tensors(self.features, self.labels, self.extras, where=where)


def save_dataset(ds: Dataset, directory: Path) -> list[Path]:
    """Validate and write ``ds`` into ``directory`` (which must exist). Returns the files written."""
    ds.validate(where=str(directory))
    directory = Path(directory)
    frame = ds.frame()
    frame.write_parquet(directory / SAMPLES_FILE)
    if isinstance(ds.features, GraphFeatures):  # node features, edge index, offsets (see GraphFeatures.state)
        tensors = {**ds.features.state(), "labels": ds.labels.contiguous()}
    else:
        tensors = {"features": ds.features.contiguous(), "labels": ds.labels.contiguous()}
    tensors.update({f"extra.{k}": v.contiguous() for k, v in ds.extras.items()})
    save_file(tensors, directory / TENSORS_FILE)
    meta = {
        "num_classes": ds.num_classes,
        "modality": ds.modality,
        "input_shape": list(ds.input_shape),
        "extras": sorted(ds.extras),
        "counts": {s: int(sum(1 for x in ds.splits if x == s)) for s in SPLITS},
        **{"meta": ds.meta},
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return [directory / SAMPLES_FILE, directory / TENSORS_FILE, directory / META_FILE]


def load_dataset(directory: Path) -> Dataset:
    """Read and validate a dataset artifact written by ``save_dataset``."""
    from kdflow.errors import ArtifactError

    directory = Path(directory)
    missing = [f for f in (SAMPLES_FILE, TENSORS_FILE, META_FILE) if not (directory / f).exists()]
    if missing:
        raise ArtifactError(f"{directory}: dataset artifact is incomplete, missing {missing}")
    meta = json.loads((directory / META_FILE).read_text())
    frame = pl.read_parquet(directory / SAMPLES_FILE).sort("row")
    tensors = load_file(directory / TENSORS_FILE)
    if meta["modality"] == "graph":
        features = GraphFeatures.from_state(tensors, where=str(directory / TENSORS_FILE))
    elif "features" in tensors:
        features = tensors["features"]
    else:
        raise ArtifactError(f"{directory / TENSORS_FILE}: no 'features' tensor")
    ds = Dataset(
        features=features,
        labels=tensors["labels"],
        sample_ids=frame["sample_id"].to_list(),
        splits=frame["split"].to_list(),
        num_classes=int(meta["num_classes"]),
        modality=meta["modality"],
        extras={k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")},
        meta=meta.get("meta", {}),
    )
    if not torch.equal(torch.as_tensor(frame["label"].to_numpy(writable=True)), ds.labels):
        from kdflow.errors import DataError

        raise DataError(f"{directory}: labels in {SAMPLES_FILE} and {TENSORS_FILE} disagree")
    ds.validate(where=str(directory))
    return ds
