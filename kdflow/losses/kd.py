"""Hinton et al. (2015) knowledge distillation on dense teacher logits."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from kdflow.errors import DataError
from kdflow.losses import LOSSES, check_args, check_batch, kl_rows, weighted_mean
from kdflow.losses.ce import ce_rows


@LOSSES.register("kd")
class KD:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``.

    Args:
        temperature: softening temperature T.
        alpha: weight of the distillation term; ``1 - alpha`` weighs the label term.
    """

    needs: tuple[str, ...] = ("y", "teacher_logits")

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9) -> None:
        check_args("kd", temperature, alpha)
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def __call__(self, student_logits: Tensor, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        check_batch("kd", self.needs, student_logits, batch)
        s = student_logits.float()  # [B, C]
        t = batch["teacher_logits"].to(device=s.device, dtype=torch.float32)  # [B, C]
        if t.shape != s.shape:
            raise DataError(
                f"loss 'kd': teacher logits {tuple(t.shape)} != student logits {tuple(s.shape)}"
            )
        T = self.temperature
        log_p = F.log_softmax(t / T, dim=-1)  # [B, C]
        log_q = F.log_softmax(s / T, dim=-1)  # [B, C]
        kd = weighted_mean(kl_rows(log_p, log_q), batch) * T**2
        ce = weighted_mean(ce_rows(s, batch["y"]), batch)
        return {"loss": self.alpha * kd + (1.0 - self.alpha) * ce, "kd": kd, "ce": ce}

    def __repr__(self) -> str:
        return f"KD(temperature={self.temperature}, alpha={self.alpha})"

