"""logits: run the chosen teacher once over the condensed training set and cache its outputs.

The cache is built in ``artifacts/<pipeline>/.work/logits/<key>/`` (``ctx.work``), keyed by the
cache key (teacher files + dataset files + input transform + format), then hard-linked into the
stage output. A killed run resumes from the shards it already wrote; a corrupted or missing
shard is recomputed alone. Only the current key's build is kept under ``ctx.work``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from kdflow.cache import CacheReader, build_cache, cache_key, fidelity, link_cache, size_metrics
from kdflow.data.dataset import load_dataset
from kdflow.models.io import load_model
from kdflow.train.device import resolve_device
from kdflow.train.loop import predict
from schemas.manifest import Manifest
from schemas.params import LogitsParams
from tasks.common import STAGES, StageContext, code_hash
from tasks.select import chosen_teacher

FIDELITY_ROWS = 512
TRANSFORM: dict = {"features": "as stored"}  # no input transform before the teacher (yet)


def _files_digest(ctx: StageContext, stage: str, prefix: str = "") -> dict[str, str]:
    """sha256 of an upstream stage's output files (those under ``prefix``), by path."""
    return {f.path: f.sha256 for f in ctx.upstream[stage].files if f.path.startswith(prefix)}


def _key(ctx: StageContext, teacher: str, spec: dict) -> str:
    """Teacher files + dataset files + input transform + format, and the code that turns them
    into logits and shards (so no edit to it can reuse shards written by older code)."""
    return cache_key(
        teacher=str(sorted(_files_digest(ctx, "teachers", f"{teacher}/").items())),
        data=str(sorted(_files_digest(ctx, "condense").items())),
        transform=TRANSFORM,
        spec={**spec, "code": code_hash(STAGES["logits"].code)},
    )


def _clear_other_caches(work: Path, keep: Path) -> None:
    for other in work.iterdir():
        if other != keep and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)


def run(params: LogitsParams, ctx: StageContext) -> Manifest:
    ds = load_dataset(ctx.input("condense"))
    name = chosen_teacher(ctx)
    teacher = load_model(ctx.input("teachers") / name)
    device = resolve_device("auto")
    spec = {"num_rows": len(ds), "num_classes": ds.num_classes, "format": params.format,
            "k": min(params.k, ds.num_classes), "dtype": params.dtype,
            "capture_temperature": params.temperature, "shard_rows": params.shard_rows}
    key = _key(ctx, name, {k: v for k, v in spec.items() if k != "shard_rows"})
    work = ctx.work / key[:16]
    _clear_other_caches(ctx.work, keep=work)

    def compute(start: int, stop: int) -> torch.Tensor:
        logits = predict(teacher, ds.features[start:stop], batch_size=params.batch_size, device=device)
        ctx.report("teacher logits", stop, len(ds))
        return logits

    info, computed = build_cache(work, compute, batch_size=params.batch_size, key=key, **spec)
    link_cache(work, ctx.out, info)
    reader = CacheReader(ctx.out, info)
    reader.verify()
    gen = torch.Generator().manual_seed(ctx.seed)
    sample = torch.randperm(len(ds), generator=gen)[:FIDELITY_ROWS].sort().values
    full = predict(teacher, ds.features[sample], device=device)
    fid = fidelity(full, reader.get(sample), capture_temperature=params.temperature)
    fid["fidelity_rows"] = fid.pop("rows")
    metrics = {**fid, **size_metrics(info), "shards_computed": len(computed)}
    return ctx.manifest(metrics=metrics, info={"cache": info, "teacher": name, "cache_key": key, "shards_computed": computed})
