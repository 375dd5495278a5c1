"""Graph pipelines end to end on the TU files in ../shared/data/tu: stages, `kdflow run`, `dvc repro`.

Skipped when ../shared/data/tu is absent. Budgets are cut to a couple of epochs: these tests check
that the graph data, GNN models, Mirage condensation, the per-graph logit cache and evaluation
flow through the pipeline, not the accuracy of the configs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, dvc_project, shared_data, tiny_params, write_params
from schemas.params import apply_overrides, parse_params, read_params_file
from tasks.common import STAGE_ORDER, STAGES, execute_stage

pytestmark = pytest.mark.slow
TU = shared_data() / "tu"
FAST = {"epochs": 2, "lr": 0.01, "batch_size": 64, "patience": None}
ENV = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
       "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}  # a busy CI box starts the ephemeral server slowly


@pytest.fixture(autouse=True)
def _need_tu() -> None:
    if not (TU / "MUTAG").exists() or not (TU / "NCI1").exists():
        pytest.skip(f"TU datasets not found under {TU}")


def fast_config(name: str) -> dict:
    """A config from configs/ with tiny budgets, the absolute TU root and no tracking."""
    raw = read_params_file(REPO / "configs" / f"{name}.yaml")
    raw = apply_overrides(raw, [f"teachers[0].train={json.dumps(FAST)}", f"student.train={json.dumps(FAST)}",
                                f"data.options.root={TU}", "tracking.enabled=false", "evaluate.latency_repeats=2"])
    return parse_params(raw).model_dump(mode="json")


def test_mirage_stages_on_mutag(tmp_path: Path) -> None:
    fast = {**FAST, "batch_size": 32}
    raw = tiny_params(
        "g", data={"source": "tu:MUTAG", "val_fraction": 0.1, "test_fraction": 0.1, "options": {"root": str(TU)}},
        teachers=[{"name": "gin", "arch": "gin", "args": {"hidden": 16, "layers": 2, "edge_dim": 4}, "train": fast}],
        condense={"method": "mirage", "hops": 2, "target_graphs": 12}, student={"arch": "tiny_gcn", "train": fast},
    )
    pp = parse_params(raw)
    out = {s: execute_stage(s, pp, tmp_path)[0] for s in STAGE_ORDER}
    art = tmp_path / "artifacts/g"
    from kdflow.data.dataset import load_dataset

    small = load_dataset(art / "condense")
    assert small.modality == "graph" and small.features.root_mask is not None and "weight" in small.extras
    assert out["condense"].metrics["n_condensed"] == len(small) and len(small) < out["prepare"].metrics["n_train"]
    assert out["logits"].info["teachers"][0]["cache"]["num_rows"] == len(small)  # one cached logit row per condensed graph
    metrics = json.loads((art / "evaluate/metrics.json").read_text())
    assert metrics["n_test"] == 19 and 0 <= metrics["student"]["accuracy"] <= 1
    assert metrics["student"]["latency_ms_b256"] > 0 and metrics["compression"]["params_ratio"] > 1
    again = {s: execute_stage(s, pp, tmp_path)[1] for s in STAGE_ORDER}
    assert not any(again.values())  # all cached


@pytest.mark.parametrize("config", ["mutag-gnn", "nci1-mirage"])
def test_config_runs_with_kdflow_run(tmp_path: Path, config: str) -> None:
    raw = fast_config(config)
    write_params(tmp_path, raw, "pipeline.yaml")
    env = {**os.environ, **ENV, "PREFECT_HOME": str(tmp_path / ".prefect")}
    proc = subprocess.run([str(Path(sys.executable).parent / "kdflow"), "run", "-c", "pipeline.yaml"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "artifacts" / raw["name"] / "evaluate/metrics.json").read_text())
    assert metrics["compression"]["params_ratio"] > 1
    manifest = json.loads((tmp_path / "artifacts" / raw["name"] / "condense/manifest.json").read_text())
    assert manifest["info"]["method"] == raw["condense"]["method"]


@pytest.mark.integration
def test_nci1_mirage_with_dvc_repro(tmp_path: Path) -> None:
    _, env = dvc_project(tmp_path, fast_config("nci1-mirage"), ENV)  # the config, every key spelt out
    run = lambda *cmd: subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)  # noqa: E731
    first = run(sys.executable, "-m", "dvc", "repro")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for name in STAGES:
        assert f"Running stage '{name}'" in first.stdout
    condensed = json.loads((tmp_path / "artifacts/nci1-mirage/condense/manifest.json").read_text())
    assert 50 <= condensed["metrics"]["n_condensed"] <= 200
    second = run(sys.executable, "-m", "dvc", "repro")
    assert second.returncode == 0 and "Running stage" not in second.stdout
