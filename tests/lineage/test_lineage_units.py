"""kdflow.lineage pieces on their own: dataset inputs, schemas, evaluation metrics, URI handling."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from kdflow.data.dataset import Dataset, save_dataset
from kdflow.lineage import datasets, models
from kdflow.lineage.backends import TrackingUnavailableError, check_reachable, fluent_uri, resolve_tracking_uri
from kdflow.lineage.query import LineageError, open_store
from kdflow.lineage.tracker import flatten, info_tags
from schemas.manifest import FileEntry, Manifest


def _manifest(stage: str, fp: str = "f" * 64, run_id: str | None = "r" * 32) -> Manifest:
    return Manifest(stage=stage, pipeline="p", fingerprint=fp, files=[FileEntry(path="a", sha256="0" * 64, bytes=10)],
                    metrics={"m": 1.0}, mlflow_run_id=run_id, kdflow_version="0", started_at="t", finished_at="t")


def _dataset(n: int = 6) -> Dataset:
    return Dataset(features=torch.randn(n, 4), labels=torch.arange(n) % 3, sample_ids=[f"s{i}" for i in range(n)],
                   splits=["train", "val", "test"] * (n // 3), num_classes=3, modality="tabular")


def test_dataset_input_names_the_stage_and_keeps_the_full_fingerprint(tmp_path: Path) -> None:
    save_dataset(_dataset(), tmp_path)
    fp = "ab" * 32
    item = datasets.artifact_input("student", "prepare", _manifest("prepare", fp), tmp_path)
    assert item.dataset.name == "prepare"
    assert item.dataset.digest == fp[:36] and len(item.dataset.digest) <= 36
    assert json.loads(item.dataset.source)["uri"] == str(tmp_path.resolve())
    tags = {t.key: t.value for t in item.tags}
    assert tags == {"mlflow.data.context": "validation", "kdflow.fingerprint": fp, "kdflow.run_id": "r" * 32}
    columns = [c["name"] for c in json.loads(item.dataset.schema)["mlflow_colspec"]]
    assert columns == ["sample_id", "split", "label", "row"]
    profile = json.loads(item.dataset.profile)
    assert profile["num_classes"] == 3 and profile["input_shape"] == [4]


def test_schemas_of_models_and_tensor_files(tmp_path: Path) -> None:
    from kdflow.models import create_model
    from kdflow.models.io import save_model
    from safetensors.torch import save_file

    save_model(create_model("tiny_mlp", (8,), 5), tmp_path / "teachers" / "a")
    spec = json.loads(datasets.artifact_schema(tmp_path / "teachers"))["mlflow_tensorspec"]
    (inp,), (outp,) = json.loads(spec["features"]), json.loads(spec["targets"])
    assert inp["name"] == "a" and inp["tensor-spec"]["shape"] == [-1, 8]
    assert outp["tensor-spec"]["shape"] == [-1, 5]
    (tmp_path / "cache").mkdir()
    save_file({"values": torch.zeros(7, 3, dtype=torch.float16), "indices": torch.zeros(7, 3, dtype=torch.uint8)},
              tmp_path / "cache" / "shard-0.safetensors")
    tensors = json.loads(json.loads(datasets.artifact_schema(tmp_path / "cache"))["mlflow_tensorspec"]["features"])
    assert {t["name"]: t["tensor-spec"] for t in tensors} == {
        "indices": {"dtype": "uint8", "shape": [-1, 3]}, "values": {"dtype": "float16", "shape": [-1, 3]}}
    (tmp_path / "empty").mkdir()
    assert datasets.artifact_schema(tmp_path / "empty") is None


def test_source_input_resolves_local_specs(tmp_path: Path) -> None:
    item = datasets.source_input({"source": "idx:data/mnist", "options": {}}, tmp_path)
    assert item.dataset.name == "source" and item.dataset.source_type == "local"
    assert json.loads(item.dataset.source) == {"uri": str((tmp_path / "data/mnist").resolve()), "spec": "idx:data/mnist"}
    builtin = datasets.source_input({"source": "sklearn:digits"}, tmp_path)
    assert builtin.dataset.source_type == "sklearn"
    other = datasets.source_input({"source": "sklearn:digits", "val_fraction": 0.3}, tmp_path)
    assert other.dataset.digest != builtin.dataset.digest  # the digest covers the whole data section


def test_evaluation_values_prefix_roles_and_keep_numbers_only() -> None:
    metrics = {"teacher": {"name": "t", "accuracy": 0.9}, "student": {"accuracy": 0.8, "params": 10},
               "agreement": 0.85, "compression": {"params_ratio": 4.0}, "ece_student": 0.1, "n_test": 5}
    values = models.evaluation_values(metrics)
    assert values["teacher"] == {"teacher.accuracy": 0.9}
    assert values["student"] == {"student.accuracy": 0.8, "student.params": 10.0, "student.agreement": 0.85,
                                 "student.compression.params_ratio": 4.0}


def test_flatten_and_info_tags() -> None:
    assert flatten({"a": {"b": 1, "c": "x"}, "d": []}) == {"a.b": "1", "a.c": "x", "d": "[]"}
    tags = info_tags({"teachers": ["a", "b"], "method": "none", "ranking": [{"x": 1}], "cache": {"k": 1}})
    assert tags == {"kdflow.info.teachers": '["a", "b"]', "kdflow.info.method": "none"}


def test_fluent_uri_restores_the_global_uri_and_the_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    before = mlflow.get_tracking_uri()
    with fluent_uri("sqlite:///inside.db"):
        assert mlflow.get_tracking_uri() == "sqlite:///inside.db"
    assert mlflow.get_tracking_uri() == before
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///elsewhere.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with fluent_uri("sqlite:///inside.db"):
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_uri_resolution_and_store_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:1"
    assert resolve_tracking_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"
    with pytest.raises(TrackingUnavailableError, match="unreachable"):
        check_reachable("http://127.0.0.1:1", timeout=2)
    with pytest.raises(LineageError, match="no MLflow store"):
        open_store(f"sqlite:///{tmp_path / 'missing.db'}", tmp_path)
