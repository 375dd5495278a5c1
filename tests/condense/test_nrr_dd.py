"""NRR-DD: Grad-CAM, masked refinement keeps critical pixels, BN matching decreases, DBR extras."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdflow.condense import CONDENSERS, condense, per_class_indices
from kdflow.condense.nrr_dd import (
    bn_matching_loss, cam_ratios, dbr_distances, grad_cam, mix, refine,
)
from kdflow.condense.rded import candidate_crops, sample_class_images
from kdflow.data.dataset import Dataset
from kdflow.models import create_model
from kdflow.train.loop import predict

CPU = torch.device("cpu")
FAST = {"iterations": 3, "crops_per_image": 2, "images_per_class": 4}


def toy(shape: tuple[int, int, int], n_per_class: int = 5, classes: int = 3, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    x = torch.randn(len(labels), *shape, generator=g) + labels.view(-1, 1, 1, 1).float()
    return Dataset(x, labels, [f"s{i}" for i in range(len(labels))], ["train"] * len(labels), classes, "image")


def teacher(shape: tuple[int, int, int], classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("tiny_convnet", shape, classes)
    for m in model.modules():  # non-trivial running statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_nrr_dd_is_registered() -> None:
    assert "nrr_dd" in CONDENSERS.names()


def test_grad_cam_matches_a_hand_computed_one_on_the_convnet_body() -> None:
    model = teacher((1, 8, 8)).eval()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0])
    a = model.body(x).detach().requires_grad_(True)  # [4, 4, 4, 4] last spatial map
    logits = model.head(model.hidden(a.flatten(2).mean(-1)))
    (g,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), a)
    ref = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    ref = F.interpolate(ref, size=(8, 8), mode="bilinear", align_corners=False)[:, 0].detach()
    for i in range(4):
        r = ref[i]
        r = (r - r.min()) / (r.max() - r.min()) if r.max() > r.min() else torch.zeros_like(r)
        assert torch.allclose(grad_cam(model, x, y)[i], r, atol=1e-5)


def test_cam_ratio_is_the_cam_mass_inside_the_box() -> None:
    cam = torch.zeros(1, 4, 4)
    cam[0, :2, :2] = 1.0
    ratios = cam_ratios(cam, [(0, 0, 2, 2), (2, 2, 2, 2), (0, 0, 4, 2)], 3)
    assert ratios.tolist() == [1.0, 0.0, 1.0]


def test_refinement_moves_only_non_critical_pixels() -> None:
    model = teacher((1, 8, 8))
    x0 = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    mask = (0.5 - grad_cam(model, x0, y)).clamp_min(0)[:, None]  # M = max(0, eps - C)
    frozen = mask == 0
    assert frozen.any() and (~frozen).any()
    x = refine(model, x0, y, mask, iterations=5, lr=0.1, bn_weight=1.0)
    assert torch.equal(x[frozen.expand_as(x)], x0[frozen.expand_as(x0)])
    assert not torch.equal(x[~frozen.expand_as(x)], x0[~frozen.expand_as(x0)])


def test_refinement_is_the_masked_gradient_step_on_a_linear_teacher() -> None:
    """x <- x - M * eta * grad, by hand: the CE gradient of a linear model is (p - onehot) W / N."""
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    w, b = lin[1].weight.detach(), lin[1].bias.detach()
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([2, 0])
    mask = torch.tensor([[1.0, 0.5], [0.0, 0.01]]).expand(2, 1, 2, 2)
    ref = x.clone()
    for _ in range(3):
        p = (ref.flatten(1) @ w.T + b).softmax(-1)  # [2, 3]
        grad = ((p - F.one_hot(y, 3).float()) @ w / len(y)).view_as(x)
        ref = ref - mask * 0.7 * grad
    got = refine(lin, x, y, mask, iterations=3, lr=0.7, bn_weight=1.0)
    assert torch.allclose(got, ref, atol=1e-6)
    assert torch.equal(got[:, :, 1, 0], x[:, :, 1, 0])  # M == 0: untouched


def test_a_soft_mask_scales_the_step() -> None:
    """Pixels with M = 0.01 move about 1% as far as pixels with M = 1 (Adam would move both alike)."""
    model = teacher((1, 8, 8))
    x0 = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    mask = torch.ones(6, 1, 8, 8)
    mask[..., ::2, :] = 0.01  # even rows nearly frozen
    x = refine(model, x0, y, mask, iterations=10, lr=1.0, bn_weight=1.0)
    moved = (x - x0).abs()
    soft, full = float(moved[..., ::2, :].mean()), float(moved[..., 1::2, :].mean())
    assert full > 0 and soft < 0.05 * full


def test_bn_matching_term_decreases_under_refinement() -> None:
    model = teacher((3, 8, 8))
    x0 = 3 * torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(3)) + 1
    y = torch.arange(8) % 3
    with torch.no_grad():
        before = float(bn_matching_loss(model, x0))
    x = refine(model, x0, y, torch.ones(8, 1, 8, 8), iterations=20, lr=5.0, bn_weight=10.0)
    with torch.no_grad():
        assert float(bn_matching_loss(model, x)) < 0.5 * before


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 8), (3, 16, 16), (1, 28, 28)])
def test_nrr_dd_shapes_and_extras(shape: tuple[int, int, int]) -> None:
    out = condense("nrr_dd", toy(shape), teacher=teacher(shape), ipc=2, seed=0, device=CPU, **FAST)
    out.validate()
    assert out.features.shape == (6, *shape)
    assert torch.bincount(out.labels).tolist() == [2, 2, 2]
    for key in ("dbr_d_org", "dbr_d_aug", "dbr_lambda", "dbr_partner", "dbr_y_aug"):
        assert out.extras[key].shape == (6,)
    assert out.extras["soft_labels"].shape == (6, 3)


def test_dbr_distances_recomputed_from_the_teacher_match_the_stored_ones() -> None:
    model = teacher((1, 8, 8))
    out = condense("nrr_dd", toy((1, 8, 8)), teacher=model, ipc=3, seed=4, device=CPU, temperature=2.0, **FAST)
    e = out.extras
    assert torch.equal(e["dbr_y_aug"], out.labels[e["dbr_partner"]])
    logits = predict(model, mix(out.features, e["dbr_partner"], e["dbr_lambda"]))
    d_org, d_aug = dbr_distances(logits, out.labels, e["dbr_y_aug"], 2.0)
    assert torch.allclose(d_org, e["dbr_d_org"], atol=1e-5) and torch.allclose(d_aug, e["dbr_d_aug"], atol=1e-5)
    # and the distance is the cross-entropy to the one-hot label at temperature T
    ref = torch.stack([-torch.log_softmax(logits[i] / 2.0, 0)[out.labels[i]] for i in range(len(logits))])
    assert torch.allclose(d_org, ref, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 8)])
def test_nrr_dd_is_deterministic_given_the_seed(shape: tuple[int, int, int]) -> None:
    model, ds = teacher(shape), toy(shape)
    run = lambda seed: condense("nrr_dd", ds, teacher=model, ipc=2, seed=seed, device=CPU, **FAST)  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.features, b.features)
    assert all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras)
    assert not torch.equal(a.features, c.features)


def test_zero_eps_freezes_the_stitched_images() -> None:
    model, ds = teacher((1, 8, 8)), toy((1, 8, 8))
    frozen = condense("nrr_dd", ds, teacher=model, ipc=2, seed=0, device=CPU, eps=0.0, **FAST)
    initial = condense("nrr_dd", ds, teacher=model, ipc=2, seed=0, device=CPU, **{**FAST, "iterations": 0})
    assert torch.equal(frozen.features, initial.features)


def test_a_teacher_without_spatial_layers_gets_input_saliency() -> None:
    torch.manual_seed(0)
    mlp = create_model("mlp", (1, 8, 8), 3, hidden=[16])
    out = condense("nrr_dd", toy((1, 8, 8)), teacher=mlp, ipc=1, seed=0, device=CPU, **FAST)
    assert out.features.shape == (3, 1, 8, 8)
    cam = grad_cam(mlp, out.features, out.labels)
    assert cam.shape == (3, 8, 8) and float(cam.min()) >= 0 and float(cam.max()) <= 1


def test_initial_crops_prefer_recognised_then_least_confident() -> None:
    model, ds = teacher((1, 8, 8)), toy((1, 8, 8), n_per_class=8)
    kw = {"iterations": 0, "crops_per_image": 3, "images_per_class": 8, "factor": 1, "cam_pool": 1.0}
    out = condense("nrr_dd", ds, teacher=model, ipc=2, seed=0, device=CPU, **kw)
    probs = predict(model, out.features).softmax(-1)
    recognised = probs.argmax(-1) == out.labels
    # the least confident recognised crop leads each class whenever the class has one
    g, checked = torch.Generator().manual_seed(0), 0  # replay the method's draws
    for c, rows in enumerate(per_class_indices(ds.labels, 3)):
        crops, _ = candidate_crops(ds.features[sample_class_images(rows, 8, g)], 3, (0.08, 1.0), g)
        p = predict(model, crops).softmax(-1)
        ok = p.argmax(-1) == c
        if ok.any():
            assert bool(recognised[2 * c])
            assert float(probs[2 * c, c]) == pytest.approx(float(p[ok, c].min()), abs=1e-6)
            checked += 1
    assert checked >= 1
