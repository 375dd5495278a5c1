"""The teacher's side of a logit cache: the inputs of cache rows and the shards built from them.

A cache row is a stored sample, or with ``K`` views the view ``row % K`` of sample ``row // K``
rebuilt from its recorded crop box and flip. ``TeacherRows`` runs the teacher over row ranges;
``ShardJob`` computes and writes one shard, locally or as a Dask task (both pickle as paths).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset

from kdflow.cache.writer import CacheSpec, write_shard
from kdflow.data.augment import apply_views
from kdflow.train.device import resolve_device


@dataclass
class TeacherRows:
    """The teacher's logits for cache rows: inputs (stored samples, or replayable views) and
    the forward pass (the track's teacher signal). Pickles as paths and names (models and data
    are loaded where it runs, e.g. a Dask worker); ``loaded()`` gives a private copy with both
    in memory."""

    teacher_dir: Path
    data_dir: Path
    views: dict[str, torch.Tensor] | None
    num_views: int
    batch_size: int
    workers: int = 0
    track: str = "classify"
    device: str = "auto"
    tokens_per_row: int | None = None  # sequence caches: real tokens per row (the rest is padding)
    model: torch.nn.Module | None = None
    features: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "model": None, "features": None}

    def loaded(self) -> TeacherRows:
        track = self._track()
        return replace(self, model=track.load_model(self.teacher_dir),
                       features=track.load(self.data_dir).features)

    def _track(self):  # noqa: ANN202  imported here: the tracks import the cache
        from kdflow.tracks import get_track

        return get_track(self.track)

    def inputs(self, rows: torch.Tensor) -> torch.Tensor:
        """The teacher's inputs for cache ``rows``: the samples, or their augmented views."""
        return row_inputs(self.features, self.views, self.num_views, rows)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher signal of inputs ``x`` (class logits ``[n, C]`` for classification)."""
        return self._track().teacher_outputs(self.model, x, batch_size=self.batch_size,
                                             device=resolve_device(self.device))

    def batches(self, start: int, stop: int, size: int) -> Iterator[torch.Tensor]:
        """Logits of rows ``[start, stop)``, ``size`` rows at a time, in order (the inputs are
        built by ``workers`` DataLoader processes when > 0)."""
        ranges = [(a, min(a + size, stop)) for a in range(start, stop, size)]
        if self.workers == 0:
            inputs: object = (self.inputs(torch.arange(a, b)) for a, b in ranges)
        else:
            inputs = DataLoader(_RangeInputs(self.features, self.views, self.num_views, ranges),
                                batch_size=None,
                                num_workers=self.workers, shuffle=False)
        for x in inputs:
            out = self.logits(x)
            if self.tokens_per_row is None:
                yield out
            else:  # a sequence cache takes (logits [B, L, V], lengths [B])
                yield out, torch.full((out.shape[0],), self.tokens_per_row, dtype=torch.int64)


def row_inputs(features: torch.Tensor, views: dict[str, torch.Tensor] | None, num_views: int,
               rows: torch.Tensor) -> torch.Tensor:
    """Inputs of cache ``rows``: ``features[rows]``, or with views the view of row
    ``sample * num_views + view`` rebuilt from its stored box and flip."""
    if views is None:  # contiguous rows as a slice (also for tensor-like feature containers)
        return features[int(rows[0]) : int(rows[-1]) + 1] if _contiguous(rows) else features[rows]
    x = features[rows // num_views]
    return apply_views(x, views["box"][rows], views["flip"][rows])


def _contiguous(rows: torch.Tensor) -> bool:
    return len(rows) > 0 and int(rows[-1]) - int(rows[0]) + 1 == len(rows) \
        and bool((rows.diff() == 1).all())


class _RangeInputs(TorchDataset):
    """One item per row range: the teacher's input batch (built in DataLoader workers)."""

    def __init__(self, features: torch.Tensor, views: dict[str, torch.Tensor] | None,
                 num_views: int, ranges: list[tuple[int, int]]) -> None:
        self.features, self.views, self.num_views, self.ranges = features, views, num_views, ranges

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, i: int) -> torch.Tensor:
        return row_inputs(self.features, self.views, self.num_views, torch.arange(*self.ranges[i]))


@dataclass(frozen=True)
class ShardJob:
    """One shard to compute and write (picklable: a Dask task argument)."""

    directory: Path
    spec: CacheSpec
    number: int
    start: int
    stop: int
    rows: TeacherRows

    def __call__(self) -> dict:
        rows = self.rows if self.rows.model is not None else self.rows.loaded()
        batches = rows.batches(self.start, self.stop, self.rows.batch_size)
        return write_shard(self.directory, self.spec, self.number, self.start, self.stop, batches)


def compute_shard(job: ShardJob) -> dict:
    """Run ``job`` (a module-level function, so a task runner can ship it to a worker)."""
    return job()
