"""The condensers' registry contract: params models, metadata, exact keyword arguments, validation."""
from __future__ import annotations

import inspect
import typing

import pytest
import torch

from kdflow.condense import CONDENSERS, condense, condense_params
from kdflow.condense.nrr_dd import dbr_batch
from kdflow.data.dataset import Dataset
from kdflow.errors import ParamsError
from kdflow.tracks import discovered
from kdflow.models import create_model
from schemas.base import Section
from tests.condense.test_mirage import TOY, as_dataset, make_graphs

CPU = torch.device("cpu")
COMMON = ("teacher", "seed", "device", "report")
TRACKS = set(discovered())


def images(n_per_class: int = 4) -> Dataset:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    x = torch.randn(len(labels), 1, 8, 8, generator=g) + labels.view(-1, 1, 1, 1).float()
    return Dataset(x, labels, [f"s{i}" for i in range(len(labels))], ["train"] * len(labels), 3, "image")


@pytest.mark.parametrize("name", CONDENSERS.names())
def test_every_condenser_declares_its_params_and_metadata(name: str) -> None:
    meta = CONDENSERS.meta(name)
    params = meta["params"]
    assert params is condense_params(name) and issubclass(params, Section)
    assert typing.get_args(params.model_fields["method"].annotation) == (name,)
    assert params.model_fields["method"].default == name
    assert meta["tracks"] and set(meta["tracks"]) <= TRACKS
    assert isinstance(meta["needs_teacher"], bool) and isinstance(meta["provides"], tuple)
    assert all(f.description for f in params.model_fields.values())


@pytest.mark.parametrize("name", CONDENSERS.names())
def test_every_condenser_takes_exactly_its_knobs(name: str) -> None:
    sig = inspect.signature(CONDENSERS.get(name))
    kinds = [p.kind for p in sig.parameters.values()]
    assert inspect.Parameter.VAR_KEYWORD not in kinds and inspect.Parameter.VAR_POSITIONAL not in kinds
    first, *rest = sig.parameters.values()
    assert first.name == "train" and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in rest)
    knobs = set(condense_params(name).model_fields) - {"method"}
    assert [p.name for p in rest] == [*COMMON, *(p.name for p in rest if p.name in knobs)]
    assert {p.name for p in rest} == {*COMMON, *knobs}
    assert all(p.default is inspect.Parameter.empty for p in rest)  # defaults live in the params model


def test_metadata_values() -> None:
    import kdflow.tracks.lm  # noqa: F401  the lm track registers its own condenser (generate)

    every = {name: CONDENSERS.meta(name) for name in CONDENSERS.names()}
    assert every["generate"]["tracks"] == ("lm",) and every["generate"]["needs_teacher"]
    meta = {n: m for n, m in every.items() if set(m["tracks"]) & {"classify", "graph"}}  # the built-in ones
    assert {n for n, m in meta.items() if m["needs_teacher"]} == {"herding", "k_center", "rded", "nrr_dd"}
    assert {n for n, m in meta.items() if "graph" in m["tracks"]} == {"none", "random", "herding", "k_center", "mirage"}
    assert {n for n, m in meta.items() if "classify" in m["tracks"]} == set(meta) - {"mirage"}
    assert meta["nrr_dd"]["provides"] == ("y_aug", "d_org", "d_aug", "lam")
    assert meta["mirage"]["provides"] == ("weight",)
    assert all(not m["provides"] for n, m in meta.items() if n not in ("nrr_dd", "mirage"))


def test_what_nrr_dd_and_mirage_provide_is_what_they_write() -> None:
    teacher = create_model("tiny_convnet", (1, 8, 8), 3)
    small = condense("nrr_dd", images(), teacher=teacher, ipc=1, iterations=1, crops_per_image=2, images_per_class=2)
    assert set(CONDENSERS.meta("nrr_dd")["provides"]) == set(dbr_batch(small)) - {"x", "y"}
    graphs = condense("mirage", as_dataset(make_graphs(TOY)), thresholds=[2, 2])  # frequency "weight"
    assert set(CONDENSERS.meta("mirage")["provides"]) <= set(graphs.extras)


@pytest.mark.parametrize("name", ["herding", "k_center", "random", "none"])
def test_coreset_methods_run_on_graphs(name: str) -> None:
    ds = as_dataset(make_graphs(TOY))
    needs_teacher = CONDENSERS.meta(name)["needs_teacher"]
    teacher = create_model("tiny_gcn", ds.input_shape, ds.num_classes) if needs_teacher else None
    out = condense(name, ds, teacher=teacher, **({} if name == "none" else {"ipc": 1}))
    assert out.modality == "graph" and len(out) == (len(ds) if name == "none" else 2)


def test_a_misspelt_knob_names_the_key() -> None:
    with pytest.raises(ParamsError) as err:
        condense("rded", images(), teacher=None, factr=2)
    assert err.value.problems == ["condense.factr: unknown key; did you mean 'factor'?"]


def test_another_methods_knob_is_rejected() -> None:
    with pytest.raises(ParamsError, match=r"condense\.factor: unknown key"):
        condense("mirage", as_dataset(make_graphs(TOY)), thresholds=[2, 2], factor=2)
    with pytest.raises(ParamsError, match=r"condense\.ipc: unknown key"):
        condense("none", images(), ipc=3)


def test_every_problem_is_listed_with_its_bound() -> None:
    with pytest.raises(ParamsError) as err:
        condense("nrr_dd", images(), teacher=None, ipc=0, eps=3.0, frequency="weight")
    assert sorted(err.value.problems) == [
        "condense.eps: must be <= 2 (got 3)",
        "condense.frequency: unknown key (allowed: method, ipc, factor, crops_per_image, images_per_class, scale_min, "
        "scale_max, cam_pool, correct_only, eps, iterations, lr, bn_weight, temperature, views, view_scale_min, "
        "view_scale_max, view_flip)",
        "condense.ipc: must be >= 1 (got 0)",
    ]


def test_mirage_validators_moved_with_the_method() -> None:
    graphs = as_dataset(make_graphs(TOY))
    with pytest.raises(ParamsError, match="exactly one of 'thresholds'"):
        condense("mirage", graphs)
    with pytest.raises(ParamsError, match="exactly one of 'thresholds'"):
        condense("mirage", graphs, thresholds=2, target_graphs=4)
    with pytest.raises(ParamsError, match=r"condense\.thresholds: mirage thresholds must be integers >= 1"):
        condense("mirage", graphs, thresholds=[0, 2])
    with pytest.raises(ParamsError, match=r"condense\.frequency: must be one of"):
        condense("mirage", graphs, thresholds=2, frequency="often")


def test_params_defaults() -> None:
    """rded/nrr_dd crop defaults are the official RDED protocol's (factor by resolution, scale
    0.08-1, 300 images per class); the rest as the flat ``condense`` section had."""
    rded, nrr, mirage = (condense_params(m) for m in ("rded", "nrr_dd", "mirage"))
    assert rded(method="rded").model_dump() == {
        "method": "rded", "ipc": 10, "factor": None, "crops_per_image": 5, "images_per_class": 300,
        "scale_min": 0.08, "scale_max": 1.0,
    }
    assert nrr(method="nrr_dd").model_dump(exclude=set(rded.model_fields)) == {
        "cam_pool": 0.5, "correct_only": True, "eps": 0.5, "iterations": 100, "lr": 0.05, "bn_weight": 1.0,
        "temperature": 1.0, "views": 300, "view_scale_min": 0.5, "view_scale_max": 1.0, "view_flip": True,
    }
    assert mirage(target_graphs=5).model_dump() == {
        "method": "mirage", "hops": 2, "thresholds": None, "target_graphs": 5, "frequency": "weight",
        "max_set_size": None,
    }
    assert condense_params("random")().ipc == condense_params("herding")().ipc == 10
