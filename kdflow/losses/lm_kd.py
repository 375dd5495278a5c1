"""Token-level KD for language models: forward KL(teacher || student) at every real token.

Two registered names, one per teacher form (each declares exactly the keys it reads):

- ``lm_kd``: a per-token top-k cache (``topk``/``topk_q8``); the KL over the k cached tokens
  plus one tail bucket (the student's mass outside them), as ``topk_kd`` does per sample;
- ``lm_kd_dense``: dense teacher logits (``dense``); the exact KL over the vocabulary.

Both: ``alpha * T^2 * mean_tokens KL + (1 - alpha) * CE``, means over the tokens with a label.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from kdflow.errors import DataError
from kdflow.losses import LOSSES, LossBase, check_args, kl_rows
from kdflow.losses.kd import KD
from kdflow.losses.lm_tokens import IGNORE_INDEX, TopKTokenLoss, check_lm_batch, real_tokens, rows, token_weights
from schemas.methods import LMKDDenseParams, LMKDParams  # torch-free (kdflow/catalog.py)

# --- reference formulas (dense, on tiny tensors) ------------------------------------------


def kl_reference(p: Tensor, q: Tensor) -> Tensor:
    """``sum_i p_i log(p_i / q_i)`` over the last dim, with 0 log 0 = 0."""
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)


def teacher_buckets_reference(logprobs: Tensor, tail: Tensor, scale: float) -> Tensor:
    """``softmax(scale * [logprobs, log tail])``: the teacher on k + 1 buckets ``[..., k + 1]``."""
    return (torch.cat([logprobs, tail.log().unsqueeze(-1)], dim=-1) * scale).softmax(-1)


def student_buckets_reference(s: Tensor, indices: Tensor, temperature: float) -> Tensor:
    """``[q[indices], 1 - sum q[indices]]`` with ``q = softmax(s / T)``: ``[..., k + 1]``."""
    top = (s / temperature).softmax(-1).gather(-1, indices)  # [..., k]
    return torch.cat([top, 1 - top.sum(-1, keepdim=True)], dim=-1)


def lm_kd_dense_reference(s: Tensor, t: Tensor, y: Tensor, temperature: float) -> Tensor:
    """``T^2 * mean_{y != -100} KL(softmax(t / T) || softmax(s / T))`` over ``[B, L, V]``."""
    kl = kl_reference((t / temperature).softmax(-1), (s / temperature).softmax(-1))  # [B, L]
    return temperature**2 * kl[y != IGNORE_INDEX].mean()


def lm_kd_topk_reference(
    s: Tensor, logprobs: Tensor, indices: Tensor, tail: Tensor, y: Tensor, temperature: float,
    capture_temperature: float,
) -> Tensor:
    """``T^2 * mean_{y != -100} KL(p || q)`` over the k + 1 buckets of each token."""
    scale = capture_temperature / temperature
    p = teacher_buckets_reference(logprobs, tail, scale)  # [B, L, k + 1]
    q = student_buckets_reference(s, indices, temperature)  # [B, L, k + 1]
    return temperature**2 * kl_reference(p, q)[y != IGNORE_INDEX].mean()


# --- the losses ---------------------------------------------------------------------------


@LOSSES.register("lm_kd", params=LMKDParams, tracks=("lm",))
class LMKD(TopKTokenLoss):
    """``alpha * T^2 * KL(p || q) + (1 - alpha) * CE`` per token, over k cached tokens + a tail.

    With k = V (tail 0) and ``temperature == capture_temperature`` this equals ``lm_kd_dense``.
    """

    loss_name, term = "lm_kd", "kd"

    def divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        return kl_rows(log_p, log_q)


@LOSSES.register("lm_kd_dense", params=LMKDDenseParams, tracks=("lm",))
class LMKDDense(LossBase):
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE`` per token.

    The real tokens are flattened to rows and fed to ``kd``'s fused row-wise loss. Only
    ``"loss"`` carries gradients; ``"kd"`` and ``"ce"`` are its terms, for logging.

    Args:
        temperature: softening temperature T.
        alpha: weight of the distillation term; ``1 - alpha`` weighs next-token CE.
    """

    needs: tuple[str, ...] = ("y", "teacher_logits")

    def __init__(self, temperature: float = 1.0, alpha: float = 0.9) -> None:
        check_args("lm_kd_dense", temperature, alpha)
        self.temperature, self.alpha = float(temperature), float(alpha)
        self._rows = KD(temperature=temperature, alpha=alpha)

    def __call__(self, student_logits: Tensor, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        check_lm_batch("lm_kd_dense", self.needs, student_logits, batch)
        teacher = batch["teacher_logits"]  # [B, L, V]
        if teacher.shape != student_logits.shape:
            raise DataError(f"loss 'lm_kd_dense': teacher logits {tuple(teacher.shape)} "
                            f"!= student logits {tuple(student_logits.shape)}")
        mask = real_tokens(batch, student_logits.device)  # [B, L]
        if not bool(mask.any()):  # no labelled token: zero terms, still on the graph
            zero = student_logits.float().sum() * 0.0
            return {"loss": zero, "kd": zero.detach(), "ce": zero.detach()}
        token_batch = {"y": rows(batch["y"], mask), "teacher_logits": rows(teacher, mask)}
        weight = token_weights(batch, mask)  # [T] or None
        if weight is not None:
            token_batch["weight"] = weight
        return self._rows(rows(student_logits.float(), mask), token_batch)  # rows [T, V]

    def __repr__(self) -> str:
        return f"LMKDDense(temperature={self.temperature}, alpha={self.alpha})"
