"""``topk_packed``: exact decoding against a plain per-token reference, its error bound, and the
cache machinery (shards of different widths, reads across shards, streaming, resume)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdflow.cache import CacheReader, build_cache, decode_to_batch, encode, encode_sequences
from kdflow.cache.formats import Q8_MAX_RANGE, topk_logprobs
from kdflow.cache.packed import VALUE_LEVELS, index_bytes

N, L, V = 5, 6, 32_000
LENGTHS = torch.tensor([6, 2, 0, 4, 5])


def reference_token(logits: torch.Tensor, k: int, capture_t: float) -> tuple[list, list, float]:
    """One token, plainly: the top-k ids ascending and their decoded log-probs (the documented
    grid: float16 step, mass-preserving base), and the tail."""
    logp = torch.log_softmax(logits.double() / capture_t, -1)
    top = sorted(((float(logp[i]), i) for i in range(len(logp))), reverse=True)[:k]
    hi, lo = top[0][0], max(top[-1][0], top[0][0] - Q8_MAX_RANGE)
    step = float(torch.tensor(max((hi - lo) / VALUE_LEVELS, 1e-6)).half())
    codes = [min(max(round((v - lo) / step), 0), VALUE_LEVELS) for v, _ in top]
    grid = torch.tensor([lo + q * step for q in codes], dtype=torch.float64)
    base = lo + float(torch.tensor([v for v, _ in top]).logsumexp(0) - grid.logsumexp(0))
    pairs = sorted((i, base + q * step) for (_, i), q in zip(top, codes))
    tail = max(0.0, 1.0 - sum(torch.tensor([v for v, _ in top]).exp().tolist()))
    return [i for i, _ in pairs], [v for _, v in pairs], tail


@pytest.mark.parametrize(("num_classes", "k", "capture_t"), [(300, 16, 1.0), (70_000, 40, 2.0), (50, 50, 1.0)])
def test_decodes_exactly_like_the_reference(num_classes: int, k: int, capture_t: float) -> None:
    logits = 4.0 * torch.randn(4, num_classes, generator=torch.Generator().manual_seed(num_classes))
    logits[0, :10] += 30.0  # a sharp token: lower values clamped at Q8_MAX_RANGE
    batch = decode_to_batch(encode(logits, format="topk_packed", k=k, dtype="float16",
                                   capture_temperature=capture_t))
    assert batch["teacher_indices"].shape == (4, k) and batch["teacher_logprobs"].dtype == torch.float32
    for row in range(4):
        ids, values, tail = reference_token(logits[row], k, capture_t)
        assert batch["teacher_indices"][row].tolist() == ids
        assert batch["teacher_logprobs"][row].double().tolist() == pytest.approx(values, abs=2e-5)
        assert float(batch["teacher_tail"][row]) == pytest.approx(tail, abs=5e-6)  # float32 1 - sum


def test_error_bound_and_mass() -> None:
    """Within one grid step of the float32 log-probs (above the clamp range); the decoded top-k
    mass plus the tail is 1."""
    logits = 3.0 * torch.randn(64, 2_000, generator=torch.Generator().manual_seed(1))
    stored = encode(logits, format="topk_packed", k=64, dtype="float16", capture_temperature=1.0)
    got = decode_to_batch(stored)
    values, indices, tail = topk_logprobs(logits, 64, 1.0)
    order = indices.long().argsort(-1)
    want = values.gather(-1, order)  # by ascending id, like the decoded rows
    assert torch.equal(got["teacher_indices"], indices.long().gather(-1, order))
    step = (values[:, 0] - values[:, -1]).clamp_max(Q8_MAX_RANGE) / VALUE_LEVELS  # [n]
    err = (got["teacher_logprobs"] - want).abs().max(-1).values
    assert (err <= step * 1.001 + 1e-6).all() and (err > 0).any()
    mass = got["teacher_logprobs"].exp().sum(-1) + got["teacher_tail"]
    assert torch.allclose(mass, torch.ones(64), atol=1e-5)
    assert index_bytes(256) == 1 and index_bytes(257) == 2 and index_bytes(49_152) == 2
    assert index_bytes(70_000) == 3
    # fewer bytes than topk_q8 at the same k for this wide, random distribution
    q8 = encode(logits, format="topk_q8", k=64, dtype="float16", capture_temperature=1.0)
    assert stored["nbytes"].sum() < sum(v.numel() * v.element_size() for v in q8.values())


def test_sharded_cache_reads_and_resumes(tmp_path: Path) -> None:
    """Shards of different widths: reads across them, streaming, and a corrupted shard rebuilt
    alone with the same bytes."""
    logits = 4.0 * torch.randn(N, L, V, generator=torch.Generator().manual_seed(0))
    mask = torch.arange(L) < LENGTHS[:, None]
    args = {"num_rows": N, "num_classes": V, "format": "topk_packed", "k": 16, "dtype": "float16",
            "capture_temperature": 1.0, "shard_rows": 2, "batch_size": 1, "seq_len": L, "key": "k1"}

    def compute(start: int, stop: int) -> tuple:
        return logits[start:stop], LENGTHS[start:stop]

    info, _ = build_cache(tmp_path, compute, **args)
    widths = {CacheReader(tmp_path)._shard(i)["values"].shape[1] for i in range(3)}
    assert len(info["shards"]) == 3 and len(widths) > 1
    reader = CacheReader(tmp_path)
    reader.verify()
    everything = reader.load_all()
    direct = decode_to_batch(encode_sequences(logits, LENGTHS, format="topk_packed", k=16,
                                              dtype="float16", capture_temperature=1.0))
    for key, value in direct.items():
        assert torch.equal(everything[key], value), key
    got = reader.get(torch.tensor([4, 0, 3, 1]))  # three shards in one batch
    for key, value in everything.items():
        assert torch.equal(got[key], value[[4, 0, 3, 1]]), key
    streamed = list(reader.iter_batches(3))
    assert torch.equal(torch.cat([b["teacher_logprobs"] for b in streamed]), everything["teacher_logprobs"])
    assert torch.equal(everything["teacher_mask"], mask)
    shard = tmp_path / info["shards"][1]["file"]
    before = shard.read_bytes()
    shard.write_bytes(before[:-7])
    calls = []
    build_cache(tmp_path, lambda a, b: calls.append((a, b)) or compute(a, b), **args)
    assert calls == [(2, 3), (3, 4)] and shard.read_bytes() == before
