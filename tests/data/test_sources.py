"""Data sources: sklearn digits, mnist1d, IDX files, parquet tables (and their broken variants)."""
from __future__ import annotations

import gzip
import random
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from kdflow.data import load_source
from kdflow.data.idx import read_idx, write_idx
from kdflow.errors import DataError, ParamsError, UnknownNameError

SPLIT = {"seed": 0, "val_fraction": 0.1, "test_fraction": 0.2}


def _by_split(ds) -> Counter:
    return Counter(ds.splits)


# --- sklearn ---------------------------------------------------------------------------------


def test_digits_shape_range_and_ids() -> None:
    ds = load_source("sklearn:digits", **SPLIT)
    assert ds.features.shape == (1797, 1, 8, 8) and ds.features.dtype == torch.float32
    assert float(ds.features.min()) == 0.0 and float(ds.features.max()) == 1.0
    assert ds.modality == "image" and ds.num_classes == 10
    assert ds.sample_ids[0] == "digits-00000" and len(set(ds.sample_ids)) == len(ds)
    assert ds.meta["source"] == "sklearn:digits"
    counts = _by_split(ds)
    assert counts["test"] == pytest.approx(0.2 * len(ds), abs=2)
    assert counts["val"] == pytest.approx(0.1 * len(ds), abs=2)


def test_digits_splits_are_stratified_and_deterministic() -> None:
    a = load_source("sklearn:digits", **SPLIT)
    b = load_source("sklearn:digits", **SPLIT)
    c = load_source("sklearn:digits", **{**SPLIT, "seed": 1})
    assert a.splits == b.splits and a.splits != c.splits
    labels = a.labels.numpy()
    test = np.array(a.splits) == "test"
    for cls in range(10):
        share = test[labels == cls].mean()
        assert share == pytest.approx(0.2, abs=0.02), cls


def test_unknown_specs_suggest_names() -> None:
    with pytest.raises(UnknownNameError, match="mnist1d"):
        load_source("mnist-1d", **SPLIT)
    with pytest.raises(UnknownNameError, match="did you mean 'digits'"):
        load_source("sklearn:digitz", **SPLIT)
    with pytest.raises(ParamsError, match="options.limt.*did you mean 'limit'"):
        load_source("idx:somewhere", **SPLIT, options={"limt": 3})


# --- mnist1d ---------------------------------------------------------------------------------


def test_mnist1d_offline_keeps_generator_test_split(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    np.random.seed(123)
    before = np.random.rand()
    np.random.seed(123)
    with monkeypatch.context() as m:
        for name in ("socket", "create_connection", "getaddrinfo"):
            m.setattr(socket, name, no_network)
        ds = load_source("mnist1d", **SPLIT, options={"num_samples": 500})
    assert np.random.rand() == before, "the global numpy RNG must be restored"
    assert ds.features.shape == (500, 1, 40) and ds.modality == "sequence"
    assert ds.meta["generator_args"]["seed"] == SPLIT["seed"]

    from mnist1d.data import get_dataset_args, make_dataset
    from mnist1d.utils import ObjectView

    py_state, np_state = random.getstate(), np.random.get_state()
    args = {**get_dataset_args(as_dict=True), "num_samples": 500, "seed": 0}
    ref = make_dataset(ObjectView(args))
    random.setstate(py_state)
    np.random.set_state(np_state)
    test = ds.split("test")
    assert len(test) == len(ref["y_test"]) == 100
    torch.testing.assert_close(test.features[:, 0], torch.from_numpy(ref["x_test"]).float())
    assert set(_by_split(ds)) == {"train", "val", "test"}


# --- idx -------------------------------------------------------------------------------------


def _write_pair(directory: Path, prefix: str, n: int, gz: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    images = rng.integers(0, 256, (n, 5, 4), dtype=np.uint8)
    write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n, dtype=np.uint8) % 4)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_train_and_t10k(tmp_path: Path, gz: bool) -> None:
    _write_pair(tmp_path, "train", 40, gz, 0)
    _write_pair(tmp_path, "t10k", 20, gz, 1)
    ds = load_source(f"idx:{tmp_path}", **SPLIT)
    assert ds.features.shape == (60, 1, 5, 4) and ds.num_classes == 4
    assert 0.0 <= float(ds.features.min()) and float(ds.features.max()) <= 1.0
    assert [s == "test" for s in ds.splits] == [i.startswith("t10k") for i in ds.sample_ids]
    raw = read_idx(tmp_path / f"t10k-images-idx3-ubyte{'.gz' if gz else ''}")
    expected = torch.from_numpy(raw / 255.0).float()
    torch.testing.assert_close(ds.split("test").features[:, 0], expected)
    assert _by_split(ds)["val"] == 4  # 10% of the 40 train rows


def test_idx_single_pair_is_split_with_fractions(tmp_path: Path, monkeypatch) -> None:
    _write_pair(tmp_path, "t10k", 60, True, 0)
    monkeypatch.chdir(tmp_path.parent)
    ds = load_source(f"idx:{tmp_path.name}", **SPLIT, options={"limit": 40})  # relative to cwd
    assert len(ds) == 40 and _by_split(ds) == {"train": 28, "test": 8, "val": 4}


def test_idx_round_trip_dtypes(tmp_path: Path) -> None:
    for dtype in (np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64):
        arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
        np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a.idx", arr)), arr)


def test_idx_broken_files(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 2, 2), np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(DataError, match="train-images-idx3-ubyte: truncated"):
        read_idx(path)
    path.write_bytes(b"\x08\x03" + data[2:])
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(path)
    gz = tmp_path / "x.gz"
    gz.write_bytes(gzip.compress(data)[:-12])
    with pytest.raises(DataError, match="x.gz"):
        read_idx(gz)
    with pytest.raises(DataError, match="nowhere"):
        load_source(f"idx:{tmp_path / 'nowhere'}", **SPLIT)
    with pytest.raises(DataError, match="no t10k-labels|no train-labels"):
        load_source(f"idx:{tmp_path}", **SPLIT)


def test_idx_real_mnist_t10k(mnist_dir: Path) -> None:
    """The shared MNIST test files (``$KDFLOW_SHARED_DATA``, skipped when absent)."""
    ds = load_source(f"idx:{mnist_dir}", **SPLIT, options={"limit": 300})
    assert ds.features.shape == (300, 1, 28, 28) and ds.num_classes == 10
    assert float(ds.features.max()) == 1.0
    assert ds.labels[:5].tolist() == [7, 2, 1, 0, 4]


# --- parquet ---------------------------------------------------------------------------------


def _table(n: int = 30) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    return pl.DataFrame(
        {
            "sample_id": [f"s{i}" for i in range(n)],
            "f0": rng.normal(size=n),
            "f1": rng.integers(0, 5, n),
            "label": np.arange(n) % 3,
        }
    )


def test_parquet_happy_path(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    _table().write_parquet(path)
    ds = load_source(f"parquet:{path}", **SPLIT)
    assert ds.features.shape == (30, 2) and ds.features.dtype == torch.float32
    assert ds.modality == "tabular" and ds.num_classes == 3 and ds.sample_ids[1] == "s1"
    assert ds.meta["feature_columns"] == ["f0", "f1"]
    _table().drop("sample_id").rename({"label": "y"}).write_parquet(path)
    ds = load_source(f"parquet:{path}", **SPLIT, options={"label_column": "y", "num_classes": 4})
    assert ds.sample_ids[0] == "row-00000" and ds.num_classes == 4


def _at_row_7(column: str, value: object) -> pl.Expr:
    return pl.when(pl.int_range(pl.len()) == 7).then(value).otherwise(pl.col(column)).alias(column)


BROKEN = {
    "nan feature": ("f0", lambda t: t.with_columns(_at_row_7("f0", float("nan")))),
    "inf feature": ("f0", lambda t: t.with_columns(_at_row_7("f0", float("inf")))),
    "label out of range": ("label", lambda t: t.with_columns(_at_row_7("label", -2))),
    "missing label": ("label", lambda t: t.with_columns(_at_row_7("label", None))),
    "duplicate ids": ("sample_id", lambda t: t.with_columns(_at_row_7("sample_id", pl.lit("s6")))),
    "string feature": ("color", lambda t: t.with_columns(pl.lit("red").alias("color"))),
    "float label": ("label", lambda t: t.with_columns(_at_row_7("label", 7.5))),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_parquet_broken_tables_name_column_and_rows(tmp_path: Path, case: str) -> None:
    column, breaker = BROKEN[case]
    path = tmp_path / "t.parquet"
    breaker(_table()).write_parquet(path)
    with pytest.raises(DataError) as info:
        load_source(f"parquet:{path}", **SPLIT)
    message = str(info.value)
    assert f"'{column}'" in message and str(path) in message
    assert "rows [" in message
    if case != "string feature":
        assert "rows [7]" in message or "rows [6, 7]" in message


def test_parquet_label_out_of_declared_range_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    _table().write_parquet(path)
    with pytest.raises(DataError, match=r"'label' fails in_range\(0, 1\)"):
        load_source(f"parquet:{path}", **SPLIT, options={"num_classes": 2})
    with pytest.raises(DataError, match="missing.parquet"):
        load_source(f"parquet:{tmp_path / 'missing.parquet'}", **SPLIT)
