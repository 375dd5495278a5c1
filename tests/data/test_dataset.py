"""The dataset artifact (save/load, validation) and the stratified splitter."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdflow.data import Dataset, load_dataset, load_source, save_dataset, stratified_split
from kdflow.errors import ArtifactError, DataError


def _tiny(n: int = 12, classes: int = 3) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset(
        features=torch.rand(n, 1, 4, 4, generator=g),
        labels=torch.arange(n) % classes,
        sample_ids=[f"x-{i}" for i in range(n)],
        splits=["train", "val", "test"] * (n // 3),
        num_classes=classes,
        modality="image",
        extras={"weights": torch.linspace(0, 1, n)},
        meta={"source": "tiny"},
    )


def test_save_load_round_trip(tmp_path: Path) -> None:
    ds = load_source("sklearn:digits", seed=0, val_fraction=0.1, test_fraction=0.2)
    ds = ds.select(np.arange(100))
    ds.extras["soft"] = torch.softmax(torch.randn(100, 10), dim=-1)
    files = save_dataset(ds, tmp_path)
    assert all(f.exists() for f in files)
    back = load_dataset(tmp_path)
    assert torch.equal(back.features, ds.features) and torch.equal(back.labels, ds.labels)
    assert back.sample_ids == ds.sample_ids and back.splits == ds.splits
    assert back.num_classes == 10 and back.modality == "image"
    assert back.meta["source"] == "sklearn:digits"
    torch.testing.assert_close(back.extras["soft"], ds.extras["soft"])


def test_load_incomplete_artifact(tmp_path: Path) -> None:
    save_dataset(_tiny(), tmp_path)
    (tmp_path / "tensors.safetensors").unlink()
    with pytest.raises(ArtifactError, match="tensors.safetensors"):
        load_dataset(tmp_path)


@pytest.mark.parametrize(
    ("column", "breaker"),
    [
        ("label", lambda d: d.labels.__setitem__(4, 7)),
        ("sample_id", lambda d: d.sample_ids.__setitem__(4, "x-3")),
        ("split", lambda d: d.splits.__setitem__(4, "holdout")),
        ("features", lambda d: d.features.__setitem__((5, 0, 1, 1), float("nan"))),
        ("features", lambda d: setattr(d, "features", d.features[:-1])),
        ("weights", lambda d: d.extras.__setitem__("weights", d.extras["weights"][:-1])),
    ],
)
def test_validation_names_the_column(tmp_path: Path, column: str, breaker) -> None:
    ds = _tiny()
    breaker(ds)
    with pytest.raises(DataError, match=f"'{column}'"):
        save_dataset(ds, tmp_path)


def test_select_and_split() -> None:
    ds = _tiny()
    val = ds.split("val")
    assert len(val) == 4 and set(val.splits) == {"val"}
    assert torch.equal(val.extras["weights"], ds.extras["weights"][1::3])
    assert ds.select(np.array([0, 2])).sample_ids == ["x-0", "x-2"]


def test_stratified_split_fractions_and_fixed_test() -> None:
    labels = np.repeat(np.arange(5), 40)  # 200 samples
    splits = np.array(stratified_split(labels, seed=3, val_fraction=0.1, test_fraction=0.2))
    assert (splits == "test").sum() == 40 and (splits == "val").sum() == 20
    for cls in range(5):
        assert (splits[labels == cls] == "test").sum() == 8
    assert splits.tolist() == stratified_split(labels, seed=3, val_fraction=0.1, test_fraction=0.2)

    fixed = np.arange(200) >= 150
    splits = np.array(
        stratified_split(labels, seed=3, val_fraction=0.2, test_fraction=0.5, fixed_test=fixed)
    )
    assert (splits == "test").tolist() == fixed.tolist()
    assert (splits == "val").sum() == 30  # 20% of the 150 non-test rows


def test_stratified_split_rejects_impossible_requests() -> None:
    with pytest.raises(DataError, match="'label'"):
        stratified_split(np.array([0, 0, 0, 1]), seed=0, val_fraction=0.0, test_fraction=0.25)
    with pytest.raises(ValueError, match="< 1"):
        stratified_split(np.zeros(10), seed=0, val_fraction=0.5, test_fraction=0.5)
