"""Knowledge distillation into a one-step generator by regression (Luhman & Luhman, 2021).

The teacher's deterministic DDIM maps noise z to an image x0 = DDIM(z); the student learns the map
directly: ``L = ||f(z, T-1) - DDIM(z)||^2`` (the paper's loss on the cached pairs; MSE here, the
paper's is a perceptual-free L2 too at this scale). With ``all_states`` the student also maps every
cached intermediate state of the trajectory to the same endpoint, ``||f(x_tn, t_n) - x0||^2`` for
one uniformly drawn state per sample, so that its multi-step (re-noised) sampling has seen
intermediate time steps.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdflow.losses import LOSSES, LossBase
from kdflow.tracks.diffusion.losses import cached_states, unwrap
from kdflow.tracks.diffusion.sampling import state_times
from schemas.base import Section


def regression_reference(student_images: Tensor, teacher_images: Tensor) -> Tensor:
    """``mean ||f(z) - DDIM(z)||^2`` over the batch."""
    return ((student_images - teacher_images) ** 2).mean()


class RegressionParams(Section):
    name: Literal["diffusion_regression"] = Field("diffusion_regression", description="Luhman & Luhman: regress the student's one-step image on the teacher's cached DDIM endpoint.")
    all_states: bool = Field(True, description="Also map one cached intermediate trajectory state per sample to the endpoint (needed for 2-4 step sampling).")


@LOSSES.register("diffusion_regression", params=RegressionParams, tracks=("diffusion",))
class Regression(LossBase):
    needs = ("x", "y", "teacher_logits")

    def __init__(self, all_states: bool = True) -> None:
        self.all_states = bool(all_states)

    def run_model(self, model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        net, z, y = unwrap(model), batch["x"], batch.get("y")
        states = cached_states(batch, z)  # [B, K, C, H, W]
        x0 = states[:, -1]
        top = torch.full((len(z),), net.timesteps - 1, device=z.device)
        one = F.mse_loss(model(z, top, y).float(), x0.float())
        terms = {"one_step": one}
        loss = one
        if self.all_states and states.shape[1] > 1:
            times = torch.tensor(state_times(states.shape[1], net.timesteps)[:-1], device=z.device)
            j = torch.randint(0, len(times), (len(z),), device=z.device)
            x_n = states[torch.arange(len(z), device=z.device), j]
            mid = F.mse_loss(model(x_n, times[j], y).float(), x0.float())
            terms["states"] = mid
            loss = (one + mid) / 2
        return {"loss": loss, **terms}
