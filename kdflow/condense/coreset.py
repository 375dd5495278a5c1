"""Coreset baselines: keep real samples. ``none``, ``random`` and ``herding``."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kdflow.condense import CONDENSERS, per_class_indices
from kdflow.data.dataset import Dataset
from kdflow.train.loop import extract_features


@CONDENSERS.register("none")
def keep_all(train: Dataset, **_: object) -> Dataset:
    """The whole training split."""
    return train


@CONDENSERS.register("random")
def random_per_class(train: Dataset, *, ipc: int, seed: int, **_: object) -> Dataset:
    """``ipc`` samples drawn uniformly per class (all of a class when it has fewer)."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for rows in per_class_indices(train.labels, train.num_classes):
        keep.append(rows[torch.randperm(len(rows), generator=g)[:ipc]])
    return train.select(torch.cat(keep).sort().values)


def herding_order(features: torch.Tensor, count: int) -> list[int]:
    """Greedy herding (Welling 2009): pick samples whose running mean tracks the class mean.

    Args:
        features: ``[n, D]`` features of one class.
        count: how many to pick (at most n).
    Returns:
        Indices into ``features`` in selection order.
    """
    mu = features.mean(dim=0)  # [D]
    chosen: list[int] = []
    total = torch.zeros_like(mu)
    available = torch.ones(len(features), dtype=torch.bool)
    for t in range(1, min(count, len(features)) + 1):
        # distance of the mean after adding each candidate to the class mean
        dist = ((total + features) / t - mu).norm(dim=1)  # [n]
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        available[i] = False
        total += features[i]
    return chosen


@CONDENSERS.register("herding")
def herding(
    train: Dataset, *, teacher: nn.Module, ipc: int, device: torch.device,
    report: Callable[[int, int], None] | None = None, **_: object,
) -> Dataset:
    """``ipc`` samples per class by herding in the teacher's penultimate feature space.

    ``report(classes_done, classes)`` is called after each class.
    """
    feats = extract_features(teacher, train.features, device=device)  # [N, D]
    feats = torch.nn.functional.normalize(feats.float(), dim=1)
    keep = []
    for c, rows in enumerate(per_class_indices(train.labels, train.num_classes), start=1):
        keep.append(rows[herding_order(feats[rows], ipc)])
        if report is not None:
            report(c, train.num_classes)
    return train.select(torch.cat(keep).sort().values)
