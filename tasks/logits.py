"""logits: run the chosen teacher(s) once over the condensed training set and cache the outputs.

Each cache is built in ``artifacts/<pipeline>/.work/logits/<key>/`` (``ctx.work``), keyed by the
cache key (teacher files + dataset files + input transform + format), then hard-linked into the
stage output: the output folder itself for one teacher, ``<teacher>/`` per teacher when
``select`` chose several. A killed run resumes from the shards it already wrote; a corrupted or
missing shard is recomputed alone. Only the current keys' builds are kept under ``ctx.work``.

With ``views: K > 1`` every sample gets K seeded augmented views (``kdflow.data.augment``); the
cache holds ``N * K`` rows, sample-major, and ``views.safetensors`` records each view's seed, crop
box and flip so the student can replay them. With ``runner: dask`` the missing shards are tasks
of a Prefect flow on a ``DaskTaskRunner``; the cache is byte-identical to the local run.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset

from kdflow.cache import CacheReader, cache_key, fidelity, link_cache, size_metrics
from kdflow.cache.views import write_views
from kdflow.cache.writer import CacheBuild, CacheSpec, write_shard
from kdflow.data.augment import Augment, apply_views, draw_views
from kdflow.data.dataset import load_dataset
from kdflow.models.io import load_model
from kdflow.train.device import resolve_device
from kdflow.train.loop import predict
from schemas.manifest import Manifest
from schemas.params import LogitsParams
from tasks.common import STAGES, StageContext, code_hash
from tasks.select import chosen_teachers

FIDELITY_ROWS = 512
TRANSFORM: dict = {"features": "as stored"}  # the input transform of a cache without views


@dataclass
class TeacherRows:
    """The teacher's logits for cache rows: inputs (stored samples, or replayable views) and
    the forward pass. Pickles as paths (models and data are loaded where it runs, e.g. a Dask
    worker); ``loaded()`` gives a private copy with both in memory."""

    teacher_dir: Path
    data_dir: Path
    views: dict[str, torch.Tensor] | None
    num_views: int
    batch_size: int
    workers: int = 0
    model: torch.nn.Module | None = None
    features: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "model": None, "features": None}

    def loaded(self) -> TeacherRows:
        return replace(self, model=load_model(self.teacher_dir),
                       features=load_dataset(self.data_dir).features)

    def inputs(self, rows: torch.Tensor) -> torch.Tensor:
        """The teacher's inputs for cache ``rows``: the samples, or their augmented views."""
        return row_inputs(self.features, self.views, self.num_views, rows)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return predict(self.model, x, batch_size=self.batch_size, device=resolve_device("auto"))

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
            yield self.logits(x)


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
        spec={**spec, "code": code_hash(STAGES["logits"].code)},
    )


def _clear_other_caches(work: Path, keep: set[Path]) -> None:
    for other in work.iterdir():
        if other not in keep and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)


def _run_on_dask(builds: list[tuple[CacheBuild, TeacherRows]], params: LogitsParams,
                 ctx: StageContext) -> None:
    """Compute every missing shard as a task of a Prefect flow on a ``DaskTaskRunner`` (an
    existing scheduler at ``dask_address``, else a local cluster), recording each as it lands."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.futures import as_completed
    from prefect_dask import DaskTaskRunner

    if params.dask_address:
        runner = DaskTaskRunner(address=params.dask_address)
    else:
        runner = DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
            "n_workers": params.dask_workers, "threads_per_worker": 1,
            "processes": params.dask_processes, "dashboard_address": ":0"})
    shard = task(_compute_shard, name="logits-shard", cache_policy=NO_CACHE, persist_result=False)

    @flow(name="logits-shards", task_runner=runner, validate_parameters=False, persist_result=False)
    def shards() -> None:
        jobs = {}
        for which, (build, rows) in enumerate(builds):
            portable = replace(rows, model=None, features=None)
            for number, start, stop in build.todo:
                job = ShardJob(build.directory, build.spec, number, start, stop, portable)
                jobs[shard.with_options(task_run_name=f"{build.directory.name}-{number}").submit(job)] = (which, number)
        for future in as_completed(list(jobs)):
            which, number = jobs[future]
            builds[which][0].record(number, future.result())
            ctx.report("teacher logit shards", sum(len(b.computed) for b, _ in builds), len(jobs))

    shards()


def _compute_shard(job: ShardJob) -> dict:
    return job()


def run(params: LogitsParams, ctx: StageContext) -> Manifest:
    ds = load_dataset(ctx.input("condense"))
    teachers = chosen_teachers(ctx)
    k_views = params.views
    spec_args = {"num_rows": len(ds) * k_views, "num_classes": ds.num_classes,
                 "format": params.format, "k": min(params.k, ds.num_classes),
                 "dtype": params.dtype, "capture_temperature": params.temperature,
                 "shard_rows": params.shard_rows}
    spec = CacheSpec(**spec_args)
    views, transform = None, TRANSFORM
    if k_views > 1:
        aug = Augment(**params.augment.model_dump())
        shape = ds.input_shape if ds.modality in ("image", "sequence") else ()  # others: an error
        views = draw_views(shape, ds.modality, len(ds), k_views, ctx.seed, aug)
        transform = {"features": "views", "views": k_views, "augment": aug.as_dict(), "seed": ctx.seed}

    builds: list[tuple[CacheBuild, TeacherRows]] = []
    for name, _ in teachers:
        key = _key(ctx, name, transform, {k: v for k, v in spec_args.items() if k != "shard_rows"})
        work = ctx.work / key[:16]
        extra = {} if views is None else {"views": write_views(work, views, views=k_views, augment=transform["augment"])}
        rows = TeacherRows(ctx.input("teachers") / name, ctx.input("condense"), views, k_views,
                           params.batch_size, params.workers,
                           model=load_model(ctx.input("teachers") / name), features=ds.features)
        builds.append((CacheBuild(work, spec, key, extra), rows))
    _clear_other_caches(ctx.work, keep={b.directory for b, _ in builds})

    if params.runner == "dask" and any(b.todo for b, _ in builds):
        _run_on_dask(builds, params, ctx)
    else:
        for build, rows in builds:
            for number, start, stop in build.todo:
                build.record(number, ShardJob(build.directory, spec, number, start, stop, rows)())
                ctx.report("teacher logits", stop, spec.num_rows)

    gen = torch.Generator().manual_seed(ctx.seed)
    sample = torch.randperm(spec.num_rows, generator=gen)[:FIDELITY_ROWS].sort().values
    entries, metrics = [], {}
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
        metrics.update(m if not entries else {f"{name}.{k}": v for k, v in m.items()})
        entries.append({"teacher": name, "weight": weight, "dir": subdir, "cache": info,
                        "cache_key": build.header["key"], "shards_computed": build.computed})
    first = entries[0]
    info = {"cache": first["cache"], "teacher": first["teacher"], "cache_key": first["cache_key"],
            "shards_computed": first["shards_computed"], "views": k_views,
            "teachers": [{k: v for k, v in e.items() if k != "cache"} for e in entries]}
    return ctx.manifest(metrics=metrics, info=info)
