"""The losses' registry contract: params models, metadata, LossBase hooks, build_loss, loss_needs."""
from __future__ import annotations

import typing

import pytest
import torch

from kdflow.condense.nrr_dd import dbr_batch
from kdflow.data.dataset import Dataset
from kdflow.losses import LOSSES, LossBase, build_loss, create_loss, loss_needs, loss_params
from kdflow.losses.ce import CEParams
from kdflow.losses.dbr import DBRParams
from kdflow.losses.kd import KDParams
from kdflow.losses.topk_kd import TopKKDParams
from kdflow.tracks import discovered
from schemas.base import Section


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_declares_its_params_and_metadata(name: str) -> None:
    cls, meta = LOSSES.get(name), LOSSES.meta(name)
    params = meta["params"]
    assert params is loss_params(name) and issubclass(params, Section) and issubclass(cls, LossBase)
    assert typing.get_args(params.model_fields["name"].annotation) == (name,)
    assert params.model_fields["name"].default == name
    assert meta["tracks"] and set(meta["tracks"]) <= set(discovered())  # tracks that exist
    assert loss_needs(name) == cls.needs and "y" in loss_needs(name)
    assert all(f.description for f in params.model_fields.values())
    built = build_loss(params(), {"capture_temperature": 1.0}, {})  # every default builds
    assert type(built) is cls


def test_params_keep_the_flat_schema_defaults_and_bounds() -> None:
    assert CEParams().model_dump() == {"name": "ce"}
    assert KDParams().model_dump() == {"name": "kd", "temperature": 4.0, "alpha": 0.9}
    assert TopKKDParams().model_dump() == {"name": "topk_kd", "temperature": 4.0, "alpha": 0.9}
    assert DBRParams().model_dump() == {"name": "dbr", "beta": 1.0}
    for bad in ({"temperature": 0}, {"temperature": 101}, {"alpha": -0.1}, {"alpha": 1.1}):
        with pytest.raises(ValueError):
            KDParams(**bad)
    for bad in ({"beta": -1}, {"beta": 10_001}, {"temperature": 2.0}):  # dbr's temperature comes from the data
        with pytest.raises(ValueError):
            DBRParams(**bad)
    with pytest.raises(ValueError, match="beta"):
        KDParams(beta=1.0)


def test_context_hooks() -> None:
    info, meta = {"capture_temperature": 2, "k": 5}, {"dbr_temperature": 3}
    assert LOSSES.get("topk_kd").context(info, meta) == {"capture_temperature": 2.0}
    assert LOSSES.get("dbr").context(info, meta) == {"temperature": 3.0}
    assert LOSSES.get("dbr").context(info, {}) == {"temperature": 1.0}
    assert LOSSES.get("kd").context(info, meta) == {} == LOSSES.get("ce").context(info, meta)


def test_build_loss_adds_the_context() -> None:
    topk = build_loss(TopKKDParams(temperature=2.0, alpha=0.5), {"capture_temperature": 1.5}, {})
    assert (topk.temperature, topk.alpha, topk.capture_temperature) == (2.0, 0.5, 1.5)
    dbr = build_loss(DBRParams(beta=0.25), {}, {"dbr_temperature": 2.0})
    assert (dbr.temperature, dbr.beta) == (2.0, 0.25)
    kd = build_loss(KDParams(temperature=3.0), {"capture_temperature": 9.0}, {"dbr_temperature": 9.0})
    assert repr(kd) == repr(create_loss("kd", temperature=3.0, alpha=0.9))
    with pytest.raises(TypeError, match="built from TopKKDParams, got KDParams"):  # the model must match the name
        build_loss(KDParams.model_construct(name="topk_kd"), {"capture_temperature": 1.0}, {})


def test_inputs_hook() -> None:
    g = torch.Generator().manual_seed(0)
    n = 6
    extras = {
        "dbr_partner": torch.randperm(n, generator=g), "dbr_y_aug": torch.randint(0, 3, (n,), generator=g),
        "dbr_lambda": torch.rand(n, generator=g), "dbr_d_org": torch.rand(n, generator=g),
        "dbr_d_aug": torch.rand(n, generator=g),
    }
    ds = Dataset(torch.randn(n, 1, 4, 4, generator=g), torch.arange(n) % 3, [f"s{i}" for i in range(n)],
                 ["train"] * n, 3, "image", extras=extras)
    got, ref = LOSSES.get("dbr").inputs(ds), dbr_batch(ds)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert set(loss_needs("dbr")) <= set(got)
    assert all(LOSSES.get(name).inputs(ds) is None for name in ("ce", "kd", "topk_kd"))
