"""The report carries its context: pipeline file, overrides, git commit, MLflow and Prefect run ids, params."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from kdflow.report import RUN_FILE, build_report, git_state, write_run_context
from schemas.manifest import Manifest


def _run(root: Path) -> Path:
    art = root / "artifacts" / "ctx"
    for stage, ups in {"prepare": {}, "evaluate": {"prepare": "prepare-fp"}}.items():
        (art / stage).mkdir(parents=True)
        Manifest(stage=stage, pipeline="ctx", fingerprint=f"{stage}-fp", upstream=ups, params={"seed": 0, stage: {"k": 1}},
                 mlflow_run_id=f"run-{stage}", kdflow_version="0", started_at="2024-01-01T00:00:00",
                 finished_at="2024-01-01T00:00:01", seconds=1.0).save(art / stage)
    model = {"accuracy": 0.9, "macro_f1": 0.9, "ece": 0.05, "params": 1000, "bytes": 4000, "latency_ms_b1": 0.2,
             "latency_ms_b256": 2.0}
    (art / "evaluate/metrics.json").write_text(json.dumps({
        "teacher": {"name": "t", **model}, "student": model, "agreement": 0.95, "kl_teacher_student": 0.1,
        "accuracy_gap": 0.0, "n_test": 10,
        "compression": {"params_ratio": 1.0, "bytes_ratio": 1.0, "latency_ratio_b1": 1.0, "latency_ratio_b256": 1.0}}))
    return art


def test_report_shows_the_flow_runs_context(tmp_path: Path) -> None:
    art = _run(tmp_path)
    write_run_context(art, {"params_file": "configs/x.yaml", "overrides": ["student.loss.temperature=2"],
                            "git": {"commit": "abc123", "dirty": True}, "prefect_flow_run_id": "flow-42",
                            "mlflow_run": "parent-7", "finished_at": "2024-01-02T00:00:00",
                            "fingerprints": {"prepare": "prepare-fp", "evaluate": "evaluate-fp"}})
    html = build_report(art, tmp_path / "r.html").read_text()
    for text in ("configs/x.yaml", "student.loss.temperature=2", "abc123 (with uncommitted changes)", "flow-42",
                 "parent-7", "run-evaluate", "&quot;k&quot;: 1"):
        assert text in html, text


def test_a_stale_flow_context_is_not_shown(tmp_path: Path) -> None:
    art = _run(tmp_path)
    write_run_context(art, {"overrides": ["seed=3"], "prefect_flow_run_id": "old-flow",
                            "fingerprints": {"evaluate": "an-older-evaluate"}})
    html = build_report(art, tmp_path / "r.html").read_text()
    assert "old-flow" not in html and "seed=3" not in html
    assert "stages run one by one" in html and "not a git work tree" in html  # tmp_path is no git repo
    assert (art / RUN_FILE).is_file()


def test_git_state_sees_uncommitted_changes(tmp_path: Path) -> None:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": __import__("os").environ["PATH"], "HOME": str(tmp_path)}
    (tmp_path / "f").write_text("a")
    for cmd in (["git", "init", "-q"], ["git", "add", "f"], ["git", "commit", "-qm", "x"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "f").write_text("b")
    assert git_state(tmp_path) == {"commit": head, "dirty": True}
    assert git_state(tmp_path / "nope") == {}
