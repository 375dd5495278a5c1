"""Token-level reverse KL(student || teacher) for language models, on a top-k cache's buckets.

Mode-seeking where ``lm_kd`` is mode-covering. Both distributions live on the k cached tokens
plus a tail bucket (see ``lm_kd``). A teacher bucket of probability 0 (a zero cached tail)
would make the KL infinite wherever the student puts mass there, so the teacher's
log-probabilities are floored at ``TAIL_LOG_FLOOR``: a large but finite penalty.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field
from torch import Tensor

from kdflow.losses import LOSSES, LossBase, alpha_field, check_args, kl_rows
from kdflow.losses.lm_kd import kl_reference, student_buckets_reference, teacher_buckets_reference
from kdflow.losses.lm_tokens import (
    IGNORE_INDEX, TOPK_NEEDS, capture_context, check_capture_temperature, lm_temperature_field,
    topk_terms,
)
from kdflow.losses.topk_kd import TAIL_LOG_FLOOR
from schemas.base import Section


def lm_rkl_reference(
    s: Tensor, logprobs: Tensor, indices: Tensor, tail: Tensor, y: Tensor, temperature: float,
    capture_temperature: float,
) -> Tensor:
    """``T^2 * mean_{y != -100} KL(q || p)`` over the k + 1 buckets of each token."""
    scale = capture_temperature / temperature
    p = teacher_buckets_reference(logprobs, tail, scale)  # [B, L, k + 1]
    q = student_buckets_reference(s, indices, temperature)  # [B, L, k + 1]
    return temperature**2 * kl_reference(q, p)[y != IGNORE_INDEX].mean()


def reverse_kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row KL(q || p) ``[T]`` of bucket log-probs ``[T, k + 1]``, the teacher's floored."""
    return kl_rows(log_q, log_p.clamp_min(TAIL_LOG_FLOOR))


class LMRKLParams(Section):
    name: Literal["lm_rkl"] = Field(
        "lm_rkl", description="Token-level reverse KL(student || teacher) on a per-token top-k "
                              "cache plus a tail bucket (logits.format topk or topk_q8)."
    )
    temperature: float = lm_temperature_field()
    alpha: float = alpha_field()


@LOSSES.register("lm_rkl", params=LMRKLParams, tracks=("lm",))
class LMRKL(LossBase):
    """``alpha * T^2 * KL(q || p) + (1 - alpha) * CE`` per token, over k cached tokens + a tail.

    Args:
        temperature: softening temperature T.
        alpha: weight of the distillation term; ``1 - alpha`` weighs next-token CE.
        capture_temperature: temperature the cache was written at (from the cache's info).
    """

    needs: tuple[str, ...] = TOPK_NEEDS

    def __init__(
        self, temperature: float = 1.0, alpha: float = 0.9, capture_temperature: float = 1.0
    ) -> None:
        check_args("lm_rkl", temperature, alpha)
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.capture_temperature = check_capture_temperature("lm_rkl", capture_temperature)

    @classmethod
    def context(cls, cache_info: dict[str, Any], data_meta: dict[str, Any]) -> dict[str, Any]:
        """The cache's capture temperature."""
        return capture_context(cache_info)

    def __call__(self, student_logits: Tensor, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return topk_terms("lm_rkl", "rkl", reverse_kl_rows, student_logits, batch,
                          temperature=self.temperature, alpha=self.alpha,
                          capture_temperature=self.capture_temperature)

    def __repr__(self) -> str:
        return (f"LMRKL(temperature={self.temperature}, alpha={self.alpha}, "
                f"capture_temperature={self.capture_temperature})")
