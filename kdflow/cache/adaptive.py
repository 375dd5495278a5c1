"""The ``topk_adaptive`` cache format: k entries per token on average, ids as frequency ranks, LZMA.

Three ideas, each measured on SmolLM2's per-token outputs (``benchmarks/lm_distill.py``):

- **Entries where they matter.** A shard keeps ``k`` entries per real token *on average*: the
  ``k * tokens`` largest log-probabilities of the whole shard (at least one and at most
  ``cap(k, V) = min(2k, V)`` per token; ties at the threshold are all kept). A peaked token
  keeps few, a flat one many: at equal bytes this is much closer to the teacher than the same
  ``k`` for every token (the KL of a uniform tail falls most where the tail is heavy).
- **Ids as ranks.** Each shard stores a table: for every vocabulary id, the class
  ``floor(log2(count)) + 1`` of how often it is kept in the shard (0: never). Ids are ranked by
  class (descending), then id; a token's ids are stored as their ranks, ascending, as gaps
  (the first gap is the rank itself). Frequent ids get small ranks, so the gaps are small.
- **Entropy coding.** Per stored row (a sample, or a sequence of L tokens) one raw LZMA2 stream
  (stdlib ``lzma``) of the byte planes, stream by stream::

      L          int32          tokens in the row
      counts     2 planes [L]   entries per token (0 at padding)
      gaps       b planes [E]   rank gaps, b = the bytes that hold V - 1 (E = sum of counts)
      codes      2 planes [E]   value codes
      tail       4 planes [L]   float32 mass outside the entries

Values: ``code = round((top1 - logprob) / STEP)`` on a fixed grid of ``STEP`` nats below the
token's top-1 log-prob; every entry but the top-1 gets at least code 1, so the decoded top-1 is
the teacher's (no ties). The decoder renormalises so the entries plus the tail sum to 1
(``logprob = -code * STEP + shift`` with ``shift`` from the tail), so every decoded log-prob is
within ``1.5 * STEP`` of the float32 value (codes saturate at 65,535, ~16k nats below the top-1).

Decoded rows have a fixed width ``cap(k, V)``: a token's entries (ascending rank), then
*padding entries*: ids no token of the shard keeps (the ranks after the shard's present ids)
when there are enough of them, else the lowest-ranked ids not among the token's entries; each
is given the uniform tail share ``tail / (V - count)``, and ``teacher_tail`` reduced by what they took. That is exactly
the distribution the uniform tail reconstruction of the other top-k formats assumes, so losses
and ``fidelity`` need no change. Padding positions of a sequence (past its length) decode to
zeros, like the other formats.

Stored keys: per row ``offset`` int64, ``nbytes`` and ``budget`` (k) int32 ``[n]``; per shard
(``SHARD_KEYS``, not one entry per row) ``blob``, the rows' LZMA streams back to back (uint8), and
``table``, the LZMA-compressed uint8 classes ``[V]``. ``encode`` returns *open* rows
(``values`` float32 ``[n, (L,) cap]`` candidate log-probs, ``indices``, ``budget`` = k and
``vocab`` = V, int32 ``[n]``): the selection and the table need the whole shard, so ``finish`` runs when a shard is
written (``kdflow.cache.writer``); ``unpack`` accepts both.
"""
from __future__ import annotations

import functools
import lzma

import numpy as np
import torch

from kdflow.cache.formats import Stored

STEP = 0.25  # nats per value code
MAX_CODE = 65_535
SHARD_KEYS = ("blob", "table")
PAD_FLOOR = -1000.0  # log-prob of a padding entry when the tail is 0 (exp gives exactly 0)
FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 1 << 20, "lc": 1, "lp": 0, "pb": 0}]


def cap(k: int, num_classes: int) -> int:
    """Most entries one token may keep, and the decoded width: ``min(2k, V)``."""
    return min(2 * k, num_classes)


def index_bytes(num_classes: int) -> int:
    """Bytes per rank gap: the fewest (1-4) that hold ``num_classes - 1``."""
    return max(1, (max(num_classes - 1, 1).bit_length() + 7) // 8)


def _compress(raw: bytes) -> bytes:
    return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=FILTERS)


def _decompress(blob: bytes) -> bytes:
    return lzma.decompress(blob, format=lzma.FORMAT_RAW, filters=FILTERS)


def _planes(a: np.ndarray, nb: int) -> list[bytes]:
    a = a.astype(np.uint32)
    return [((a >> (8 * i)) & 255).astype(np.uint8).tobytes() for i in range(nb)]


def open_rows(values: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor | None = None, *,
              num_classes: int, k: int) -> Stored:
    """Open rows: the top-``cap`` log-probs ``[n, (L,) cap]`` (descending) and their ids, plus
    ``budget`` (k) and ``vocab`` (V) per row (``tail`` is recomputed for the kept entries)."""
    n = values.shape[0]
    return {"values": values.float().contiguous(), "indices": indices.to(torch.int32).contiguous(),
            "budget": torch.full((n,), k, dtype=torch.int32),
            "vocab": torch.full((n,), num_classes, dtype=torch.int32)}


def classes(kept_ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The rank table: ``floor(log2(count)) + 1`` of each id among ``kept_ids`` (0: absent), uint8."""
    count = torch.bincount(kept_ids.long().reshape(-1), minlength=num_classes).double()
    return torch.where(count > 0, count.clamp_min(1).log2().floor() + 1, 0).to(torch.uint8)


def rank_order(table: torch.Tensor) -> torch.Tensor:
    """``order[rank] = id``: ids by class (descending), ties by ascending id."""
    return torch.sort(-table.long(), stable=True).indices


def select(values: torch.Tensor, real: torch.Tensor, k: int) -> torch.Tensor:
    """Entries kept per token ``[T]`` of descending log-probs ``values`` ``[T, cap]``: the
    ``k * real tokens`` largest of the shard (ties kept), at least 1 per real token, 0 else."""
    n_real = int(real.sum())
    rest = values[real][:, 1:].reshape(-1)  # the top-1 of a real token is always kept
    extra = k * n_real - n_real
    if extra >= rest.numel():
        kept = torch.full(real.shape, values.shape[-1], dtype=torch.long)
    elif extra <= 0:
        kept = torch.ones(real.shape, dtype=torch.long)
    else:
        threshold = rest.topk(extra).values[-1]
        kept = 1 + (values[:, 1:] >= threshold).sum(-1)
    return torch.where(real, kept, 0)


def finish(stored: Stored) -> Stored:
    """Open rows -> the stored shard (``values``/``nbytes``/``budget`` per row, ``table`` for
    the shard; ``lengths`` kept)."""
    if "indices" not in stored:
        return stored  # already finished
    vals, ids = stored["values"].float(), stored["indices"].long()
    sequences = "lengths" in stored
    if not sequences:
        vals, ids = vals[:, None], ids[:, None]
    n, length, width = vals.shape
    k = int(stored["budget"][0]) if n else 1
    num_classes = int(stored["vocab"][0]) if n else 1
    real = (torch.arange(length) < stored["lengths"].long()[:, None]) if sequences \
        else torch.ones(n, 1, dtype=torch.bool)
    counts = select(vals.reshape(-1, width), real.reshape(-1), k).view(n, length)  # [n, L]
    keep = torch.arange(width) < counts[..., None]  # [n, L, cap]
    table = classes(ids[keep], num_classes)
    rank = torch.empty(num_classes, dtype=torch.long)
    rank[rank_order(table)] = torch.arange(num_classes)
    tail = (1.0 - (vals.double().exp() * keep).sum(-1)).clamp_min(0.0)  # [n, L], float64 sum
    tail = torch.where(counts == num_classes, 0.0, tail).float()  # stored as float32
    codes = ((vals[..., :1] - vals) / STEP).round().clamp(0, MAX_CODE)
    codes[..., 1:] = codes[..., 1:].clamp_min(1)  # the top-1 stays unique
    big = torch.iinfo(torch.long).max
    ranks, order = torch.where(keep, rank[ids], big).sort(-1)  # kept first, ascending rank
    codes = codes.gather(-1, order).to(torch.int64)
    gaps = torch.cat([ranks[..., :1], ranks.diff(dim=-1)], dim=-1)
    b = index_bytes(num_classes)
    blobs = []
    for r in range(n):
        m = keep[r]
        raw = b"".join([np.array([length], dtype=np.int32).tobytes(),
                        *_planes(counts[r].numpy(), 2), *_planes(gaps[r][m].numpy(), b),
                        *_planes(codes[r][m].numpy(), 2), tail[r].float().numpy().tobytes()])
        blobs.append(_compress(raw))
    sizes = torch.tensor([len(x) for x in blobs], dtype=torch.int64)
    result = {"nbytes": sizes.to(torch.int32), "offset": sizes.cumsum(0) - sizes,
              "blob": torch.frombuffer(bytearray(b"".join(blobs) or b"\0"), dtype=torch.uint8),
              "table": torch.frombuffer(bytearray(_compress(table.numpy().tobytes())), dtype=torch.uint8),
              "budget": torch.full((n,), k, dtype=torch.int32)}
    if sequences:
        result["lengths"] = stored["lengths"]
    return result


@functools.lru_cache(maxsize=8)
def _table(blob: bytes) -> tuple[int, int, torch.Tensor]:
    """Vocabulary size, ids present in the shard, ``order[rank] = id``."""
    table = torch.frombuffer(bytearray(_decompress(blob)), dtype=torch.uint8)
    return len(table), int((table > 0).sum()), rank_order(table)


def _complement(ranks: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The ``W`` smallest ranks not among each token's first ``counts`` ``ranks`` ``[T, W]``
    (ascending there): ``c_j = j + #{i < count : ranks_i - i <= j}``."""
    t, w = ranks.shape
    slot = torch.arange(w)
    shifted = torch.where(slot < counts[:, None], ranks - slot, torch.iinfo(torch.long).max)
    j = slot.expand(t, w).contiguous()
    return j + torch.searchsorted(shifted, j, right=True)


def unpack(stored: Stored) -> dict[str, torch.Tensor]:
    """Stored (or open) rows -> ``teacher_logprobs``/``teacher_indices`` ``[n, (L,) cap]``
    (float32, int64) and ``teacher_tail`` ``[n, (L)]`` (see the module docstring)."""
    stored = finish(stored)  # open rows (``encode``) are finished as one shard
    sizes = stored["nbytes"].tolist()
    if not sizes:
        raise ValueError("no topk_adaptive rows to decode")
    num_classes, present, order = _table(stored["table"].numpy().tobytes())
    k = int(stored["budget"][0])
    width, b = cap(k, num_classes), index_bytes(num_classes)
    data, offsets = stored["blob"].numpy(), stored["offset"].tolist()
    raws = [_decompress(data[o : o + size].tobytes()) for o, size in zip(offsets, sizes)]
    n, length = len(raws), int(np.frombuffer(raws[0][:4], dtype=np.int32)[0])
    buf = np.frombuffer(b"".join(raws), dtype=np.uint8)
    starts = np.cumsum([0] + [len(x) for x in raws[:-1]])  # [n] where each row's bytes begin
    if (buf[starts[:, None] + np.arange(4)].copy().view(np.int32)[:, 0] != length).any():
        raise ValueError("topk_adaptive rows of different lengths cannot be decoded together")
    # every row at once: [L int32][counts 2 x L][gaps b x E][codes 2 x E][tail 4 x L], E per row
    at = starts[:, None] + 4 + np.arange(length)  # [n, L]
    counts_rl = buf[at].astype(np.int64) | (buf[at + length].astype(np.int64) << 8)  # [n, L]
    per_row = counts_rl.sum(1)  # [n] entries of each row
    row = np.repeat(np.arange(n), per_row)  # [E] the row of every entry
    first = np.cumsum(per_row) - per_row  # [n]
    pos = (starts + 4 + 2 * length)[row] + np.arange(len(row)) - first[row]  # [E] first plane
    step = per_row[row]  # [E] plane stride
    gaps_np = np.zeros(len(row), dtype=np.int64)
    for i in range(b):
        gaps_np |= buf[pos + i * step].astype(np.int64) << (8 * i)
    pos = pos + b * step
    codes_np = buf[pos].astype(np.int64) | (buf[pos + step].astype(np.int64) << 8)
    at = (starts + 4 + 2 * length + (b + 2) * per_row)[:, None] + np.arange(4 * length)  # [n, 4L]
    counts = torch.from_numpy(counts_rl.reshape(-1))  # [T]
    gaps = torch.from_numpy(gaps_np)  # [E]
    codes = torch.from_numpy(codes_np).float()
    tail = torch.from_numpy(buf[at].copy().view(np.float32).reshape(-1))  # [T] float32
    t = len(counts)
    kept = torch.arange(width) < counts[:, None]  # [T, W]; entries fill it in row-major order
    csum = gaps.cumsum(0)
    before = torch.cat([torch.zeros(1, dtype=torch.long), csum])[counts.cumsum(0) - counts]  # [T]
    ranks = torch.zeros(t, width, dtype=torch.long).masked_scatter_(kept, csum)
    ranks -= before[:, None]  # each token's gaps summed from its own start
    value = torch.full((t, width), -torch.inf).masked_scatter_(kept, codes * -STEP)
    shift = torch.log1p(-tail.double()).float() - value.logsumexp(-1)  # [T]
    spare = (num_classes - counts).clamp_min(1).float()
    pad_value = torch.where(tail > 0, (tail / spare).log(), PAD_FLOOR).clamp_min(PAD_FLOOR)
    logprobs = torch.where(kept, value + shift[:, None], pad_value[:, None])
    extra = (torch.arange(width) - counts[:, None]).clamp_min(0)  # [T, W] index among the pads
    if num_classes - present >= width:  # ids absent from the whole shard: never a token's entry
        pad_rank = present + extra
    else:
        pad_rank = _complement(ranks, counts).gather(1, extra)
    ids = order[torch.where(kept, ranks, pad_rank).clamp_max(num_classes - 1)]
    out_tail = torch.where(counts > 0, tail * ((num_classes - width) / spare), 0.0)
    real = (counts > 0)[:, None]
    out = {"teacher_logprobs": torch.where(real, logprobs, 0.0).view(n, length, width),
           "teacher_indices": torch.where(real, ids, 0).view(n, length, width),
           "teacher_tail": out_tail.view(n, length)}
    if "lengths" not in stored:  # one sample per row
        out = {key: value.squeeze(1) for key, value in out.items()}
    return out
