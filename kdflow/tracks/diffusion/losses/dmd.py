"""Distribution matching distillation (Yin et al., DMD 2024 and DMD2 2024).

A one-step generator ``G(z) = f(z, T-1)`` is pushed along the difference of two scores of its
noised outputs: the teacher's (the real distribution) and a *fake-score* network trained alongside
on the generator's own samples. In x0 terms, for ``x_t = sqrt(a_t) G(z) + sqrt(1 - a_t) eps`` with
``t ~ U[t_min, t_max]``:

    grad_G = (x0_fake(x_t, t) - x0_real(x_t, t)) / mean|G(z) - x0_real(x_t, t)|
    L_dm   = 1/2 || G(z) - sg(G(z) - grad_G) ||^2      (so dL/dG = grad_G, averaged)

The fake score is a copy of the teacher updated ``fake_updates`` times per generator step with its
own learning rate (DMD2's two time-scale update rule) on the denoising loss of ``sg(G(z))``.
Optional terms: DMD's paired regression on the cached noise -> image pairs
(``regression_weight``; DMD2 drops it) and DMD2's GAN term (``gan_weight``): a linear head on the
fake-score UNet's pooled middle-block features tells noised real images (``batch["real"]``) from
noised generated ones, trained with the fake score; the generator gets the non-saturating loss.

Multi-step students (``multistep``, DMD2 section 4.5): the generator is trained at every time step
of its declared step counts, each batch at one of them (a step count ``n`` of the student's
``steps``, uniform, then one of its ``n`` LCM time steps ``t_k``, uniform). Its input at ``t_k`` comes
from *backward simulation*: the generator's own ``k``-step sampling from the noise (without gradient,
re-noised with fresh noise between steps, as the LCM sampler does), so training sees what sampling
feeds it. The paired regression only applies at the first step (the cache pairs noise with images).

DMD2's training loop (measured on Fashion-MNIST in the README: ``fresh_noise`` helps, on by default;
``ema`` did not at 256 steps, off by default):

- ``fresh_noise``: every generator step draws fresh Gaussian noise for its distribution-matching
  batch, and each of the ``fake_updates`` fake-score updates trains on its own freshly generated
  batch (without gradient) -- DMD2's two time-scale rule interleaves a new generator sample per
  fake-score step; off, the fake score repeats on this step's batch and the generator sees only the
  cached noises. The paired regression keeps the cached noise -> image pairs (a forward of its own).
- ``critic_weight``: the discriminator loss's weight in the fake-score update (DMD2: 1e-2 of the
  denoising loss), so the GAN head does not swamp the fake score's own objective.
- ``ema``: an exponential moving average of the generator's weights, after its ``n``-th step
  ``w_ema <- d_n * w_ema + (1 - d_n) * w`` with ``d_n = min(ema, (1 + n) / (10 + n))`` (the usual
  warm-up, so the teacher's initial weights fade fast; ``w_ema`` starts at the initial weights);
  validation, the best-epoch choice and the exported student use the averaged weights (``fit``
  reads ``averaged_state``), training continues on the raw ones.

The fake score, its optimiser, the GAN head and the moving average are training state: ``state_dict`` /
``load_state_dict`` put them into the student's checkpoint so a resumed run continues them.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from kdflow.errors import ModelError
from kdflow.losses import LOSSES, LossBase
from kdflow.tracks.diffusion.losses import cached_states, unwrap
from schemas.base import Section


def dmd_reference(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """The distribution-matching gradient per sample: ``(x0_fake - x0_real) / mean|x - x0_real|``."""
    w = (x - x0_real).abs().flatten(1).mean(1).clamp_min(1e-5).view(-1, *[1] * (x.dim() - 1))
    return (x0_fake - x0_real) / w


class DMDParams(Section):
    name: Literal["dmd"] = Field("dmd", description="Distribution matching distillation (DMD2): a fake-score network trained alongside the one-step generator.")
    fake_updates: int = Field(5, ge=1, le=100, description="Fake-score updates per generator step (two time-scale update rule).")
    fake_lr: float = Field(1e-4, gt=0, le=1, description="Learning rate (AdamW) of the fake-score network (and the GAN head).")
    t_min: float = Field(0.02, ge=0, lt=1, description="Lowest time step of the distribution-matching noise, as a share of T.")
    t_max: float = Field(0.98, gt=0, le=1, description="Highest time step of the distribution-matching noise, as a share of T.")
    regression_weight: float = Field(0.25, ge=0, le=100, description="Weight of DMD's paired regression on the cached noise -> image pairs (0: DMD2, none).")
    gan_weight: float = Field(0.0, ge=0, le=100, description="Weight of DMD2's GAN term for the generator (0: off); the discriminator head reads the fake score's features.")
    multistep: bool = Field(True, description="Train at every time step of the student's declared step counts, inputs by backward simulation (DMD2); false: at the first step (t = T-1) only.")
    fresh_noise: bool = Field(True, description="Fresh Gaussian noise for every generator step's distribution-matching batch and a freshly generated batch for every fake-score update (DMD2); false: the cached noises, the fake score repeats on the step's batch.")
    critic_weight: float = Field(1.0, gt=0, le=100, description="Weight of the GAN head's discriminator loss in the fake-score update (DMD2: 0.01); only with gan_weight > 0.")
    ema: float = Field(0.0, ge=0, lt=1, description="Decay of a moving average of the generator's weights, updated every step; validated and exported instead of the raw weights (0: off).")

    @model_validator(mode="after")
    def _range(self) -> DMDParams:
        if self.t_min >= self.t_max:
            raise ValueError(f"t_min must be below t_max (got {self.t_min} >= {self.t_max})")
        return self


class _Critic(nn.Module):
    """A linear head on the pooled middle-block features of the fake-score UNet (captured by a hook)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.head = nn.Linear(unet.config.block_out_channels[-1], 1)
        self.features: Tensor | None = None
        unet.mid_block.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: object, out: Tensor) -> None:
        self.features = out

    def logit(self) -> Tensor:
        return self.head(self.features.float().mean((2, 3)))[:, 0]  # [B]


@LOSSES.register("dmd", params=DMDParams, tracks=("diffusion",))
class DMD(LossBase):
    needs = ("x", "y", "real", "teacher_logits")

    def __init__(self, fake_updates: int = 5, fake_lr: float = 1e-4, t_min: float = 0.02, t_max: float = 0.98,
                 regression_weight: float = 0.25, gan_weight: float = 0.0, multistep: bool = True,
                 fresh_noise: bool = True, critic_weight: float = 1.0, ema: float = 0.0) -> None:
        self.fake_updates, self.fake_lr = int(fake_updates), float(fake_lr)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.regression_weight, self.gan_weight = float(regression_weight), float(gan_weight)
        self.multistep, self.fresh_noise = bool(multistep), bool(fresh_noise)
        self.critic_weight, self.ema = float(critic_weight), float(ema)
        self.real: nn.Module | None = None
        self.averaged: dict[str, Tensor] | None = None  # the generator's moving average (ema > 0)
        self.averaged_steps = 0  # generator steps folded into it
        self._stepped: nn.Module | None = None  # the generator, when a step since the last fold is pending
        self._pending: dict | None = None  # a checkpoint's state, loaded at setup

    def _setup(self, net: nn.Module, device: torch.device) -> None:
        from kdflow.tracks.diffusion.models import load_diffusion

        teacher_dir: Path | None = getattr(net, "teacher_dir", None)
        if teacher_dir is None:
            raise ModelError("loss 'dmd' needs the teacher (the real score): the student must be created from the "
                             "chosen teacher's folder")
        self.real = load_diffusion(teacher_dir).to(device).requires_grad_(False).eval()
        self.fake = copy.deepcopy(self.real).requires_grad_(True).train()
        with torch.random.fork_rng(devices=[]):  # the head's init leaves the training RNG alone (resumes match)
            torch.manual_seed(0)
            self.critic = _Critic(self.fake.unet).to(device)
        params = [*self.fake.parameters(), *self.critic.parameters()]
        self.opt = torch.optim.AdamW(params, lr=self.fake_lr, weight_decay=0.0)
        if self._pending is not None:
            state, self._pending = self._pending, None
            self._load(state)
        self._start_average(net)

    def _load(self, state: dict) -> None:
        self.fake.load_state_dict(state["fake"])
        self.critic.load_state_dict(state["critic"])
        self.opt.load_state_dict(state["opt"])
        if state.get("averaged") is not None:
            self.averaged = {k: v.clone() for k, v in state["averaged"].items()}
            self.averaged_steps = int(state["averaged_steps"])

    def state_dict(self) -> dict:
        """The fake score, the GAN head, their optimiser and the generator's moving average (empty
        before the first step)."""
        if self.real is None:
            return dict(self._pending or {})
        self._fold()
        return {"fake": {k: v.detach().cpu().clone() for k, v in self.fake.state_dict().items()},
                "critic": {k: v.detach().cpu().clone() for k, v in self.critic.state_dict().items()},
                "opt": copy.deepcopy(self.opt.state_dict()),
                "averaged": None if self.averaged is None else {k: v.cpu().clone() for k, v in self.averaged.items()},
                "averaged_steps": self.averaged_steps}

    def averaged_state(self, model: nn.Module) -> dict[str, Tensor] | None:
        """The generator's moving-average weights as a state dict of ``model`` (None: ``ema`` off or
        no step yet); ``fit`` validates and keeps these instead of the raw weights."""
        self._fold()
        if self.ema <= 0 or self.averaged is None:
            return None
        return {k: v.clone() for k, v in self.averaged.items()}

    def _start_average(self, net: nn.Module) -> None:
        if self.ema > 0 and self.averaged is None:
            self.averaged = {k: v.detach().clone() for k, v in net.state_dict().items()}

    @torch.no_grad()
    def _fold(self) -> None:
        """Fold the generator's weights after its pending step into the average (once per step: the
        optimiser steps after ``run_model`` returns, so the next call, validation or checkpoint folds it)."""
        net, self._stepped = self._stepped, None
        if net is None or self.averaged is None:
            return
        self.averaged_steps += 1
        d = min(self.ema, (1 + self.averaged_steps) / (10 + self.averaged_steps))
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                self.averaged[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.averaged[k].copy_(v)

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's ``state_dict`` (applied when the networks are built)."""
        if not state:
            return
        if self.real is None:
            self._pending = state
        else:
            self._load(state)

    def _noise(self, x: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor, Tensor]:
        t_all = self.real.timesteps
        t = torch.randint(int(lo * t_all), max(int(hi * t_all), int(lo * t_all) + 1), (len(x),), device=x.device)
        noise = torch.randn_like(x)
        return self.real.noised(x, noise, t), t, noise

    def _update_fake(self, x: Tensor, real: Tensor | None, y: Tensor | None) -> dict[str, Tensor]:
        """One fake-score step on generated images ``x`` (and, with the GAN term, one critic step)."""
        x_t, t, noise = self._noise(x, 0.0, 1.0)
        loss = F.mse_loss(self.fake.raw(x_t, t, y).float(), self.fake.target(x, noise, t).float())
        terms = {"fake_score": loss.detach()}
        if self.gan_weight > 0 and real is not None:
            fake_logit = self.critic.logit()
            self.fake.raw(*self._noise(real, 0.0, 1.0)[:2], y)
            d = F.softplus(fake_logit).mean() + F.softplus(-self.critic.logit()).mean()
            loss = loss + self.critic_weight * d
            terms["critic"] = d.detach()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return terms

    def _schedule(self, net: nn.Module) -> list[list[int]]:
        """The LCM time steps of each step count the generator trains at (the sampler's own)."""
        from diffusers import LCMScheduler

        from kdflow.tracks.diffusion.models import scheduler_config

        counts = getattr(net, "steps", [1]) if self.multistep else [1]
        sched = LCMScheduler(**scheduler_config(net))
        out = []
        for n in counts:
            sched.set_timesteps(n)
            out.append([int(t) for t in sched.timesteps])
        return out

    def _generator_input(self, model: nn.Module, net: nn.Module, z: Tensor, y: Tensor | None) -> tuple[Tensor, int, bool]:
        """``(x_t, t, first)``: a step count and one of its steps (seeded by the epoch's RNG), and the
        generator's input there by backward simulation from the noise ``z`` (no gradient)."""
        schedules = self._schedule(net)
        times = schedules[int(torch.randint(len(schedules), ()))]
        k = int(torch.randint(len(times), ()))
        x = z
        with torch.no_grad():
            for j in range(k):
                t = torch.full((len(z),), times[j], device=z.device)
                x0 = model(x, t, y)
                x = net.noised(x0, torch.randn_like(x0), torch.full_like(t, times[j + 1]))
        return x, times[k], k == 0

    def _fake_batch(self, model: nn.Module, net: nn.Module, like: Tensor, y: Tensor | None) -> Tensor:
        """A freshly generated batch (new noise, the generator's current weights, no gradient)."""
        x_in, t_in, _ = self._generator_input(model, net, torch.randn_like(like), y)
        with torch.no_grad():
            return model(x_in, torch.full((len(like),), t_in, device=like.device), y)

    def run_model(self, model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        net, z, y = unwrap(model), batch["x"], batch.get("y")
        if self.real is None:
            self._setup(net, z.device)
        self._fold()  # the previous step's weights into the moving average
        z_dm = torch.randn_like(z) if self.fresh_noise else z
        x_in, t_in, first = self._generator_input(model, net, z_dm, y)
        x = model(x_in, torch.full((len(z),), t_in, device=z.device), y)  # [B, C, H, W]
        for i in range(self.fake_updates):
            x_fake = self._fake_batch(model, net, z, y) if self.fresh_noise and i > 0 else x.detach()
            fake_terms = self._update_fake(x_fake, batch.get("real"), y)
        x_t, t, _ = self._noise(x.detach(), self.t_min, self.t_max)
        with torch.no_grad():
            x0_real = self.real.x0(x_t, t, y)
            x0_fake = self.fake.x0(x_t, t, y)
        grad = dmd_reference(x.detach().float(), x0_real.float(), x0_fake.float())
        dm = 0.5 * F.mse_loss(x.float(), (x.detach().float() - grad))
        loss, terms = dm, {"dm": dm.detach(), **fake_terms}
        if self.regression_weight > 0 and (first or self.fresh_noise):  # the pairs start at the noise, t = T-1
            x_reg = model(z, torch.full((len(z),), net.timesteps - 1, device=z.device), y) if self.fresh_noise else x
            reg = F.mse_loss(x_reg.float(), cached_states(batch, z)[:, -1].float())
            loss, terms["regression"] = loss + self.regression_weight * reg, reg.detach()
        if self.gan_weight > 0:
            self.fake.requires_grad_(False)
            self.fake.raw(*self._noise(x, 0.0, 1.0)[:2], y)  # gradients reach x through the frozen fake score
            self.fake.requires_grad_(True)
            gan = F.softplus(-self.critic.logit()).mean()
            loss, terms["gan"] = loss + self.gan_weight * gan, gan.detach()
        if self.averaged is not None:
            self._stepped = net  # the optimiser steps next: fold those weights in later
        return {"loss": loss, **terms}
