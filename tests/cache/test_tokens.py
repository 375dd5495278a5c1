"""Per-token sequence caches over a 32k vocabulary: masks, reads, bytes/token, losses."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdflow.cache import (
    CacheReader,
    decode_to_batch,
    encode,
    encode_sequences,
    fidelity,
    flatten_tokens,
    write_cache,
)
from kdflow.losses import create_loss

N, L, V = 5, 6, 32_000
LENGTHS = torch.tensor([6, 2, 0, 4, 5])


def _sequences(seed: int = 0) -> torch.Tensor:
    logits = 4.0 * torch.randn(N, L, V, generator=torch.Generator().manual_seed(seed))
    mask = torch.arange(L) < LENGTHS[:, None]
    logits[~mask] = float("nan")  # padding may hold anything
    return logits


@pytest.mark.parametrize("fmt", ["topk", "topk_q8", "topk_packed"])
def test_sequence_cache_round_trip(tmp_path: Path, fmt: str) -> None:
    logits = _sequences()
    batches = [(logits[:2], LENGTHS[:2]), (logits[2:], LENGTHS[2:])]
    info = write_cache(tmp_path, batches, num_rows=N, num_classes=V, format=fmt, k=16,
                       dtype="float16", capture_temperature=1.0, shard_rows=3, seq_len=L)
    assert info["seq_len"] == L and info["num_tokens"] == int(LENGTHS.sum())
    assert info["index_dtype"] == "uint16"
    assert info["bytes_per_token"] == pytest.approx(info["bytes_total"] / int(LENGTHS.sum()))
    reader = CacheReader(tmp_path)
    reader.verify()
    everything = reader.load_all()
    assert everything["teacher_logprobs"].shape == (N, L, 16)
    assert everything["teacher_tail"].shape == (N, L)
    assert torch.equal(everything["teacher_mask"], torch.arange(L) < LENGTHS[:, None])
    # every real token equals the row-wise encoding of that token; padding is zeros
    mask = everything["teacher_mask"]
    rows = decode_to_batch(encode(logits[mask], format=fmt, k=16, dtype="float16",
                                  capture_temperature=1.0))
    tokens = flatten_tokens(everything)
    for key, value in rows.items():
        assert torch.equal(tokens[key], value), key
        assert not everything[key][~mask].any(), key
    got = reader.get(torch.tensor([4, 0, 3]))
    for key, value in everything.items():
        assert torch.equal(got[key], value[[4, 0, 3]]), key
    fid = fidelity(logits[[4, 0, 3]], got, capture_temperature=1.0)
    assert fid["rows"] == 15 and fid["top1_agreement"] == 1.0


def test_flattened_tokens_feed_topk_kd(tmp_path: Path) -> None:
    logits = _sequences()
    stored = encode_sequences(logits, LENGTHS, format="topk_q8", k=32, dtype="float16",
                              capture_temperature=2.0)
    tokens = flatten_tokens(decode_to_batch(stored))  # [T, ...]
    student = torch.randn(int(LENGTHS.sum()), V, requires_grad=True)
    y = torch.zeros(int(LENGTHS.sum()), dtype=torch.long)
    loss = create_loss("topk_kd", temperature=2.0, capture_temperature=2.0)
    out = loss(student, {"y": y, **tokens})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and student.grad is not None


def test_sequence_shape_errors(tmp_path: Path) -> None:
    args = {"num_rows": 2, "num_classes": V, "format": "topk", "k": 4, "dtype": "float16",
            "capture_temperature": 1.0, "shard_rows": 8, "seq_len": L}
    logits = torch.randn(2, L, V)
    with pytest.raises(ValueError, match="lengths"):
        write_cache(tmp_path, [logits], **args)
    with pytest.raises(ValueError, match=r"\[0, 6\]"):
        write_cache(tmp_path, [(logits, torch.tensor([7, 1]))], **args)
    with pytest.raises(ValueError, match=r"\[B, 6, 32000\]"):
        write_cache(tmp_path, [(torch.randn(2, 5, V), torch.tensor([5, 1]))], **args)
