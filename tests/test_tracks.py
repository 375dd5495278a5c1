"""Tracks: the stages call the track, a new track is one folder, code sets are import closures."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_params
from kdflow.tracks import discovered, get_track, infer_track
from schemas.params import parse_params
from schemas.stages import STAGES
from tasks import common
from tasks.common import fingerprint, import_closure, stage_code, stage_params

TOY = REPO / "tests" / "tracks" / "regress"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_builtin_tracks_are_found_and_inferred_from_the_source() -> None:
    assert {"classify", "graph"} <= set(discovered())
    assert infer_track("tu:MUTAG") == "graph"
    assert infer_track("sklearn:digits") == infer_track("idx:data") == "classify"
    assert parse_params(tiny_params()).track == "classify"
    assert get_track("graph").offers("condenser") == ["herding", "k_center", "mirage", "none", "random"]
    assert "rded" not in get_track("graph").offers("condenser") and "mirage" not in get_track("classify").offers("condenser")
    assert "gin" in get_track("graph").architectures() and "gin" not in get_track("classify").architectures()


def test_no_stage_branches_on_modality_and_no_task_imports_another() -> None:
    for stage in STAGES:
        path = REPO / "tasks" / f"{stage}.py"
        text = path.read_text()
        for word in ("modality", "GraphFeatures", "isinstance"):
            assert word not in text, f"tasks/{stage}.py mentions {word!r}: that belongs to a track"
        others = {f"tasks.{s}" for s in STAGES if s != stage}
        assert not _imports(path) & others, f"tasks/{stage}.py imports another task"


def test_library_imports_neither_tasks_nor_flows() -> None:
    for path in (REPO / "kdflow").rglob("*.py"):
        if path.name == "cli.py" and path.parent.name == "kdflow":
            continue  # the entry point wires library, stages and flow together
        bad = {m for m in _imports(path) if m.split(".")[0] in ("tasks", "flows", "prefect")}
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_import_closure_follows_lazy_relative_and_package_imports() -> None:
    files = import_closure("tasks.teachers")
    assert "tasks/common.py" in files and "kdflow/__init__.py" in files
    assert "kdflow/tracks/__init__.py" in files
    code = stage_code("teachers", "classify")
    assert "kdflow/losses/ce.py" in code  # the track trains teachers with CE
    assert "kdflow/tracks/classify/evaluation.py" in code
    assert "kdflow/tracks/graph/__init__.py" not in code  # another track's code is not this pipeline's


def _copy_project(dest: Path) -> Path:
    for item in ("kdflow", "tasks", "schemas", "flows"):
        shutil.copytree(REPO / item, dest / item, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_editing_a_file_a_stage_imports_changes_its_fingerprint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _copy_project(tmp_path)
    monkeypatch.setattr(common, "code_root", lambda: root)
    common.import_closure.cache_clear()
    pp = parse_params(tiny_params())
    ups = {"prepare": "p" * 64}
    before = fingerprint("teachers", pp, ups)
    selected = fingerprint("select", pp, {"prepare": "p" * 64, "teachers": "t" * 64})
    loss_file = root / "kdflow" / "losses" / "ce.py"
    loss_file.write_text(loss_file.read_text() + "\n# an edit\n")
    assert fingerprint("teachers", pp, ups) != before  # teachers trains with CE: it reruns
    assert fingerprint("select", pp, {"prepare": "p" * 64, "teachers": "t" * 64}) != selected
    common.import_closure.cache_clear()


def test_a_stage_fingerprint_covers_only_the_knobs_it_reads() -> None:
    base = parse_params(tiny_params(condense={"method": "random", "ipc": 5}))
    assert stage_params("condense", base)["condense"] == {"method": "random", "ipc": 5}
    ups = {"prepare": "p" * 64, "select": "s" * 64, "teachers": "t" * 64}
    other_knobs = [
        tiny_params(condense={"method": "random", "ipc": 5}, logits={"format": "dense", "k": 9}),
        tiny_params(condense={"method": "random", "ipc": 5}, student={"loss": {"name": "kd", "temperature": 2.0}}),
        tiny_params(condense={"method": "random", "ipc": 5}, runtime={"threads": 1, "device": "cpu"}),
    ]
    for raw in other_knobs:
        assert fingerprint("condense", parse_params(raw), ups) == fingerprint("condense", base, ups)
    changed = parse_params(tiny_params(condense={"method": "random", "ipc": 6}))
    assert fingerprint("condense", changed, ups) != fingerprint("condense", base, ups)


def _toy_params(root: Path, **student: object) -> Path:
    fast = {"epochs": 25, "lr": 0.01, "batch_size": 64, "patience": None}
    raw = {
        "name": "toy", "track": "regress", "seed": 0,
        "data": {"source": "sine:600"},
        "teachers": [{"name": "wide", "arch": "regress_mlp", "args": {"hidden": 64}, "train": fast},
                     {"name": "narrow", "arch": "regress_mlp", "args": {"hidden": 16}, "train": fast}],
        "select": {"strategy": "val_rmse"},
        "condense": {"method": "none"},
        "logits": {"format": "dense"},
        "student": {"arch": "regress_mlp", "args": {"hidden": 8}, "loss": {"name": "mse_kd", "alpha": 0.8},
                    "train": fast, **student},
        "evaluate": {"latency_repeats": 2},
        "tracking": {"enabled": True, "uri": f"sqlite:///{root / 'mlflow.db'}"},
        "runtime": {"threads": 1, "device": "cpu"},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _kdflow(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "kdflow.cli", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.integration
def test_a_toy_track_in_one_folder_runs_through_kdflow_run(tmp_path: Path) -> None:
    root = _copy_project(tmp_path)
    shutil.copytree(TOY, root / "kdflow" / "tracks" / "regress", ignore=shutil.ignore_patterns("__pycache__"))
    _toy_params(root)

    listed = _kdflow(root, "list")
    assert listed.returncode == 0 and "regress: toy regression" in listed.stdout, listed.stderr[-2000:]
    bad = _kdflow(root, "validate", "-s", "student.arch=mlp")
    assert bad.returncode == 2 and "student.arch: unknown architecture 'mlp' for track 'regress'" in bad.stderr, bad.stderr
    bad = _kdflow(root, "validate", "-s", "student.loss={name: kd}")
    assert bad.returncode == 2 and "student.loss.name: 'kd' is not offered by track 'regress'" in bad.stderr, bad.stderr

    run = _kdflow(root, "run")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "RMSE" in run.stdout and "Traceback" not in run.stderr
    metrics = json.loads((root / "artifacts/toy/evaluate/metrics.json").read_text())
    spread = 0.75  # std of y = sin(x0) + x1^2/2 over U(-2, 2): the error of predicting the mean
    assert metrics["teacher"]["rmse"] < 0.5 * spread and metrics["student"]["rmse"] < spread
    assert metrics["student"]["params"] < metrics["teacher"]["params"]
    chosen = json.loads((root / "artifacts/toy/select/chosen.json").read_text())
    assert chosen["strategy"] == "val_rmse" and chosen["teachers"][0] in ("wide", "narrow")
    prepared = json.loads((root / "artifacts/toy/prepare/manifest.json").read_text())
    assert prepared["info"]["track"] == "regress" and (root / "artifacts/toy/prepare/table.parquet").is_file()

    again = _kdflow(root, "run")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("Cached") == len(STAGES), again.stdout
    report = _kdflow(root, "report")
    assert report.returncode == 0 and "RMSE" in (root / "artifacts/toy/report.html").read_text()
