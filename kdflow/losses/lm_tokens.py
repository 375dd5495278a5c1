"""Per-token plumbing shared by the language-model losses (track ``lm``); not a loss itself.

The batch contract of the ``lm_*`` losses:

- ``student_logits``: ``[B, L, V]``, the student's next-token logits at every position;
- ``"y"``: ``[B, L]`` integer next-token labels, ``IGNORE_INDEX`` (-100) where there is none
  (a block's last position, padding). Every term, distillation terms included, is a mean over
  the real tokens ``y != -100``; ``teacher_mask`` is not read;
- teacher signal per token: ``teacher_logprobs`` / ``teacher_indices`` ``[B, L, k]`` and
  ``teacher_tail`` ``[B, L]`` from a ``topk``/``topk_q8`` cache, or ``teacher_logits``
  ``[B, L, V]`` from a ``dense`` one;
- ``"weight"`` (optional): per-sequence weights ``[B]``; every token of a sequence carries its
  sequence's weight and the means become weighted means.

The losses flatten the real tokens to rows ``[T, ...]`` and reuse the row-wise helpers of
``kd``/``topk_kd``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from kdflow.errors import DataError, ParamsError
from kdflow.losses import weighted_mean
from kdflow.losses.topk_kd import student_bucket_logprobs, teacher_bucket_logprobs

IGNORE_INDEX = -100


def lm_temperature_field() -> Any:
    """The softening temperature knob of the LM divergence losses (default 1, as LMs are usually
    cached and distilled at T = 1)."""
    return Field(1.0, gt=0, le=100, description="Softmax temperature T (the divergence is scaled by T^2).")


def capture_context(cache_info: dict[str, Any]) -> dict[str, Any]:
    """``{"capture_temperature": ...}`` from a top-k cache's info (its log-probabilities are at it)."""
    return {"capture_temperature": float(cache_info["capture_temperature"])}


def check_capture_temperature(name: str, value: float) -> float:
    """``value`` as a float; ``ParamsError`` unless it is > 0."""
    if not value > 0:
        raise ParamsError([f"{name}.capture_temperature: must be > 0 (got {value})"], source="loss")
    return float(value)


def check_lm_batch(
    name: str, needs: tuple[str, ...], student_logits: Tensor, batch: Mapping[str, Tensor]
) -> None:
    """Raises ``DataError`` when a needed key is missing or a per-token key is not ``[B, L, ...]``."""
    missing = [k for k in needs if k not in batch]
    if missing:
        raise DataError(
            f"loss {name!r} needs batch keys {list(needs)}; missing {missing} "
            f"(got {sorted(batch)}). Check that the logit cache matches the loss."
        )
    if student_logits.dim() != 3:
        raise DataError(f"loss {name!r}: student logits must be [B, L, V], got {tuple(student_logits.shape)}")
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
    """The real tokens of ``values`` ``[B, L, ...]`` as rows ``[T, ...]`` (a view when all are real)."""
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


def topk_buckets(
    name: str, s: Tensor, batch: Mapping[str, Tensor], mask: Tensor, temperature: float,
    capture_temperature: float,
) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probabilities over the k cached tokens + a tail bucket, per real token.

    Args:
        name: the loss, for error messages.
        s: student logits of the real tokens ``[T, V]`` float32.
        batch: holds ``teacher_logprobs``, ``teacher_indices`` ``[B, L, k]``, ``teacher_tail`` ``[B, L]``.
        mask: real tokens ``[B, L]``.
        temperature: softening temperature T of both distributions.
        capture_temperature: temperature the cache was written at (teacher re-tempered when it
            differs from T, as in ``topk_kd``).

    Returns:
        ``(log_p, log_q)``, each ``[T, k + 1]``.
    """
    logprobs = rows(batch["teacher_logprobs"], mask).float()  # [T, k]
    indices = rows(batch["teacher_indices"], mask).long()  # [T, k]
    tail = rows(batch["teacher_tail"], mask).float()  # [T]
    vocab = s.shape[-1]
    if indices.shape != logprobs.shape or indices.shape[-1] > vocab:
        raise DataError(f"loss {name!r}: teacher_indices and teacher_logprobs must both be [B, L, k] "
                        f"with k <= V = {vocab}, got {tuple(batch['teacher_indices'].shape)} and "
                        f"{tuple(batch['teacher_logprobs'].shape)}")
    if indices.numel() and (indices.min() < 0 or indices.max() >= vocab):
        raise DataError(f"loss {name!r}: teacher_indices outside the student vocabulary [0, {vocab})")
    same = math.isclose(temperature, capture_temperature, rel_tol=1e-9)
    scale = 1.0 if same else capture_temperature / temperature
    log_p = teacher_bucket_logprobs(logprobs, tail, scale)  # [T, k + 1]
    log_q = student_bucket_logprobs(s, indices, temperature)  # [T, k + 1]
    return log_p, log_q


def mix(alpha: float, key: str, distill: Tensor, ce: Tensor) -> dict[str, Tensor]:
    """``{"loss": alpha * distill + (1 - alpha) * ce, key: distill, "ce": ce}``."""
    return {"loss": alpha * distill + (1.0 - alpha) * ce, key: distill, "ce": ce}
