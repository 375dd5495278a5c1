"""Tracking backends: a real `mlflow server` on loopback, and a server that is not there."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import free_port, stop_process_group, tiny_params, write_params
from tasks.common import STAGE_ORDER

pytestmark = pytest.mark.slow


def _get(url: str, payload: dict | None = None) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` (sqlite backend, proxied artifacts) on a free loopback port."""
    port, home = free_port(), tmp_path / "server"
    home.mkdir()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{home / 'm.db'}",
           "--serve-artifacts", "--artifacts-destination", str(home / "art")]
    log = (home / "server.log").open("wb")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(cmd, cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop_process_group(proc)
        log.close()


@pytest.mark.integration
def test_pipeline_against_a_tracking_server_reads_back_over_rest(tmp_path: Path, mlflow_server: str, prefect_harness,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from flows.distill import distill
    from kdflow.cli import app

    root = tmp_path / "project"
    write_params(root, tiny_params(tracking={"enabled": True, "uri": mlflow_server, "experiment": "served"}))
    result = distill(params_file="params.yaml", root=str(root))
    assert result["mlflow_run"].startswith(f"{mlflow_server}/#/experiments/")
    assert not (root / "mlflow.db").exists()  # everything went to the server

    api = f"{mlflow_server}/api/2.0/mlflow"
    exp = _get(f"{api}/experiments/get-by-name?experiment_name=served")["experiment"]
    runs = _get(f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [t for t in tags if t.get("kdflow.kind") == "pipeline"]
    stages = {t["kdflow.stage"]: r for t, r in zip(tags, runs) if t.get("kdflow.kind") == "stage"}
    assert len(parents) == 1 and sorted(stages) == sorted(STAGE_ORDER)
    student = stages["student"]
    inputs = {d["dataset"]["name"] for d in student["inputs"]["dataset_inputs"]}
    assert inputs == {"prepare", "condense", "logits", "teachers"}  # the student may start from the teacher

    alias = _get(f"{api}/registered-models/alias?name=tiny-student&alias=latest")["model_version"]
    assert alias["run_id"] == student["info"]["run_id"]
    version_tags = {t["key"]: t["value"] for t in alias["tags"]}
    assert version_tags["kdflow.teacher.run_id"] == stages["teachers"]["info"]["run_id"]
    assert version_tags["kdflow.data.fingerprint"] == {t["key"]: t["value"] for t in stages["prepare"]["data"]["tags"]}[
        "kdflow.fingerprint"]
    models = _get(f"{api}/logged-models/search", {"experiment_ids": [exp["experiment_id"]]})["models"]
    assert {m["info"]["name"] for m in models} == {"tiny-teacher-conv", "tiny-teacher-mlp", "tiny-student"}

    monkeypatch.chdir(root)
    shown = CliRunner().invoke(app, ["lineage", "tiny-student@latest"], env={"COLUMNS": "220"})
    assert shown.exit_code == 0, shown.output
    for stage, run in stages.items():
        assert run["info"]["run_id"] in shown.output, stage


def test_unreachable_required_server_stops_before_any_compute(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    write_params(tmp_path, tiny_params(tracking={"enabled": True, "uri": uri, "required": True}))
    done = subprocess.run([sys.executable, "-m", "kdflow.cli", "run"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stderr
    assert f"MLflow tracking server {uri} is unreachable" in done.stderr
    assert "tracking.required: false" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "artifacts").exists()
    kept = tmp_path / ".kdflow"  # only the project lock (kdflow/lock.py) may have been written
    assert not kept.exists() or {p.name for p in kept.iterdir()} <= {"lock"}


def test_unreachable_optional_server_runs_keeps_artifacts_and_says_so(tmp_path: Path, prefect_harness,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from flows.distill import distill
    from kdflow.cli import app

    uri = f"http://127.0.0.1:{free_port()}"
    write_params(tmp_path, tiny_params(tracking={"enabled": True, "uri": uri, "required": False}))
    result = distill(params_file="params.yaml", root=str(tmp_path))
    assert "unreachable" in result["tracking_unavailable"] and result["mlflow_run"] is None
    assert all(not s["cached"] for s in result["stages"].values())
    art = tmp_path / "artifacts/tiny"
    assert (art / "evaluate/metrics.json").is_file() and (art / "student/model.safetensors").is_file()
    assert (art / "select/figures/ranking.png").is_file()
    assert not (tmp_path / "mlflow.db").exists()

    # the CLI says it at the end (everything is cached now, so this is quick)
    monkeypatch.chdir(tmp_path)
    shown = CliRunner().invoke(app, ["run"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "lineage was not recorded" in shown.output and "unreachable" in shown.output
