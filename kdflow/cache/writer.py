"""Stream teacher logits into safetensors shards plus ``cache.json``."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from kdflow.cache.formats import FORMATS, encode, narrowest_uint, value_dtype

log = logging.getLogger(__name__)

INFO_FILE = "cache.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _replace_atomically(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


def _write_shard(directory: Path, number: int, tensors: dict[str, torch.Tensor], start: int,
                 meta: dict[str, str]) -> dict:
    name = SHARD_PATTERN.format(number)
    tmp = directory / f".{name}.tmp-{os.getpid()}"
    stop = start + int(tensors["values"].shape[0])
    # one metadata key: safetensors writes a multi-key metadata map in random order per process,
    # which would make identical caches differ byte-wise
    doc = json.dumps({**meta, "rows": f"{start}:{stop}"}, sort_keys=True)
    save_file(tensors, tmp, metadata={"kdflow": doc})
    digest, size = _sha256(tmp), tmp.stat().st_size
    _replace_atomically(tmp, directory / name)
    log.debug("wrote %s rows [%d, %d) %d bytes", name, start, stop, size)
    return {"file": name, "rows": [start, stop], "sha256": digest, "bytes": size}


def _take(tensors: dict[str, torch.Tensor], rows: int) -> tuple[dict, dict]:
    head = {k: v[:rows].contiguous() for k, v in tensors.items()}
    rest = {k: v[rows:] for k, v in tensors.items()}
    return head, rest


def write_cache(
    directory: Path,
    batches: Iterable[torch.Tensor],
    *,
    num_rows: int,
    num_classes: int,
    format: str,
    k: int | None,
    dtype: str,
    capture_temperature: float,
    shard_rows: int,
) -> dict:
    """Write teacher logits, streamed in row order, as shards of at most ``shard_rows`` rows.

    Each shard is written under a temporary name, then renamed. The returned info (also saved
    as ``cache.json``) lists every shard with its row range, sha256 and size.

    Args:
        directory: output folder (created if needed).
        batches: logits ``[B, C]`` in row order, ``num_rows`` rows in all.
        format: ``dense`` or ``topk``.
        k: number of kept classes for ``topk``.
        dtype: value dtype, ``float16`` or ``bfloat16``.
        capture_temperature: temperature of the stored top-k log-probabilities.
        shard_rows: maximum rows per shard.
    """
    FORMATS.get(format)
    value_dtype(dtype)
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": format, "num_classes": str(num_classes)}
    shards: list[dict] = []
    pending: list[dict[str, torch.Tensor]] = []
    pending_rows, row = 0, 0

    def flush(rows: int) -> None:
        nonlocal pending, pending_rows, row
        merged = pending[0] if len(pending) == 1 else {
            key: torch.cat([p[key] for p in pending]) for key in pending[0]
        }
        head, rest = _take(merged, rows)
        shards.append(_write_shard(directory, len(shards), head, row, meta))
        row += rows
        pending_rows -= rows
        pending = [rest] if pending_rows else []

    for batch in batches:
        if batch.ndim != 2 or batch.shape[1] != num_classes:
            raise ValueError(f"logits batch must be [B, {num_classes}], got {tuple(batch.shape)}")
        if row + pending_rows + batch.shape[0] > num_rows:
            raise ValueError(f"more than num_rows={num_rows} rows of logits were streamed")
        pending.append(encode(batch.detach().cpu(), format=format, k=k, dtype=dtype,
                              capture_temperature=capture_temperature))
        pending_rows += int(batch.shape[0])
        while pending_rows >= shard_rows:
            flush(shard_rows)
    if pending_rows:
        flush(pending_rows)
    if row != num_rows:
        raise ValueError(f"expected num_rows={num_rows} rows of logits, got {row}")
    names = {s["file"] for s in shards}
    for stale in directory.glob("shard-*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    bytes_total = sum(s["bytes"] for s in shards)
    info = {
        "format": format,
        "k": k if format == "topk" else None,
        "dtype": str(value_dtype(dtype)).removeprefix("torch."),
        "num_rows": num_rows,
        "num_classes": num_classes,
        "capture_temperature": float(capture_temperature),
        "index_dtype": (
            str(narrowest_uint(num_classes)).removeprefix("torch.") if format == "topk" else None
        ),
        "shards": shards,
        "bytes_total": bytes_total,
        "bytes_per_sample": bytes_total / num_rows if num_rows else 0.0,
    }
    tmp = directory / f".{INFO_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    _replace_atomically(tmp, directory / INFO_FILE)
    log.info("wrote %s cache: %d rows in %d shard(s), %.1f bytes/sample", format, num_rows,
             len(shards), info["bytes_per_sample"])
    return info
