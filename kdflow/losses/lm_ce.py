"""Next-token cross-entropy for language models: the no-teacher baseline, and how teachers train."""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

from kdflow.losses import LOSSES, LossBase
from kdflow.losses.lm_tokens import IGNORE_INDEX, check_lm_batch, real_tokens, token_ce
from schemas.methods import LMCEParams  # torch-free (kdflow/catalog.py)


def lm_ce_reference(student_logits: Tensor, y: Tensor) -> Tensor:
    """Mean over real tokens of ``-log softmax(s[b, l])[y[b, l]]``, one token at a time."""
    total, count = 0.0, 0
    for b in range(y.shape[0]):
        for pos in range(y.shape[1]):
            if int(y[b, pos]) != IGNORE_INDEX:
                total = total - F.log_softmax(student_logits[b, pos], dim=-1)[int(y[b, pos])]
                count += 1
    return total / count if count else math.nan


@LOSSES.register("lm_ce", params=LMCEParams, tracks=("lm",))
class LMCE(LossBase):
    """Next-token cross-entropy, mean over the real tokens (``y != -100``)."""

    needs: tuple[str, ...] = ("y",)

    def __call__(self, student_logits: Tensor, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        check_lm_batch("lm_ce", self.needs, student_logits, batch)
        ce = token_ce(student_logits, batch, real_tokens(batch, student_logits.device))
        return {"loss": ce, "ce": ce}

    def __repr__(self) -> str:
        return "LMCE()"
