"""Combining the cached signal of several teachers into one, at train time.

- ``weighted_mean``: the weighted average of the teachers' probabilities at the distillation
  temperature T, ``p = sum_i w_i softmax(t_i / T)`` (weights normalised to sum to 1). It is
  handed to the loss as dense logits ``T * log p``, so that ``softmax(logits / T)`` is exactly
  ``p``. Defined for dense caches only: top-k caches keep different classes per teacher and
  their tails cannot be mixed exactly.
- ``per_sample``: each sample takes all of its teacher keys from one teacher, the one that
  gives the true class the highest probability at the capture temperature (for a top-k cache a
  true class outside a teacher's top k counts as probability 0); ties go to the teacher listed
  first (the best ranked by ``select``). Defined for every format.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdflow.errors import DataError, ParamsError

COMBINES = ("weighted_mean", "per_sample")


def weighted_mean(batches: list[dict[str, torch.Tensor]], weights: list[float],
                  temperature: float) -> dict[str, torch.Tensor]:
    """Dense logits ``[B, C]`` whose softmax at ``temperature`` is the weighted mean of the
    teachers' softmax at ``temperature``."""
    if not all("teacher_logits" in b and "teacher_mask" not in b for b in batches):
        raise ParamsError(["student.combine: 'weighted_mean' is defined for dense caches only "
                           "(logits.format 'dense'); use 'per_sample' or select.top 1"])
    w = torch.tensor(weights, dtype=torch.float64)
    if (w < 0).any() or not w.sum() > 0:
        raise DataError(f"teacher weights must be >= 0 with a positive sum, got {weights}")
    log_w = (w / w.sum()).log().float()  # [m]
    logs = torch.stack([F.log_softmax(b["teacher_logits"].float() / temperature, dim=-1)
                        for b in batches])  # [m, B, C]
    mixed = torch.logsumexp(logs + log_w[:, None, None], dim=0)  # [B, C] log p
    return {"teacher_logits": mixed * temperature}


def true_class_logprob(batch: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """log p(y) ``[B]`` of one teacher's cached rows at the capture temperature
    (-inf when a top-k cache does not hold the true class)."""
    if "teacher_logits" in batch:
        return F.log_softmax(batch["teacher_logits"].float(), dim=-1).gather(1, y[:, None])[:, 0]
    hit = batch["teacher_indices"].long() == y[:, None]  # [B, k]
    values = batch["teacher_logprobs"].float().masked_fill(~hit, -math.inf)
    return values.max(dim=-1).values


def per_sample(batches: list[dict[str, torch.Tensor]], y: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    """Every teacher key taken, row by row, from the teacher giving ``y`` the highest
    probability (first teacher on ties)."""
    if any("teacher_mask" in b for b in batches):
        raise ParamsError(["student.combine: 'per_sample' needs one label per row; "
                           "sequence caches are not supported"])
    scores = torch.stack([true_class_logprob(b, y) for b in batches])  # [m, B]
    choice = scores.argmax(dim=0)  # [B]; the first maximum on ties
    rows = torch.arange(len(y))
    out = {}
    for key in batches[0]:
        shapes = {tuple(b[key].shape) for b in batches}
        if len(shapes) != 1:
            raise DataError(f"student.combine: teacher caches disagree on {key!r} shapes {shapes}")
        out[key] = torch.stack([b[key] for b in batches])[choice, rows]
    return out


def combine(batches: list[dict[str, torch.Tensor]], weights: list[float], *, mode: str,
            y: torch.Tensor, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """The teachers' cached rows for one batch, combined by ``mode`` (one teacher: unchanged).

    Args:
        batches: each teacher's loss batch keys for the same rows (``CacheReader.get``).
        weights: the teachers' weights (from ``select``).
        mode: ``weighted_mean`` or ``per_sample``.
        y: the true classes ``[B]``.
        temperature: the distillation temperature of ``weighted_mean``.

    Raises:
        ParamsError: unknown mode, or a mode not defined for the caches' format.
    """
    if mode not in COMBINES:
        raise ParamsError([f"student.combine: must be one of {list(COMBINES)} (got {mode!r})"])
    if len(batches) != len(weights) or not batches:
        raise ValueError(f"{len(batches)} teacher batches for {len(weights)} weights")
    if len(batches) == 1:
        return batches[0]
    if mode == "weighted_mean":
        return weighted_mean(batches, weights, temperature)
    return per_sample(batches, y)
