"""Consistency distillation (Song et al., 2023; latent consistency models, Luo et al., 2023).

The teacher's ODE solver is its deterministic DDIM: adjacent states ``(x_tn, x_tn-1)`` of one
trajectory are one solver segment apart. The student ``f`` (LCM boundary condition, see
``models.FewStepGenerator``) must give the same output at both:

    L = || f_theta(x_tn, t_n) - f_ema(x_tn-1, t_n-1) ||^2,  f(x, clean) = x,

with ``n`` uniform over the segments and ``f_ema`` an exponential moving average of the student
(``ema`` decay; saved in the student's checkpoint, so a resumed run continues it). The segments are the cached states (``condense.states``), so no teacher runs while
the student trains: the pairs are what the paper's solver step computes from a data point noised to
``t_n``, taken here from the teacher's own trajectories. Sampling: the LCM scheduler's multi-step
consistency sampler (``sampling.few_step``). The distance is the squared L2 (the papers also use
LPIPS / pseudo-Huber).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdflow.losses import LOSSES, LossBase
from kdflow.tracks.diffusion.losses import cached_states, unwrap
from kdflow.tracks.diffusion.sampling import CLEAN, state_times
from schemas.base import Section


def consistency_reference(f, f_ema, x_n: Tensor, t_n: int, x_prev: Tensor, t_prev: int) -> Tensor:  # noqa: ANN001
    """``mean ||f(x_n, t_n) - f_ema(x_prev, t_prev)||^2`` with ``f_ema(x, CLEAN) = x``."""
    target = x_prev if t_prev == CLEAN else f_ema(x_prev, t_prev)
    return ((f(x_n, t_n) - target) ** 2).mean()


class ConsistencyParams(Section):
    name: Literal["consistency"] = Field("consistency", description="Consistency distillation on the cached DDIM trajectory states (LCM-style boundary condition and sampler).")
    ema: float = Field(0.95, ge=0, lt=1, description="Decay of the target network's moving average of the student (0: the student itself, without gradient).")


@LOSSES.register("consistency", params=ConsistencyParams, tracks=("diffusion",))
class Consistency(LossBase):
    needs = ("x", "y", "teacher_logits")

    def __init__(self, ema: float = 0.95) -> None:
        self.ema = float(ema)
        self.target: nn.Module | None = None
        self._pending: dict | None = None  # a checkpoint's target weights, loaded at the first step

    def state_dict(self) -> dict:
        """The EMA target network (training state: saved in the student's checkpoint)."""
        if self.target is None:
            return dict(self._pending or {})
        return {"target": {k: v.detach().cpu().clone() for k, v in self.target.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.target is None:
            self._pending = state
        else:
            self.target.load_state_dict(state["target"])

    @torch.no_grad()
    def _update_target(self, net: nn.Module) -> nn.Module:
        if self.target is None:
            self.target = copy.deepcopy(net).requires_grad_(False)
            if self._pending is None:
                return self.target
            self.target.load_state_dict(self._pending["target"])  # resumed: then this step's update
            self._pending = None
        for p_t, p in zip(self.target.parameters(), net.parameters()):
            p_t.lerp_(p.detach(), 1 - self.ema)
        return self.target

    def run_model(self, model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        net, z, y = unwrap(model), batch["x"], batch.get("y")
        target_net = self._update_target(net)  # the moving average after the previous step
        chain = torch.cat([z[:, None], cached_states(batch, z)], 1)  # [B, K+1, C, H, W]: noise .. x0
        times = torch.tensor([net.timesteps - 1, *state_times(chain.shape[1] - 1, net.timesteps)], device=z.device)
        rows = torch.arange(len(z), device=z.device)
        n = torch.randint(0, chain.shape[1] - 1, (len(z),), device=z.device)  # the noisier state of the pair
        pred = model(chain[rows, n], times[n], y)
        with torch.no_grad():
            prev, t_prev = chain[rows, n + 1], times[n + 1]
            clean = (t_prev == CLEAN).view(-1, 1, 1, 1)
            target = torch.where(clean, prev, target_net(prev, t_prev.clamp_min(0), y))
        loss = F.mse_loss(pred.float(), target.float())
        return {"loss": loss}
