"""Issue 12, runtime hardening: the project lock, Prefect on a slow machine, failure logs without
tracebacks, stale temporary folders, file modes, non-pickle MLflow models, no remote-code prompt,
and the no-op ``kdflow run`` that does not start Prefect."""
from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, tiny_params, write_params

CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- the project lock (item 8) -----------------------------------------------------------------

HOLDER = """
import sys
from pathlib import Path
from kdflow.lock import project_lock
with project_lock(Path(sys.argv[1]), command="kdflow run (holder)"):
    print("locked", flush=True)
    sys.stdin.read()  # hold until the test closes stdin
"""

CONTENDER = """
import sys, time
from pathlib import Path
from kdflow.lock import ProjectLockedError, project_lock
wait = sys.argv[2] == "wait"
try:
    with project_lock(Path(sys.argv[1]), command="contender", wait=wait, poll=0.05,
                      on_wait=lambda h: print("waiting", h.pid, flush=True)):
        print("acquired", flush=True)
except ProjectLockedError as exc:
    print(exc, flush=True)
    sys.exit(1)
"""


def _holder(root: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=CHILD_ENV)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_with_the_holder_named_or_waits(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    try:
        refused = subprocess.run([sys.executable, "-c", CONTENDER, str(tmp_path), "nowait"], capture_output=True,
                                 text=True, env=CHILD_ENV, timeout=60)
        assert refused.returncode == 1, refused.stderr
        assert f"pid {holder.pid}" in refused.stdout and "kdflow run (holder)" in refused.stdout
        assert "--wait" in refused.stdout
        waiter = subprocess.Popen([sys.executable, "-c", CONTENDER, str(tmp_path), "wait"], stdout=subprocess.PIPE,
                                  text=True, env=CHILD_ENV)
        assert waiter.stdout.readline().split() == ["waiting", str(holder.pid)]
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert waiter.stdout.readline().strip() == "acquired"
    assert waiter.wait(timeout=30) == 0


def test_the_lock_of_a_killed_holder_is_free_and_its_record_reported_stale(tmp_path: Path, caplog) -> None:
    from kdflow.lock import project_lock, read_holder

    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert read_holder(tmp_path).pid == holder.pid  # the record outlives its process
    with caplog.at_level(logging.WARNING, logger="kdflow.lock"), project_lock(tmp_path, "me"):
        pass
    assert f"pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert read_holder(tmp_path) is None  # released cleanly: no record left


def test_the_lock_is_reentrant_in_one_process(tmp_path: Path) -> None:
    from kdflow.lock import holds_lock, project_lock

    with project_lock(tmp_path, "outer"):
        with project_lock(tmp_path, "inner"):
            assert holds_lock(tmp_path)
        assert holds_lock(tmp_path)
    assert not holds_lock(tmp_path)


# --- stale temporary folders, file modes (item 10) -----------------------------------------------

def test_temporary_folders_of_dead_processes_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    from kdflow.lock import clean_stale_temps

    dead, live = _dead_pid(), os.getppid()
    stale = [tmp_path / f".tmp-student-{dead}", tmp_path / f".old-teachers-{dead}"]
    for d in stale:
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "model.safetensors").write_bytes(b"x")
    shard = tmp_path / ".work" / "logits" / "abc" / f".shard-00003.safetensors.tmp-{dead}"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"x")
    keep = [tmp_path / f".tmp-student-{live}", tmp_path / f".tmp-student-{os.getpid()}", tmp_path / "student",
            tmp_path / ".work" / "student"]
    for d in keep:
        d.mkdir(parents=True)
    removed = clean_stale_temps(tmp_path)
    assert sorted(removed) == sorted([*stale, shard])
    assert not any(p.exists() for p in removed) and all(p.exists() for p in keep)


def test_stage_outputs_and_cache_shards_get_the_default_file_mode(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from kdflow.cache.store import replace_atomically
    from tasks.common import atomic_dir

    umask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "prepare") as tmp:
            save_file({"x": torch.zeros(2)}, tmp / "tensors.safetensors")  # safetensors writes 0600
            (tmp / "info.json").write_text("{}")
        shard = tmp_path / ".shard.tmp-1"
        save_file({"x": torch.zeros(2)}, shard)
        replace_atomically(shard, tmp_path / "shard-00000.safetensors")
    finally:
        os.umask(umask)
    for p in (tmp_path / "prepare" / "tensors.safetensors", tmp_path / "prepare" / "info.json",
              tmp_path / "shard-00000.safetensors"):
        assert p.stat().st_mode & 0o777 == 0o644, p


# --- transformers' remote code (item 10) -------------------------------------------------------

def _from_pretrained_calls_without_trust_false(path: Path) -> list[str]:
    """``Auto*.from_pretrained`` calls (the ones that follow a folder's ``auto_map`` and prompt)
    without ``trust_remote_code=False``; a concrete class never runs a folder's code."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        func = node.func if isinstance(node, ast.Call) else None
        if (isinstance(func, ast.Attribute) and func.attr == "from_pretrained" and isinstance(func.value, ast.Name)
                and func.value.id.startswith("Auto")):
            trust = [k for k in node.keywords if k.arg == "trust_remote_code"]
            if not (trust and isinstance(trust[0].value, ast.Constant) and trust[0].value.value is False):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return bad


def test_every_from_pretrained_call_refuses_remote_code_explicitly() -> None:
    bad = [b for folder in ("kdflow", "tasks", "flows") for p in sorted((REPO / folder).rglob("*.py"))
           for b in _from_pretrained_calls_without_trust_false(p)]
    assert not bad, f"from_pretrained without trust_remote_code=False: {bad}"


def test_a_model_folder_with_auto_map_neither_prompts_nor_runs_its_code(tmp_path: Path) -> None:
    folder, marker = tmp_path / "model", tmp_path / "EXECUTED"
    folder.mkdir()
    config = {"model_type": "kdflow_evil", "architectures": ["EvilModel"],
              "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                           "AutoModelForImageClassification": "modeling_evil.EvilModel",
                           "AutoModelForSequenceClassification": "modeling_evil.EvilModel"}}
    (folder / "config.json").write_text(json.dumps(config))
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    (folder / "configuration_evil.py").write_text(payload + "from transformers import PretrainedConfig\n"
                                                  "class EvilConfig(PretrainedConfig):\n    model_type = 'kdflow_evil'\n")
    (folder / "modeling_evil.py").write_text(payload)
    code = f"from kdflow.models.hf import load_hf_classifier; load_hf_classifier({str(folder)!r})"
    env = {**CHILD_ENV, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run([sys.executable, "-c", code], input="y\ny\ny\n", capture_output=True, text=True, env=env,
                          timeout=300)
    assert not marker.exists(), "the folder's code ran"
    assert "[y/N]" not in proc.stdout + proc.stderr
    assert proc.returncode == 1 and "ModelError" in proc.stderr, proc.stderr[-2000:]


# --- Prefect on a slow machine (item 9), failure logs (item 5) ----------------------------------

SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
READ_SETTING = """
from kdflow.cli import _prefect_settings
_prefect_settings()
from prefect.settings import get_current_settings
print(get_current_settings().server.ephemeral.startup_timeout_seconds)
"""


@pytest.mark.parametrize(("preset", "expected"), [(None, 300), ("45", 45)])
def test_prefect_gets_a_startup_timeout_for_busy_machines_unless_the_user_set_one(preset, expected) -> None:
    env = {k: v for k, v in CHILD_ENV.items() if k != SETTING}
    if preset is not None:
        env[SETTING] = preset
    proc = subprocess.run([sys.executable, "-c", READ_SETTING], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) == expected


def test_prefect_run_logs_keep_the_line_but_not_the_traceback_of_kdflow_errors(capsys, monkeypatch) -> None:
    from flows.logs import hide_error_tracebacks
    from kdflow.errors import DataError

    logger = logging.getLogger("prefect.task_runs")
    monkeypatch.setattr(logger, "propagate", False)  # Prefect's own handlers want a run context
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    try:
        hide_error_tracebacks(True)
        for exc in (DataError("labels.parquet: row 3 is NaN"), OSError(28, "No space left on device"),
                    ValueError("a bug")):
            try:
                raise exc
            except Exception as caught:  # noqa: BLE001
                logger.exception("Task run failed with exception: %r", caught)
    finally:
        hide_error_tracebacks(False)
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    data_part, bug_part = err[: err.index("ValueError(")], err[err.index("ValueError("):]
    assert "row 3 is NaN" in data_part and "No space left" in data_part and "Traceback" not in data_part
    assert "Traceback" in bug_part  # a bug keeps its traceback


@pytest.mark.slow
def test_a_failing_run_prints_one_line_and_no_traceback(tmp_path: Path, prefect_harness, monkeypatch, capfd) -> None:
    import polars as pl
    from typer.testing import CliRunner

    from kdflow.cli import app

    pl.DataFrame({"f0": [0.1, float("nan"), 0.3, 0.4] * 10, "f1": [1.0, 2.0, 3.0, 4.0] * 10,
                  "label": [0, 1, 0, 1] * 10}).write_parquet(tmp_path / "data.parquet")
    mlp = {"name": "mlp", "arch": "mlp", "args": {"hidden": [8]}, "train": {"epochs": 1}}
    write_params(tmp_path, tiny_params(data={"source": "parquet:data.parquet"}, teachers=[mlp]))
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # the CLI's handler writes to CliRunner's stream
    result = CliRunner().invoke(app, ["run"])
    text = result.output + "".join(capfd.readouterr())
    assert result.exit_code == 1, text
    assert "kdflow failed:" in text and "data.parquet" in text
    assert "Finished in state Failed" in text  # Prefect's one-line failure stays
    assert "Traceback" not in text


# --- a no-op run without Prefect (item 12), lock between two `kdflow run` (item 8) ----------------

CLI = """
import sys
from kdflow.cli import app
code = 1
try:
    code = app(sys.argv[1:], standalone_mode=False)  # returns the exit code of typer.Exit
finally:
    print("prefect imported:", "prefect" in sys.modules, flush=True)
    heavy = ("torch", "mlflow", "transformers", "diffusers", "torch_geometric", "polars")
    print("heavy imported:", sorted(m for m in sys.modules if m.split(".")[0] in heavy), flush=True)
sys.exit(code or 0)
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A project whose stages are all built, with its own copy of the code (other edits to the
    repository must not change its fingerprints while the tests run)."""
    from tasks import common
    from tasks.common import execute_stage
    from schemas.params import parse_params

    root = tmp_path_factory.mktemp("noop")
    for item in ("kdflow", "tasks", "schemas", "flows"):
        shutil.copytree(REPO / item, root / item, ignore=shutil.ignore_patterns("__pycache__"))
    raw = tiny_params()
    write_params(root, raw)
    mp = pytest.MonkeyPatch()
    mp.setattr(common, "code_root", lambda: root)
    common.import_closure.cache_clear()
    try:
        pp = parse_params(raw)
        for stage in common.STAGE_ORDER:
            execute_stage(stage, pp, root)
    finally:
        mp.undo()
        common.import_closure.cache_clear()
    return root


def _cli(root: Path, *args: str, popen: bool = False):
    cmd = [sys.executable, "-c", CLI, *args]
    env = {**os.environ, "PYTHONPATH": str(root)}  # the project's copy of the code
    if popen:
        return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_noop_run_skips_prefect_a_changed_param_runs_it_and_a_second_run_meets_the_lock(built: Path) -> None:
    from kdflow.lock import read_holder

    dead = built / "artifacts" / "tiny" / f".tmp-student-{_dead_pid()}"
    dead.mkdir()
    noop = _cli(built, "run")
    assert noop.returncode == 0, noop.stderr[-3000:]
    assert "prefect imported: False" in noop.stdout and "nothing ran" in noop.stdout
    assert "heavy imported: []" in noop.stdout  # nor torch, MLflow, ... (kdflow/catalog.py)
    assert noop.stdout.count("Cached") == 7
    assert not dead.exists()  # a killed run's temporary folder is cleaned under the lock

    art = built / "artifacts" / "tiny"
    before = {s: json.loads((art / s / "manifest.json").read_text()) for s in ("prepare", "student")}
    changed = _cli(built, "run", "-s", "student.loss.temperature=2", "-s", "student.train.epochs=150", popen=True)
    deadline = time.time() + 300
    while (read_holder(built) is None or read_holder(built).pid != changed.pid) and time.time() < deadline:
        assert changed.poll() is None, changed.communicate()
        time.sleep(0.1)
    second = _cli(built, "run")
    queued = _cli(built, "run", "-s", "student.loss.temperature=2", "-s", "student.train.epochs=150", "--wait",
                  popen=True)
    out, err = changed.communicate(timeout=600)
    assert changed.returncode == 0, err[-3000:]
    assert "prefect imported: True" in out
    states = {line.split()[1]: line.split()[3] for line in out.splitlines() if line.startswith("│ ") and
              len(line.split()) > 3 and line.split()[1] in ("student", "evaluate")}
    assert states == {"student": "Completed", "evaluate": "Completed"}
    after = {s: json.loads((art / s / "manifest.json").read_text()) for s in ("prepare", "student")}
    assert after["prepare"] == before["prepare"]  # reused, not rebuilt
    assert after["student"]["fingerprint"] != before["student"]["fingerprint"]
    assert second.returncode == 1, second.stdout + second.stderr
    assert f"pid {changed.pid}" in second.stderr and "student.loss.temperature=2" in second.stderr
    assert "Traceback" not in second.stderr
    q_out, q_err = queued.communicate(timeout=600)
    assert queued.returncode == 0, q_err[-3000:]
    assert "nothing ran" in q_out and "prefect imported: False" in q_out


# --- MLflow models without pickle (item 10) -------------------------------------------------------

@pytest.mark.slow
def test_logged_models_load_with_pickle_disallowed(tmp_path: Path, monkeypatch) -> None:
    import mlflow.pytorch
    import torch
    from mlflow.tracking import MlflowClient

    from kdflow.lineage import models
    from kdflow.lineage.backends import fluent_uri
    from kdflow.models import create_model
    from kdflow.models.io import save_model

    torch.manual_seed(0)
    model = create_model("tiny_convnet", input_shape=(1, 8, 8), num_classes=10).eval()
    save_model(model, tmp_path / "student")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "mlruns").as_uri())
    run = client.create_run(exp).info.run_id
    example = torch.randn(4, 1, 8, 8)
    model_id = models.log_model(client, uri, exp, run, "tiny-student", tmp_path / "student", example, {})
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with fluent_uri(uri):
        loaded = mlflow.pytorch.load_model(f"models:/{model_id}")
    x = torch.randn(7, 1, 8, 8)  # another batch size than the example's
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_report_refuses_while_another_process_holds_the_lock(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from kdflow.cli import app

    write_params(tmp_path, tiny_params())
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    holder = _holder(tmp_path)
    try:
        result = CliRunner().invoke(app, ["report"])
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert result.exit_code == 1, result.output
    assert f"pid {holder.pid}" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "artifacts" / "tiny" / "report.html").exists()
