"""The declared pipeline: every config validates, mistakes are reported completely and clearly."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_params
from kdflow.errors import ParamsError
from schemas.params import PipelineParams, apply_overrides, load_params, parse_params, schema_keys

CONFIGS = sorted([REPO / "params.yaml", *REPO.glob("configs/**/*.yaml")])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_validates(path: Path) -> None:
    assert isinstance(load_params(path), PipelineParams)


def test_configs_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {"params.yaml", "mnist1d.yaml", "mnist-idx.yaml"} <= names


def problems(raw: dict) -> list[str]:
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    return info.value.problems


def test_bound_violation_names_key_path_and_value() -> None:
    raw = tiny_params(student={"loss": {"name": "kd", "temperature": -1}})
    assert problems(raw) == ["student.loss.temperature: must be > 0 (got -1)"]


def test_every_problem_is_reported_at_once() -> None:
    raw = tiny_params(seed=-3, student={"loss": {"temperatur": 2}, "epochs": 3})
    raw["teachers"][0]["trian"] = {}
    raw["teachers"][1]["train"] = {"lr": 0}
    found = problems(raw)
    assert "seed: must be >= 0 (got -3)" in found
    assert "student.loss.temperatur: unknown key; did you mean 'temperature'?" in found
    assert "teachers[0].trian: unknown key; did you mean 'train'?" in found
    assert "teachers[1].train.lr: must be > 0 (got 0)" in found
    assert any(p.startswith("student.epochs: unknown key") for p in found)
    assert len(found) == 5


def test_literal_and_missing_and_cross_section_errors() -> None:
    assert problems(tiny_params(condense={"method": "magic"}))[0].startswith("condense.method: must be one of")
    raw = tiny_params()
    del raw["teachers"]
    assert problems(raw) == ["teachers: required key is missing"]
    found = problems(tiny_params(logits={"format": "topk"}))
    assert any(p.startswith("student.loss.name: 'kd' needs ['teacher_logits']") and "use logits.format 'dense'" in p
               for p in found)
    raw = tiny_params()
    raw["teachers"][1] = {"name": "conv", "arch": "mlp"}
    assert any("teacher names must be unique" in p for p in problems(raw))


def test_teacher_needs_exactly_one_origin() -> None:
    raw = tiny_params()
    raw["teachers"][0]["checkpoint"] = "some/dir"
    assert any(p.startswith("teachers[0]: give exactly one of") for p in problems(raw))


def test_overrides_parse_yaml_values() -> None:
    raw = apply_overrides(tiny_params(), ["student.loss.temperature=2", "student.args={hidden: [8]}", "select.strategy=probe"])
    pp = parse_params(raw)
    assert pp.student.loss.temperature == 2.0 and pp.student.args == {"hidden": [8]}
    assert pp.select.strategy == "probe"


def test_overrides_index_lists_and_report_bad_paths() -> None:
    raw = tiny_params()
    out = apply_overrides(raw, ["teachers[1].train.epochs=7", "teachers.0.args={channels: [2]}"])
    assert out["teachers"][1]["train"]["epochs"] == 7 and out["teachers"][0]["args"] == {"channels": [2]}
    assert raw["teachers"][1]["train"]["epochs"] == 3  # the input is not mutated
    with pytest.raises(ParamsError, match=r"no list item \[5\]"):
        apply_overrides(raw, ["teachers[5].name=x"])
    with pytest.raises(ParamsError, match="expected key.path=value"):
        apply_overrides(raw, ["student.loss.temperature"])


def test_every_field_has_a_description() -> None:
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            for sub in [field.annotation, *getattr(field.annotation, "__args__", ())]:
                if isinstance(sub, type) and hasattr(sub, "model_fields"):
                    walk(sub)

    walk(PipelineParams)
    assert "student.loss.temperature" in schema_keys()


def test_cli_exits_2_with_every_problem_and_no_traceback(tmp_path: Path) -> None:
    raw = tiny_params(student={"loss": {"name": "kd", "temperature": -1}, "epochz": 1})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "kdflow.cli", "run", "-c", "bad.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    text = proc.stdout + proc.stderr
    assert "student.loss.temperature: must be > 0 (got -1)" in text
    assert "student.epochz: unknown key" in text
    assert "Traceback" not in text
    assert not (tmp_path / "artifacts").exists()


def test_cli_reports_broken_yaml(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("name: [unclosed\n")
    proc = subprocess.run([sys.executable, "-m", "kdflow.cli", "validate", "-c", "p.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "invalid YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_topk_kd_accepts_every_topk_format() -> None:
    for fmt in ("topk", "topk_q8", "topk_packed", "topk_adaptive"):
        assert parse_params(tiny_params(logits={"format": fmt}, student={"loss": {"name": "topk_kd"}}))
    found = problems(tiny_params(logits={"format": "dense"}, student={"loss": {"name": "topk_kd"}}))
    assert any("'topk_kd' needs" in p and "use logits.format 'topk' or logits.format 'topk_adaptive' or "
               "logits.format 'topk_packed' or logits.format 'topk_q8'" in p
               for p in found)
    assert any("'kd' needs" in p and "use logits.format 'dense'" in p for p in problems(tiny_params(logits={"format": "topk_q8"})))


@pytest.mark.parametrize("name", ["..", ".", "a.b", "../x", "a/b"])
def test_names_cannot_leave_the_artifact_root_or_break_mlflow(name: str) -> None:
    found = problems(tiny_params(name=name))
    assert found and found[0].startswith("name: String should match pattern")
    raw = tiny_params()
    raw["teachers"][0]["name"] = name
    assert problems(raw)[0].startswith("teachers[0].name: String should match pattern")


@pytest.mark.parametrize("override, message", [
    ("student.arch=convnett", "student.arch: unknown architecture 'convnett' for track 'classify'; did you mean 'convnet'?"),
    ("teachers[1].args={hiden: [8]}", "teachers[1].args: got an unexpected keyword argument 'hiden' (architecture 'mlp')"),
    ("logits.format=topk", "student.loss.name: 'kd' needs ['teacher_logits'], which logits.format 'topk'"),
    ("teachers[0].arch=gin", "teachers[0].arch: unknown architecture 'gin' for track 'classify'"),
])
def test_validate_rejects_what_the_run_would_fail_on(tmp_path: Path, override: str, message: str) -> None:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(tiny_params()))
    proc = subprocess.run([sys.executable, "-m", "kdflow.cli", "validate", "-c", "p.yaml", "-s", override],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in " ".join(proc.stderr.split()), proc.stderr
    assert "Traceback" not in proc.stderr
