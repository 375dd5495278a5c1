"""RDED: stitching geometry, crop ranking, shapes for 1/3 channels and several sizes, determinism."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kdflow.condense import CONDENSERS, condense
from kdflow.condense.rded import (
    RdedParams, candidate_crops, cell_edges, default_factor, random_resized_box, rank_candidates, rded, stitch,
)
from kdflow.data.dataset import Dataset
from kdflow.errors import DataError, ParamsError
from kdflow.models import create_model
from kdflow.train.loop import predict

CPU = torch.device("cpu")


def toy(shape: tuple[int, int, int], n_per_class: int = 6, classes: int = 3, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    x = torch.randn(len(labels), *shape, generator=g) + labels.view(-1, 1, 1, 1).float()
    return Dataset(x, labels, [f"s{i}" for i in range(len(labels))], ["train"] * len(labels), classes, "image")


class MeanTeacher(nn.Module):
    """Logits ``[mean(x), 0]``: class 0 likes bright crops, class 1 dark ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1)
        return torch.stack([m, torch.zeros_like(m)], dim=1)


def test_rded_is_registered() -> None:
    assert "rded" in CONDENSERS.names()


@pytest.mark.parametrize("size,factor", [((8, 8), 2), ((9, 7), 2), ((16, 16), 4), ((28, 28), 3)])
def test_stitch_puts_patch_k_in_cell_row_major(size: tuple[int, int], factor: int) -> None:
    patches = torch.arange(factor * factor, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 2, 5, 5)
    out = stitch(patches.contiguous(), factor, size)
    assert out.shape == (2, *size)
    rows, cols = cell_edges(size[0], factor), cell_edges(size[1], factor)
    assert rows[0] == 0 and rows[-1] == size[0] and cols[-1] == size[1]
    for k in range(factor * factor):
        i, j = divmod(k, factor)
        cell = out[:, rows[i] : rows[i + 1], cols[j] : cols[j + 1]]
        assert cell.numel() > 0 and torch.allclose(cell, torch.full_like(cell, float(k)))


def test_random_resized_box_stays_inside_and_respects_scale() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_box(12, 10, (0.3, 0.6), g)
        assert 0 <= top and top + h <= 12 and 0 <= left and left + w <= 10 and h >= 1 and w >= 1


def test_rank_candidates_takes_one_crop_per_image_first() -> None:
    score = torch.tensor([0.1, 0.2, 5.0, 0.3, 0.05, 9.0])  # 3 images x 2 crops, image-major
    # best crop of each image by score (0.05, 0.1, 0.3), then the second-best ones (0.2, 5, 9)
    assert rank_candidates(score, 2).tolist() == [4, 0, 3, 1, 2, 5]


def test_rded_picks_the_most_confident_crops_and_places_them_in_order() -> None:
    values = torch.tensor([1.0, 8.0, 3.0, 6.0, 2.0, 7.0, 5.0, 4.0, -1.0, -4.0, -2.0, -3.0])
    labels = torch.tensor([0] * 8 + [1] * 4)
    x = values.view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()  # constant images
    ds = Dataset(x, labels, [f"s{i}" for i in range(12)], ["train"] * 12, 2, "image")
    out = condense("rded", ds, teacher=MeanTeacher(), ipc=1, seed=0, device=CPU, factor=2, crops_per_image=1)
    cells = out.features[:, 0, ::4, ::4]  # one pixel per 4x4 cell, [2, 2, 2]
    assert cells[0].flatten().tolist() == [8.0, 7.0, 6.0, 5.0]  # class 0: brightest first
    assert cells[1].flatten().tolist() == [-4.0, -3.0, -2.0, -1.0]  # class 1: darkest first
    assert out.labels.tolist() == [0, 1]


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 8), (3, 16, 16), (1, 28, 28)])
def test_rded_shapes_and_soft_labels(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    teacher = create_model("tiny_convnet", shape, 3)
    ds = toy(shape)
    out = condense("rded", ds, teacher=teacher, ipc=2, seed=0, device=CPU, factor=2, crops_per_image=2)
    out.validate()
    assert out.features.shape == (6, *shape)
    assert torch.bincount(out.labels).tolist() == [2, 2, 2]
    assert len(set(out.sample_ids)) == 6
    assert torch.allclose(out.extras["soft_labels"], predict(teacher, out.features))


def test_rded_is_deterministic_given_the_seed() -> None:
    torch.manual_seed(0)
    teacher = create_model("tiny_convnet", (1, 8, 8), 3)
    ds = toy((1, 8, 8))
    run = lambda seed: condense("rded", ds, teacher=teacher, ipc=2, seed=seed, device=CPU)  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.features, b.features) and torch.equal(a.extras["soft_labels"], b.extras["soft_labels"])
    assert not torch.equal(a.features, c.features)


def test_rded_rejects_bad_arguments() -> None:
    teacher = create_model("tiny_convnet", (1, 8, 8), 3)
    with pytest.raises(DataError, match="factor"):  # within the params' bounds, too large for 8x8 images
        condense("rded", toy((1, 8, 8)), teacher=teacher, ipc=1, seed=0, device=CPU, factor=9)
    with pytest.raises(ParamsError, match=r"condense\.scale_min: must be > 0 \(got 0\)"):
        condense("rded", toy((1, 8, 8)), teacher=teacher, ipc=1, seed=0, device=CPU, scale_min=0.0)
    with pytest.raises(ParamsError, match=r"scale_min \(0.9\) must be <= scale_max \(0.5\)"):
        condense("rded", toy((1, 8, 8)), teacher=teacher, ipc=1, seed=0, device=CPU, scale_min=0.9, scale_max=0.5)
    with pytest.raises(DataError, match="scale"):  # a direct call is checked by the method itself
        rded(toy((1, 8, 8)), teacher=teacher, seed=0, device=CPU, report=None,
             **{**RdedParams().model_dump(exclude={"method"}), "scale_min": 0.0})


def test_a_misspelt_knob_is_an_error_naming_it() -> None:
    teacher = create_model("tiny_convnet", (1, 8, 8), 3)
    with pytest.raises(ParamsError, match=r"condense\.factr: unknown key; did you mean 'factor'\?") as err:
        condense("rded", toy((1, 8, 8)), teacher=teacher, ipc=1, seed=0, device=CPU, factr=2)
    assert err.value.problems == ["condense.factr: unknown key; did you mean 'factor'?"]


def test_the_model_defaults_reach_the_method() -> None:
    """``condense`` without knobs equals a direct call with the params model's defaults."""
    teacher, ds = create_model("tiny_convnet", (1, 8, 8), 3), toy((1, 8, 8))
    a = condense("rded", ds, teacher=teacher, seed=3, device=CPU)
    b = rded(ds, teacher=teacher, seed=3, device=CPU, report=None, ipc=10, factor=1, crops_per_image=5,
             images_per_class=300, scale_min=0.08, scale_max=1.0)
    assert torch.equal(a.features, b.features) and len(a) == 30


def test_default_factor_follows_the_official_resolution_rule() -> None:
    assert [default_factor((s, s)) for s in (8, 28, 32, 64, 127, 128, 224)] == [1, 1, 1, 1, 1, 2, 2]
    assert default_factor((128, 64)) == 1  # the smaller side decides


def test_default_crops_are_square_and_span_the_official_scale_range() -> None:
    g = torch.Generator().manual_seed(0)
    _, boxes = candidate_crops(torch.zeros(50, 1, 64, 64), 8, (0.08, 1.0), g)
    areas = torch.tensor([h * w / 64**2 for _, _, h, w in boxes])
    assert all(h == w for _, _, h, w in boxes)
    assert areas.min() < 0.15 and areas.max() > 0.9 and 0.07 <= float(areas.min())


def test_stitch_order_interleaves_ranks_across_cells() -> None:
    """Cell j of image i takes rank j * ipc + i (the official order), checked on constant images."""
    values = torch.arange(8, 0, -1).float()  # brightest = most confident for class 0 of MeanTeacher
    x = values.view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    ds = Dataset(x, torch.zeros(8, dtype=torch.long), [f"s{i}" for i in range(8)], ["train"] * 8, 2, "image")
    out = condense("rded", ds, teacher=MeanTeacher(), ipc=2, seed=0, device=CPU, factor=2, crops_per_image=1)
    ranks = 8 - out.features[:, 0, ::4, ::4].flatten(1)  # rank 0 = value 8; [ipc, cells]
    expected = [[j * 2 + i for j in range(4)] for i in range(2)]
    assert ranks.tolist() == expected
