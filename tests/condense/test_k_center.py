"""k-center coreset: greedy order against a slow reference, per-class counts."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kdflow.condense import CONDENSERS, condense
from kdflow.condense.coreset import k_center_order
from kdflow.data.dataset import Dataset


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def slow_k_center(features: np.ndarray, count: int) -> list[int]:
    """Reference: start nearest the mean; then, over all unused points, take the one whose nearest
    chosen point is farthest (first index on ties)."""
    mu = features.mean(axis=0)
    chosen = [int(np.argmin([np.linalg.norm(f - mu) for f in features]))]
    while len(chosen) < count:
        best, best_d = None, -1.0
        for i in range(len(features)):
            if i in chosen:
                continue
            d = min(np.linalg.norm(features[i] - features[j]) for j in chosen)
            if d > best_d + 1e-12:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def test_k_center_is_registered() -> None:
    assert "k_center" in CONDENSERS.names()


def test_k_center_matches_the_slow_reference() -> None:
    for seed in range(3):
        feats = torch.randn(30, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert k_center_order(feats, 12) == slow_k_center(feats.numpy(), 12)


def test_k_center_caps_at_the_class_size() -> None:
    feats = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    assert sorted(k_center_order(feats, 10)) == [0, 1, 2, 3]
    assert k_center_order(feats, 0) == []


def test_k_center_keeps_ipc_real_samples_per_class() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(10)
    x = torch.randn(30, 1, 4, 4, generator=g)
    ds = Dataset(x, labels, [f"s{i}" for i in range(30)], ["train"] * 30, 3, "image")
    out = condense("k_center", ds, teacher=Flatten(), ipc=4, seed=0, device=torch.device("cpu"))
    assert torch.bincount(out.labels).tolist() == [4, 4, 4]
    for i, sid in enumerate(out.sample_ids):
        assert torch.equal(out.features[i], ds.features[ds.sample_ids.index(sid)])


def covering_radius(features: np.ndarray, centers: list[int]) -> float:
    """Largest distance from any point to its nearest center."""
    return max(min(np.linalg.norm(f - features[c]) for c in centers) for f in features)


def test_k_center_is_within_twice_the_brute_force_optimum() -> None:
    """Greedy k-center's covering radius is at most 2x the best over every subset of the same size
    (Gonzalez's bound, whatever the first center): checked exhaustively on tiny point sets."""
    from itertools import combinations

    for trial in range(5):
        feats = torch.randn(9, 2, generator=torch.Generator().manual_seed(trial))
        pts = feats.numpy()
        for k in (1, 2, 3):
            best = min(covering_radius(pts, list(s)) for s in combinations(range(len(pts)), k))
            greedy = covering_radius(pts, k_center_order(feats, k))
            assert greedy <= 2 * best + 1e-6, (trial, k, greedy, best)
