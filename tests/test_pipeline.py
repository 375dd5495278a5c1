"""End to end on digits with tiny budgets: the Prefect flow, caching, atomic outputs, resume."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_params, write_params
from schemas.manifest import Manifest
from schemas.params import parse_params
from tasks.common import STAGE_ORDER, execute_stage, sha256_file

pytestmark = pytest.mark.slow


def _states(result: dict) -> dict[str, str]:
    return {s: v["state"] for s, v in result["stages"].items()}


def _run_stages(root: Path, raw: dict, until: str = "evaluate") -> None:
    pp = parse_params(raw)
    for stage in STAGE_ORDER[: STAGE_ORDER.index(until) + 1]:
        execute_stage(stage, pp, root)


def test_flow_runs_caches_and_reruns_only_what_changed(tmp_path: Path, prefect_harness) -> None:
    from flows.distill import distill
    from mlflow.tracking import MlflowClient

    raw = tiny_params(tracking={"enabled": True, "experiment": "e2e"})
    write_params(tmp_path, raw)
    first = distill(params_file="params.yaml", root=str(tmp_path))
    assert set(_states(first).values()) == {"Completed"}
    metrics = json.loads((tmp_path / "artifacts/tiny/evaluate/metrics.json").read_text())
    for who in ("teacher", "student"):
        assert {"accuracy", "params", "bytes", "latency_ms_b1", "latency_ms_b256"} <= set(metrics[who])
    assert {"agreement", "kl_teacher_student", "ece_student"} <= set(metrics)
    assert {"params_ratio", "latency_ratio_b1"} <= set(metrics["compression"])
    assert (tmp_path / "artifacts/tiny/evaluate/figures/confusion_student.png").stat().st_size > 0
    built = {s: Manifest.load(tmp_path / "artifacts/tiny" / s) for s in ("student", "evaluate")}

    assert set(_states(distill(params_file="params.yaml", root=str(tmp_path))).values()) == {"Cached"}

    changed = _states(distill(params_file="params.yaml", overrides=["student.loss.temperature=2"], root=str(tmp_path)))
    assert {s for s, v in changed.items() if v != "Cached"} == {"student", "evaluate"}

    # a deleted output folder is rebuilt, not handed downstream as a stale manifest
    import shutil

    shutil.rmtree(tmp_path / "artifacts/tiny/select")
    (tmp_path / "artifacts/tiny/student/model.safetensors").write_bytes(b"tampered")
    again = _states(distill(params_file="params.yaml", overrides=["student.loss.temperature=2"], root=str(tmp_path)))
    assert {s for s, v in again.items() if v != "Cached"} == {"select", "student"}
    assert (tmp_path / "artifacts/tiny/select/chosen.json").exists()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("kdflow.kind") == "pipeline"]
    stages = [r for r in runs if r.data.tags.get("kdflow.kind") == "stage"]
    assert len(parents) == 4
    assert len(stages) == 7 + 0 + 2 + 2  # executed stages only: cached stages get no run
    last = max(parents, key=lambda r: r.info.start_time)
    assert last.data.tags["kdflow.stage.prepare.cached"] == "true"
    assert last.data.tags["kdflow.stage.student.cached"] == "false"
    assert "student_accuracy" in last.data.metrics

    # back to the first setting: its outputs were kept (tasks/kept.py), so nothing computes, no stage
    # run or model version is added, and the new parent run links the runs that built them
    versions = len(client.search_model_versions("name = 'tiny-student'"))
    back = _states(distill(params_file="params.yaml", root=str(tmp_path)))
    assert back == {**{s: "Cached" for s in STAGE_ORDER[:5]}, "student": "Restored", "evaluate": "Restored"}
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert len([r for r in runs if r.data.tags.get("kdflow.kind") == "stage"]) == len(stages)
    assert len(client.search_model_versions("name = 'tiny-student'")) == versions
    last = max((r for r in runs if r.data.tags.get("kdflow.kind") == "pipeline"), key=lambda r: r.info.start_time)
    for stage, manifest in built.items():
        assert Manifest.load(tmp_path / "artifacts/tiny" / stage).mlflow_run_id == manifest.mlflow_run_id
        assert last.data.tags[f"kdflow.stage.{stage}.run_id"] == manifest.mlflow_run_id


def test_stage_path_and_flow_path_give_identical_artifacts(tmp_path: Path, prefect_harness) -> None:
    from flows.distill import distill

    raw = tiny_params()
    _run_stages(tmp_path / "a", raw)
    write_params(tmp_path / "b", raw)
    distill(params_file="params.yaml", root=str(tmp_path / "b"))
    for stage in STAGE_ORDER:
        a, b = Manifest.load(tmp_path / "a/artifacts/tiny" / stage), Manifest.load(tmp_path / "b/artifacts/tiny" / stage)
        assert a.fingerprint == b.fingerprint
        files_a = {f.path: f.sha256 for f in a.files if f.path != "metrics.json"}  # metrics.json holds timings
        files_b = {f.path: f.sha256 for f in b.files if f.path != "metrics.json"}
        assert files_a == files_b, stage


def test_flow_reuses_stages_the_stage_path_made_and_reports_them_cached(tmp_path: Path, prefect_harness) -> None:
    """`kdflow stage` (what `dvc repro` runs) made the first stages: the flow runs none of them again,
    reports them Cached (no Prefect record of them exists) and the parent run says so."""
    from mlflow.tracking import MlflowClient

    from flows.distill import distill

    raw = tiny_params(tracking={"enabled": True, "experiment": "shared"})
    write_params(tmp_path, raw)
    _run_stages(tmp_path, raw, until="logits")
    before = {s: Manifest.load(tmp_path / "artifacts/tiny" / s) for s in STAGE_ORDER[:5]}
    states = _states(distill(params_file="params.yaml", root=str(tmp_path)))
    assert states == {**{s: "Cached" for s in before}, "student": "Completed", "evaluate": "Completed"}
    for stage, manifest in before.items():
        assert Manifest.load(tmp_path / "artifacts/tiny" / stage).finished_at == manifest.finished_at
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = next(r for r in client.search_runs([client.get_experiment_by_name("shared").experiment_id])
                  if r.data.tags.get("kdflow.kind") == "pipeline")
    assert {s: parent.data.tags[f"kdflow.stage.{s}.cached"] for s in STAGE_ORDER} == \
        {s: "true" if s in before else "false" for s in STAGE_ORDER}


class Killed(Exception):
    pass


def _kill_at(epoch: int):
    def progress(label: str, done: int, total: int | None, info: dict) -> None:
        if label == "student" and done >= epoch:
            raise Killed(f"killed after epoch {epoch}")

    return progress


def test_failed_stage_leaves_previous_output_untouched(tmp_path: Path) -> None:
    raw = tiny_params(student={"train": {"epochs": 4, "lr": 0.01, "batch_size": 128, "patience": None}})
    _run_stages(tmp_path, raw, until="logits")
    pp = parse_params(raw)
    out = tmp_path / "artifacts/tiny/student"
    with pytest.raises(Killed):
        execute_stage("student", pp, tmp_path, progress=_kill_at(2))
    assert not out.exists()
    assert not list(out.parent.glob(".tmp-*"))
    good, executed = execute_stage("student", pp, tmp_path)
    assert executed
    before = {p.name: sha256_file(p) for p in out.iterdir()}
    with pytest.raises(Killed):
        execute_stage("student", pp, tmp_path, force=True, progress=_kill_at(1))
    assert {p.name: sha256_file(p) for p in out.iterdir()} == before
    assert Manifest.load(out).fingerprint == good.fingerprint


def test_resumed_student_is_bit_identical_to_an_uninterrupted_one(tmp_path: Path) -> None:
    raw = tiny_params(student={"train": {"epochs": 5, "lr": 0.01, "batch_size": 128, "patience": None}})
    pp = parse_params(raw)
    for root in (tmp_path / "a", tmp_path / "b"):
        _run_stages(root, raw, until="logits")
    whole, _ = execute_stage("student", pp, tmp_path / "a")
    with pytest.raises(Killed):
        execute_stage("student", pp, tmp_path / "b", progress=_kill_at(3))
    resumed, _ = execute_stage("student", pp, tmp_path / "b", resume=True)
    assert resumed.info["resumed_from"] == 3 and whole.info["resumed_from"] is None
    a, b = (r / "artifacts/tiny/student/model.safetensors" for r in (tmp_path / "a", tmp_path / "b"))
    assert sha256_file(a) == sha256_file(b)


def test_killed_student_process_resumes_from_checkpoint(tmp_path: Path) -> None:
    """A real SIGKILL of `kdflow stage student` right after its first checkpoint, then `--resume`."""
    # enough epochs left after the first checkpoint (~0.2 s each at one thread) for the kill to land first
    train = {"epochs": 15, "lr": 0.003, "batch_size": 16, "patience": None}
    raw = tiny_params(student={"arch": "mlp", "args": {"hidden": [256, 256]}, "train": train})
    write_params(tmp_path, raw)
    _run_stages(tmp_path, raw, until="logits")
    ckpt = tmp_path / "artifacts/tiny/.work/student/checkpoint.pt"
    cmd = [sys.executable, "-m", "kdflow.cli", "stage", "student"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the stage finished before it could be killed"
    assert ckpt.exists(), proc.stderr.read().decode()
    assert not (tmp_path / "artifacts/tiny/student").exists()
    done = subprocess.run([*cmd, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    manifest = Manifest.load(tmp_path / "artifacts/tiny/student")
    assert manifest.info["resumed_from"] >= 1
    assert manifest.metrics["epochs_run"] == 15
    assert not ckpt.exists()
