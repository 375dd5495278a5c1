"""The ``topk_packed`` cache format: top-k per token, sorted ids delta-coded, 5-bit values, deflate.

Per stored row (a sample, or a sequence of L tokens) the k cached entries of every token are
re-ordered by id. One raw byte string holds, in this order::

    header     int32 [3]       L, k, index bytes b (1-4: the narrowest that holds C - 1)
    gaps       b byte planes   of the ascending ids' gaps [L * k] (the first gap is the id itself)
    codes      uint8 [L * k]   value codes q in [0, 31] on the token's grid
    base       float32 [L]     decoded log-prob = base + q * scale
    scale      float16 [L]
    tail       float32 [L]     the mass outside the k

and is compressed with raw deflate (zlib, level ``LEVEL``): the byte planes of small gaps and
the skewed codes are what the entropy coder shrinks. Stored keys: ``values`` uint8 ``[n, W]``
(each row's compressed bytes, zero-padded to the widest row of its shard) and ``nbytes``
int32 ``[n]``. Decoding inflates each row (C code) and parses all rows at once (vectorised):
it is exact, the decoded ids are the teacher's top-k ids (sorted ascending, not by value).

Values use ``topk_q8``'s per-token grid with ``VALUE_LEVELS`` = 31 steps over at most
``Q8_MAX_RANGE`` nats below the top-1 log-prob, ``scale`` rounded to float16 first, and
``base`` chosen so the decoded top-k mass equals the true one (decoded log-probs + tail sum to
1): every decoded log-prob is within one grid step (``scale``) of the float32 value (values
more than ``Q8_MAX_RANGE`` below the top-1 are clamped up to the grid).
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

from kdflow.cache.formats import Q8_MAX_RANGE, Stored  # noqa: I001  (formats imports this module last)

VALUE_LEVELS = 31  # 5-bit codes
LEVEL = 6  # deflate level: 9 saves < 1% here and writes several times slower
HEADER = 12


def index_bytes(num_classes: int) -> int:
    """Bytes per id: the fewest (1-4) that hold ``num_classes - 1``."""
    return max(1, (max(num_classes - 1, 1).bit_length() + 7) // 8)


def quantize(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes ``[..., k]`` uint8, ``base`` ``[...]`` float32 and ``scale`` ``[...]`` float16 of
    log-probs ``values`` ``[..., k]`` (descending along the last dim)."""
    hi = values[..., 0]
    lo = torch.maximum(values[..., -1], hi - Q8_MAX_RANGE)
    scale = ((hi - lo) / VALUE_LEVELS).clamp_min(1e-6).half()  # [...] float16 (>= its normal range)
    step = scale.float()[..., None]
    q = ((values - lo[..., None]) / step).round().clamp(0, VALUE_LEVELS)  # [..., k]
    # shift the grid so that the decoded top-k mass equals the true one
    base = lo + values.logsumexp(-1) - (lo[..., None] + q * step).logsumexp(-1)
    return q.to(torch.uint8), base.float(), scale


def pack(values: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor, num_classes: int,
         k: int | None = None) -> Stored:
    """``values``/``indices`` ``[n, L, k]`` (top-k, descending values) and ``tail`` ``[n, L]``
    as packed rows: ``values`` uint8 ``[n, W]`` and ``nbytes`` int32 ``[n]``."""
    n, length, k = values.shape
    codes, base, scale = quantize(values.float())
    ids, order = indices.long().sort(-1)  # [n, L, k] ascending
    codes = codes.gather(-1, order)
    gaps = torch.cat([ids[..., :1], ids.diff(dim=-1)], dim=-1).numpy().astype(np.uint32)
    b = index_bytes(num_classes)
    header = np.array([length, k, b], dtype=np.int32).tobytes()
    blobs = []
    for r in range(n):
        planes = [((gaps[r] >> (8 * i)) & 255).astype(np.uint8).tobytes() for i in range(b)]
        raw = b"".join([header, *planes, codes[r].numpy().tobytes(), base[r].numpy().tobytes(),
                        scale[r].numpy().tobytes(), tail[r].float().numpy().tobytes()])
        c = zlib.compressobj(LEVEL, zlib.DEFLATED, -15)
        blobs.append(c.compress(raw) + c.flush())
    width = max((len(x) for x in blobs), default=0)
    out = np.zeros((n, width), dtype=np.uint8)
    for r, blob in enumerate(blobs):
        out[r, : len(blob)] = np.frombuffer(blob, dtype=np.uint8)
    return {"values": torch.from_numpy(out),
            "nbytes": torch.tensor([len(x) for x in blobs], dtype=torch.int32)}


def unpack(stored: Stored) -> dict[str, torch.Tensor]:
    """Packed rows -> ``teacher_logprobs``/``teacher_indices`` ``[n, L, k]`` (float32, int64,
    ids ascending) and ``teacher_tail`` ``[n, L]``; rows of one token (L = 1) drop the L axis."""
    data, sizes = stored["values"].numpy(), stored["nbytes"].tolist()
    raws = [zlib.decompress(data[r, : sizes[r]].tobytes(), -15) for r in range(len(sizes))]
    if not raws:
        raise ValueError("no packed rows to decode")
    length, k, b = np.frombuffer(raws[0][:HEADER], dtype=np.int32).tolist()
    flat = np.frombuffer(b"".join(raws), dtype=np.uint8).reshape(len(raws), -1)  # [n, raw bytes]
    n, m = len(raws), length * k
    pos = HEADER
    gaps = np.zeros((n, m), dtype=np.int64)
    for i in range(b):
        gaps |= flat[:, pos : pos + m].astype(np.int64) << (8 * i)
        pos += m
    codes = flat[:, pos : pos + m].astype(np.float32)
    pos += m
    base = flat[:, pos : pos + 4 * length].copy().view(np.float32)  # [n, L]
    pos += 4 * length
    scale = flat[:, pos : pos + 2 * length].copy().view(np.float16).astype(np.float32)
    pos += 2 * length
    tail = flat[:, pos : pos + 4 * length].copy().view(np.float32)
    ids = torch.from_numpy(gaps).view(n, length, k).cumsum(-1)
    logprobs = torch.from_numpy(base)[..., None] + torch.from_numpy(codes).view(n, length, k) * \
        torch.from_numpy(scale)[..., None]
    out = {"teacher_logprobs": logprobs, "teacher_indices": ids, "teacher_tail": torch.from_numpy(tail)}
    if "lengths" not in stored:  # one sample per row
        out = {key: value.squeeze(1) for key, value in out.items()}
    return out


def pad_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` along rows of 2-D byte rows of different widths (zero-padded to the widest)."""
    width = max(p.shape[1] for p in parts)
    return torch.cat([p if p.shape[1] == width else torch.nn.functional.pad(p, (0, width - p.shape[1]))
                      for p in parts])
