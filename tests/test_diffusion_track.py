"""The diffusion track: data, teacher trajectories, the three distillation losses against reference
formulas, the classifier-space statistics against closed forms, the exported pipeline, bad input,
and (slow) ``kdflow run -c configs/digits-diffusion.yaml``."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, shared_data
from kdflow.data.dataset import Dataset
from kdflow.data.idx import write_idx
from kdflow.errors import DataError, ModelError, ParamsError
from kdflow.tracks import get_track
from kdflow.tracks.diffusion import Latents, noise
from kdflow.tracks.diffusion import evaluation as ev
from kdflow.tracks.diffusion.losses.consistency import Consistency, consistency_reference
from kdflow.tracks.diffusion.losses.denoise import DenoiseLoss, denoise_reference
from kdflow.tracks.diffusion.losses.dmd import DMD, dmd_reference
from kdflow.tracks.diffusion.losses.regression import Regression, regression_reference
from kdflow.tracks.diffusion.models import (Denoiser, FewStepGenerator, boundary_scalings, build_unet, load_diffusion,
                                            save_diffusion)
from kdflow.tracks.diffusion.sampling import CLEAN, ddim, few_step, state_times

TRACK = get_track("diffusion")
FASHION = Path("/usr/share/datasets/fashion-mnist")
SHAPE = (1, 8, 8)


def tiny_unet(classes: int | None = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet(SHAPE, classes, channels=[8, 16], norm_groups=4)


@pytest.fixture(scope="module")
def teacher() -> Denoiser:
    return Denoiser(tiny_unet()).eval()


def student_of(teacher_dir: Path, steps: list[int] = [1, 2], states: int = 4) -> FewStepGenerator:  # noqa: B006
    ref = load_diffusion(teacher_dir)
    model = FewStepGenerator(ref.unet, ref.prediction_type, ref.schedule, steps, states)
    model.teacher_dir = teacher_dir
    return model


@pytest.fixture
def teacher_dir(tmp_path: Path, teacher: Denoiser) -> Path:
    save_diffusion(teacher, tmp_path / "teacher")
    return tmp_path / "teacher"


def _batch(n: int = 6, states: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn((n, *SHAPE), generator=g), "y": torch.randint(0, 3, (n,), generator=g),
            "real": torch.rand((n, *SHAPE), generator=g) * 2 - 1,
            "teacher_logits": torch.randn((n, states * 64), generator=g).clamp(-1, 1)}


# -- data ------------------------------------------------------------------------------------------

def test_digits_are_upscaled_to_16x16_in_minus_one_to_one() -> None:
    ds = TRACK.load_source("sklearn:digits", seed=0, val_fraction=0.1, test_fraction=0.1, options={"size": 16})
    assert ds.input_shape == (1, 16, 16) and ds.meta["size"] == 16
    assert float(ds.features.min()) >= -1 and float(ds.features.max()) <= 1 and float(ds.features.min()) < -0.99


def test_images_of_mixed_sizes_are_refused_naming_the_files(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 8, 8), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 10, 10), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(DataError, match=r"image sizes differ between files: .*'train': \(8, 8\).*'t10k': \(10, 10\)"):
        TRACK.load_source(f"idx:{tmp_path}", seed=0, val_fraction=0.1, test_fraction=0.1, options={})
    with pytest.raises(DataError, match="data.options.size"):
        TRACK.load_source("sklearn:digits", seed=0, val_fraction=0.1, test_fraction=0.1, options={"size": 3})


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_the_debian_package() -> None:
    ds = TRACK.load_source(f"idx:{FASHION}", seed=0, val_fraction=0.1, test_fraction=0.1,
                           options={"limit": 300, "size": 16})
    assert ds.input_shape == (1, 16, 16) and ds.num_classes == 10 and len(ds) == 600
    assert sum(s == "test" for s in ds.splits) == 300  # t10k is the fixed test split


def test_mnist_from_the_shared_idx_files() -> None:
    folder = shared_data() / "mnist-t10k"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    ds = TRACK.load_source(f"idx:{folder}", seed=0, val_fraction=0.1, test_fraction=0.2,
                           options={"limit": 200, "size": 16})
    assert ds.input_shape == (1, 16, 16) and len(ds) == 200 and ds.num_classes == 10


# -- models, samplers, the cache -------------------------------------------------------------------

def test_boundary_condition_is_the_lcm_schedulers() -> None:
    from diffusers import LCMScheduler

    sched = LCMScheduler()
    for t in (0, 1, 99, 500, 999):
        c_skip, c_out = boundary_scalings(torch.tensor([t]))
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(t)
        assert math.isclose(float(c_skip), float(ref_skip), rel_tol=1e-5)
        assert math.isclose(float(c_out), float(ref_out), rel_tol=1e-5)


def test_parametrisations_recover_x0(teacher: Denoiser) -> None:
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn((4, *SHAPE), generator=g), torch.randn((4, *SHAPE), generator=g)
    t = torch.tensor([0, 10, 500, 999])
    for kind in ("epsilon", "v_prediction", "sample"):
        m = Denoiser(teacher.unet, kind)
        x_t = m.noised(x0, eps, t)
        torch.testing.assert_close(m.x0_from(m.target(x0, eps, t), x_t, t), x0, atol=2e-3, rtol=1e-3)


def test_ddim_trajectory_states_end_in_the_ddim_image(teacher: Denoiser) -> None:
    z = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2])
    states = ddim(teacher, z, y, 8, keep=4)  # [3, 4, C, H, W]
    assert states.shape == (3, 4, *SHAPE)
    torch.testing.assert_close(states[:, -1], ddim(teacher, z, y, 8))
    assert state_times(4) == [749, 499, 249, CLEAN]
    rows = TRACK.teacher_outputs(teacher, Latents(z, y, 8, 4), batch_size=2, device=torch.device("cpu"))
    torch.testing.assert_close(rows, states.flatten(1))
    with pytest.raises(ParamsError, match="teacher_steps"):
        ddim(teacher, z, y, 6, keep=4)


def test_noise_condenser_and_its_schedule_check() -> None:
    ds = TRACK.load_source("sklearn:digits", seed=0, val_fraction=0.1, test_fraction=0.1, options={"size": 8})
    train = ds.split("train")
    out = noise(train, teacher=None, seed=3, device=torch.device("cpu"), report=None, samples=50, teacher_steps=20,
                states=4)
    assert len(out) == 50 and isinstance(out.features, Latents) and out.extras["real"].shape == (50, 1, 8, 8)
    assert TRACK.output_dim(out) == 4 * 64
    real_rows = [int(((train.features - r).abs().flatten(1).sum(1) == 0).nonzero()[0]) for r in out.extras["real"][:5]]
    assert out.labels[:5].tolist() == train.labels[real_rows].tolist()  # each noise has the class of its image
    with pytest.raises(ParamsError, match=r"condense.teacher_steps: 30 DDIM steps cannot be cut into condense.states=4"):
        noise(train, teacher=None, seed=3, device=torch.device("cpu"), report=None, samples=5, teacher_steps=30, states=4)


# -- losses against their reference formulas -------------------------------------------------------

def test_denoise_loss_is_the_ddpm_objective(teacher: Denoiser) -> None:
    b = _batch()
    torch.manual_seed(5)
    got = DenoiseLoss().run_model(teacher, b)["loss"]
    torch.manual_seed(5)
    t = torch.randint(0, 1000, (len(b["x"]),))
    eps = torch.randn_like(b["x"])
    out = teacher(teacher.noised(b["x"], eps, t), t, b["y"])
    torch.testing.assert_close(got, denoise_reference(out, teacher.target(b["x"], eps, t)))


def test_regression_loss_is_luhman_on_the_cached_pairs(teacher_dir: Path) -> None:
    model, b = student_of(teacher_dir), _batch()
    got = Regression(all_states=False).run_model(model, b)
    x0 = b["teacher_logits"].view(6, 4, *SHAPE)[:, -1]
    ref = regression_reference(model(b["x"], torch.full((6,), 999), b["y"]), x0)
    torch.testing.assert_close(got["loss"], ref)
    assert set(Regression(all_states=True).run_model(model, b)) == {"loss", "one_step", "states"}


def test_consistency_loss_matches_the_per_pair_reference(teacher_dir: Path) -> None:
    model, b = student_of(teacher_dir), _batch(states=4)
    loss = Consistency(ema=0.5)
    torch.manual_seed(7)
    got = loss.run_model(model, b)["loss"]
    torch.manual_seed(7)
    n = torch.randint(0, 4, (6,))
    chain = torch.cat([b["x"][:, None], b["teacher_logits"].view(6, 4, *SHAPE)], 1)
    times = [999, *state_times(4)]
    f = lambda x, t: model(x, torch.full((len(x),), t), b["y"][i : i + 1])  # noqa: E731
    per = []
    for i in range(6):
        j = int(n[i])
        per.append(consistency_reference(f, f, chain[i : i + 1, j], times[j], chain[i : i + 1, j + 1], times[j + 1]))
    torch.testing.assert_close(got, torch.stack(per).mean(), rtol=1e-4, atol=1e-6)
    # the target network is a moving average: after a change of the student it moves by (1 - ema)
    before = next(loss.target.parameters()).clone()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    loss.run_model(model, b)
    torch.testing.assert_close(next(loss.target.parameters()), before + 0.5)


def test_dmd_gradient_formula_and_two_time_scale_updates(teacher_dir: Path) -> None:
    x, real, fake = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    w = (x - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(dmd_reference(x, real, fake), (fake - real) / w)
    # 1/2 ||x - sg(x - g)||^2 (mean) has the gradient g / numel: the loss moves x along -g
    x = x.requires_grad_(True)
    g = dmd_reference(x.detach(), real, fake)
    (0.5 * torch.nn.functional.mse_loss(x, (x.detach() - g))).backward()
    torch.testing.assert_close(x.grad, g / x.numel())

    model, b = student_of(teacher_dir), _batch()
    loss = DMD(fake_updates=3, fake_lr=1e-2, regression_weight=0.5, gan_weight=0.1, multistep=False)
    terms = loss.run_model(model, b)
    assert {"loss", "dm", "fake_score", "regression", "gan", "critic"} <= set(terms)
    assert all(torch.isfinite(v) for v in terms.values())
    changed = [not torch.equal(p, q) for p, q in zip(loss.fake.parameters(), loss.real.parameters())]
    assert any(changed) and not any(p.requires_grad for p in loss.real.parameters())
    terms["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_dmd_fresh_noise_gives_every_fake_update_its_own_generated_batch(teacher_dir: Path) -> None:
    calls: list[tuple[bool, torch.Tensor]] = []  # (with gradient, the generator's input) per forward
    for fresh, updates in ((False, 3), (True, 3)):
        model, b, seen, calls = student_of(teacher_dir), _batch(), [], []
        model.register_forward_hook(lambda m, args, out, calls=calls: calls.append((torch.is_grad_enabled(), args[0].clone())))
        loss = DMD(fake_updates=updates, fake_lr=1e-2, regression_weight=0.5, multistep=False, fresh_noise=fresh)
        loss._setup(model, torch.device("cpu"))
        original = loss._update_fake
        loss._update_fake = lambda x, real, y: (seen.append(x.clone()), original(x, real, y))[1]  # noqa: B023
        torch.manual_seed(3)
        loss.run_model(model, b)
        distinct = {tuple(x.flatten()[:8].tolist()) for x in seen}
        with_grad = [x for g, x in calls if g]
        if not fresh:  # the step's batch, three times; the generator runs once, on the cached noise
            assert len(seen) == updates and len(distinct) == 1 and len(calls) == 1
            assert torch.equal(calls[0][1], b["x"])
        else:  # three generated batches: the step's and two more without gradient, from new noise
            assert len(seen) == updates and len(distinct) == updates
            assert len(calls) == 1 + (updates - 1) + 1 and sum(not g for g, _ in calls) == updates - 1
            assert not any(torch.equal(x, b["x"]) for x in with_grad[:1])  # distribution matching: fresh noise
            assert torch.equal(with_grad[1], b["x"])  # the regression: the cached pairs' noise


def test_dmd_critic_weight_scales_the_discriminator_gradient(teacher_dir: Path) -> None:
    grads = {}
    for w in (1.0, 0.01):
        model, b = student_of(teacher_dir), _batch()
        loss = DMD(fake_updates=1, fake_lr=1e-2, gan_weight=0.1, multistep=False, critic_weight=w)
        loss._setup(model, torch.device("cpu"))
        loss.opt.step = lambda: None  # keep the gradients of the one update
        torch.manual_seed(4)
        loss._update_fake(torch.randn(6, *SHAPE), b["real"], b["y"])
        grads[w] = loss.critic.head.weight.grad.clone()  # the head learns from the discriminator loss only
    torch.testing.assert_close(grads[0.01], 0.01 * grads[1.0])


def test_dmd_ema_is_the_warmed_up_moving_average_and_is_what_fit_keeps(teacher_dir: Path) -> None:
    from kdflow.train.loop import fit

    model, b = student_of(teacher_dir), _batch()
    loss, opt = DMD(fake_updates=1, fake_lr=1e-2, multistep=False, ema=0.9), None
    ref = {k: v.clone() for k, v in model.state_dict().items()}  # the average starts at the initial weights
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for n in range(1, 5):
        terms = loss.run_model(model, b)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        d = min(0.9, (1 + n) / (10 + n))
        ref = {k: d * ref[k] + (1 - d) * v if v.is_floating_point() else v for k, v in model.state_dict().items()}
    got = loss.averaged_state(model)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])
    assert loss.averaged_steps == 4 and loss.averaged_state(model)[k].equal(got[k])  # folded once per step
    assert not all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    assert DMD(ema=0.0).averaged_state(model) is None

    data = {k: v for k, v in _batch(n=8).items()}
    fit_loss = DMD(fake_updates=1, fake_lr=1e-2, multistep=False, ema=0.9)
    trained = student_of(teacher_dir)
    fit(trained, data, fit_loss, epochs=2, lr=1e-2, batch_size=4, seed=0, device=torch.device("cpu"))
    avg = fit_loss.averaged_state(trained)  # fit returns the model holding the average, not the raw weights
    assert all(torch.equal(avg[k], v) for k, v in trained.state_dict().items())


def test_multistep_dmd_trains_at_the_declared_lcm_steps_from_its_own_samples(teacher_dir: Path) -> None:
    from diffusers import LCMScheduler

    from kdflow.tracks.diffusion.models import scheduler_config

    model = student_of(teacher_dir, steps=[1, 2, 4], states=4)
    sched, declared = LCMScheduler(**scheduler_config(model)), set()
    for n in (1, 2, 4):
        sched.set_timesteps(n)
        declared |= {int(t) for t in sched.timesteps}
    z, y = torch.randn(3, *SHAPE), torch.tensor([0, 1, 2])
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        x, t, first = DMD(multistep=True)._generator_input(model, model, z, y)
        seen.add(t)
        assert first == (t == 999)
        if first:
            assert torch.equal(x, z)
    assert seen == declared and len(declared) > 1  # every step of 1, 2 and 4-step sampling
    # backward simulation: the input at the k-th step is the generator's own k-step sample, re-noised
    sched.set_timesteps(4)
    t1 = int(sched.timesteps[1])  # the 2nd step of 4-step sampling
    seed = next(s for s in range(100) if (torch.manual_seed(s), int(torch.randint(3, ())), int(torch.randint(4, ())))[1:] == (2, 1))
    torch.manual_seed(seed)
    x, t, first = DMD()._generator_input(model, model, z, y)
    assert t == t1 and not first
    torch.manual_seed(seed)
    torch.randint(3, ()), torch.randint(4, ())  # the step count (4) and its step (the 2nd) drawn above
    with torch.no_grad():
        x0 = model(z, torch.full((3,), 999), y)
        expect = model.noised(x0, torch.randn_like(x0), torch.full((3,), t1))
    torch.testing.assert_close(x, expect)
    assert {DMD(multistep=False)._generator_input(model, model, z, y)[1] for _ in range(10)} == {999}


@pytest.mark.parametrize("method", ["dmd", "consistency"])
def test_a_killed_and_resumed_student_continues_the_fake_score_and_ema(teacher_dir: Path, tmp_path: Path,
                                                                      method: str) -> None:
    from kdflow.train.loop import fit

    g = torch.Generator().manual_seed(1)
    data = {"x": torch.randn((8, *SHAPE), generator=g), "y": torch.randint(0, 3, (8,), generator=g),
            "real": torch.rand((8, *SHAPE), generator=g) * 2 - 1,
            "teacher_logits": torch.randn((8, 4 * 64), generator=g).clamp(-1, 1)}

    def new_loss() -> DMD | Consistency:
        return (DMD(fake_updates=2, fake_lr=1e-2, fresh_noise=True, ema=0.9) if method == "dmd"
                else Consistency(ema=0.5))

    def train(loss: DMD | Consistency, ckpt: Path, resume: bool = False, stop_after: int | None = None) -> FewStepGenerator:
        model = student_of(teacher_dir, steps=[1, 2], states=4)

        def on_epoch(row: dict) -> None:
            if row["epoch"] == stop_after:
                raise KeyboardInterrupt  # killed after the epoch's checkpoint

        fit(model, data, loss, epochs=3, lr=1e-2, batch_size=4, seed=0, device=torch.device("cpu"),
            checkpoint_dir=ckpt, resume=resume, fingerprint="f", on_epoch=on_epoch)
        return model

    straight_loss = new_loss()
    straight = train(straight_loss, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        train(new_loss(), tmp_path / "b", stop_after=1)
    resumed_loss = new_loss()
    resumed = train(resumed_loss, tmp_path / "b", resume=True)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    aux = (lambda lf: lf.fake) if method == "dmd" else (lambda lf: lf.target)
    for p, q in zip(aux(straight_loss).parameters(), aux(resumed_loss).parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    fresh = new_loss()  # without the saved state the resumed run would differ: the test can fail
    assert fresh.state_dict() == {}


def test_a_dmd_student_needs_its_teacher(teacher: Denoiser) -> None:
    model = FewStepGenerator(teacher.unet, steps=[1], cached_states=4)
    with pytest.raises(ModelError, match="needs the teacher"):
        DMD().run_model(model, _batch())


def test_student_validation_scores_pixel_fd_on_up_to_student_val_rows_images(teacher: Denoiser) -> None:
    """FD on 256 rows of 16x16 pixels is biased enough to keep the wrong epoch: students are validated on
    up to STUDENT_VAL_ROWS rows (generated in batches, equal to one batch of all of them)."""
    from kdflow.tracks.diffusion import STUDENT_VAL_ROWS, VAL_ROWS, _val_metric, pixel_fd

    model = FewStepGenerator(teacher.unet, steps=[1], cached_states=4).eval()
    n = 600
    assert VAL_ROWS < n < STUDENT_VAL_ROWS
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand((n, *SHAPE), generator=g) * 2 - 1, torch.randint(0, 3, (n,), generator=g)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one_batch = few_step(model, z, y, 1)
    reference = ev.fid(x.flatten(1), one_batch.flatten(1))
    cpu = torch.device("cpu")
    assert pixel_fd(model, x, y, cpu) == pytest.approx(reference, rel=1e-4)
    assert _val_metric(model, x, y, batch_size=64, device=cpu) == pytest.approx(-reference, rel=1e-4)
    val = Dataset(x, y, [str(i) for i in range(n)], ["val"] * n, 3, "image")
    assert TRACK.val_score(model, val, cpu)["val_pixel_fd"] == pytest.approx(reference, rel=1e-4)
    assert pixel_fd(model, x[:VAL_ROWS], y[:VAL_ROWS], cpu) != pytest.approx(reference, rel=1e-2)


# -- evaluation statistics against closed forms ----------------------------------------------------

def test_fid_matches_the_closed_form_for_gaussians() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4))
    c1, c2 = a @ a.T + np.eye(4), np.diag([1.0, 2.0, 3.0, 4.0])
    mu1, mu2 = np.zeros(4), np.array([1.0, 0.0, -2.0, 0.5])
    # Tr((C1 C2)^(1/2)) = sum of sqrt(eigenvalues of C1 C2), which are real and positive
    ref = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(c1 + c2) - 2 * np.sqrt(np.linalg.eigvals(c1 @ c2).real).sum())
    assert math.isclose(ev.frechet_distance(mu1, c1, mu2, c2), ref, rel_tol=1e-6)
    # diagonal covariances: sum (sqrt(s1) - sqrt(s2))^2
    d1, d2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    assert math.isclose(ev.frechet_distance(np.zeros(2), d1, np.zeros(2), d2), (1 - 3) ** 2 + (2 - 1) ** 2, rel_tol=1e-9)
    # from samples: close to the population value
    x = torch.from_numpy(rng.multivariate_normal(mu1, c1, size=40000))
    y = torch.from_numpy(rng.multivariate_normal(mu2, c2, size=40000))
    assert abs(ev.fid(x, y) - ref) < 0.05 * ref


def test_precision_recall_and_coverage_against_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(30, 3, generator=g), torch.randn(25, 3, generator=g) + 0.7

    def radius(s: torch.Tensor, i: int, k: int = 3) -> float:
        return sorted(float((s[i] - s[j]).norm()) for j in range(len(s)) if j != i)[k - 1]

    r_real, r_fake = [radius(real, i) for i in range(30)], [radius(fake, i) for i in range(25)]
    prec = np.mean([any(float((f - real[i]).norm()) <= r_real[i] for i in range(30)) for f in fake])
    rec = np.mean([any(float((r - fake[i]).norm()) <= r_fake[i] for i in range(25)) for r in real])
    p, r = ev.precision_recall(real, fake, k=3)
    assert math.isclose(p, prec, abs_tol=1e-9) and math.isclose(r, rec, abs_tol=1e-9)
    assert ev.precision_recall(real, real + 100) == (0.0, 0.0)
    assert math.isclose(ev.coverage(torch.arange(10).repeat(5), 10), 1.0)
    assert ev.coverage(torch.zeros(20, dtype=torch.long), 10) == 0.0
    assert math.isclose(ev.coverage(torch.tensor([0, 1] * 10), 4), math.log(2) / math.log(4))


def test_the_fid_floor_scores_held_out_real_images_like_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    quick = ev.train_feature_net
    monkeypatch.setattr(ev, "train_feature_net", lambda x, y, k, seed: quick(x, y, k, seed, steps=5))
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand((42, *SHAPE), generator=g) * 2 - 1, torch.arange(42) % 3
    ref = ev.reference(images, labels, 3, seed=0)
    m = ref.metrics
    assert (m["n_reference"], m["n_generated"]) == (11, 10)  # 21 train the classifier, the rest split
    assert ref.noise.shape == (10, *SHAPE) and len(ref.labels) == 10 and len(ref.feats) == 11
    # the floor is the held-out real images scored exactly as a model's samples would be
    order = torch.randperm(42, generator=torch.Generator().manual_seed(0))
    held = order[21 + 11 :]
    torch.testing.assert_close(ref.labels, labels[held])
    again = ev.score(ref.net, images[held], ref.feats, 3, labels[held])
    assert math.isclose(m["fid_real_floor"], again["fid"], rel_tol=1e-9) and m["real"] == again
    # a "model" whose images are visibly off (all bright) scores well above the floor
    assert ev.score(ref.net, images[held].abs(), ref.feats, 3, ref.labels)["fid"] > 2 * m["fid_real_floor"]


# -- export ------------------------------------------------------------------------------------

def test_student_exports_as_a_diffusers_pipeline_that_loads_offline(teacher_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from kdflow.tracks.diffusion.pipeline import FewStepPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = student_of(teacher_dir, steps=[1, 2], states=4).eval()
    TRACK.save_model(model, tmp_path / "student")
    assert (tmp_path / "student" / "model_index.json").is_file()
    pipe = FewStepPipeline.from_pretrained(tmp_path / "student", local_files_only=True)
    labels = [0, 1, 2, 1]
    for steps in (1, 2):
        out = pipe(batch_size=4, class_labels=labels, num_inference_steps=steps,
                   generator=torch.Generator().manual_seed(0)).images
        gen = torch.Generator().manual_seed(0)
        z = torch.randn((4, *SHAPE), generator=gen)
        ref = few_step(model, z, torch.tensor(labels), steps, gen)
        torch.testing.assert_close(out, ref)
    with pytest.raises(ParamsError, match=r"num_inference_steps: this student was distilled for \[1, 2\] steps, not 4"):
        pipe(batch_size=1, class_labels=[0], num_inference_steps=4)
    again = TRACK.load_model(tmp_path / "student")
    assert again.kind == "student" and again.steps == [1, 2] and again.cached_states == 4


# -- bad input ---------------------------------------------------------------------------------

def test_a_folder_that_is_not_a_diffusers_model_is_refused_naming_the_file(tmp_path: Path, teacher_dir: Path) -> None:
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"_class_name": "BertModel"}))
    with pytest.raises(ModelError, match=r"bert/config.json: _class_name is 'BertModel', not a diffusers 'UNet2DModel'"):
        TRACK.load_checkpoint("bert", tmp_path, tmp_path / "out1")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a diffusers model" in TRACK.checkpoint_problems("empty", tmp_path, "teachers[0].checkpoint")[0]
    nothing = tmp_path / "noweights"
    nothing.mkdir()
    (nothing / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ModelError, match="no diffusion_pytorch_model.safetensors"):
        TRACK.load_checkpoint("noweights", tmp_path, tmp_path / "out2")
    # a bare UNet2DModel save_pretrained folder is a teacher
    load_diffusion(teacher_dir).unet.save_pretrained(tmp_path / "bare")
    (tmp_path / "out3").mkdir()
    model = TRACK.load_checkpoint("bare", tmp_path, tmp_path / "out3")
    assert model.kind == "teacher" and (tmp_path / "out3" / "scheduler" / "scheduler_config.json").is_file()


def test_step_counts_the_method_cannot_use_are_refused(teacher_dir: Path, teacher: Denoiser) -> None:
    with pytest.raises(ModelError, match=r"student.args.steps: \[8\] cannot be sampled: a consistency sampler takes 1..4"):
        FewStepGenerator(teacher.unet, steps=[1, 8], cached_states=4)
    problems = TRACK.model_problems("few_step_unet", {"steps": 2, "scheduler": "euler"}, "student")
    assert any(p.startswith("student.args.scheduler: unknown argument") for p in problems)
    assert any(p.startswith("student.args.steps: a list of step counts") for p in problems)
    with pytest.raises(ParamsError, match="steps: the student was distilled for"):
        few_step(student_of(teacher_dir, steps=[1]), torch.randn(1, *SHAPE), torch.tensor([0]), 2)


def test_validate_names_bad_student_args_and_a_loss_of_another_track() -> None:
    import yaml

    from kdflow.checks import model_problems
    from schemas.params import parse_params

    raw = yaml.safe_load((REPO / "configs/digits-diffusion.yaml").read_text())
    raw["student"]["args"] = {"steps": [1], "scheduler": "euler"}
    problems = model_problems(parse_params(raw))
    assert any(p.startswith("student.args.scheduler: unknown argument of 'few_step_unet'") for p in problems), problems
    raw["student"]["loss"] = {"name": "kd"}
    with pytest.raises(ParamsError, match="student.loss.name: 'kd' is not offered by track 'diffusion'"):
        parse_params(raw)


# -- the CI pipeline ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.integration
def test_digits_diffusion_config_runs_with_kdflow_run(tmp_path: Path) -> None:
    import yaml

    raw = yaml.safe_load((REPO / "configs/digits-diffusion.yaml").read_text())
    raw["tracking"] = {"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "diffusion"}
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "kdflow.cli", "run", "-c", "d.yaml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    art = tmp_path / "artifacts" / "digits-diffusion"
    m = json.loads((art / "evaluate/metrics.json").read_text())
    assert list(m["teacher"]["steps"]) == ["1", "2", "4", "10", "50"] and list(m["student"]["steps"]) == ["1", "2", "4"]
    for row in [*m["teacher"]["steps"].values(), *m["student"]["steps"].values()]:
        assert math.isfinite(row["fid"]) and 0 <= row["precision"] <= 1 and 0 <= row["coverage"] <= 1
    assert "NOT Inception" in m["feature_space"]
    assert {"samples_teacher_50step.png", "samples_student_1step.png"} <= {p.name for p in (art / "evaluate/figures").iterdir()}
    cache = json.loads((art / "logits/cache.json").read_text())
    assert len(list((art / "logits").glob("shard-*.safetensors"))) >= 2
    from kdflow.tracks.diffusion.pipeline import FewStepPipeline

    pipe = FewStepPipeline.from_pretrained(art / "student", local_files_only=True)
    images = pipe(batch_size=2, class_labels=[3, 4], num_inference_steps=1).images
    assert images.shape == (2, 1, 16, 16) and cache["num_classes"] == 4 * 256
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("diffusion").experiment_id],
                              "tags.`kdflow.stage` = 'evaluate'")
    assert len(runs) == 1  # the evaluate run holds the sample grids
    names = {a.path for a in client.list_artifacts(runs[0].info.run_id, "figures")}
    assert {"figures/samples_student_1step.png", "figures/samples_teacher_50step.png"} <= names
