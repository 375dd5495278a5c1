"""topk_q8 round trips, and train-time re-tempering of what each format stores."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdflow.cache import CacheReader, decode_to_batch, encode, fidelity, write_cache
from kdflow.cache.formats import FORMATS, Q8_LEVELS, topk_logprobs
from kdflow.losses import create_loss
from kdflow.losses.topk_kd import teacher_bucket_logprobs


def _logits(n: int, c: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(n, c, generator=torch.Generator().manual_seed(seed))


def _enc(logits: torch.Tensor, fmt: str, k: int | None, temperature: float) -> dict:
    return encode(logits, format=fmt, k=k, dtype="float16", capture_temperature=temperature)


@pytest.mark.parametrize(("classes", "k"), [(10, 3), (10, 10), (1000, 64), (40_000, 128)])
def test_q8_round_trip_within_one_grid_step(classes: int, k: int) -> None:
    logits = _logits(16, classes)
    stored = _enc(logits, "topk_q8", k, 1.5)
    assert stored["values"].dtype == torch.uint8 and stored["scale"].shape == (16,)
    ref, ref_idx, ref_tail = topk_logprobs(logits, k, 1.5)
    batch = decode_to_batch(stored)
    assert set(batch) == {"teacher_logprobs", "teacher_indices", "teacher_tail"}
    assert torch.equal(batch["teacher_indices"], ref_idx.long())
    assert torch.equal(batch["teacher_tail"], ref_tail)
    # stated error: every decoded log-prob within one grid step, scale = (max - min) / 255
    err = (batch["teacher_logprobs"] - ref).abs()  # [n, k]
    assert (err <= stored["scale"][:, None] * 1.0001 + 1e-6).all()
    expected_scale = ((ref[:, 0] - ref[:, -1]) / Q8_LEVELS).clamp_min(1e-12)
    torch.testing.assert_close(stored["scale"], expected_scale)
    # tail mass + exp(values) sums to 1 (the grid offset preserves the top-k mass)
    total = batch["teacher_logprobs"].exp().sum(-1) + batch["teacher_tail"]
    torch.testing.assert_close(total, torch.ones(16), atol=1e-5, rtol=0)


def test_q8_is_close_to_topk_and_much_smaller(tmp_path: Path) -> None:
    logits = _logits(64, 1000)
    q8 = fidelity(logits, _enc(logits, "topk_q8", 32, 2.0), capture_temperature=2.0)
    fp16 = fidelity(logits, _enc(logits, "topk", 32, 2.0), capture_temperature=2.0)
    assert q8["top1_agreement"] == 1.0
    assert abs(q8["kl"] - fp16["kl"]) < 1e-3 * max(fp16["kl"], 1.0)
    info = write_cache(tmp_path, logits.split(16), num_rows=64, num_classes=1000,
                       format="topk_q8", k=32, dtype="float16", capture_temperature=2.0,
                       shard_rows=32)
    assert info["dtype"] == "uint8" and info["index_dtype"] == "uint16" and info["k"] == 32
    got = CacheReader(tmp_path).load_all()
    direct = decode_to_batch(_enc(logits, "topk_q8", 32, 2.0))
    for key, value in direct.items():
        assert torch.equal(got[key], value), key


def test_q8_handles_constant_and_extreme_rows() -> None:
    logits = torch.zeros(2, 50)
    logits[1, 0] = 1e4  # a one-hot teacher: everything else is ~ -1e4 nats below
    batch = decode_to_batch(_enc(logits, "topk_q8", 8, 1.0))
    assert torch.isfinite(batch["teacher_logprobs"]).all()
    uniform = torch.full((8,), -torch.log(torch.tensor(50.0)))
    torch.testing.assert_close(batch["teacher_logprobs"][0], uniform)
    assert batch["teacher_logprobs"][1, 0].abs() < 1e-6


# --- temperature: capture at Tc, train at T -------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_dense_cache_applies_logits_over_T(tmp_path: Path, T: float) -> None:
    teacher, student = _logits(32, 10, seed=1), _logits(32, 10, seed=2)
    y = torch.arange(32) % 10
    write_cache(tmp_path, teacher.split(8), num_rows=32, num_classes=10, format="dense", k=None,
                dtype="float16", capture_temperature=2.0, shard_rows=16)
    cached = CacheReader(tmp_path).load_all()
    kd = create_loss("kd", temperature=T, alpha=1.0)
    live = kd(student, {"y": y, "teacher_logits": teacher})["loss"]
    torch.testing.assert_close(kd(student, {"y": y, **cached})["loss"], live, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("fmt", ["topk", "topk_q8"])
@pytest.mark.parametrize("T", [1.0, 4.0])  # sharpen and soften a capture at Tc = 2
def test_topk_cache_retempered_equals_live_kd_at_T(fmt: str, T: float) -> None:
    teacher, student = _logits(32, 10, seed=1), _logits(32, 10, seed=2)
    y = torch.arange(32) % 10
    cached = decode_to_batch(_enc(teacher, fmt, 10, 2.0))  # k = C: the tail is 0
    loss = create_loss("topk_kd", temperature=T, alpha=1.0, capture_temperature=2.0)
    live = create_loss("kd", temperature=T, alpha=1.0)(student, {"y": y, "teacher_logits": teacher})
    tol = 2e-3 if fmt == "topk" else 2e-2
    torch.testing.assert_close(loss(student, {"y": y, **cached})["loss"], live["loss"], rtol=tol,
                               atol=tol * 0.1)


@pytest.mark.parametrize("fmt", ["topk", "topk_q8"])
def test_retempering_is_exact_among_the_cached_classes(fmt: str) -> None:
    teacher = _logits(16, 200, seed=3)
    stored = _enc(teacher, fmt, 20, 2.0)
    cached = decode_to_batch(stored)
    values = cached["teacher_logprobs"]
    # storage error of one value: half an fp16 ulp, or one q8 grid step
    err = values.abs().max() * 2**-11 if fmt == "topk" else stored["scale"].max()
    for T in (0.5, 1.0, 5.0):
        buckets = teacher_bucket_logprobs(values, cached["teacher_tail"], scale=2.0 / T)[:, :20]
        ref = F.log_softmax(teacher / T, -1).gather(-1, cached["teacher_indices"])  # [n, k]
        # relative log-probs of the cached classes match softmax(z / T) up to storage error
        got, want = buckets - buckets[:, :1], ref - ref[:, :1]
        assert (got - want).abs().max() <= 2.0 / T * 2 * err + 1e-5, T


@pytest.mark.parametrize("fmt", FORMATS.names())
def test_provides_is_what_decode_yields(fmt: str) -> None:
    stored = _enc(_logits(4, 10), fmt, 3, 1.0)
    assert tuple(FORMATS.get(fmt).decode(stored)) == FORMATS.get(fmt).provides
    assert tuple(decode_to_batch(stored, fmt)) == FORMATS.get(fmt).provides
