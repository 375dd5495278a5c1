"""Per-token plumbing shared by the language-model losses (track ``lm``); not a loss itself.

The batch contract of the ``lm_*`` losses:

- ``student_logits``: ``[B, L, V]``, the student's next-token logits at every position;
- ``"y"``: ``[B, L]`` integer next-token labels, ``IGNORE_INDEX`` (-100) where there is none
  (a block's last position, padding). Every term, distillation terms included, is a mean over
  the real tokens ``y != -100``; ``teacher_mask`` is not read;
- teacher signal per token: ``teacher_logprobs`` / ``teacher_indices`` ``[B, L, k]`` and
  ``teacher_tail`` ``[B, L]`` from a ``topk``/``topk_q8`` cache, or ``teacher_logits``
  ``[B, L, V]`` from a ``dense`` one;
- ``"weight"`` (optional): per-sequence weights ``[B]``; every token carries its sequence's
  weight and the means become weighted means.

The losses flatten the real tokens to rows ``[T, ...]`` and reuse the row-wise helpers of
``kd`` and ``topk_kd``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdflow.errors import DataError, ParamsError
from kdflow.losses import LossBase, check_args, require_keys, weighted_mean
from kdflow.losses.topk_kd import student_bucket_logprobs, teacher_bucket_logprobs

IGNORE_INDEX = -100
TOPK_NEEDS = ("y", "teacher_logprobs", "teacher_indices", "teacher_tail")


def capture_context(cache_info: dict[str, Any]) -> dict[str, Any]:
    """``{"capture_temperature": ...}`` from a top-k cache's info (its log-probs are at it)."""
    return {"capture_temperature": float(cache_info["capture_temperature"])}


def check_capture_temperature(name: str, value: float) -> float:
    """``value`` as a float; ``ParamsError`` unless it is > 0."""
    if not value > 0:
        raise ParamsError([f"{name}.capture_temperature: must be > 0 (got {value})"], source="loss")
    return float(value)


def check_lm_batch(
    name: str, needs: tuple[str, ...], student_logits: Tensor, batch: Mapping[str, Tensor]
) -> None:
    """Raises ``DataError`` for a missing needed key or a per-token key not ``[B, L, ...]``."""
    require_keys(name, needs, batch)
    if student_logits.dim() != 3:
        shape = tuple(student_logits.shape)
        raise DataError(f"loss {name!r}: student logits must be [B, L, V], got {shape}")
    size = tuple(student_logits.shape[:2])
    for key in needs:
        if tuple(batch[key].shape[:2]) != size:
            raise DataError(f"loss {name!r}: batch[{key!r}] has shape {tuple(batch[key].shape)}, "
                            f"expected [B, L, ...] = {list(size)} like the student logits")
    if "weight" in batch and tuple(batch["weight"].shape) != size[:1]:
        raise DataError(f"loss {name!r}: batch['weight'] must be per sequence [{size[0]}], "
                        f"got {tuple(batch['weight'].shape)}")


def real_tokens(batch: Mapping[str, Tensor], device: Any) -> Tensor:
    """``[B, L]`` bool, True where ``batch["y"]`` holds a label."""
    return batch["y"].to(device) != IGNORE_INDEX


def rows(values: Tensor, mask: Tensor) -> Tensor:
    """The real tokens of ``values`` ``[B, L, ...]`` as rows ``[T, ...]`` (a view if all are)."""
    values = values.to(mask.device)
    return values.flatten(0, 1) if bool(mask.all()) else values[mask]


def token_weights(batch: Mapping[str, Tensor], mask: Tensor) -> Tensor | None:
    """Per-token weights ``[T]`` (each token carries its sequence's weight), or None."""
    weight = batch.get("weight")
    if weight is None:
        return None
    weight = weight.to(device=mask.device, dtype=torch.float32)  # [B]
    return weight[:, None].expand(mask.shape)[mask]


def token_mean(values: Tensor, weight: Tensor | None) -> Tensor:
    """(Weighted) mean of per-token ``values`` ``[T]``; 0 (still on the graph) when T = 0."""
    if values.numel() == 0:
        return values.sum()
    return weighted_mean(values, {} if weight is None else {"weight": weight})


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
    ce = F.cross_entropy(s.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                         reduction="none")  # [B * L]
    return token_mean(ce.view(mask.shape)[mask], token_weights(batch, mask))


def topk_buckets(
    name: str, s: Tensor, batch: Mapping[str, Tensor], mask: Tensor, temperature: float,
    capture_temperature: float,
) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probabilities over the k cached tokens + a tail bucket, per token.

    Args:
        name: the loss, for error messages.
        s: student logits of the real tokens ``[T, V]`` float32.
        batch: holds ``teacher_logprobs``, ``teacher_indices`` ``[B, L, k]`` and
            ``teacher_tail`` ``[B, L]``.
        mask: real tokens ``[B, L]``.
        temperature: softening temperature T of both distributions.
        capture_temperature: temperature the cache was written at (the teacher is re-tempered
            when it differs from T, as in ``topk_kd``).

    Returns:
        ``(log_p, log_q)``, each ``[T, k + 1]``.
    """
    logprobs = rows(batch["teacher_logprobs"], mask).float()  # [T, k]
    indices = rows(batch["teacher_indices"], mask).long()  # [T, k]
    tail = rows(batch["teacher_tail"], mask).float()  # [T]
    vocab = s.shape[-1]
    if indices.shape != logprobs.shape or indices.shape[-1] > vocab:
        shapes = tuple(batch["teacher_indices"].shape), tuple(batch["teacher_logprobs"].shape)
        raise DataError(f"loss {name!r}: teacher_indices and teacher_logprobs must both be "
                        f"[B, L, k] with k <= V = {vocab}, got {shapes[0]} and {shapes[1]}")
    if indices.numel() and (indices.min() < 0 or indices.max() >= vocab):
        raise DataError(
            f"loss {name!r}: teacher_indices outside the student vocabulary [0, {vocab})"
        )
    same = math.isclose(temperature, capture_temperature, rel_tol=1e-9)
    scale = 1.0 if same else capture_temperature / temperature
    log_p = teacher_bucket_logprobs(logprobs, tail, scale)  # [T, k + 1]
    log_q = student_bucket_logprobs(s, indices, temperature)  # [T, k + 1]
    return log_p, log_q


def mix(alpha: float, key: str, distill: Tensor, ce: Tensor) -> dict[str, Tensor]:
    """``{"loss": alpha * distill + (1 - alpha) * ce, key: distill, "ce": ce}``."""
    return {"loss": alpha * distill + (1.0 - alpha) * ce, key: distill, "ce": ce}


def check_topk_ids(name: str, indices: Tensor, logprobs: Tensor, mask: Tensor, vocab: int) -> None:
    """``DataError`` unless the real tokens' cached ids ``indices`` ``[B, L, k]`` (int64) lie in
    ``[0, vocab)`` with ``k <= vocab`` and match the log-probabilities' shape."""
    if indices.shape != logprobs.shape or indices.shape[-1] > vocab:
        raise DataError(f"loss {name!r}: teacher_indices and teacher_logprobs must both be "
                        f"[B, L, k] with k <= V = {vocab}, got {tuple(indices.shape)} and "
                        f"{tuple(logprobs.shape)}")
    real = rows(indices, mask)  # [T, k]
    if real.numel() and (real.min() < 0 or real.max() >= vocab):
        raise DataError(
            f"loss {name!r}: teacher_indices outside the student vocabulary [0, {vocab})"
        )


def row_weights(batch: Mapping[str, Tensor], mask: Tensor) -> Tensor:
    """Per-position weights ``[B * L]`` summing to 1 over the real tokens (0 elsewhere; all 0
    when there is none): ``sum(w * v)`` is ``token_mean`` of ``v``."""
    w = mask.float()  # [B, L]
    if "weight" in batch:
        w = w * batch["weight"].to(device=mask.device, dtype=torch.float32)[:, None]
    return (w / w.sum().clamp_min(torch.finfo(torch.float32).tiny)).flatten()


def topk_terms(
    name: str, key: str, divergence: Callable[[Tensor, Tensor], Tensor], student_logits: Tensor,
    batch: Mapping[str, Tensor], *, temperature: float, capture_temperature: float, alpha: float,
) -> dict[str, Tensor]:
    """The terms of a top-k LM loss: ``alpha * T^2 * mean_tokens D + (1 - alpha) * CE``, fused.

    Every position of ``[B, L]`` is one row (no copy of the real tokens' logits): the positions
    without a label weigh 0. The student's buckets come from ``lm_buckets.bucket_logprobs`` (one
    softmax, an analytic gradient), the CE term from the same pass when T = 1. Equal to
    ``topk_terms_reference`` (tested to float32 rounding, values and gradients).

    Args:
        name: the loss, for error messages.
        key: the name of the distillation term in the result.
        divergence: per-row ``D(log_p, log_q)`` ``[T]`` of bucket log-probs ``[T, k + 1]``.
        student_logits: ``[B, L, V]``.
        batch: ``TOPK_NEEDS`` and optionally ``"weight"``.
        temperature: softening temperature T.
        capture_temperature: temperature the cache was written at.
        alpha: weight of the distillation term.
    """
    from kdflow.losses.lm_buckets import bucket_logprobs

    check_lm_batch(name, TOPK_NEEDS, student_logits, batch)
    mask = real_tokens(batch, student_logits.device)  # [B, L]
    vocab = student_logits.shape[-1]
    device = student_logits.device
    indices = batch["teacher_indices"].to(device).long()  # [B, L, k]
    check_topk_ids(name, indices, batch["teacher_logprobs"], mask, vocab)
    keep = mask.flatten()[:, None]  # [N, 1]
    indices = indices.flatten(0, 1)  # [N, k]
    indices = torch.where(keep, indices, torch.arange(indices.shape[-1], device=device))
    labels = batch["y"].to(device).flatten().long().clamp_min(0)  # [N]
    logprobs = batch["teacher_logprobs"].to(device).flatten(0, 1).float()  # [N, k]
    tail = batch["teacher_tail"].to(device).flatten().float()  # [N]
    same = math.isclose(temperature, capture_temperature, rel_tol=1e-9)
    log_p = teacher_bucket_logprobs(logprobs, tail, 1.0 if same else capture_temperature / temperature)
    s = student_logits.float().flatten(0, 1)  # [N, V] a view when already float32
    unit = temperature == 1.0
    log_q, log_y = bucket_logprobs(s if unit else s / temperature, indices, labels)
    w = row_weights(batch, mask)  # [N]
    per_row = divergence(log_p, log_q)  # [N]
    distill = torch.where(w > 0, per_row, 0.0).mul(w).sum() * temperature**2
    if unit:
        ce = -torch.where(w > 0, log_y, 0.0).mul(w).sum()
    else:
        ce = token_ce(student_logits, batch, mask)
    return mix(alpha, key, distill, ce)


def topk_terms_reference(
    name: str, key: str, divergence: Callable[[Tensor, Tensor], Tensor], student_logits: Tensor,
    batch: Mapping[str, Tensor], *, temperature: float, capture_temperature: float, alpha: float,
) -> dict[str, Tensor]:
    """The terms of a top-k LM loss, unfused: ``alpha * T^2 * mean_tokens D + (1 - alpha) * CE``.

    The plain autograd path over ``topk_buckets``: the oracle ``topk_terms`` is tested against.
    Arguments as for ``topk_terms``.
    """
    check_lm_batch(name, TOPK_NEEDS, student_logits, batch)
    mask = real_tokens(batch, student_logits.device)  # [B, L]
    s = rows(student_logits.float(), mask)  # [T, V]
    log_p, log_q = topk_buckets(name, s, batch, mask, temperature, capture_temperature)
    distill = token_mean(divergence(log_p, log_q), token_weights(batch, mask)) * temperature**2
    return mix(alpha, key, distill, token_ce(student_logits, batch, mask))


class TopKTokenLoss(LossBase):
    """Base of the per-token top-k losses: ``alpha * T^2 * D(p, q) + (1 - alpha) * CE`` with ``D``
    the subclass's ``divergence`` over the k cached tokens + a tail bucket (``topk_terms``).

    Args:
        temperature: softening temperature T.
        alpha: weight of the distillation term; ``1 - alpha`` weighs next-token CE.
        capture_temperature: temperature the cache was written at (from the cache's info).
    """

    needs: tuple[str, ...] = TOPK_NEEDS
    loss_name = ""  # the registered name (for messages)
    term = ""  # the distillation term's key in the returned dict

    def __init__(self, temperature: float = 1.0, alpha: float = 0.9, capture_temperature: float = 1.0) -> None:
        check_args(self.loss_name, temperature, alpha)
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.capture_temperature = check_capture_temperature(self.loss_name, capture_temperature)

    @classmethod
    def context(cls, cache_info: dict[str, Any], data_meta: dict[str, Any]) -> dict[str, Any]:
        """The cache's capture temperature."""
        return capture_context(cache_info)

    def divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        """Per-row divergence ``[T]`` of teacher ``log_p`` and student ``log_q`` buckets ``[T, k + 1]``."""
        raise NotImplementedError

    def __call__(self, student_logits: Tensor, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return topk_terms(self.loss_name, self.term, self.divergence, student_logits, batch,
                          temperature=self.temperature, alpha=self.alpha,
                          capture_temperature=self.capture_temperature)

    def __repr__(self) -> str:
        extra = "".join(f"{k}={v}, " for k, v in vars(self).items() if k not in ("temperature", "alpha",
                                                                                "capture_temperature"))
        return (f"{type(self).__name__}({extra}temperature={self.temperature}, alpha={self.alpha}, "
                f"capture_temperature={self.capture_temperature})")
