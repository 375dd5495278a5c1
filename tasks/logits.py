"""logits: run the chosen teacher(s) once over the condensed training set and cache the outputs.

Each cache is built in ``artifacts/<pipeline>/.work/logits/<key>/`` (``ctx.work``), keyed by the
cache key (teacher files + dataset files + input transform + format), then hard-linked into the
stage output: the output folder itself for one teacher, ``<teacher>/`` per teacher when
``select`` chose several. A killed run resumes from the shards it already wrote; a corrupted or
missing shard is recomputed alone. Only the current keys' builds are kept under ``ctx.work``.

With ``views: K > 1`` every sample gets K seeded augmented views (``kdflow.data.augment``); the
cache holds ``N * K`` rows, sample-major, and ``views.safetensors`` records each view's seed, crop
box and flip so the student can replay them. With ``runner: dask`` the missing shards are tasks
of a Prefect flow on a ``DaskTaskRunner`` (``flows/shards.py``, injected as ``ctx.runners``); the
cache is byte-identical to the local run. The teacher's rows and shard jobs live in ``kdflow.cache.teacher_rows``.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from kdflow.cache import CacheReader, cache_key, fidelity, link_cache, size_metrics
from kdflow.cache.teacher_rows import ShardJob, TeacherRows
from kdflow.cache.views import write_views
from kdflow.cache.writer import CacheBuild, CacheSpec
from kdflow.errors import KdflowError
from schemas.manifest import Manifest
from schemas.outputs import Logits, TeacherCache
from schemas.params import LogitsParams
from tasks.common import StageContext, code_hash, stage_code

log = logging.getLogger(__name__)

TRANSFORM: dict = {"features": "as stored"}  # the input transform of a cache without views


def _files_digest(ctx: StageContext, stage: str, prefix: str = "") -> dict[str, str]:
    """sha256 of an upstream stage's output files (those under ``prefix``), by path."""
    return {f.path: f.sha256 for f in ctx.upstream[stage].files if f.path.startswith(prefix)}


def _key(ctx: StageContext, teacher: str, transform: dict, spec: dict) -> str:
    """Teacher files + dataset files + input transform + format, and the code that turns them
    into logits and shards (so no edit to it can reuse shards written by older code)."""
    return cache_key(
        teacher=str(sorted(_files_digest(ctx, "teachers", f"{teacher}/").items())),
        data=str(sorted(_files_digest(ctx, "condense").items())),
        transform=transform,
        spec=spec,
    )


def _clear_other_caches(work: Path, keep: set[Path]) -> None:
    for other in work.iterdir():
        if other not in keep and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)


def run(params: LogitsParams, ctx: StageContext) -> Manifest:
    ds = ctx.track.load(ctx.input("condense"))
    if params.format != "dense" and params.k > ctx.track.output_dim(ds):
        log.warning("logits.k %d is above the %d classes of the teacher's output: the top-k cache keeps all %d "
                    "(set logits.k to at most %d, or use logits.format dense)", params.k, ctx.track.output_dim(ds),
                    ctx.track.output_dim(ds), ctx.track.output_dim(ds))
    teachers = ctx.output("select").chosen()
    k_views = params.views
    spec_args = {"num_rows": len(ds) * k_views, "num_classes": ctx.track.output_dim(ds),
                 "format": params.format, "k": min(params.k, ctx.track.output_dim(ds)),
                 "dtype": params.dtype, "capture_temperature": params.temperature,
                 "shard_rows": params.shard_rows}
    layout = ctx.track.cache_layout(ds)  # per-token rows for sequences
    spec = CacheSpec(**spec_args, seq_len=layout.get("seq_len"))
    views, transform = None, TRANSFORM
    if k_views > 1:
        augment = params.augment.model_dump()
        views = ctx.track.views(ds, k_views, ctx.seed, augment)
        transform = {"features": "views", "views": k_views, "augment": augment, "seed": ctx.seed}

    # the code that turns teachers into shards, hashed once (read from disk) for every teacher's key
    key_spec = {**{k: v for k, v in spec_args.items() if k != "shard_rows"},
                "code": code_hash(stage_code("logits", ctx.pipeline.track))}
    builds: list[tuple[CacheBuild, TeacherRows]] = []
    for name, _ in teachers:
        key = _key(ctx, name, transform, {**key_spec, **layout})
        work = ctx.work / key[:16]
        extra = {} if views is None else {"views": write_views(work, views, views=k_views, augment=transform["augment"])}
        rows = TeacherRows(ctx.input("teachers") / name, ctx.input("condense"), views, k_views,
                           params.batch_size, params.workers, track=ctx.pipeline.track, device=str(ctx.device),
                           tokens_per_row=layout.get("tokens_per_row"),
                           model=ctx.track.load_model(ctx.input("teachers") / name), features=ds.features)
        builds.append((CacheBuild(work, spec, key, extra), rows))
    _clear_other_caches(ctx.work, keep={b.directory for b, _ in builds})

    if params.runner != "local" and any(b.todo for b, _ in builds):
        if params.runner not in ctx.runners:
            raise KdflowError(f"logits.runner: {params.runner!r} is not available here (available: local"
                              f"{''.join(', ' + r for r in ctx.runners)})")
        ctx.runners[params.runner](builds, address=params.dask_address, workers=params.dask_workers,
                                   processes=params.dask_processes, report=ctx.report)
    else:
        for build, rows in builds:
            for number, start, stop in build.todo:
                build.record(number, ShardJob(build.directory, spec, number, start, stop, rows)())
                ctx.report("teacher logits", stop, spec.num_rows)

    gen = torch.Generator().manual_seed(ctx.seed)
    sample = torch.randperm(spec.num_rows, generator=gen)[:ctx.track.fidelity_rows].sort().values
    caches, metrics = [], {}
    for (name, weight), (build, rows) in zip(teachers, builds):
        info = build.finish()
        subdir = "" if len(teachers) == 1 else name
        link_cache(build.directory, ctx.out / subdir, info)
        reader = CacheReader(ctx.out / subdir, info)
        reader.verify()
        full = rows.logits(rows.inputs(sample))
        fid = fidelity(full, reader.get(sample), capture_temperature=params.temperature)
        fid["fidelity_rows"] = fid.pop("rows")
        m = {**fid, **size_metrics(info), "shards_computed": len(build.computed)}
        metrics.update(m if not caches else {f"{name}.{k}": v for k, v in m.items()})
        caches.append(TeacherCache(teacher=name, weight=weight, dir=subdir, cache=info,
                                   cache_key=build.header["key"], shards_computed=build.computed))
    return ctx.manifest(metrics=metrics, info=Logits(views=k_views, teachers=caches,
                                                     teacher_names=[c.teacher for c in caches]))
