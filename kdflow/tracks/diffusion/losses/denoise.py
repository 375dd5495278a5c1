"""The DDPM objective (Ho et al., 2020) that trains the teachers: predict the network target
(epsilon, v or x0) of a randomly noised training image at a uniformly drawn time step."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdflow.tracks.diffusion.losses import unwrap


def denoise_reference(out: Tensor, target: Tensor) -> Tensor:
    """``mean ||net(x_t, t) - target(x0, eps, t)||^2``."""
    return ((out - target) ** 2).mean()


class DenoiseLoss:
    """``E_{x0, t ~ U{0..T-1}, eps} ||net(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, y) - target||^2``."""

    needs = ("x", "y")

    def run_model(self, model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        net = unwrap(model)
        x0 = batch["x"]
        t = torch.randint(0, net.timesteps, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        out = model(net.noised(x0, noise, t), t, batch.get("y"))
        return {"loss": F.mse_loss(out.float(), net.target(x0, noise, t).float())}
