"""The condense stage with the synthetic-image methods and the label modes, on digits with tiny budgets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import tiny_params
from kdflow.condense.nrr_dd import DBRViews, dbr_distances
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
    assert small.extras["dbr_d_org"].shape == small.extras["dbr_d_aug"].shape == (10, 300)  # saved and read back
    assert small.meta["dbr_views"] == 300 and "dbr_augment" in small.meta


@pytest.mark.parametrize("loss", ["dbr", "ce"])
def test_the_student_trains_with_each_label_mode_on_nrr_dd(tmp_path: Path, loss: str, monkeypatch) -> None:
    seen: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []  # (idx, batch) of every step fit took

    def spy_fit(*args, batch_fn, **kwargs):
        def recording(idx, epoch):
            batch = batch_fn(idx, epoch)
            seen.append((idx.clone(), epoch, batch))
            return batch
        return fit(*args, batch_fn=recording, **kwargs)

    monkeypatch.setattr(student_stage, "fit", spy_fit)
    raw = tiny_params(condense={**NRR, "views": 2},
                      student={"loss": {"name": loss, **({"beta": 0.5} if loss == "dbr" else {})}})
    ms = run_until(tmp_path, raw, "student")
    art = tmp_path / "artifacts/tiny"
    small = load_dataset(art / "condense")
    history = json.loads((art / "student/history.json").read_text())
    assert len(history) == 3 and ms["student"].metrics["epochs_run"] == 3
    assert seen, "the student stage did not train through its batch_fn"
    e = small.extras
    views = DBRViews(small)
    epochs = set()
    for idx, epoch, batch in seen:
        if loss == "dbr":  # stored view (epoch - 1) % 2 with its labels and distances
            ref = views.view(idx, epoch - 1)
            assert all(torch.equal(batch[k], ref[k]) for k in ("x", "y", "y_aug", "lam"))
            v = (epoch - 1) % 2
            assert torch.equal(batch["d_org"], e["dbr_d_org"][idx, v].float())
            assert torch.equal(batch["d_aug"], e["dbr_d_aug"][idx, v].float())
            epochs.add(epoch)
        else:  # hard labels on the refined images themselves
            assert torch.equal(batch["x"], small.features[idx]) and "d_org" not in batch
    if loss == "dbr":
        assert epochs == {1, 2, 3}  # epochs 1 and 3 train on view 0, epoch 2 on view 1
    if loss == "dbr":
        assert {"train_dbr", "train_ce"} <= set(history[0])
    else:
        assert "train_dbr" not in history[0]


def test_stored_dbr_distances_match_the_saved_teacher(tmp_path: Path) -> None:
    raw = tiny_params(condense={**NRR, "temperature": 2.0, "views": 3})
    ms = run_until(tmp_path, raw, "condense")
    art = tmp_path / "artifacts/tiny"
    small = load_dataset(art / "condense")
    teacher = load_model(art / "teachers" / ms["condense"].info["teacher"])
    assert small.meta["dbr_temperature"] == 2.0
    views = DBRViews(small)
    for v in range(3):  # the saved teacher on each rebuilt view gives the stored distances
        b = views.view(torch.arange(len(small)), v)
        d_org, d_aug = dbr_distances(predict(teacher, b["x"]), b["y"], b["y_aug"], 2.0)
        assert torch.allclose(d_org, small.extras["dbr_d_org"][:, v].float(), rtol=2e-3, atol=2e-3)
        assert torch.allclose(d_aug, small.extras["dbr_d_aug"][:, v].float(), rtol=2e-3, atol=2e-3)


def test_condense_params_reject_an_empty_scale_range() -> None:
    with pytest.raises(Exception, match="scale_min"):
        parse_params(tiny_params(condense={"method": "rded", "scale_min": 0.9, "scale_max": 0.5}))


def test_dbr_labels_need_nrr_dd() -> None:
    with pytest.raises(Exception, match="'dbr' needs .*use condense.method 'nrr_dd'"):
        parse_params(tiny_params(condense={"method": "rded"}, student={"loss": {"name": "dbr"}}))
