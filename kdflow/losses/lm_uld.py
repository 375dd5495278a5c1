"""Universal Logit Distillation (Boizard et al., 2024, "Towards Cross-Tokenizer Distillation:
the Universal Logit Distillation Loss"): tokenizer-agnostic, so the vocabularies may differ.

Per token, the student's probabilities and the teacher's are each sorted in decreasing order,
the shorter list is padded with zeros, and the loss is their L1 distance (the Wasserstein-1
distance between the two distributions under a sorted-rank matching). Token identities are
never compared, so ``teacher_indices`` is not read.

Simplifications (deliberate):

- the teacher contributes its k cached probabilities only; its tail mass is not spread over
  unknown tokens (the zero padding stands for it);
- ``temperature`` softens the student only; the teacher's probabilities stay at the cache's
  capture temperature. The distance is not scaled by T^2 (an L1 distance, not a KL).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

from kdflow.losses import LOSSES, LossBase, check_args
from kdflow.losses.lm_tokens import (
    IGNORE_INDEX, check_lm_batch, mix, real_tokens, rows, token_ce, token_mean, token_weights,
)
from schemas.methods import LMULDParams  # torch-free (kdflow/catalog.py)


def lm_uld_reference(s: Tensor, logprobs: Tensor, y: Tensor, temperature: float) -> Tensor:
    """``mean_{y != -100} sum_i |sort(q)_i - sort(p)_i|``, the shorter of ``q = softmax(s / T)``
    ``[B, L, V]`` and ``p = exp(logprobs)`` ``[B, L, k]`` zero-padded to ``max(V, k)``."""
    q = (s / temperature).softmax(-1).sort(-1, descending=True).values  # [B, L, V]
    p = logprobs.exp().sort(-1, descending=True).values  # [B, L, k]
    n = max(q.shape[-1], p.shape[-1])
    q, p = F.pad(q, (0, n - q.shape[-1])), F.pad(p, (0, n - p.shape[-1]))  # [B, L, n]
    return (q - p).abs().sum(-1)[y != IGNORE_INDEX].mean()


def uld_rows(s: Tensor, logprobs: Tensor, temperature: float) -> Tensor:
    """Per-token ULD distance ``[T]`` without sorting the student's vocabulary.

    Only the first ``m = min(k, V)`` ranks can pair two nonzero values, so with the student's
    m largest probabilities ``q_(i)`` (a top-m, not a sort of V) and the teacher's sorted
    ``p_(i)``: ``sum_{i<m} |q_(i) - p_(i)| + (1 - sum_{i<m} q_(i)) + sum_{i>=m} p_(i)``.

    Args:
        s: student logits ``[T, V]`` float32.
        logprobs: teacher log-probabilities ``[T, k]``, in any order.
        temperature: softening temperature of the student.
    """
    m = min(s.shape[-1], logprobs.shape[-1])
    z = s / temperature  # [T, V]
    q = (z.topk(m, dim=-1).values - z.logsumexp(-1, keepdim=True)).exp()  # [T, m] descending
    p = logprobs.float().exp().sort(-1, descending=True).values  # [T, k]
    student_rest = (1.0 - q.sum(-1)).clamp_min(0.0)  # [T] the student's mass at ranks >= m
    return (q - p[:, :m]).abs().sum(-1) + student_rest + p[:, m:].sum(-1)


@LOSSES.register("lm_uld", params=LMULDParams, tracks=("lm",))
class LMULD(LossBase):
    """``alpha * ULD + (1 - alpha) * CE`` per token; reads the teacher's probabilities, not its
    token ids.

    Args:
        temperature: softening temperature of the student.
        alpha: weight of the distillation term; ``1 - alpha`` weighs next-token CE.
    """

    needs: tuple[str, ...] = ("y", "teacher_logprobs")

    def __init__(self, temperature: float = 1.0, alpha: float = 0.9) -> None:
        check_args("lm_uld", temperature, alpha)
        self.temperature, self.alpha = float(temperature), float(alpha)

    def __call__(self, student_logits: Tensor, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        check_lm_batch("lm_uld", self.needs, student_logits, batch)
        mask = real_tokens(batch, student_logits.device)  # [B, L]
        s = rows(student_logits.float(), mask)  # [T, V]
        logprobs = rows(batch["teacher_logprobs"], mask)  # [T, k]
        uld = token_mean(uld_rows(s, logprobs, self.temperature), token_weights(batch, mask))
        return mix(self.alpha, "uld", uld, token_ce(student_logits, batch, mask))

    def __repr__(self) -> str:
        return f"LMULD(temperature={self.temperature}, alpha={self.alpha})"
