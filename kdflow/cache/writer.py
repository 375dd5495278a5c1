"""Write teacher logits as safetensors shards plus ``cache.json``: streamed or resumable.

``write_cache`` consumes a stream of logit batches in row order. ``build_cache`` asks for row
ranges instead, so it can resume: shards already on disk that pass their sha256 are kept, and
only missing, truncated or altered shards are recomputed. Both lay out the same shards
(``shard_rows`` rows each from row 0) with the same bytes.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from kdflow.cache.formats import FORMATS, Format, Stored, cat_stored, encode, narrowest_uint, value_dtype
from kdflow.cache.store import (
    CACHE_VERSION,
    INFO_FILE,
    SHARD_PATTERN,
    load_info,
    replace_atomically,
    save_info,
    sha256_file,
    shard_problem,
)
from kdflow.cache.tokens import encode_sequences
from kdflow.errors import CacheCorruptError

log = logging.getLogger(__name__)

Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # [B, C] or ([B, L, V], lengths [B])


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds and how it is sharded: everything but the rows themselves.

    Attributes:
        num_rows: samples (sequences for a sequence cache).
        num_classes: classes, or the vocabulary size.
        format: a registered format (``dense``, ``topk``, ``topk_q8``, ``topk_packed``,
            ``topk_adaptive``).
        k: classes kept per row by top-k formats.
        dtype: value dtype of ``dense`` and ``topk``, ``float16`` or ``bfloat16``.
        capture_temperature: temperature of stored top-k log-probabilities.
        shard_rows: maximum rows per shard.
        seq_len: tokens per row of a sequence cache (None: one row per sample).
    """

    num_rows: int
    num_classes: int
    format: str
    k: int | None
    dtype: str
    capture_temperature: float
    shard_rows: int
    seq_len: int | None = None

    def __post_init__(self) -> None:
        fmt = FORMATS.get(self.format)
        value_dtype(self.dtype)
        if self.shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {self.shard_rows}")
        if self.num_rows < 0 or self.num_classes < 1:
            raise ValueError(f"need num_rows >= 0 and num_classes >= 1, got {self.num_rows}, "
                             f"{self.num_classes}")
        if not self.capture_temperature > 0:
            raise ValueError(f"capture_temperature must be > 0, got {self.capture_temperature}")
        if fmt.topk and (self.k is None or not 1 <= self.k <= self.num_classes):
            raise ValueError(f"{self.format} cache needs 1 <= k <= num_classes="
                             f"{self.num_classes}, got k={self.k}")
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")

    @property
    def fmt(self) -> Format:
        return FORMATS.get(self.format)

    def encode(self, batch: Batch) -> Stored:
        """Check the shape of one batch of logits and encode it."""
        args = {"format": self.format, "k": self.k, "dtype": self.dtype,
                "capture_temperature": self.capture_temperature}
        if self.seq_len is None:
            if not isinstance(batch, torch.Tensor) or batch.ndim != 2 \
                    or batch.shape[1] != self.num_classes:
                got = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch)
                raise ValueError(f"logits batch must be [B, {self.num_classes}], got {got}")
            return encode(batch.detach().cpu(), **args)
        if not (isinstance(batch, tuple) and len(batch) == 2):
            raise ValueError("a sequence cache needs (logits [B, L, V], lengths [B]) batches")
        logits, lengths = batch
        if logits.ndim != 3 or tuple(logits.shape[1:]) != (self.seq_len, self.num_classes):
            raise ValueError(f"logits batch must be [B, {self.seq_len}, {self.num_classes}], "
                             f"got {tuple(logits.shape)}")
        return encode_sequences(logits.detach().cpu(), torch.as_tensor(lengths).cpu(), **args)

    def ranges(self) -> list[tuple[int, int]]:
        """Row range ``[start, stop)`` of every shard."""
        return [(a, min(a + self.shard_rows, self.num_rows))
                for a in range(0, self.num_rows, self.shard_rows)]

    def header(self, key: str = "") -> dict:
        """The ``cache.json`` fields that must match for shards to be reused."""
        fmt = self.fmt
        return {
            "version": CACHE_VERSION,
            "key": key,
            "format": self.format,
            "k": self.k if fmt.topk else None,
            "dtype": str(fmt.fixed_dtype or value_dtype(self.dtype)).removeprefix("torch."),
            "index_dtype": (str(narrowest_uint(self.num_classes)).removeprefix("torch.")
                            if fmt.topk else None),
            "num_rows": self.num_rows,
            "num_classes": self.num_classes,
            "seq_len": self.seq_len,
            "capture_temperature": float(self.capture_temperature),
            "shard_rows": self.shard_rows,
        }


def _rows(stored: Stored) -> int:
    return int((stored["values"] if "values" in stored else stored["nbytes"]).shape[0])


def _write_shard(directory: Path, number: int, stored: Stored, start: int, spec: CacheSpec) -> dict:
    name = SHARD_PATTERN.format(number)
    tmp = directory / f".{name}.tmp-{os.getpid()}"
    stop = start + _rows(stored)
    if spec.fmt.finish is not None:  # encodings that need the whole shard (topk_adaptive)
        stored = spec.fmt.finish(stored)
    meta = {"format": spec.format, "num_classes": str(spec.num_classes), "rows": f"{start}:{stop}"}
    if spec.seq_len is not None:
        meta["seq_len"] = str(spec.seq_len)
    # one metadata key: safetensors writes a multi-key metadata map in random order per process,
    # which would make identical caches differ byte-wise
    save_file(stored, tmp, metadata={"kdflow": json.dumps(meta, sort_keys=True)})
    digest, size = sha256_file(tmp), tmp.stat().st_size
    replace_atomically(tmp, directory / name)
    tokens = int(stored["lengths"].sum()) if "lengths" in stored else stop - start
    log.debug("wrote %s rows [%d, %d) %d bytes", name, start, stop, size)
    return {"file": name, "rows": [start, stop], "tokens": tokens, "sha256": digest, "bytes": size}


def _cat(parts: list[Stored]) -> Stored:
    return {k: v.contiguous() for k, v in cat_stored(parts).items()}


def _finish(directory: Path, header: dict, shards: list[dict]) -> dict:
    """Remove stale shards, then write and return the complete ``cache.json``."""
    names = {s["file"] for s in shards}
    for stale in directory.glob("shard-*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    bytes_total = sum(s["bytes"] for s in shards)
    num_rows, tokens = header["num_rows"], sum(s["tokens"] for s in shards)
    info = {**header, "complete": True, "shards": shards, "bytes_total": bytes_total,
            "bytes_per_sample": bytes_total / num_rows if num_rows else 0.0, "num_tokens": tokens}
    if header["seq_len"] is not None:
        info["bytes_per_token"] = bytes_total / tokens if tokens else 0.0
    save_info(directory, info)
    log.info("wrote %s cache: %d rows in %d shard(s), %.1f bytes/sample", header["format"],
             num_rows, len(shards), info["bytes_per_sample"])
    return info


def write_cache(
    directory: Path,
    batches: Iterable[Batch],
    *,
    num_rows: int,
    num_classes: int,
    format: str,
    k: int | None,
    dtype: str,
    capture_temperature: float,
    shard_rows: int,
    seq_len: int | None = None,
    key: str = "",
) -> dict:
    """Write teacher logits, streamed in row order, as shards of at most ``shard_rows`` rows.

    Each shard is written under a temporary name, then renamed. The returned info (also saved
    as ``cache.json``) lists every shard with its row range, token count, sha256 and size.

    Args:
        directory: output folder (created if needed).
        batches: logits ``[B, C]`` in row order, ``num_rows`` rows in all; for a sequence cache
            (``seq_len`` set) pairs of logits ``[B, seq_len, V]`` and lengths ``[B]``.
        key: the cache key, recorded so that ``build_cache`` only reuses matching shards.

    The other arguments are the fields of ``CacheSpec``.
    """
    spec = CacheSpec(num_rows, num_classes, format, k, dtype, capture_temperature, shard_rows,
                     seq_len)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / INFO_FILE).unlink(missing_ok=True)
    shards: list[dict] = []
    pending: list[Stored] = []
    pending_rows, row = 0, 0
    for batch in batches:
        stored = spec.encode(batch)
        if row + pending_rows + _rows(stored) > num_rows:
            raise ValueError(f"more than num_rows={num_rows} rows of logits were streamed")
        pending.append(stored)
        pending_rows += _rows(stored)
        while pending_rows >= shard_rows or (pending_rows and row + pending_rows == num_rows):
            merged = _cat(pending)
            take = min(shard_rows, pending_rows)
            head = {key_: v[:take].contiguous() for key_, v in merged.items()}
            shards.append(_write_shard(directory, len(shards), head, row, spec))
            row, pending_rows = row + take, pending_rows - take
            pending = [{key_: v[take:] for key_, v in merged.items()}] if pending_rows else []
    if row + pending_rows != num_rows:
        raise ValueError(f"expected num_rows={num_rows} rows of logits, got {row + pending_rows}")
    return _finish(directory, spec.header(key), shards)


def _reusable(directory: Path, header: dict) -> dict[str, dict]:
    """Shard entries of an earlier (possibly interrupted) build with the same header."""
    try:
        old = load_info(directory)
    except CacheCorruptError:
        return {}
    if any(old.get(name) != value for name, value in header.items()):
        log.info("%s: cache parameters or key changed; rebuilding every shard", directory)
        return {}
    return {s["file"]: s for s in old.get("shards", [])}


class CacheBuild:
    """One resumable build: which shards are intact, which must be computed, and the journal.

    ``build_cache`` runs the missing shards one after the other; a task runner (e.g. Dask) may
    instead compute ``todo`` shards anywhere that sees ``directory``, each with ``write_shard``,
    then ``record`` their entries here and ``finish``. Both give the same bytes.

    Args:
        directory: the cache folder (created if needed).
        spec: what the cache holds.
        key: the cache key; shards of another key are never reused.
        extra: more ``cache.json`` fields that must match for shards to be reused (e.g. the
            views table entry).
    """

    def __init__(self, directory: Path, spec: CacheSpec, key: str = "",
                 extra: dict | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.spec = spec
        self.header = {**spec.header(key), **(extra or {})}
        self._known = _reusable(self.directory, self.header)
        self.entries: list[dict | None] = []
        self.todo: list[tuple[int, int, int]] = []  # (shard number, start, stop)
        for number, (start, stop) in enumerate(spec.ranges()):
            entry = self._known.get(SHARD_PATTERN.format(number))
            if entry is not None and entry["rows"] == [start, stop]:
                problem = shard_problem(self.directory, entry)
                if problem is None:
                    self.entries.append(entry)
                    continue
                log.warning("%s: %s; recomputing rows [%d, %d)", directory, problem, start, stop)
            self.entries.append(None)
            self.todo.append((number, start, stop))
        self.computed: list[str] = []

    def record(self, number: int, entry: dict) -> None:
        """Note a freshly written shard and save the journal (``complete: false``)."""
        self.entries[number] = self._known[entry["file"]] = entry
        self.computed.append(entry["file"])
        journal = sorted(self._known.values(), key=lambda s: s["file"])
        save_info(self.directory, {**self.header, "complete": False, "shards": journal})

    def finish(self) -> dict:
        """Write and return the complete ``cache.json`` (every shard must be recorded)."""
        missing = [n for n, e in enumerate(self.entries) if e is None]
        if missing:
            raise RuntimeError(f"{self.directory}: shards {missing} were never written")
        self.computed.sort()
        return _finish(self.directory, self.header, self.entries)


def write_shard(directory: Path, spec: CacheSpec, number: int, start: int, stop: int,
                batches: Iterable[Batch]) -> dict:
    """Encode the logit ``batches`` of rows ``[start, stop)`` (in order) and write shard
    ``number``; returns its ``cache.json`` entry."""
    stored = _cat([spec.encode(b) for b in batches])
    if _rows(stored) != stop - start:
        raise ValueError(f"compute returned {_rows(stored)} rows for [{start}, {stop})")
    return _write_shard(Path(directory), number, stored, start, spec)


def build_cache(
    directory: Path,
    compute: Callable[[int, int], Batch],
    *,
    num_rows: int,
    num_classes: int,
    format: str,
    k: int | None,
    dtype: str,
    capture_temperature: float,
    shard_rows: int,
    batch_size: int,
    seq_len: int | None = None,
    key: str = "",
) -> tuple[dict, list[str]]:
    """Build a cache, or resume or repair one: compute only the shards that are not intact.

    An earlier ``cache.json`` in ``directory`` with the same key and parameters (complete, or
    left by an interrupted build, which rewrites it after every shard with ``complete: false``)
    names the shards that may be reused; each is re-verified (size and sha256) first.

    Args:
        compute: ``(start, stop) -> logits`` of rows ``[start, stop)``, ``[B, C]``, or
            ``([B, seq_len, V], lengths [B])`` for a sequence cache; called with at most
            ``batch_size`` rows, never across a shard boundary.
        key: the cache key (teacher + data + transform + format); shards of another key are
            never reused.

    The other arguments are the fields of ``CacheSpec``.

    Returns:
        The cache info (as saved in ``cache.json``) and the names of the shards computed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    spec = CacheSpec(num_rows, num_classes, format, k, dtype, capture_temperature, shard_rows,
                     seq_len)
    build = CacheBuild(directory, spec, key)
    for number, start, stop in build.todo:
        batches = (compute(a, min(a + batch_size, stop)) for a in range(start, stop, batch_size))
        build.record(number, write_shard(build.directory, spec, number, start, stop, batches))
    return build.finish(), build.computed
