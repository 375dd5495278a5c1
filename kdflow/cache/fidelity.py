"""How faithfully a cache reproduces the teacher, and what it costs in bytes."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdflow.cache.formats import decode_to_batch
from kdflow.cache.tokens import flatten_tokens


def _cached_logprobs(cached: dict[str, torch.Tensor], rows: slice, num_classes: int,
                     capture_temperature: float) -> torch.Tensor:
    """Log of the distribution the cache represents, ``[n, C]``."""
    if "teacher_logits" in cached:
        return F.log_softmax(cached["teacher_logits"][rows].float() / capture_temperature, dim=-1)
    logprobs = cached["teacher_logprobs"][rows].float()  # [n, k]
    indices = cached["teacher_indices"][rows].long()  # [n, k]
    tail = cached["teacher_tail"][rows].float()  # [n]
    rest = max(num_classes - indices.shape[1], 1)
    probs = (tail / rest)[:, None].expand(-1, num_classes).clone()
    probs.scatter_(1, indices, logprobs.exp())
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs.clamp_min(1e-30).log()


def fidelity(
    full_logits: torch.Tensor,
    cached: dict[str, torch.Tensor],
    *,
    capture_temperature: float,
    chunk_rows: int = 4096,
) -> dict[str, float]:
    """How well the cache reproduces the teacher distribution at the capture temperature.

    Top-k caches spread the tail mass uniformly over the ``C - k`` classes outside the top k.

    Args:
        full_logits: the teacher logits ``[n, C]``, or ``[n, L, V]`` for a sequence cache
            (only the positions where ``teacher_mask`` is True count).
        cached: the loss batch keys for the same rows (``CacheReader.get``), or the stored
            keys (``encode`` / ``encode_sequences`` output).

    Returns:
        ``kl`` (mean KL(full || cached) per row, per token for sequences), ``kl_max``,
        ``top1_agreement`` and ``rows`` (rows or tokens compared).
    """
    if "values" in cached:
        cached = decode_to_batch(cached)
    if "teacher_mask" in cached:
        full_logits = full_logits[cached["teacher_mask"]]  # [T, V]
        cached = flatten_tokens(cached)
    n, num_classes = full_logits.shape
    kl_sum, kl_max, agree = 0.0, 0.0, 0
    for start in range(0, n, chunk_rows):
        rows = slice(start, start + chunk_rows)
        p_log = F.log_softmax(full_logits[rows].float() / capture_temperature, dim=-1)
        q_log = _cached_logprobs(cached, rows, num_classes, capture_temperature)
        kl = (p_log.exp() * (p_log - q_log)).sum(dim=-1).clamp_min(0.0)  # [n]
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
        agree += int((p_log.argmax(dim=-1) == q_log.argmax(dim=-1)).sum())
    return {"kl": kl_sum / max(n, 1), "kl_max": kl_max, "top1_agreement": agree / max(n, 1),
            "rows": float(n)}


def size_metrics(info: dict) -> dict[str, float]:
    """Bytes per sample (and per real token for sequence caches) and the compression vs. dense
    fp32 logits of the same rows (``C * 4`` bytes per row or token), from a cache's info."""
    rows = max(int(info["num_rows"]), 1)
    tokens = max(int(info.get("num_tokens", rows)), 1)
    out = {"bytes_total": float(info["bytes_total"]),
           "bytes_per_sample": info["bytes_total"] / rows}
    if info.get("seq_len"):
        out["bytes_per_token"] = info["bytes_total"] / tokens
    fp32 = tokens * int(info["num_classes"]) * 4
    out["compression_vs_fp32"] = fp32 / max(int(info["bytes_total"]), 1)
    return out
