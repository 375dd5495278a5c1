"""Several teachers: select chooses the top ones with weights, one cache each, combined at train time."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_params
from kdflow.cache import CacheReader, write_cache
from kdflow.cache.combine import combine
from kdflow.cache.replay import CachedBatches
from kdflow.errors import ParamsError
from kdflow.select import choose, ranking_weights
from schemas.params import parse_params
from tasks.common import STAGE_ORDER, execute_stage

N, C = 40, 6


def _teachers() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return 3 * torch.randn(N, C, generator=g), 3 * torch.randn(N, C, generator=g), torch.randint(C, (N,), generator=g)


def _cache(directory: Path, logits: torch.Tensor, fmt: str = "dense", k: int | None = None) -> CacheReader:
    info = write_cache(directory, [logits], num_rows=N, num_classes=C, format=fmt, k=k, dtype="float16",
                       capture_temperature=1.0, shard_rows=16)
    return CacheReader(directory, info)


def test_ranking_weights_are_a_softmax_of_the_scores() -> None:
    w = ranking_weights([0.9, 0.88, 0.8], 0.02)
    z = [math.exp(s / 0.02) for s in (0.9, 0.88, 0.8)]
    assert w == pytest.approx([v / sum(z) for v in z])
    assert ranking_weights([0.7], 0.01) == [1.0]
    rows = [{"teacher": "a", "score": 0.9}, {"teacher": "b", "score": 0.9}, {"teacher": "c", "score": 0.5}]
    assert choose(rows, 2, 0.01) == (["a", "b"], [0.5, 0.5])


def test_weighted_mean_equals_the_hand_computed_mixture(tmp_path: Path) -> None:
    t1, t2, y = _teachers()
    readers = [_cache(tmp_path / "a", t1), _cache(tmp_path / "b", t2)]
    T, w = 3.0, [0.7, 0.3]
    batches = CachedBatches({"x": torch.zeros(N, 2), "y": y}, readers, w, temperature=T, memory_limit=0)
    idx = torch.tensor([5, 0, 17, 39, 22])
    out = batches(idx, epoch=1)["teacher_logits"]
    a, b = t1.half().float()[idx], t2.half().float()[idx]  # what the fp16 caches hold
    expected = [[0.7 * math.exp(a[i, c] / T) / sum(math.exp(v / T) for v in a[i].tolist())
                 + 0.3 * math.exp(b[i, c] / T) / sum(math.exp(v / T) for v in b[i].tolist())
                 for c in range(C)] for i in range(len(idx))]
    torch.testing.assert_close(torch.softmax(out / T, dim=-1).double(), torch.tensor(expected, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    # in memory or streamed, the same rows
    in_memory = CachedBatches({"x": torch.zeros(N, 2), "y": y}, readers, w, temperature=T)
    assert in_memory.in_memory and torch.equal(in_memory(idx, 1)["teacher_logits"], out)


@pytest.mark.parametrize("fmt", ["dense", "topk"])
def test_per_sample_picks_the_teacher_most_sure_of_the_true_class(tmp_path: Path, fmt: str) -> None:
    t1, t2, y = _teachers()
    k = 2 if fmt == "topk" else None
    readers = [_cache(tmp_path / "a", t1, fmt, k), _cache(tmp_path / "b", t2, fmt, k)]
    batches = CachedBatches({"x": torch.zeros(N, 2), "y": y}, readers, [0.5, 0.5], combine_mode="per_sample",
                            memory_limit=0)
    got = batches(torch.arange(N), 1)
    single = [r.get(torch.arange(N)) for r in readers]
    picks = []
    for i in range(N):  # reference: p(y) per teacher, 0 outside a top-k; first teacher on ties
        probs = []
        for s in single:
            if fmt == "dense":
                probs.append(torch.softmax(s["teacher_logits"][i], -1)[y[i]].item())
            else:
                hit = (s["teacher_indices"][i] == y[i]).nonzero()
                probs.append(math.exp(s["teacher_logprobs"][i, hit[0, 0]].item()) if len(hit) else 0.0)
        picks.append(0 if probs[0] >= probs[1] else 1)
    assert 0 < sum(picks) < N  # both teachers get picked somewhere
    for key, value in got.items():
        if key.startswith("teacher_"):
            expected = torch.stack([single[p][key][i] for i, p in enumerate(picks)])
            assert torch.equal(value, expected), key


def test_combinations_that_are_not_defined_are_params_errors(tmp_path: Path) -> None:
    t1, t2, y = _teachers()
    readers = [_cache(tmp_path / "a", t1, "topk", 2), _cache(tmp_path / "b", t2, "topk", 2)]
    with pytest.raises(ParamsError, match="weighted_mean"):
        CachedBatches({"x": torch.zeros(N, 2), "y": y}, readers, [0.5, 0.5])
    with pytest.raises(ParamsError, match="weighted_mean"):
        combine([r.get(torch.arange(3)) for r in readers], [0.5, 0.5], mode="weighted_mean", y=y[:3])
    with pytest.raises(ParamsError, match="student.combine"):
        parse_params(tiny_params(select={"top": 2}, logits={"format": "topk", "k": 3},
                                 student={"loss": {"name": "topk_kd"}}))
    with pytest.raises(ParamsError, match="select.top"):
        parse_params(tiny_params(select={"top": 3}))


@pytest.mark.slow
@pytest.mark.parametrize("combine_mode", ["weighted_mean", "per_sample"])
def test_two_teachers_one_cache_each_through_the_stages(tmp_path: Path, combine_mode: str) -> None:
    fast = {"epochs": 2, "lr": 0.01, "batch_size": 128, "patience": None}
    raw = tiny_params(select={"top": 2, "weight_temperature": 0.05},
                      student={"combine": combine_mode, "train": fast})
    pp = parse_params(raw)
    ms = {}
    for stage in STAGE_ORDER[: STAGE_ORDER.index("student") + 1]:
        ms[stage], _ = execute_stage(stage, pp, tmp_path)
    chosen = ms["select"].info
    assert len(chosen["teachers"]) == 2 and sum(chosen["weights"]) == pytest.approx(1.0)
    assert chosen["weights"][0] >= chosen["weights"][1]
    entries = ms["logits"].info["teachers"]
    assert [e["teacher"] for e in entries] == chosen["teachers"]
    assert [e["weight"] for e in entries] == chosen["weights"]
    assert entries[0]["cache_key"] != entries[1]["cache_key"]
    for e in entries:
        CacheReader(tmp_path / "artifacts/tiny/logits" / e["dir"]).verify()
    assert ms["student"].metrics["epochs_run"] == 2


def test_memory_limit_counts_the_decoded_rows_not_the_bytes_on_disk(tmp_path: Path) -> None:
    n, c = 2000, 100
    logits = 3 * torch.randn(n, c, generator=torch.Generator().manual_seed(0))
    info = write_cache(tmp_path, [logits], num_rows=n, num_classes=c, format="topk_q8", k=20, dtype="float16",
                       capture_temperature=1.0, shard_rows=500)
    reader = CacheReader(tmp_path, info)
    decoded = sum(v.element_size() * v.numel() for v in reader.load_all().values())
    assert decoded > 3 * reader.nbytes  # uint8 values and narrow indices decode to float32 / int64
    tensors = {"x": torch.zeros(n, 2), "y": logits.argmax(1)}
    assert not CachedBatches(tensors, [reader], [1.0], memory_limit=decoded - 1).in_memory
    assert CachedBatches(tensors, [reader], [1.0], memory_limit=decoded).in_memory
