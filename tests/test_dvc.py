"""dvc.yaml agrees with the stage specs and the schema; `dvc repro` works in a fresh git repo."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, dvc_project, tiny_params, write_params
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


def test_dvc_leaves_outputs_in_place_for_kdflow_to_recognise() -> None:
    # without persist, DVC deletes a stage's outputs before its command when dvc.lock does not
    # record them (the first `dvc repro` after `kdflow run`), so every stage retrained
    for name, stage in DVC.items():
        for kind in ("outs", "metrics", "plots"):
            for item in stage.get(kind, []):
                (path, props), = item.items()
                assert props.get("persist") is True, (name, kind, path)


@pytest.mark.slow
def test_dvc_repro_after_the_kdflow_path_only_records_the_lock(tmp_path: Path) -> None:
    """Outputs kdflow made (here in process, as `kdflow run` does) are current for `dvc repro`: the
    stage's command finds them up to date, nothing is retrained, no model version is registered."""
    from mlflow.tracking import MlflowClient

    from kdflow.lineage import open_tracker
    from tasks.common import execute_stage

    raw = parse_params(tiny_params(tracking={"enabled": True, "experiment": "dvc"})).model_dump(mode="json")
    root, env = dvc_project(tmp_path, raw)
    env = {**env, "PYTHONPATH": str(root)}
    pp = parse_params(raw)
    tracker = open_tracker(enabled=True, uri=None, experiment="dvc", required=True, root=root, pipeline="tiny")
    for stage in STAGES:
        execute_stage(stage, pp, root, tracker=tracker)
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    assert len(client.search_model_versions("name='tiny-student'")) == 1
    before = _manifests(root)
    out = _sh([sys.executable, "-m", "dvc", "repro", "-s", "student"], root, env).stdout
    assert "student: up to date" in out, out
    assert _manifests(root) == before  # not rebuilt
    assert len(client.search_model_versions("name='tiny-student'")) == 1  # no new version
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"student"}  # recorded, so the next `dvc repro -s student` does nothing


def _sh(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _manifests(root: Path) -> dict[str, str]:
    return {s: (root / f"artifacts/tiny/{s}/manifest.json").read_text() for s in STAGES}


@pytest.mark.integration
@pytest.mark.slow
def test_dvc_repro_experiments_compare_then_share_through_a_remote(tmp_path: Path) -> None:
    """repro, nothing to redo, an experiment compared with metrics/plots diff, push to a folder
    remote, a fresh clone pulls and finds everything up to date (DVC and kdflow), checkout restores."""
    import json
    import re

    # DVC reads the params keys from the file itself, so give it every key (defaults resolved)
    raw = parse_params(tiny_params(tracking={"enabled": True, "experiment": "dvc"})).model_dump(mode="json")
    (tmp_path / "a").mkdir()
    root, env = dvc_project(tmp_path / "a", raw)
    env = {**env, "PYTHONPATH": str(root)}  # `kdflow stage` runs the project's copy of the code (its identity)
    dvc = [sys.executable, "-m", "dvc"]

    first = _sh([*dvc, "repro"], root, env).stdout
    for name in STAGES:
        assert f"Running stage '{name}'" in first
    assert (root / "dvc.lock").exists()
    second = _sh([*dvc, "repro"], root, env).stdout
    assert "Running stage" not in second and "up to date" in second

    _sh(["git", "add", "-A"], root, env)
    _sh(["git", "commit", "-qm", "baseline"], root, env)
    tracked = _sh(["git", "ls-files", "artifacts"], root, env).stdout.split()
    assert "artifacts/tiny/evaluate/metrics.json" in tracked  # small metrics/plots: in git
    assert "artifacts/tiny/evaluate/plots/reliability_student.csv" in tracked
    assert not any("/student/" in f or f.endswith(".png") for f in tracked)  # models, pictures: DVC's
    baseline = _sh(["git", "rev-parse", "HEAD"], root, env).stdout.strip()
    old_student = json.loads((root / "artifacts/tiny/student/manifest.json").read_text())

    exp = _sh([*dvc, "exp", "run", "-n", "t2", "-S", "student.loss.temperature=2"], root, env).stdout
    ran = {name for name in STAGES if f"Running stage '{name}'" in exp}
    assert ran == {"student", "evaluate"}, exp

    rows = json.loads(_sh([*dvc, "exp", "show", "--json"], root, env).stdout)
    found = {}
    for row in rows:  # the baseline commit and its experiment, each with its own metrics
        for rev in [row, *(e for x in row.get("experiments") or [] for e in x.get("revs", []))]:
            data = rev.get("data") or {}
            m = (data.get("metrics") or {}).get("artifacts/tiny/evaluate/metrics.json", {}).get("data")
            t = (data.get("params") or {}).get("params.yaml", {}).get("data", {}).get("student", {}).get("loss", {})
            found[rev.get("name") or rev.get("rev")] = (t.get("temperature"), m and m["student"]["accuracy"])
    assert found.get("t2", (None, None))[0] == 2 and found["t2"][1] is not None, found
    assert any(v[0] == 4.0 and v[1] is not None for k, v in found.items() if k != "t2" and k != "workspace"), found

    # what a temperature change would rerun, and why (nothing runs)
    plan = json.loads(_sh([sys.executable, "-m", "kdflow.cli", "status", "--json", "-s", "student.loss.temperature=3"],
                          root, env).stdout)
    why = {s["stage"]: s["reasons"] for s in plan["stages"] if s["runs"]}
    assert why == {"student": ["params changed: student.loss.temperature"], "evaluate": ["upstream changed: student (will run)"]}
    lineage = _sh([sys.executable, "-m", "kdflow.cli", "lineage", "tiny-student@latest", "--json"], root, env).stdout
    assert [s["stage"] for s in json.loads(lineage)["steps"]][:2] == ["evaluate", "student"]
    piped = _sh([sys.executable, "-m", "kdflow.cli", "lineage", "tiny-student@latest"], root,
                {k: v for k, v in env.items() if k != "COLUMNS"}).stdout
    assert re.search(r"<- teachers +│ [0-9a-f]{32} +│ [0-9a-f]{16} +│", piped), piped  # columns not squeezed

    diff = json.loads(_sh([*dvc, "metrics", "diff", "--json", baseline, "t2"], root, env).stdout)
    acc = diff["artifacts/tiny/evaluate/metrics.json"]["student.accuracy"]
    assert acc["old"] is not None and acc["new"] is not None
    plots = _sh([*dvc, "plots", "diff", "--json", baseline, "t2"], root, env).stdout
    assert "reliability_student.csv" in plots and "t2" in plots and "confusion_student.png" in plots

    # keep the experiment as a commit, share everything through a folder remote
    _sh([*dvc, "exp", "apply", "t2"], root, env)
    _sh([*dvc, "remote", "add", "-d", "store", str(tmp_path / "remote")], root, env)
    _sh(["git", "add", "-A"], root, env)
    _sh(["git", "commit", "-qm", "temperature 2"], root, env)
    _sh([*dvc, "push"], root, env)

    clone = tmp_path / "b"
    _sh(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    env = {**env, "PYTHONPATH": str(clone)}
    _sh([*dvc, "pull"], clone, env)
    pulled = _manifests(clone)
    assert pulled == _manifests(root)
    up = _sh([*dvc, "repro"], clone, env).stdout
    assert "Running stage" not in up, up
    status = json.loads(_sh([sys.executable, "-m", "kdflow.cli", "status", "--json"], clone, env).stdout)
    assert not any(s["runs"] for s in status["stages"]), status
    run = _sh([sys.executable, "-m", "kdflow.cli", "run"], clone, env)
    assert _manifests(clone) == pulled, run.stdout  # nothing retrained: every output is the pulled one
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{clone / 'mlflow.db'}")
    assert client.search_model_versions("name='tiny-student'") == []  # no new model version

    # a flow run with an override: the report says which file, override, commit and run ids made it
    _sh([sys.executable, "-m", "kdflow.cli", "run", "-s", "student.loss.temperature=3"], clone, env)
    report = json.loads(_sh([sys.executable, "-m", "kdflow.cli", "report", "--json"], clone, env).stdout)["report"]
    html = Path(report).read_text()
    commit = _sh(["git", "rev-parse", "HEAD"], clone, env).stdout.strip()
    context = json.loads((clone / "artifacts/tiny/run.json").read_text())
    assert context["overrides"] == ["student.loss.temperature=3"] and context["params_file"] == "params.yaml"
    for text in ("student.loss.temperature=3", commit, context["prefect_flow_run_id"], context["mlflow_run"]):
        assert text and text in html, text

    # an older commit's artifacts come back with dvc checkout
    _sh(["git", "checkout", "-q", baseline], root, env)
    _sh([*dvc, "checkout"], root, env)
    restored = json.loads((root / "artifacts/tiny/student/manifest.json").read_text())
    assert restored["fingerprint"] == old_student["fingerprint"]
    from tasks.common import check_output

    assert check_output(root / "artifacts/tiny/student", old_student["fingerprint"]) is None


def test_dvc_exp_run_set_changes_only_the_values_it_sets(tmp_path: Path) -> None:
    # `dvc exp run -S` rewrites params.yaml through ruamel; the committed layout is its fixed point
    from dvc.utils.hydra import apply_overrides

    copy = tmp_path / "params.yaml"
    before = (REPO / "params.yaml").read_text()
    copy.write_text(before)
    apply_overrides(str(copy), ["student.loss.temperature=2", "teachers.1.train.lr=0.01"])
    after = copy.read_text()
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert len(before.splitlines()) == len(after.splitlines()), after
    assert [b.strip() for _, b in changed] == ["lr: 0.01", "loss: {name: kd, temperature: 2, alpha: 0.9}"], changed


def test_config_pipeline_reads_its_own_file_and_writes_its_own_outputs(tmp_path: Path) -> None:
    from tasks.dvcgen import config_dvc_yaml

    config = write_params(tmp_path / "configs", tiny_params(name="small", student={"arch": "tiny_mlp"}), "small.yaml")
    text = config_dvc_yaml(config, tmp_path / "pipelines/small/dvc.yaml", tmp_path)
    stages = yaml.safe_load(text)["stages"]
    assert list(stages) == list(STAGES)
    for name, stage in stages.items():
        assert stage["cmd"] == f"kdflow stage {name} -c configs/small.yaml" and stage["wdir"] == "../.."
        assert all("${" not in d for d in stage["deps"]), stage["deps"]
        keys = stage["params"][0]["configs/small.yaml"]
        assert "track" not in keys  # not written in the file: DVC would fail on it
    assert stages["select"]["params"] == [{"configs/small.yaml": ["seed", "select", "student.arch"]}]  # no student.args
    assert stages["student"]["outs"] == [{"artifacts/small/student": {"persist": True}}]
    assert "artifacts/small/evaluate/metrics.json" in str(stages["evaluate"]["metrics"])
    write_params(tmp_path, tiny_params(name="small"))  # params.yaml with the same name: one output folder
    from kdflow.errors import ParamsError

    with pytest.raises(ParamsError, match="also params.yaml's name"):
        config_dvc_yaml(config, tmp_path / "pipelines/small/dvc.yaml", tmp_path)


@pytest.mark.integration
@pytest.mark.slow
def test_dvc_repro_runs_a_config_without_touching_params_yaml(tmp_path: Path) -> None:
    raw = parse_params(tiny_params()).model_dump(mode="json")
    root, env = dvc_project(tmp_path, raw)
    write_params(root / "configs", tiny_params(name="small"), "small.yaml")
    kdflow = [sys.executable, "-m", "kdflow.cli"]
    _sh([*kdflow, "dvc-yaml", "-c", "configs/small.yaml"], root, env)
    out = _sh([sys.executable, "-m", "dvc", "repro", "pipelines/small/dvc.yaml:prepare"], root, env).stdout
    assert "Running stage 'pipelines/small/dvc.yaml:prepare'" in out, out
    assert (root / "artifacts/small/prepare/manifest.json").is_file() and not (root / "artifacts/tiny").exists()
    lock = yaml.safe_load((root / "pipelines/small/dvc.lock").read_text())
    assert lock["stages"]["prepare"]["params"]["configs/small.yaml"]["seed"] == 0
