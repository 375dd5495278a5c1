"""Resumable builds, shard repair, the cache key, and streamed reads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdflow.cache import CacheReader, build_cache, cache_key, link_cache, write_cache
from kdflow.errors import CacheCorruptError

N, C = 103, 300
SPEC = {"num_rows": N, "num_classes": C, "format": "topk_q8", "k": 8, "dtype": "float16",
        "capture_temperature": 2.0, "shard_rows": 25}
LOGITS = 3.0 * torch.randn(N, C, generator=torch.Generator().manual_seed(0))


class Teacher:
    """``compute`` for ``build_cache`` that counts its rows and can die after some calls."""

    def __init__(self, die_after: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.die_after = die_after

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        if self.die_after is not None and len(self.calls) == self.die_after:
            raise KeyboardInterrupt("killed")
        self.calls.append((start, stop))
        return LOGITS[start:stop]


def _build(directory: Path, teacher: Teacher, key: str = "k1") -> tuple[dict, list[str]]:
    return build_cache(directory, teacher, batch_size=10, key=key, **SPEC)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_build_equals_streamed_write(tmp_path: Path) -> None:
    info, computed = _build(tmp_path / "built", Teacher())
    assert computed == [f"shard-0000{i}.safetensors" for i in range(5)]
    streamed = write_cache(tmp_path / "streamed", LOGITS.split(7), key="k1", **SPEC)
    assert info == streamed
    assert _files(tmp_path / "built") == _files(tmp_path / "streamed")


def test_killed_build_resumes_with_the_verified_shards(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path, Teacher(die_after=7))  # 3 calls per shard: dies inside shard 2
    with pytest.raises(CacheCorruptError, match="did not finish"):
        CacheReader(tmp_path)
    teacher = Teacher()
    info, computed = _build(tmp_path, teacher)
    assert computed == ["shard-00002.safetensors", "shard-00003.safetensors",
                        "shard-00004.safetensors"]
    assert teacher.calls[0] == (50, 60)
    _build(tmp_path / "fresh", Teacher())
    assert _files(tmp_path) == _files(tmp_path / "fresh")  # byte-identical to a clean build


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_shard_is_rebuilt_alone(tmp_path: Path, damage: str) -> None:
    _build(tmp_path, Teacher())
    before = _files(tmp_path)
    shard = tmp_path / "shard-00003.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[:-5]))
    else:
        shard.unlink()
    with pytest.raises(CacheCorruptError, match="shard-00003.safetensors"):
        CacheReader(tmp_path).verify()
    teacher = Teacher()
    _, computed = _build(tmp_path, teacher)
    assert computed == ["shard-00003.safetensors"]
    assert teacher.calls == [(75, 85), (85, 95), (95, 100)]
    assert _files(tmp_path) == before


def test_another_key_or_layout_rebuilds_everything(tmp_path: Path) -> None:
    _build(tmp_path, Teacher())
    assert len(_build(tmp_path, Teacher(), key="k2")[1]) == 5
    info, computed = build_cache(tmp_path, Teacher(), batch_size=10, key="k2",
                                 **{**SPEC, "shard_rows": 50})
    assert len(computed) == 3 and sorted(p.name for p in tmp_path.glob("shard-*")) == [
        s["file"] for s in info["shards"]]
    a = cache_key("t", "d", {}, {"format": "topk", "k": 5})
    assert a == cache_key("t", "d", {}, {"k": 5, "format": "topk"})
    assert len({a, cache_key("t2", "d", {}, {"format": "topk", "k": 5}),
                cache_key("t", "d2", {}, {"format": "topk", "k": 5}),
                cache_key("t", "d", {"crop": 1}, {"format": "topk", "k": 5}),
                cache_key("t", "d", {}, {"format": "topk", "k": 6})}) == 5


def test_link_cache(tmp_path: Path) -> None:
    info, _ = _build(tmp_path / "work", Teacher())
    link_cache(tmp_path / "work", tmp_path / "out", info)
    CacheReader(tmp_path / "out").verify()
    assert _files(tmp_path / "out") == _files(tmp_path / "work")


@pytest.mark.parametrize("batch_size", [1, 10, 25, 40, 200])
def test_iter_batches_streams_every_row_in_order(tmp_path: Path, batch_size: int) -> None:
    _build(tmp_path, Teacher())
    reader = CacheReader(tmp_path)
    batches = list(reader.iter_batches(batch_size))
    assert [len(b["teacher_tail"]) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    everything = reader.load_all()
    for key, value in everything.items():
        assert torch.equal(torch.cat([b[key] for b in batches]), value), key


def test_iter_batches_stops_at_a_corrupt_shard(tmp_path: Path) -> None:
    _build(tmp_path, Teacher())
    shard = tmp_path / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-2] ^= 0x01
    shard.write_bytes(bytes(data))
    seen = []
    with pytest.raises(CacheCorruptError, match="shard-00002.safetensors.*sha256"):
        for batch in CacheReader(tmp_path).iter_batches(25):
            seen.append(batch)
    assert len(seen) == 2  # the intact shards before it
