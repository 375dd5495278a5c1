"""The teacher-logit cache: formats, sharded writes, memory-mapped reads, corruption, fidelity."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdflow.cache import (
    CacheReader,
    decode_to_batch,
    encode,
    fidelity,
    narrowest_uint,
    write_cache,
)
from kdflow.errors import CacheCorruptError, DataError, UnknownNameError


def _logits(n: int = 103, c: int = 10, seed: int = 0) -> torch.Tensor:
    return 3.0 * torch.randn(n, c, generator=torch.Generator().manual_seed(seed))


def _topk(logits: torch.Tensor, k: int, temperature: float = 2.0) -> dict[str, torch.Tensor]:
    return encode(logits, format="topk", k=k, dtype="float16", capture_temperature=temperature)


def _write(directory: Path, logits: torch.Tensor, **kwargs) -> dict:
    args = {"format": "dense", "k": None, "dtype": "float16", "capture_temperature": 1.0,
            "shard_rows": 1000, **kwargs}
    return write_cache(directory, logits.split(16), num_rows=logits.shape[0],
                       num_classes=logits.shape[1], **args)


def test_narrowest_uint() -> None:
    assert narrowest_uint(10) == torch.uint8 and narrowest_uint(256) == torch.uint8
    assert narrowest_uint(257) == torch.uint16 and narrowest_uint(1000) == torch.uint16
    assert narrowest_uint(100_000) == torch.uint32


@pytest.mark.parametrize(
    ("dtype", "tdtype"), [("float16", torch.float16), ("bfloat16", torch.bfloat16)]
)
def test_dense_round_trip(tmp_path: Path, dtype: str, tdtype: torch.dtype) -> None:
    logits = _logits()
    info = _write(tmp_path, logits, dtype=dtype)
    assert info["dtype"] == dtype and info["index_dtype"] is None
    assert json.loads((tmp_path / "cache.json").read_text()) == info
    reader = CacheReader(tmp_path)
    assert reader._shard(0)["values"].dtype == tdtype
    cached = reader.load_all()["teacher_logits"]
    tol = 1e-3 if tdtype == torch.float16 else 8e-3
    torch.testing.assert_close(cached, logits, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ("classes", "index_dtype"),
    [(10, torch.uint8), (1000, torch.uint16), (100_000, torch.uint32)],
)
def test_topk_encoding(classes: int, index_dtype: torch.dtype) -> None:
    logits = _logits(8, classes)
    enc = _topk(logits, 5)
    assert enc["indices"].dtype == index_dtype and enc["values"].dtype == torch.float16
    assert enc["tail"].dtype == torch.float32 and (enc["tail"] >= 0).all()
    total = enc["values"].float().exp().sum(-1) + enc["tail"]
    torch.testing.assert_close(total, torch.ones(8), atol=1e-3, rtol=0)
    ref = F.log_softmax(logits / 2.0, dim=-1).topk(5, dim=-1)
    assert torch.equal(enc["indices"].long(), ref.indices)
    torch.testing.assert_close(enc["values"].float(), ref.values, atol=2e-3, rtol=1e-3)
    batch = decode_to_batch(enc)
    assert set(batch) == {"teacher_logprobs", "teacher_indices", "teacher_tail"}
    assert batch["teacher_indices"].dtype == torch.int64


def test_shards_get_and_load_all(tmp_path: Path) -> None:
    logits = _logits(103, 1000)
    info = _write(tmp_path, logits, format="topk", k=4, shard_rows=25, capture_temperature=2.0)
    files = [s["file"] for s in info["shards"]]
    assert files[:2] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    rows = [s["rows"] for s in info["shards"]]
    assert rows == [[0, 25], [25, 50], [50, 75], [75, 100], [100, 103]]
    assert info["index_dtype"] == "uint16" and info["k"] == 4
    assert info["bytes_total"] == sum((tmp_path / f).stat().st_size for f in files)
    assert info["bytes_per_sample"] == pytest.approx(info["bytes_total"] / 103)
    reader = CacheReader(tmp_path)
    reader.verify()
    assert len(reader) == 103
    everything = reader.load_all()
    assert everything["teacher_logprobs"].shape == (103, 4)
    idx = torch.randint(0, 103, (64,), generator=torch.Generator().manual_seed(1))
    got = reader.get(idx)
    for key, value in everything.items():
        assert torch.equal(got[key], value[idx]), key
    direct = decode_to_batch(_topk(logits, 4))
    for key, value in direct.items():
        assert torch.equal(everything[key], value), key
    with pytest.raises(IndexError):
        reader.get(torch.tensor([103]))


def test_verify_detects_bit_flip_truncation_and_missing(tmp_path: Path) -> None:
    _write(tmp_path, _logits(), shard_rows=40)
    shard = tmp_path / "shard-00001.safetensors"
    original = shard.read_bytes()
    flipped = bytearray(original)
    flipped[-3] ^= 0x01
    shard.write_bytes(bytes(flipped))
    with pytest.raises(CacheCorruptError, match="shard-00001.safetensors.*sha256"):
        CacheReader(tmp_path).verify()
    shard.write_bytes(original[:-7])
    with pytest.raises(CacheCorruptError, match="shard-00001.safetensors.*truncated"):
        CacheReader(tmp_path).verify()
    with pytest.raises(CacheCorruptError, match="shard-00001.safetensors"):
        CacheReader(tmp_path).get(torch.tensor([45]))  # fails to parse
    shard.unlink()
    with pytest.raises(CacheCorruptError, match="shard-00001.safetensors.*missing"):
        CacheReader(tmp_path).verify()


def test_fidelity(tmp_path: Path) -> None:
    logits = _logits(200, 10)
    _write(tmp_path, logits)
    dense = fidelity(logits, CacheReader(tmp_path).load_all(), capture_temperature=1.0)
    assert dense["kl"] < 1e-5 and dense["top1_agreement"] == 1.0
    assert fidelity(logits, _topk(logits, 10), capture_temperature=2.0)["kl"] < 1e-4
    top3 = fidelity(logits, _topk(logits, 3), capture_temperature=2.0)
    top7 = fidelity(logits, _topk(logits, 7), capture_temperature=2.0)
    assert 0 < top7["kl"] < top3["kl"] and top3["top1_agreement"] == 1.0


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'topk'"):
        _write(tmp_path, _logits(), format="top-k")
    dense = {"format": "dense", "k": None, "dtype": "float16", "capture_temperature": 1.0}
    with pytest.raises(DataError, match="NaN/inf"):
        encode(torch.tensor([[0.0, float("nan")]]), **dense)
    with pytest.raises(DataError, match="bf16"):
        encode(torch.tensor([[0.0, 1e6]]), **dense)
    with pytest.raises(ValueError, match="num_rows"):
        write_cache(tmp_path, _logits().split(16), num_rows=50, num_classes=10, format="dense",
                    k=None, dtype="float16", capture_temperature=1.0, shard_rows=10)
    with pytest.raises(CacheCorruptError, match="cache.json"):
        CacheReader(tmp_path / "nothing")
