"""The condense stage with the synthetic-image methods and the label modes, on digits with tiny budgets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import tiny_params
from kdflow.condense.nrr_dd import dbr_distances, mix
from kdflow.data.dataset import load_dataset
from kdflow.models.io import load_model
from kdflow.train.loop import fit, predict
from schemas.params import parse_params
import tasks.student as student_stage
from test_stages import run_until

NRR = {"method": "nrr_dd", "ipc": 2, "images_per_class": 5, "crops_per_image": 2, "iterations": 2}


def test_rded_and_nrr_dd_condense_and_the_student_trains_on_rded(tmp_path: Path) -> None:
    raw = tiny_params(condense={"method": "rded", "ipc": 2, "images_per_class": 10, "crops_per_image": 2})
    ms = run_until(tmp_path, raw, "student")
    assert ms["condense"].metrics["n_condensed"] == 20
    small = load_dataset(tmp_path / "artifacts/tiny/condense")
    assert small.features.shape == (20, 1, 8, 8)
    assert small.extras["soft_labels"].shape == (20, 10)
    png = tmp_path / "artifacts/tiny/condense/figures/samples.png"
    with Image.open(png) as im:  # the per-class grid, listed in the manifest (MLflow logs it)
        im.verify()
    assert "figures/samples.png" in {f.path for f in ms["condense"].files}

    # same upstream stages (cached), other method
    raw = tiny_params(condense={"method": "nrr_dd", "ipc": 1, "images_per_class": 5, "crops_per_image": 2,
                                "iterations": 2})
    ms = run_until(tmp_path, raw, "condense")
    assert ms["condense"].metrics["n_condensed"] == 10
    small = load_dataset(tmp_path / "artifacts/tiny/condense")
    assert {"dbr_d_org", "dbr_d_aug", "dbr_lambda", "dbr_partner", "dbr_y_aug"} <= set(small.extras)


@pytest.mark.parametrize("loss", ["dbr", "ce"])
def test_the_student_trains_with_each_label_mode_on_nrr_dd(tmp_path: Path, loss: str, monkeypatch) -> None:
    seen: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []  # (idx, batch) of every step fit took

    def spy_fit(*args, batch_fn, **kwargs):
        def recording(idx, epoch):
            batch = batch_fn(idx, epoch)
            seen.append((idx.clone(), batch))
            return batch
        return fit(*args, batch_fn=recording, **kwargs)

    monkeypatch.setattr(student_stage, "fit", spy_fit)
    raw = tiny_params(condense=NRR, student={"loss": {"name": loss, **({"beta": 0.5} if loss == "dbr" else {})}})
    ms = run_until(tmp_path, raw, "student")
    art = tmp_path / "artifacts/tiny"
    small = load_dataset(art / "condense")
    history = json.loads((art / "student/history.json").read_text())
    assert len(history) == 3 and ms["student"].metrics["epochs_run"] == 3
    assert seen, "the student stage did not train through its batch_fn"
    e = small.extras
    mixed = mix(small.features, e["dbr_partner"], e["dbr_lambda"])
    for idx, batch in seen:
        if loss == "dbr":  # the stored mixed views with their labels and distances
            assert torch.equal(batch["x"], mixed[idx])
            assert torch.equal(batch["y_aug"], e["dbr_y_aug"][idx])
            assert torch.equal(batch["d_org"], e["dbr_d_org"][idx]) and torch.equal(batch["d_aug"], e["dbr_d_aug"][idx])
        else:  # hard labels on the refined images themselves
            assert torch.equal(batch["x"], small.features[idx]) and "d_org" not in batch
    if loss == "dbr":
        assert {"train_dbr", "train_ce"} <= set(history[0])
    else:
        assert "train_dbr" not in history[0]


def test_stored_dbr_distances_match_the_saved_teacher(tmp_path: Path) -> None:
    raw = tiny_params(condense={**NRR, "temperature": 2.0})
    ms = run_until(tmp_path, raw, "condense")
    art = tmp_path / "artifacts/tiny"
    small = load_dataset(art / "condense")
    teacher = load_model(art / "teachers" / ms["condense"].info["teacher"])
    e = small.extras
    logits = predict(teacher, mix(small.features, e["dbr_partner"], e["dbr_lambda"]))
    d_org, d_aug = dbr_distances(logits, small.labels, e["dbr_y_aug"], 2.0)
    assert small.meta["dbr_temperature"] == 2.0
    assert torch.allclose(d_org, e["dbr_d_org"], atol=1e-5)
    assert torch.allclose(d_aug, e["dbr_d_aug"], atol=1e-5)


def test_condense_params_reject_an_empty_scale_range() -> None:
    with pytest.raises(Exception, match="scale_min"):
        parse_params(tiny_params(condense={"method": "rded", "scale_min": 0.9, "scale_max": 0.5}))


def test_dbr_labels_need_nrr_dd() -> None:
    with pytest.raises(Exception, match="'dbr' needs .*use condense.method 'nrr_dd'"):
        parse_params(tiny_params(condense={"method": "rded"}, student={"loss": {"name": "dbr"}}))
