"""The condense stage with the synthetic-image methods, on digits with tiny budgets."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import tiny_params
from kdflow.data.dataset import load_dataset
from schemas.params import parse_params
from test_stages import run_until


def test_rded_and_nrr_dd_condense_and_the_student_trains_on_rded(tmp_path: Path) -> None:
    raw = tiny_params(condense={"method": "rded", "ipc": 2, "images_per_class": 10, "crops_per_image": 2})
    ms = run_until(tmp_path, raw, "student")
    assert ms["condense"].metrics["n_condensed"] == 20
    small = load_dataset(tmp_path / "artifacts/tiny/condense")
    assert small.features.shape == (20, 1, 8, 8)
    assert small.extras["soft_labels"].shape == (20, 10)

    # same upstream stages (cached), other method
    raw = tiny_params(condense={"method": "nrr_dd", "ipc": 1, "images_per_class": 5, "crops_per_image": 2,
                                "iterations": 2})
    ms = run_until(tmp_path, raw, "condense")
    assert ms["condense"].metrics["n_condensed"] == 10
    small = load_dataset(tmp_path / "artifacts/tiny/condense")
    assert {"dbr_d_org", "dbr_d_aug", "dbr_lambda", "dbr_partner", "dbr_y_aug"} <= set(small.extras)


def test_condense_params_reject_an_empty_scale_range() -> None:
    with pytest.raises(Exception, match="scale_min"):
        parse_params(tiny_params(condense={"method": "rded", "scale_min": 0.9, "scale_max": 0.5}))
