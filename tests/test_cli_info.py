"""Reporting commands: `kdflow params`, `kdflow status`, `kdflow list`, `--json`, piped output."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO, tiny_params, write_params
from kdflow.cli import app
from schemas.params import parse_params, schema_keys


def _invoke(*args: str, cwd: Path | None = None, monkeypatch: pytest.MonkeyPatch | None = None):
    if cwd is not None:
        monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, list(args))


def test_params_lists_every_schema_key_with_type_default_bounds(monkeypatch) -> None:
    result = _invoke("params", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    listed = {r["key"].replace("[]", "") for r in rows}
    assert schema_keys() <= listed, schema_keys() - listed
    by_key = {(r["key"], r["when"]): r for r in rows}
    temp = by_key[("student.loss.temperature", "student.loss.name=kd")]
    assert temp["default"] == "4.0" and temp["bounds"] == "> 0, <= 100" and temp["type"] == "float" and temp["description"]
    from kdflow.condense import CONDENSERS

    method = by_key[("condense.method", "")]
    assert all(f'"{n}"' in method["type"] for n in CONDENSERS.names())
    assert _invoke("params", "student.nope").exit_code == 2


def test_piped_tables_keep_their_columns() -> None:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run([sys.executable, "-m", "kdflow.cli", "params", "student.loss"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # piped, Rich would assume 80 columns and fold the key column: every key stays on one line
    assert any(re.search(r"│ student\.loss\.temperature +│", line) for line in lines), proc.stdout
    assert max(len(line) for line in lines) > 80


def test_list_json_names_every_registry_per_track() -> None:
    result = _invoke("list", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert {"classify", "graph", "lm"} <= set(doc)
    for track, rows in doc.items():
        assert {"sources", "architectures", "losses", "condensers", "formats", "strategies"} <= set(rows), track
    assert "sklearn" in doc["classify"]["sources"] and "tu" in doc["graph"]["sources"]
    assert "mirage" in doc["graph"]["condensers"] and "kd" in doc["classify"]["losses"]


def test_validate_json_reports_problems_with_exit_2(tmp_path: Path, monkeypatch) -> None:
    write_params(tmp_path, tiny_params())
    bad = _invoke("validate", "--json", "-s", "student.loss.temperature=-1", cwd=tmp_path, monkeypatch=monkeypatch)
    assert bad.exit_code == 2
    assert json.loads(bad.stdout) == {"ok": False, "config": "params.yaml",
                                      "problems": ["student.loss.temperature: must be > 0 (got -1)"]}
    good = json.loads(_invoke("validate", "--json").stdout)
    assert good["ok"] and good["pipeline"] == "tiny"


def test_status_says_which_stages_would_run_and_why(tmp_path: Path, monkeypatch) -> None:
    from tasks.common import execute_stage

    raw = tiny_params()
    write_params(tmp_path, raw)
    for stage in ("prepare", "teachers"):
        execute_stage(stage, parse_params(raw), tmp_path)

    def status(*extra: str) -> dict[str, dict]:
        result = _invoke("status", "--json", *extra, cwd=tmp_path, monkeypatch=monkeypatch)
        assert result.exit_code == 0, result.output
        return {s["stage"]: s for s in json.loads(result.stdout)["stages"]}

    now = status()
    assert not now["prepare"]["runs"] and not now["teachers"]["runs"]
    assert now["select"]["runs"] and now["select"]["reasons"] == ["no output yet"]
    assert not (tmp_path / "artifacts/tiny/select").exists()  # nothing ran

    changed = status("-s", "data.val_fraction=0.2")
    assert changed["prepare"]["reasons"] == ["params changed: data.val_fraction"]
    assert changed["teachers"]["reasons"] == ["upstream changed: prepare (will run)"]
    from tasks.common import fingerprint

    assert changed["prepare"]["fingerprint"] == fingerprint("prepare", parse_params(raw, "x").model_copy(
        update={"data": parse_params(raw).data.model_copy(update={"val_fraction": 0.2})}), {})

    model = next((tmp_path / "artifacts/tiny/teachers").rglob("model.safetensors"))
    model.write_bytes(b"altered")
    assert "was altered" in status()["teachers"]["reasons"][0]
    table = _invoke("status", cwd=tmp_path, monkeypatch=monkeypatch).stdout
    assert "would run" in table


def test_params_yaml_comment_names_every_condenser_of_its_tracks() -> None:
    from kdflow.condense import CONDENSERS

    text = (REPO / "params.yaml").read_text()
    block = text[text.index("condense:"):text.index("logits:")]
    for name in CONDENSERS.names():
        if not {"classify", "graph"} & set(CONDENSERS.meta(name)["tracks"]):
            continue  # another track's (e.g. lm's generate, registered when that track loads)
        assert re.search(rf"\b{name}\b", block), f"params.yaml's condense comment does not name {name!r}"
