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
                 regression_weight: float = 0.25, gan_weight: float = 0.0) -> None:
        self.fake_updates, self.fake_lr = int(fake_updates), float(fake_lr)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.regression_weight, self.gan_weight = float(regression_weight), float(gan_weight)
        self.real: nn.Module | None = None

    def _setup(self, net: nn.Module, device: torch.device) -> None:
        from kdflow.tracks.diffusion.models import load_diffusion

        teacher_dir: Path | None = getattr(net, "teacher_dir", None)
        if teacher_dir is None:
            raise ModelError("loss 'dmd' needs the teacher (the real score): the student must be created from the "
                             "chosen teacher's folder")
        self.real = load_diffusion(teacher_dir).to(device).requires_grad_(False).eval()
        self.fake = copy.deepcopy(self.real).requires_grad_(True).train()
        self.critic = _Critic(self.fake.unet).to(device)
        params = [*self.fake.parameters(), *self.critic.parameters()]
        self.opt = torch.optim.AdamW(params, lr=self.fake_lr, weight_decay=0.0)

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
            loss = loss + d
            terms["critic"] = d.detach()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return terms

    def run_model(self, model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        net, z, y = unwrap(model), batch["x"], batch.get("y")
        if self.real is None:
            self._setup(net, z.device)
        top = torch.full((len(z),), net.timesteps - 1, device=z.device)
        x = model(z, top, y)  # [B, C, H, W] one step
        for _ in range(self.fake_updates):
            fake_terms = self._update_fake(x.detach(), batch.get("real"), y)
        x_t, t, _ = self._noise(x.detach(), self.t_min, self.t_max)
        with torch.no_grad():
            x0_real = self.real.x0(x_t, t, y)
            x0_fake = self.fake.x0(x_t, t, y)
        grad = dmd_reference(x.detach().float(), x0_real.float(), x0_fake.float())
        dm = 0.5 * F.mse_loss(x.float(), (x.detach().float() - grad))
        loss, terms = dm, {"dm": dm.detach(), **fake_terms}
        if self.regression_weight > 0:
            reg = F.mse_loss(x.float(), cached_states(batch, z)[:, -1].float())
            loss, terms["regression"] = loss + self.regression_weight * reg, reg.detach()
        if self.gan_weight > 0:
            self.fake.requires_grad_(False)
            self.fake.raw(*self._noise(x, 0.0, 1.0)[:2], y)  # gradients reach x through the frozen fake score
            self.fake.requires_grad_(True)
            gan = F.softplus(-self.critic.logit()).mean()
            loss, terms["gan"] = loss + self.gan_weight * gan, gan.detach()
        return {"loss": loss, **terms}
