"""Training batches from logit caches: the ``batch_fn`` that ``fit`` calls for each step.

``CachedBatches(idx, epoch)`` returns the per-sample tensors of samples ``idx`` plus the teacher
keys of their cache rows. With a views cache (``K`` views per sample, rows ``sample * K +
view``) each sample replays one cached view per epoch (``view_choice(seed, epoch)``): its input
is rebuilt from the stored crop box and flip with ``apply_views``, bit-identical to the input
the teacher was given, and the teacher keys come from that view's row. With several teachers
the rows of every cache are combined (``kdflow.cache.combine``).

Rows are read from the memory-mapped shards per batch (``CacheReader.get``), or from memory
when the caches together are at most ``memory_limit`` bytes.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from kdflow.cache.combine import COMBINES, combine
from kdflow.cache.reader import CacheReader
from kdflow.cache.views import view_choice
from kdflow.data.augment import apply_views
from kdflow.errors import DataError, ParamsError

log = logging.getLogger(__name__)

DEFAULT_MEMORY_LIMIT = 1 << 30  # bytes of cache loaded into memory before streaming instead


def decoded_nbytes(reader: CacheReader, sample_rows: int = 64) -> int:
    """Bytes ``reader.load_all()`` would hold: the decoded size of a few rows, scaled up."""
    n = len(reader)
    if n == 0:
        return 0
    head = reader.get(torch.arange(min(n, sample_rows)))
    per_row = sum(v.element_size() * v.numel() for v in head.values()) / len(head[next(iter(head))])
    return int(per_row * n)


class CachedBatches:
    """``fit``'s ``batch_fn``: per-sample tensors + replayed views + combined teacher rows.

    Args:
        tensors: per-sample tensors sharing the first axis N: ``x``, ``y`` and any extras.
        readers: one verified cache per teacher, each of ``N * K`` rows.
        weights: one weight per teacher (from ``select``).
        combine_mode: ``weighted_mean`` or ``per_sample`` (see ``kdflow.cache.combine``).
        temperature: the distillation temperature (used by ``weighted_mean``).
        seed: with ``epoch``, picks the view each sample replays.
        memory_limit: load the caches into memory when, decoded (float32 values, int64
            indices: several times their size on disk), they total at most this many bytes;
            stream rows from the memory-mapped shards otherwise (0: always stream).
        inputs: ``inputs(idx, epoch)``, the loss's per-epoch inputs (``LossBase.batches``, e.g.
            DBR's stored views), which override those keys of the ``tensors`` slices.

    Raises:
        DataError: the caches do not match the samples or each other.
        ParamsError: ``combine_mode`` is not defined for the caches' format.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], readers: list[CacheReader],
                 weights: list[float], *, combine_mode: str = "weighted_mean",
                 temperature: float = 1.0, seed: int = 0,
                 memory_limit: int = DEFAULT_MEMORY_LIMIT,
                 inputs: Callable[[torch.Tensor, int], dict[str, torch.Tensor]] | None = None) -> None:
        if combine_mode not in COMBINES:
            raise ParamsError([f"student.combine: must be one of {list(COMBINES)} "
                               f"(got {combine_mode!r})"])
        if len(readers) > 1 and combine_mode == "weighted_mean" \
                and any(r.format != "dense" for r in readers):
            raise ParamsError(["student.combine: 'weighted_mean' is defined for dense caches "
                               "only (logits.format 'dense'); use 'per_sample' or select.top 1"])
        if len(readers) != len(weights) or not readers:
            raise ValueError(f"{len(readers)} caches for {len(weights)} weights")
        self.tensors, self.inputs = tensors, inputs
        self.n = int(tensors["y"].shape[0])
        self.readers, self.weights = readers, [float(w) for w in weights]
        self.combine_mode, self.temperature, self.seed = combine_mode, float(temperature), seed
        self.k = readers[0].num_views
        self.views = self._check_views()
        self.in_memory = sum(decoded_nbytes(r) for r in readers) <= memory_limit
        self._rows = [r.load_all() for r in readers] if self.in_memory else None
        self._epoch: tuple[int, torch.Tensor] | None = None
        log.info("teacher rows from %d cache(s), %d view(s) per sample, %s", len(readers), self.k,
                 "in memory" if self.in_memory else "streamed from the memory-mapped shards")

    def _check_views(self) -> dict[str, torch.Tensor] | None:
        first = self.readers[0]
        for r in self.readers:
            if len(r) != self.n * self.k or r.num_views != self.k:
                raise DataError(f"{r.directory}: cache holds {len(r)} rows ({r.num_views} view(s) "
                                f"per sample) for {self.n} samples x {self.k} views")
            if (r.info.get("views") or {}).get("sha256") != (first.info.get("views") or {}).get("sha256"):
                raise DataError(f"{r.directory}: views table differs from {first.directory}'s")
        if self.k == 1:
            return None
        table = first.views()
        expected = torch.arange(self.n).repeat_interleave(self.k)
        if not torch.equal(table["sample"], expected):
            raise DataError(f"{first.directory}: views table rows are not sample-major")
        return table

    def choice(self, epoch: int) -> torch.Tensor:
        """The view each sample replays in ``epoch``, ``[N]``."""
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, view_choice(self.seed, epoch, self.n, self.k))
        return self._epoch[1]

    def rows(self, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        """Cache rows replayed by samples ``idx`` in ``epoch``."""
        return idx if self.k == 1 else idx * self.k + self.choice(epoch)[idx]

    def teacher(self, rows: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The combined teacher keys of cache ``rows``."""
        if self._rows is not None:
            parts = [{k: v[rows] for k, v in cached.items()} for cached in self._rows]
        else:
            parts = [r.get(rows) for r in self.readers]
        return combine(parts, self.weights, mode=self.combine_mode, y=y,
                       temperature=self.temperature)

    def __call__(self, idx: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        batch = {k: v[idx] for k, v in self.tensors.items()}
        if self.inputs is not None:
            batch.update(self.inputs(idx, epoch))
        rows = self.rows(idx, epoch)
        if self.views is not None:
            batch["x"] = apply_views(batch["x"], self.views["box"][rows], self.views["flip"][rows])
        batch.update(self.teacher(rows, batch["y"]))
        return batch
