"""Next-token cross-entropy for language models: the no-teacher baseline (and how teachers train)."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdflow.losses import LOSSES, LossBase
from kdflow.losses.lm_tokens import IGNORE_INDEX, check_lm_batch, real_tokens, token_mean, token_weights
from schemas.base import Section


def lm_ce_reference(student_logits: Tensor, y: Tensor) -> Tensor:
    """Mean over real tokens of ``-log softmax(s[b, l])[y[b, l]]``, one token at a time."""
    total, count = 0.0, 0
    for b in range(y.shape[0]):
        for pos in range(y.shape[1]):
            if int(y[b, pos]) != IGNORE_INDEX:
                total = total - F.log_softmax(student_logits[b, pos], dim=-1)[int(y[b, pos])]
                count += 1
    return total / count if count else math.nan


class LMCEParams(Section):
    name: Literal["lm_ce"] = Field(
        "lm_ce", description="Next-token cross-entropy only (no teacher): the LM baseline, and how teachers train."
    )


def token_ce(student_logits: Tensor, batch: Mapping[str, Tensor], mask: Tensor) -> Tensor:
    """Next-token cross-entropy averaged over the real tokens (weighted by ``batch["weight"]``).

    Args:
        student_logits: ``[B, L, V]``.
        batch: holds ``"y"`` ``[B, L]`` and optionally ``"weight"`` ``[B]``.
        mask: real tokens ``[B, L]``.
    """
    s = student_logits.float()  # [B, L, V]; no copy when already float32
    y = batch["y"].to(s.device).long()  # [B, L]
    # ignore_index skips the padding without gathering the real tokens' [T, V] logits
    ce = F.cross_entropy(s.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="none")  # [B * L]
    return token_mean(ce.view(mask.shape)[mask], token_weights(batch, mask))


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
