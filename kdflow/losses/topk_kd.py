"""Knowledge distillation from a top-k logit cache: the k cached classes plus a tail bucket.

The teacher distribution over k + 1 buckets comes from the cache: the k cached
log-probabilities and ``log(tail)``, all taken at the capture temperature. The student's
distribution at T is aggregated onto the same buckets: its probabilities at the k cached
classes, and the mass of every other class in the tail bucket (a masked logsumexp, so
it stays stable when the tail is tiny).

When ``temperature`` differs from ``capture_temperature`` the teacher buckets are
re-tempered by treating ``[logprobs, log(tail)]`` as k + 1 logits scaled by
``capture_temperature / temperature``. This is exact for the k cached classes relative to
each other, but approximate for the tail: the tail mass of many classes is tempered as if
it were one class. Capture at the temperature you train with to avoid it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdflow.errors import DataError, ParamsError
from kdflow.losses import LOSSES, LossBase, check_args, check_batch, kl_rows, weighted_mean
from kdflow.losses.ce import ce_rows
from schemas.methods import TopKKDParams  # torch-free (kdflow/catalog.py)

TAIL_LOG_FLOOR = -100.0  # log of a mass below float32's smallest normal number


def teacher_bucket_logprobs(logprobs: Tensor, tail: Tensor, scale: float) -> Tensor:
    """Teacher log-probabilities over k + 1 buckets, renormalized.

    Args:
        logprobs: cached log-probabilities ``[B, k]`` at the capture temperature.
        tail: probability mass outside the top-k ``[B]``.
        scale: ``capture_temperature / temperature`` (1.0 keeps the cached distribution).

    Returns:
        ``[B, k + 1]`` log-probabilities; renormalizing absorbs fp16 rounding of the cache.
    """
    log_tail = tail.float().clamp_min(0.0).log().unsqueeze(-1)  # [B, 1], -inf when the tail is 0
    z = torch.cat([logprobs.float(), log_tail], dim=-1)  # [B, k + 1]
    return F.log_softmax(z * scale, dim=-1)


def student_bucket_logprobs(student_logits: Tensor, indices: Tensor, temperature: float) -> Tensor:
    """Student log-probabilities at T over the cached classes plus the tail bucket.

    Args:
        student_logits: ``[B, C]`` float32 logits.
        indices: ``[B, k]`` int64 cached class indices.
        temperature: softening temperature T.

    Returns:
        ``[B, k + 1]``: ``log softmax(s/T)`` at ``indices``, then the log of the remaining mass
        (floored at ``TAIL_LOG_FLOOR`` when the k classes cover all C).
    """
    log_q = F.log_softmax(student_logits / temperature, dim=-1)  # [B, C]
    log_q_top = log_q.gather(-1, indices)  # [B, k]
    in_top = torch.zeros_like(log_q, dtype=torch.bool).scatter_(-1, indices, True)  # [B, C]
    log_q_tail = torch.logsumexp(log_q.masked_fill(in_top, -math.inf), dim=-1)  # [B]
    # A floor keeps KL finite if the k classes cover all C but the cached tail is not exactly 0.
    log_q_tail = log_q_tail.clamp_min(TAIL_LOG_FLOOR)
    return torch.cat([log_q_top, log_q_tail.unsqueeze(-1)], dim=-1)


@LOSSES.register("topk_kd", params=TopKKDParams, tracks=("classify", "graph", "text"))
class TopKKD(LossBase):
    """``alpha * T^2 * KL(p || q) + (1 - alpha) * CE`` over k cached classes + a tail bucket.

    With k = C (tail 0) and ``temperature == capture_temperature`` this equals ``kd``.

    Args:
        temperature: softening temperature T of the distillation term.
        alpha: weight of the distillation term; ``1 - alpha`` weighs the label term.
        capture_temperature: temperature at which the cache was written.
    """

    needs: tuple[str, ...] = ("y", "teacher_logprobs", "teacher_indices", "teacher_tail")

    def __init__(
        self, temperature: float = 4.0, alpha: float = 0.9, capture_temperature: float = 1.0
    ) -> None:
        check_args("topk_kd", temperature, alpha)
        if not capture_temperature > 0:
            msg = f"topk_kd.capture_temperature: must be > 0 (got {capture_temperature})"
            raise ParamsError([msg], source="loss")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.capture_temperature = float(capture_temperature)

    @classmethod
    def context(cls, cache_info: dict[str, Any], data_meta: dict[str, Any]) -> dict[str, Any]:
        """The cache's capture temperature (the cached log-probabilities are at it)."""
        return {"capture_temperature": float(cache_info["capture_temperature"])}

    def __call__(self, student_logits: Tensor, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        check_batch("topk_kd", self.needs, student_logits, batch)
        s = student_logits.float()  # [B, C]
        indices = batch["teacher_indices"].to(s.device).long()  # [B, k]
        logprobs = batch["teacher_logprobs"].to(s.device)  # [B, k]
        tail = batch["teacher_tail"].to(s.device)  # [B]
        if indices.shape != logprobs.shape or indices.shape[-1] > s.shape[-1]:
            raise DataError(
                f"loss 'topk_kd': teacher_indices {tuple(indices.shape)} and teacher_logprobs "
                f"{tuple(logprobs.shape)} must match and have k <= {s.shape[-1]} classes"
            )
        if indices.numel() and (indices.min() < 0 or indices.max() >= s.shape[-1]):
            raise DataError(f"loss 'topk_kd': teacher_indices outside [0, {s.shape[-1]})")
        T = self.temperature
        same = math.isclose(T, self.capture_temperature, rel_tol=1e-9)
        scale = 1.0 if same else self.capture_temperature / T
        log_p = teacher_bucket_logprobs(logprobs, tail, scale)  # [B, k + 1]
        log_q = student_bucket_logprobs(s, indices, T)  # [B, k + 1]
        kd = weighted_mean(kl_rows(log_p, log_q), batch) * T**2
        ce = weighted_mean(ce_rows(s, batch["y"]), batch)
        return {"loss": self.alpha * kd + (1.0 - self.alpha) * ce, "kd": kd, "ce": ce}

    def __repr__(self) -> str:
        return (
            f"TopKKD(temperature={self.temperature}, alpha={self.alpha}, "
            f"capture_temperature={self.capture_temperature})"
        )
