"""The README recipe, literally: a local Prefect server, `kdflow serve`, `prefect deployment run --watch`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, stop_process_group, tiny_params, write_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PREFECT = str(Path(sys.executable).parent / "prefect")


def wait_for(url: str, timeout: float) -> dict | list:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return json.loads(resp.read() or b"null")
        except OSError:
            if time.time() > deadline:
                raise TimeoutError(f"{url} did not answer in {timeout}s") from None
            time.sleep(1)


def start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def test_prefect_deployment_run_completes_the_pipeline(tmp_path: Path) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    project = tmp_path / "project"
    write_params(project, tiny_params())
    server = start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], tmp_path, env, tmp_path / "server.log")
    served = None
    try:
        wait_for(f"{api}/health", 120)
        served = start([sys.executable, "-m", "kdflow.cli", "serve"], project, env, tmp_path / "serve.log")
        deadline = time.time() + 120
        while True:
            try:
                wait_for(f"{api}/deployments/name/distill/default", 5)
                break
            except TimeoutError:
                assert served.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.time() < deadline, "deployment distill/default was not registered"
        run = subprocess.run(
            [PREFECT, "deployment", "run", "distill/default", "--param", "params_file=params.yaml", "--watch", "--watch-timeout", "500"],
            cwd=project, env=env, capture_output=True, text=True, timeout=600,
        )
        logs = run.stdout + run.stderr + (tmp_path / "serve.log").read_text()
        assert run.returncode == 0, logs
        assert "Completed" in run.stdout, logs
        metrics = json.loads((project / "artifacts/tiny/evaluate/metrics.json").read_text())
        assert 0 <= metrics["student"]["accuracy"] <= 1
        flow_runs = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"{api}/flow_runs/filter", data=b"{}", headers={"Content-Type": "application/json"}, method="POST"), timeout=10).read())
        assert [r["state_type"] for r in flow_runs] == ["COMPLETED"]
        artifacts = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"{api}/artifacts/filter", data=b"{}", headers={"Content-Type": "application/json"}, method="POST"), timeout=10).read())
        assert any(a["type"] == "markdown" and "teacher" in (a.get("data") or "") for a in artifacts)
    finally:
        if served is not None:
            stop_process_group(served)
        stop_process_group(server)
