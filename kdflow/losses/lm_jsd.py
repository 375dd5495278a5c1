"""Generalised Jensen-Shannon divergence JSD(beta) per token (GKD: Agarwal et al., 2024,
"On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes").

With the teacher P and the student Q on a top-k cache's k + 1 buckets (see ``lm_kd``) and
``M = beta * P + (1 - beta) * Q``::

    JSD(beta) = beta * KL(P || M) + (1 - beta) * KL(Q || M)

As in GKD and TRL's ``GKDTrainer``, the endpoints are the limits of the *normalised*
divergence: ``beta = 0`` is the forward KL(P || Q) (``lm_kd``'s term) and ``beta = 1`` the
reverse KL(Q || P) (``lm_rkl``'s, teacher floored likewise). The formula itself tends to 0 at
both ends (``JSD(beta) ~ beta * KL(P || Q)``), so the loss jumps there: a small ``beta`` gives
a small loss, not one close to the forward KL.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from kdflow.errors import ParamsError
from kdflow.losses import LOSSES, kl_rows
from kdflow.losses.lm_kd import kl_reference, student_buckets_reference, teacher_buckets_reference
from kdflow.losses.lm_rkl import reverse_kl_rows
from kdflow.losses.lm_tokens import IGNORE_INDEX, TopKTokenLoss
from schemas.methods import LMJSDParams  # torch-free (kdflow/catalog.py)


def lm_jsd_reference(
    s: Tensor, logprobs: Tensor, indices: Tensor, tail: Tensor, y: Tensor, beta: float,
    temperature: float, capture_temperature: float,
) -> Tensor:
    """``T^2 * mean_{y != -100} JSD(beta)`` over the k + 1 buckets of each token."""
    scale = capture_temperature / temperature
    p = teacher_buckets_reference(logprobs, tail, scale)  # [B, L, k + 1]
    q = student_buckets_reference(s, indices, temperature)  # [B, L, k + 1]
    if beta == 0:
        jsd = kl_reference(p, q)
    elif beta == 1:
        jsd = kl_reference(q, p)
    else:
        m = beta * p + (1 - beta) * q
        jsd = beta * kl_reference(p, m) + (1 - beta) * kl_reference(q, m)  # [B, L]
    return temperature**2 * jsd[y != IGNORE_INDEX].mean()


def jsd_rows(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """Per-row JSD(beta) ``[T]`` of bucket log-probabilities ``[T, k + 1]``, in log space."""
    if beta == 0.0:
        return kl_rows(log_p, log_q)
    if beta == 1.0:
        return reverse_kl_rows(log_p, log_q)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))  # [T, k + 1]
    return beta * kl_rows(log_p, log_m) + (1.0 - beta) * kl_rows(log_q, log_m)


@LOSSES.register("lm_jsd", params=LMJSDParams, tracks=("lm",))
class LMJSD(TopKTokenLoss):
    """``alpha * T^2 * JSD(beta) + (1 - alpha) * CE`` per token, over k cached tokens + a tail.

    Args:
        beta: teacher weight of the mixture (0: forward KL, 1: reverse KL).
    """

    loss_name, term = "lm_jsd", "jsd"

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, alpha: float = 0.9,
                 capture_temperature: float = 1.0) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ParamsError([f"lm_jsd.beta: must be in [0, 1] (got {beta})"], source="loss")
        self.beta = float(beta)
        super().__init__(temperature, alpha, capture_temperature)

    def divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        return jsd_rows(log_p, log_q, self.beta)
