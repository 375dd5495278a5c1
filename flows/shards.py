"""Fan-out for the logits stage (injected by the flow and the CLI as ``ctx.runners["dask"]``): missing logit-cache shards as tasks of a Prefect flow on a ``DaskTaskRunner``.

Each task computes and writes one shard (``kdflow.cache.teacher_rows.ShardJob``); the parent
records each shard as it lands, so the cache is byte-identical to a local run. Prefect is
imported on call only: a local run of the logits stage never loads it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from kdflow.cache.teacher_rows import ShardJob, TeacherRows, compute_shard
from kdflow.cache.writer import CacheBuild


def run_shards_on_dask(builds: list[tuple[CacheBuild, TeacherRows]], *, address: str | None,
                       workers: int, processes: bool,
                       report: Callable[[str, int, int | None], None] | None = None) -> None:
    """Compute every missing shard of ``builds`` as a task of a Prefect flow on a
    ``DaskTaskRunner`` (the scheduler at ``address``, else a local cluster of ``workers``
    single-threaded workers, processes or threads), recording each as it lands.

    Args:
        builds: cache builds with the teacher rows that fill them.
        address: an existing Dask scheduler, or None for a local cluster.
        workers: local cluster workers (ignored with ``address``).
        processes: local cluster workers are processes (else threads).
        report: called as ``report(label, shards_done, shards_total)`` after each shard.
    """
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.futures import as_completed
    from prefect_dask import DaskTaskRunner

    if address:
        runner = DaskTaskRunner(address=address)
    else:
        runner = DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
            "n_workers": workers, "threads_per_worker": 1,
            "processes": processes, "dashboard_address": ":0"})
    shard = task(compute_shard, name="logits-shard", cache_policy=NO_CACHE, persist_result=False)

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
            if report is not None:
                report("teacher logit shards", sum(len(b.computed) for b, _ in builds), len(jobs))

    shards()
