"""Token-level reverse KL(student || teacher) for language models, on a top-k cache's buckets.

Mode-seeking where ``lm_kd`` is mode-covering. Both distributions live on the k cached tokens
plus a tail bucket (see ``lm_kd``). A teacher bucket of probability 0 (a zero cached tail)
would make the KL infinite wherever the student puts mass there, so the teacher's
log-probabilities are floored at ``TAIL_LOG_FLOOR``: a large but finite penalty.
"""
from __future__ import annotations

from torch import Tensor

from kdflow.losses import LOSSES, kl_rows
from kdflow.losses.lm_kd import kl_reference, student_buckets_reference, teacher_buckets_reference
from kdflow.losses.lm_tokens import IGNORE_INDEX, TopKTokenLoss
from kdflow.losses.topk_kd import TAIL_LOG_FLOOR
from schemas.methods import LMRKLParams  # torch-free (kdflow/catalog.py)


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


@LOSSES.register("lm_rkl", params=LMRKLParams, tracks=("lm",))
class LMRKL(TopKTokenLoss):
    """``alpha * T^2 * KL(q || p) + (1 - alpha) * CE`` per token, over k cached tokens + a tail."""

    loss_name, term = "lm_rkl", "rkl"

    def divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        return reverse_kl_rows(log_p, log_q)
