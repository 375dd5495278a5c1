"""NRR-DD: Grad-CAM, masked refinement keeps critical pixels, BN matching decreases, DBR extras."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdflow.condense import CONDENSERS, condense, per_class_indices
from kdflow.condense.nrr_dd import (
    DBRViews, bn_matching_loss, cam_ratios, grad_cam, mix, refine,
)
from kdflow.condense.rded import candidate_crops, sample_class_images
from kdflow.data.augment import Augment, apply_views, boxes_from_seeds, uniforms, view_seeds
from kdflow.data.dataset import Dataset
from kdflow.errors import DataError, ParamsError
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
    for key in ("dbr_d_org", "dbr_d_aug"):  # two fp16 distances per stored view
        assert out.extras[key].shape == (6, 300) and out.extras[key].dtype == torch.float16
    assert not {"dbr_lambda", "dbr_partner", "dbr_y_aug"} & set(out.extras)  # views are rebuilt from seeds
    assert out.meta["dbr_views"] == 300 and out.meta["dbr_augment"]["scale_min"] == 0.5
    assert out.extras["soft_labels"].shape == (6, 3)


def brute_force_view(x: torch.Tensor, i: int, v: int, n: int, views: int, seed: int, aug: Augment
                     ) -> tuple[torch.Tensor, int, float]:
    """View ``v`` of image ``i`` built one at a time from its seed: (image [C, H, W], partner, lam)."""
    s = view_seeds(seed, n, views)[i * views + v : i * views + v + 1]
    box, flip = boxes_from_seeds(s, tuple(x.shape[1:]), aug)
    u = uniforms(s, 7)[0]
    others = [j for j in range(n) if j != i]
    j = others[min(int(u[5] * (n - 1)), n - 2)]
    lam = float(torch.tensor(u[6]).float())
    mixed = lam * x[i] + (1 - lam) * x[j]
    return apply_views(mixed[None], box, flip)[0], j, lam


def test_dbr_distances_of_every_view_match_a_brute_force_recomputation() -> None:
    """Per stored view: rebuild the view (mixup with a partner, crop, flip) from its seed one image at
    a time, run the teacher on it alone, and get the stored distances; the student's batches in
    epoch e are view (e - 1) % views with the same images, labels and distances."""
    model = teacher((1, 8, 8))
    out = condense("nrr_dd", toy((1, 8, 8)), teacher=model, ipc=3, seed=4, device=CPU, temperature=2.0,
                   views=4, view_scale_min=0.3, **FAST)
    e, m, n = out.extras, out.meta, len(out)
    assert e["dbr_d_org"].shape == (n, 4) and m["dbr_temperature"] == 2.0
    aug = Augment(**m["dbr_augment"])
    assert (aug.scale_min, aug.flip) == (0.3, True)
    views = DBRViews(out)
    lams, xs = [], []
    for v in range(4):
        batch = views(torch.arange(n), v + 1)  # epoch v + 1
        assert torch.equal(views(torch.arange(n), v + 5)["x"], batch["x"])  # epochs cycle through the views
        for i in range(n):
            img, j, lam = brute_force_view(out.features, i, v, n, 4, m["dbr_view_seed"], aug)
            assert j != i and batch["y_aug"][i] == out.labels[j] and batch["lam"][i] == lam
            assert torch.allclose(batch["x"][i], img, atol=1e-6)
            logits = model.eval()(img[None]).detach()
            ref_org = -torch.log_softmax(logits[0] / 2.0, 0)[out.labels[i]]  # cross-entropy to the one-hot label
            ref_aug = -torch.log_softmax(logits[0] / 2.0, 0)[out.labels[j]]
            for key, ref in (("dbr_d_org", ref_org), ("dbr_d_aug", ref_aug)):
                assert float(e[key][i, v]) == pytest.approx(float(ref), rel=2e-3, abs=2e-3)  # fp16 storage
            assert float(batch["d_org"][i]) == float(e["dbr_d_org"][i, v])
            lams.append(lam)
        xs.append(batch["x"])
    assert len(set(lams)) == len(lams)  # every view draws its own mixup
    assert not torch.equal(xs[0], xs[1])
    # the whole extras: 2 fp16 distances per view
    assert sum(t.numel() * t.element_size() for k, t in e.items() if k.startswith("dbr_")) == n * 4 * 2 * 2


def test_a_set_condensed_before_per_view_storage_is_read_as_one_view() -> None:
    """Old artifacts (one uncropped mixup view per image, [N] extras) still train: every epoch sees it."""
    g = torch.Generator().manual_seed(0)
    n = 5
    partner, lam = torch.randperm(n, generator=g), torch.rand(n, generator=g)
    labels = torch.arange(n) % 2
    old = {"dbr_partner": partner, "dbr_y_aug": labels[partner], "dbr_lambda": lam,
           "dbr_d_org": torch.rand(n, generator=g), "dbr_d_aug": torch.rand(n, generator=g)}
    ds = Dataset(torch.randn(n, 1, 4, 4, generator=g), labels, [f"s{i}" for i in range(n)], ["train"] * n, 2,
                 "image", extras=old)
    views = DBRViews(ds)
    for epoch in (1, 7):
        b = views(torch.arange(n), epoch)
        assert torch.equal(b["x"], mix(ds.features, partner, lam)) and torch.equal(b["d_org"], old["dbr_d_org"])


def test_dbr_views_reject_sets_without_or_with_mismatched_extras() -> None:
    ds = toy((1, 4, 4))
    with pytest.raises(DataError, match="lacks extras .*use condense.method nrr_dd"):
        DBRViews(ds)
    n = len(ds)
    bad = Dataset(ds.features, ds.labels, ds.sample_ids, ds.splits, 3, "image",
                  extras={"dbr_d_org": torch.zeros(n, 3), "dbr_d_aug": torch.zeros(n, 3)},
                  meta={"dbr_views": 4, "dbr_view_seed": 0, "dbr_augment": Augment().as_dict()})
    with pytest.raises(DataError, match=r"do not match meta .*condense again"):
        DBRViews(bad)


def test_nrr_dd_rejects_bad_view_params() -> None:
    model, ds = teacher((1, 8, 8)), toy((1, 8, 8))
    with pytest.raises(ParamsError, match="condense.views: must be >= 1"):
        condense("nrr_dd", ds, teacher=model, ipc=1, seed=0, device=CPU, views=0, **FAST)
    with pytest.raises(ParamsError, match="view_scale_min"):
        condense("nrr_dd", ds, teacher=model, ipc=1, seed=0, device=CPU, view_scale_min=0.9, view_scale_max=0.5,
                 **FAST)


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
