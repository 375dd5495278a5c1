"""Per-token rows for sequence outputs (language models).

A sequence cache stores every format key per token, ``[n, L, ...]``, plus ``lengths`` ``[n]``
(int32). Positions at or past a row's length are padding: their stored tensors are zeros and
``teacher_mask`` (built by ``decode_to_batch``) is False there.
"""
from __future__ import annotations

import torch

from kdflow.cache.formats import FORMATS, Stored, check_finite, encode, topk_logprobs

_SIGNED = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def mask_from_lengths(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[B, L]`` bool, True at the first ``lengths[b]`` positions of each row."""
    return torch.arange(seq_len) < lengths.long().reshape(-1, 1)


def check_lengths(lengths: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """``lengths`` ``[B]`` as int64, checked to lie in ``[0, seq_len]``."""
    lengths = torch.as_tensor(lengths).reshape(-1)
    if lengths.shape[0] != batch or lengths.is_floating_point():
        raise ValueError(f"lengths must be [{batch}] integers, got {tuple(lengths.shape)} "
                         f"{lengths.dtype}")
    lengths = lengths.long()
    if batch and (lengths.min() < 0 or lengths.max() > seq_len):
        raise ValueError(f"lengths must lie in [0, {seq_len}], got "
                         f"{int(lengths.min())}..{int(lengths.max())}")
    return lengths


def _scatter(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows ``[T, ...]`` placed at the True positions of ``mask`` ``[B, L]``; zeros elsewhere."""
    out = torch.zeros((*mask.shape, *rows.shape[1:]), dtype=rows.dtype)
    signed = _SIGNED.get(rows.dtype)  # index_put has no kernels for uint16/32/64
    if signed is None:
        out[mask] = rows
    else:
        out.view(signed)[mask] = rows.view(signed)
    return out


def encode_sequences(
    logits: torch.Tensor, lengths: torch.Tensor, *, format: str, k: int | None, dtype: str,
    capture_temperature: float,
) -> Stored:
    """Encode per-token logits ``[B, L, V]`` whose rows hold ``lengths`` ``[B]`` real tokens.

    Only real tokens are encoded (padding may hold anything, NaN included).

    Returns:
        The format's keys per token ``[B, L, ...]`` and ``lengths`` ``[B]`` int32.
    """
    if logits.ndim != 3:
        raise ValueError(f"sequence logits must be [B, L, V], got shape {tuple(logits.shape)}")
    lengths = check_lengths(lengths, logits.shape[0], logits.shape[1])
    mask = mask_from_lengths(lengths, logits.shape[1])  # [B, L]
    full = bool(mask.all())  # packed sequences: no padding to drop, no copy
    rows = logits.detach().flatten(0, 1) if full else logits.detach()[mask]  # [T, V]
    fmt = FORMATS.get(format)
    if fmt.per_row:  # the whole row at once: top-k per real token, zeros at the padding
        rows = rows.float()
        check_finite(rows)
        width = fmt.candidates(k, logits.shape[-1]) if fmt.candidates and k else k
        values, indices, tail = topk_logprobs(rows, width, capture_temperature)
        per_token = [values, indices.long(), tail]
        if full:
            per_token = [v.unflatten(0, mask.shape) for v in per_token]
        else:
            per_token = [_scatter(v, mask) for v in per_token]
        out = fmt.encode_rows(*per_token, num_classes=logits.shape[-1], k=k)
        out["lengths"] = lengths.to(torch.int32)
        return out
    flat = encode(rows, format=format, k=k, dtype=dtype, capture_temperature=capture_temperature)
    out = {key: (value.unflatten(0, mask.shape) if full else _scatter(value, mask))
           for key, value in flat.items()}
    out["lengths"] = lengths.to(torch.int32)
    return out


def flatten_tokens(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The real tokens of a sequence batch as rows ``[T, ...]`` (drops ``teacher_mask``).

    Keys shaped ``[B, L, ...]`` like ``teacher_mask`` are masked; others pass through. The
    result feeds row-wise losses (``kd``, ``topk_kd``) unchanged.
    """
    mask = batch["teacher_mask"]  # [B, L]
    return {key: (value[mask] if value.shape[:2] == mask.shape else value)
            for key, value in batch.items() if key != "teacher_mask"}
