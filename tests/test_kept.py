"""Outputs kept by fingerprint (tasks/kept.py) and `kdflow gc` (tasks/gc.py), on digits with tiny budgets."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import tiny_params, write_params
from typer.testing import CliRunner

from kdflow.cli import app
from schemas.manifest import Manifest
from schemas.params import parse_params
from tasks import gc, kept
from tasks.common import STAGE_ORDER, execute_stage, fingerprint
from tasks.status import pipeline_status

TEMPS = (4.0, 2.0, 8.0, 16.0)  # student.loss.temperature of the settings switched between


def raw_at(temperature: float, **runtime) -> dict:
    raw = tiny_params(student={"loss": {"name": "kd", "temperature": temperature}})
    if runtime:
        raw["runtime"] = runtime
    return raw


def run(root: Path, raw: dict, until: str = "student") -> dict[str, bool]:
    """Execute the stages up to ``until``; which ones computed."""
    pp = parse_params(raw)
    return {s: execute_stage(s, pp, root)[1] for s in STAGE_ORDER[: STAGE_ORDER.index(until) + 1]}


def invoke(root: Path, monkeypatch: pytest.MonkeyPatch, *args: str):
    monkeypatch.chdir(root)
    return CliRunner().invoke(app, list(args))


def listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / "artifacts").rglob("*"))


@pytest.fixture(scope="module")
def switched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project (params.yaml at T=4) whose student ran at T = 4, 2, 8, 16: three kept outputs,
    kept 3000, 2000 and 1000 s ago."""
    root = tmp_path_factory.mktemp("switched")
    write_params(root, raw_at(TEMPS[0]))
    for t in TEMPS:
        run(root, raw_at(t))
    base = root / "artifacts" / "tiny"
    now = time.time()
    for i, t in enumerate(TEMPS[:-1]):
        fp = fingerprint("student", parse_params(raw_at(t)), {u: Manifest.load(base / u).fingerprint
                                                             for u in ("prepare", "condense", "logits", "teachers")})
        os.utime(kept.kept_path(base, "student", fp), (now - 3000 + 1000 * i,) * 2)
    return root


@pytest.fixture
def project(switched: Path, tmp_path: Path) -> Path:
    shutil.copytree(switched, tmp_path / "p", symlinks=True)
    return tmp_path / "p"


def test_switching_back_restores_the_kept_outputs_instead_of_recomputing(project: Path, monkeypatch) -> None:
    base = project / "artifacts/tiny"
    assert [e.stage for e in kept.entries(base)] == ["student"] * 3  # T = 4, 2, 8; 16 is current
    earlier = Manifest.load(kept.entries(base)[1].path)
    assert earlier.params["student"]["loss"]["temperature"] == 2.0

    plan = {s.stage: s for s in pipeline_status(parse_params(raw_at(2.0)), project)}
    assert [s for s in STAGE_ORDER if plan[s].runs] == ["evaluate"]  # never built here (run stops at student)
    assert [s for s in STAGE_ORDER if plan[s].restores] == ["student"]
    assert plan["student"].reasons == ["params changed: student.loss.temperature",
                                       f"restore kept output {earlier.fingerprint[:12]}"]
    assert plan["evaluate"].reasons == ["no output yet"]
    table = invoke(project, monkeypatch, "status", "-s", "student.loss.temperature=2").stdout
    assert "restore kept output" in table and "1 of 7 stage(s) would run, 1 restored from kept outputs" in table

    assert not any(run(project, raw_at(2.0)).values())  # going back computes nothing
    now = Manifest.load(base / "student")  # the very output built then, every file checked
    assert (now.fingerprint, now.finished_at, now.files) == (earlier.fingerprint, earlier.finished_at, earlier.files)
    temps = [Manifest.load(e.path).params["student"]["loss"]["temperature"] for e in kept.entries(base)]
    assert temps == [4.0, 8.0, 16.0]  # the one it replaced is kept in turn

    # the DVC path (`kdflow stage`) restores too, before Prefect or MLflow
    result = invoke(project, monkeypatch, "stage", "student", "-s", "student.loss.temperature=8")
    assert result.exit_code == 0, result.output
    assert "student: restored kept output" in result.stdout
    assert Manifest.load(base / "student").params["student"]["loss"]["temperature"] == 8.0


def test_a_corrupted_kept_output_is_deleted_and_recomputed(project: Path, caplog) -> None:
    base = project / "artifacts/tiny"
    pp = parse_params(raw_at(2.0))
    fp = pipeline_status(pp, project)[STAGE_ORDER.index("student")].fingerprint
    model = kept.kept_path(base, "student", fp) / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-1] + b"\0")
    assert pipeline_status(pp, project)[STAGE_ORDER.index("student")].runs  # not offered for restore
    with caplog.at_level(logging.WARNING, logger="tasks.common"):
        assert run(project, raw_at(2.0))["student"] is True
    assert "is corrupted" in caplog.text and "was altered" in caplog.text
    assert Manifest.load(base / "student").fingerprint == fp
    assert not kept.kept_path(base, "student", fp).exists()  # recomputed into the current slot


def test_keep_outputs_bounds_each_stage_store(project: Path) -> None:
    base = project / "artifacts/tiny"
    assert run(project, raw_at(3.0, keep_outputs=1))["student"]
    assert [Manifest.load(e.path).params["student"]["loss"]["temperature"] for e in kept.entries(base)] == [16.0]
    assert not run(project, raw_at(16.0, keep_outputs=0))["student"]  # restored; T=3 is not kept
    assert kept.entries(base) == []


def test_a_store_that_links_elsewhere_is_never_written(project: Path, tmp_path: Path, caplog) -> None:
    base = project / "artifacts/tiny"
    outside = tmp_path / "elsewhere"
    shutil.move(kept.store(base) / "student", outside)
    (kept.store(base) / "student").symlink_to(outside, target_is_directory=True)
    before = sorted(p.name for p in outside.iterdir())
    with caplog.at_level(logging.WARNING, logger="tasks.kept"):
        assert run(project, raw_at(3.0))["student"]
    assert "is a link" in caplog.text
    assert sorted(p.name for p in outside.iterdir()) == before  # neither kept into nor pruned


def _gc(project: Path, monkeypatch, *args: str) -> dict:
    result = invoke(project, monkeypatch, "gc", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_gc_lists_and_dry_run_deletes_nothing(project: Path, monkeypatch) -> None:
    before = listing(project)
    doc = _gc(project, monkeypatch)
    assert [(e["stage"], e["action"]) for e in doc["entries"]] == [("student", "named"), ("student", "keep"),
                                                                    ("student", "keep")]
    assert [e["differs"] for e in doc["entries"]] == [f"student.loss.temperature={t}" for t in TEMPS[:-1]]
    assert all(e["bytes"] > 0 and e["mlflow_run_id"] is None for e in doc["entries"])
    dry = _gc(project, monkeypatch, "--keep-last", "0", "--dry-run")
    assert [e["action"] for e in dry["entries"]] == ["named", "delete", "delete"]
    assert dry["would_free_bytes"] == sum(e["bytes"] for e in doc["entries"][1:]) and dry["freed_bytes"] == 0
    assert listing(project) == before
    text = invoke(project, monkeypatch, "gc", "--max-bytes", "0", "-n").stdout
    assert "would delete" in text and "nothing deleted" in text and listing(project) == before


def test_gc_keep_last_and_max_bytes_never_touch_current_or_named(project: Path, monkeypatch) -> None:
    base = project / "artifacts/tiny"
    current = {s: Manifest.load(base / s).fingerprint for s in STAGE_ORDER[:6]}
    doc = _gc(project, monkeypatch, "--keep-last", "1")
    assert [e["action"] for e in doc["entries"]] == ["named", "deleted", "keep"]  # the oldest unnamed goes
    doc = _gc(project, monkeypatch, "--max-bytes", "1K")  # below the named one alone: the rest goes
    assert [e["action"] for e in doc["entries"]] == ["named", "deleted"] and doc["kept_bytes"] == doc["entries"][0]["bytes"]
    assert [e.fingerprint for e in kept.entries(base)] == [doc["entries"][0]["fingerprint"]]
    assert {s: Manifest.load(base / s).fingerprint for s in STAGE_ORDER[:6]} == current
    # nothing named (another pipeline file names other fingerprints): everything kept can go
    write_params(project, raw_at(3.0), "other.yaml")
    doc = _gc(project, monkeypatch, "--max-bytes", "0", "-c", "other.yaml")
    assert [e["action"] for e in doc["entries"]] == ["deleted"] and kept.entries(base) == []
    assert {s: Manifest.load(base / s).fingerprint for s in STAGE_ORDER[:6]} == current


def test_gc_keeps_a_fingerprint_prefix_and_refuses_names_outside_the_root(project: Path, monkeypatch, tmp_path) -> None:
    base = project / "artifacts/tiny"
    outside = tmp_path / "outside" / ("f" * 64)
    shutil.copytree(base / "student", outside)
    (kept.store(base) / "student" / ("f" * 64)).symlink_to(outside, target_is_directory=True)
    youngest = kept.entries(base)[-1].fingerprint
    doc = _gc(project, monkeypatch, "--max-bytes", "0", "--keep", youngest[:10])
    assert [e["action"] for e in doc["entries"]] == ["named", "deleted", "named"]
    assert doc["refused"] == [str(kept.store(base) / "student" / ("f" * 64))]
    assert (outside / "manifest.json").is_file()  # left alone
    with pytest.raises(ValueError, match="refusing"):
        kept.remove(kept.store(base) / "student" / ("f" * 64), base)
    with pytest.raises(ValueError, match="refusing"):
        kept.remove(base / "student", base)  # a current output is never a kept one


def test_gc_bad_options_exit_2_before_deleting(project: Path, monkeypatch) -> None:
    before = listing(project)
    for args in (("--max-bytes", "lots"), ("--keep", "no-such.yaml"), ("-c", "no-such.yaml", "--keep-last", "0")):
        result = invoke(project, monkeypatch, "gc", *args)
        assert result.exit_code == 2, (args, result.output)
    assert listing(project) == before


@pytest.mark.parametrize(("text", "size"), [("1000", 1000), ("2K", 2048), ("1.5GiB", 3 * 2**29), ("800MB", 800_000_000),
                                            ("0", 0)])
def test_parse_size(text: str, size: int) -> None:
    assert gc.parse_size(text) == size

