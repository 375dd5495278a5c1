"""dvc.yaml agrees with the stage specs and the schema; `dvc repro` works in a fresh git repo."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, dvc_project, tiny_params
from schemas.params import parse_params, schema_keys
from schemas.stages import STAGES
from tasks.common import stage_code
from tasks.dvcgen import dvc_yaml

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_committed_dvc_yaml_is_the_generated_one() -> None:
    assert (REPO / "dvc.yaml").read_text() == dvc_yaml("classify"), "dvc.yaml is stale: run `kdflow dvc-yaml -o dvc.yaml`"


def test_every_params_key_in_dvc_yaml_exists_in_the_schema() -> None:
    keys = schema_keys()
    for name, stage in DVC.items():
        for key in stage["params"]:
            assert key in keys, f"dvc.yaml stage {name!r} names unknown params key {key!r}"


def test_dvc_deps_cover_each_stages_import_closure() -> None:
    assert list(DVC) == list(STAGES)
    for name, spec in STAGES.items():
        stage = DVC[name]
        assert stage["cmd"] == f"kdflow stage {name}"
        deps = stage["deps"]
        for track in ("classify", "graph"):
            for f in stage_code(name, track):  # every file the stage runs is a dep (or inside one)
                assert any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps), (name, f)
        assert {f"artifacts/${{name}}/{u}" for u in spec.upstream} <= set(deps), name
        for dep in deps:
            if not dep.startswith("artifacts/"):
                assert (REPO / dep).exists(), f"{name}: dep {dep} does not exist"


def test_teachers_code_includes_the_loss_it_trains_with() -> None:
    # the drift the hand-written lists had: teachers trains with the CE loss but did not list it
    assert "kdflow/losses/ce.py" in stage_code("teachers", "classify")
    assert "tasks/select.py" not in stage_code("condense", "classify")  # no task imports another


def _sh(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.integration
@pytest.mark.slow
def test_dvc_repro_builds_everything_then_nothing_then_an_experiment(tmp_path: Path) -> None:
    # DVC reads the params keys from the file itself, so give it every key (defaults resolved)
    _, env = dvc_project(tmp_path, parse_params(tiny_params()).model_dump(mode="json"))
    dvc = [sys.executable, "-m", "dvc"]

    first = _sh([*dvc, "repro"], tmp_path, env).stdout
    for name in STAGES:
        assert f"Running stage '{name}'" in first
    assert (tmp_path / "artifacts/tiny/evaluate/metrics.json").exists()
    assert (tmp_path / "dvc.lock").exists()

    second = _sh([*dvc, "repro"], tmp_path, env).stdout
    assert "Running stage" not in second and "up to date" in second

    _sh(["git", "add", "-A"], tmp_path, env)
    _sh(["git", "commit", "-qm", "lock"], tmp_path, env)
    exp = _sh([*dvc, "exp", "run", "-S", "student.loss.temperature=2"], tmp_path, env).stdout
    ran = {name for name in STAGES if f"Running stage '{name}'" in exp}
    assert ran == {"student", "evaluate"}, exp
    shown = _sh([*dvc, "exp", "show", "--no-pager", "--csv"], tmp_path, env).stdout
    assert "student.loss.temperature" in shown
