"""End to end: one flow run on tiny digits, then everything a user reads back from the MLflow store."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_params, write_params
from kdflow.data.dataset import load_dataset
from kdflow.lineage.backends import fluent_uri
from kdflow.models.io import load_model
from schemas.manifest import Manifest
from tasks.common import STAGE_ORDER, STAGES

pytestmark = pytest.mark.slow

PICTURES = {
    "select": {"figures/ranking.png"},
    "evaluate": {"figures/confusion_student.png", "figures/confusion_teacher.png", "figures/reliability.png",
                 "figures/curves.png", "figures/compression.png"},
}


def _runs(client, experiment: str) -> tuple[list, dict[str, object]]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=200)
    parents = [r for r in runs if r.data.tags.get("kdflow.kind") == "pipeline"]
    return parents, exp.experiment_id


def _lineage_output(root: Path, monkeypatch: pytest.MonkeyPatch, ref: str) -> str:
    from typer.testing import CliRunner

    from kdflow.cli import app

    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, ["lineage", ref], env={"COLUMNS": "220"})
    assert result.exit_code == 0, result.output
    return result.output


def test_flow_records_runs_inputs_models_registry_and_lineage(tmp_path: Path, prefect_harness, monkeypatch) -> None:
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    from flows.distill import distill

    write_params(tmp_path, tiny_params(tracking={"enabled": True, "experiment": "lineage"}))
    result = distill(params_file="params.yaml", root=str(tmp_path))
    assert result["tracking_unavailable"] is None
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    art = tmp_path / "artifacts/tiny"
    manifests = {s: Manifest.load(art / s) for s in STAGE_ORDER}

    # one parent run, one child run per executed stage, linked both ways
    parents, exp_id = _runs(client, "lineage")
    assert len(parents) == 1
    parent = parents[0]
    runs = {s: client.get_run(manifests[s].mlflow_run_id) for s in STAGE_ORDER}
    for stage, run in runs.items():
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id and tags["kdflow.stage"] == stage
        assert tags["kdflow.fingerprint"] == manifests[stage].fingerprint
        assert parent.data.tags[f"kdflow.stage.{stage}.run_id"] == run.info.run_id
        for up in STAGES[stage].upstream:
            assert tags[f"kdflow.upstream.{up}.run_id"] == manifests[up].mlflow_run_id
            assert tags[f"kdflow.upstream.{up}.fingerprint"] == manifests[up].fingerprint

        # inputs as datasets: name = upstream stage, digest = its fingerprint (prefix), full one in a tag
        inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
        assert set(inputs) == (set(STAGES[stage].upstream) or {"source"}), stage
        for name, item in inputs.items():
            full = {t.key: t.value for t in item.tags}["kdflow.fingerprint"]
            assert item.dataset.digest == full[:36]
            if name != "source":
                assert full == manifests[name].fingerprint
                assert json.loads(item.dataset.source)["uri"] == str((art / name).resolve())
    assert json.loads(runs["prepare"].inputs.dataset_inputs[0].dataset.source)["spec"] == "sklearn:digits"
    prepare_input = next(i for i in runs["student"].inputs.dataset_inputs if i.dataset.name == "prepare")
    columns = [c["name"] for c in json.loads(prepare_input.dataset.schema)["mlflow_colspec"]]
    assert {"sample_id", "split", "label"} <= set(columns)
    chosen = manifests["select"].info["teachers"][0]
    chosen_model = runs["teachers"].data.tags[f"kdflow.model.{chosen}.id"]
    assert [m.model_id for m in runs["logits"].inputs.model_inputs] == [chosen_model]  # the models a stage reads

    # pictures as run artifacts
    for stage, pictures in PICTURES.items():
        logged = {f.path for f in client.list_artifacts(runs[stage].info.run_id, "figures")}
        assert pictures <= logged, (stage, logged)

    # teachers and the student as LoggedModels of their stage runs
    logged = {m.name: m for m in client.search_logged_models([exp_id])}
    assert set(logged) == {"tiny-teacher-conv", "tiny-teacher-mlp", "tiny-student"}
    assert {m.source_run_id for n, m in logged.items() if "teacher" in n} == {runs["teachers"].info.run_id}
    student = logged["tiny-student"]
    assert student.source_run_id == runs["student"].info.run_id and student.status.name == "READY"
    test = load_dataset(art / "prepare").split("test")
    expected = load_model(art / "student")(test.features)
    with fluent_uri(uri):
        from mlflow.models import get_model_info

        assert get_model_info(f"models:/{student.model_id}").signature is not None
        by_id = mlflow.pytorch.load_model(f"models:/{student.model_id}")
        by_alias = mlflow.pytorch.load_model("models:/tiny-student@latest")
    with torch.no_grad():
        assert torch.equal(by_id(test.features), expected.detach())  # pt2: exported in eval mode
        assert torch.equal(by_alias(test.features), expected.detach())

    # evaluation metrics attached to the logged student (and the chosen teacher)
    metrics = json.loads((art / "evaluate/metrics.json").read_text())
    on_model = {m.key: m.value for m in client.get_logged_model(student.model_id).metrics}
    assert on_model["student.accuracy"] == pytest.approx(metrics["student"]["accuracy"])
    assert on_model["student.agreement"] == pytest.approx(metrics["agreement"])
    teacher = metrics["teacher"]["name"]
    on_teacher = {m.key: m.value for m in client.get_logged_model(logged[f"tiny-teacher-{teacher}"].model_id).metrics}
    assert on_teacher["teacher.accuracy"] == pytest.approx(metrics["teacher"]["accuracy"])

    # the registered student, alias latest, with its lineage tags
    version = client.get_model_version_by_alias("tiny-student", "latest")
    assert version.run_id == runs["student"].info.run_id
    tags = version.tags
    assert tags["kdflow.teacher.name"] == teacher
    assert tags["kdflow.teacher.run_id"] == runs["teachers"].info.run_id
    assert tags["kdflow.teacher.model_id"] == logged[f"tiny-teacher-{teacher}"].model_id
    assert tags["kdflow.data.fingerprint"] == manifests["prepare"].fingerprint
    assert tags["kdflow.condense.method"] == "none"
    assert tags["kdflow.eval.run_id"] == runs["evaluate"].info.run_id

    # the parent as users browse it: named by fingerprint, data and registered student on it, links, champion
    parent = client.get_run(parent.info.run_id)
    assert parent.info.run_name == f"tiny @{manifests['evaluate'].fingerprint[:8]}"
    on_parent = {i.dataset.name: i.dataset for i in parent.inputs.dataset_inputs}
    assert set(on_parent) == {"prepare", "source"}
    assert on_parent["prepare"].digest == manifests["prepare"].fingerprint[:36]
    assert parent.data.tags["kdflow.registered_model"] == f"tiny-student/{version.version}"
    assert parent.data.tags["kdflow.student.model_id"] == student.model_id
    assert [o.model_id for o in parent.outputs.model_outputs] == [student.model_id]
    note = parent.data.tags["mlflow.note.content"]
    for stage in STAGE_ORDER:
        assert f"#/experiments/{exp_id}/runs/{runs[stage].info.run_id})" in note
    assert f"#/models/tiny-student/versions/{version.version})" in note
    logged_files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"lineage.md", "lineage.json"} <= logged_files
    champion = client.get_model_version_by_alias("tiny-student", "champion")
    assert champion.version == version.version
    assert float(champion.tags["kdflow.eval.accuracy"]) == pytest.approx(metrics["student"]["accuracy"], abs=1e-4)

    # `kdflow lineage tiny-student@latest`: the chain back to the data source
    text = _lineage_output(tmp_path, monkeypatch, "tiny-student@latest")
    rows = [line for line in text.splitlines() if line.startswith("│")]
    order = [cell for cell in (row.split("│")[1].strip().removeprefix("<- ") for row in rows) if cell]
    assert order == ["evaluate", "student", "logits", "condense", "select", "teachers", "prepare", "source"], text
    for stage in STAGE_ORDER:
        assert runs[stage].info.run_id in text and manifests[stage].fingerprint[:16] in text
    assert "sklearn:digits" in text

    # a change to the student: a new version; cached stages keep pointing at the runs that made them
    write_params(tmp_path, tiny_params(tracking={"enabled": True, "experiment": "lineage"},
                                       student={"loss": {"name": "kd", "temperature": 2.0}}))
    again = distill(params_file="params.yaml", root=str(tmp_path), overrides=["evaluate.latency_repeats=2"])
    assert {s for s, v in again["stages"].items() if not v["cached"]} == {"student", "evaluate"}
    newest = client.get_model_version_by_alias("tiny-student", "latest")
    assert int(newest.version) == int(version.version) + 1
    parents, _ = _runs(client, "lineage")
    second = next(p for p in parents if p.info.run_id != parent.info.run_id)
    assert second.info.run_name == "tiny evaluate.latency_repeats=2"
    cached_note = second.data.tags["mlflow.note.content"]  # a cached stage links the run that made it
    assert f"| prepare | cached | [{runs['prepare'].info.run_id[:12]}](#/experiments/{exp_id}/runs/" in cached_note
    assert second.data.tags["kdflow.registered_model"] == f"tiny-student/{newest.version}"
    champion = client.get_model_version_by_alias("tiny-student", "champion")
    better = float(newest.tags["kdflow.eval.accuracy"]) > float(version.tags["kdflow.eval.accuracy"])
    assert champion.version == (newest.version if better else version.version)
    assert newest.tags["kdflow.teacher.run_id"] == runs["teachers"].info.run_id
    text = _lineage_output(tmp_path, monkeypatch, "tiny-student@latest")
    assert runs["prepare"].info.run_id in text and runs["student"].info.run_id not in text
    assert _lineage_output(tmp_path, monkeypatch, f"tiny-student/{version.version}").count(runs["student"].info.run_id) == 1
