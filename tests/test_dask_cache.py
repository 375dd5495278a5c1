"""logits.runner dask: shards as tasks of a Prefect flow on a DaskTaskRunner, byte-identical cache."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import tiny_params
from flows.distill import RUNNERS  # the Dask fan-out is injected by flows/, as the CLI and the flow do
from schemas.params import parse_params
from tasks.common import STAGE_ORDER, execute_stage

pytestmark = pytest.mark.slow


def _files(m) -> dict[str, str]:
    return {f.path: f.sha256 for f in m.files}


def test_dask_fan_out_writes_the_same_bytes_as_the_local_run(tmp_path: Path, prefect_harness) -> None:
    from distributed import LocalCluster
    from prefect import flow, task

    raw = tiny_params(logits={"format": "topk_q8", "k": 4, "shard_rows": 300, "views": 2},
                      student={"loss": {"name": "topk_kd"}})
    pp = parse_params(raw)
    for stage in STAGE_ORDER[: STAGE_ORDER.index("condense") + 1]:
        execute_stage(stage, pp, tmp_path)
    local, _ = execute_stage("logits", pp, tmp_path)
    shards = [s["file"] for s in local.info["teachers"][0]["cache"]["shards"]]
    assert len(shards) > 2
    work = tmp_path / "artifacts/tiny/.work/logits"

    # as `kdflow stage logits` runs it (no Prefect context): a local cluster of 2 thread workers
    shutil.rmtree(work)
    dask_pp = parse_params({**raw, "logits": {**raw["logits"], "runner": "dask", "dask_workers": 2,
                                             "dask_processes": False}})
    with pytest.raises(Exception, match="logits.runner: 'dask' is not available here"):
        execute_stage("logits", dask_pp, tmp_path, force=True)  # no engine injected: a clear error
    plain, _ = execute_stage("logits", dask_pp, tmp_path, force=True, runners=RUNNERS)
    assert plain.info["teachers"][0]["shards_computed"] == shards
    assert _files(plain) == _files(local)

    # inside a Prefect task (as flows/distill.py runs it), on an existing scheduler
    shutil.rmtree(work)
    cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0")
    try:
        remote_pp = parse_params({**raw, "logits": {**raw["logits"], "runner": "dask",
                                                    "dask_address": cluster.scheduler_address}})

        @task(persist_result=False)
        def stage_task() -> object:
            return execute_stage("logits", remote_pp, tmp_path, force=True, runners=RUNNERS)[0]

        @flow(persist_result=False)
        def outer() -> object:
            return stage_task()

        nested = outer()
    finally:
        cluster.close()
    assert nested.info["teachers"][0]["shards_computed"] == shards
    assert _files(nested) == _files(local)
