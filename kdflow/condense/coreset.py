"""Coreset baselines: keep real samples. ``none``, ``random``, ``herding`` and ``k_center``."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kdflow.condense import CONDENSERS, Report, per_class_indices
from kdflow.data.dataset import Dataset
from kdflow.train.loop import extract_features
from schemas.methods import HerdingParams, KCenterParams, NoneParams, RandomParams  # torch-free (kdflow/catalog.py)

BOTH = ("classify", "graph", "text")  # the tracks these methods serve (any features the teacher embeds)


@CONDENSERS.register("none", params=NoneParams, tracks=BOTH, needs_teacher=False, provides=())
def keep_all(
    train: Dataset, *, teacher: nn.Module | None, seed: int, device: torch.device, report: Report | None,
) -> Dataset:
    """The whole training split."""
    return train


@CONDENSERS.register("random", params=RandomParams, tracks=BOTH, needs_teacher=False, provides=())
def random_per_class(
    train: Dataset, *, teacher: nn.Module | None, seed: int, device: torch.device, report: Report | None,
    ipc: int,
) -> Dataset:
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


def k_center_order(features: torch.Tensor, count: int) -> list[int]:
    """Greedy k-center (Sener & Savarese 2018): repeatedly add the farthest sample.

    The first pick is the sample closest to the class mean (so no seed is needed); each next
    pick maximises the Euclidean distance to its nearest already-chosen sample (ties: lowest index).

    Args:
        features: ``[n, D]`` features of one class.
        count: how many to pick (at most n).
    Returns:
        Indices into ``features`` in selection order.
    """
    n = len(features)
    count = min(count, n)
    if count == 0:
        return []
    first = int((features - features.mean(dim=0)).norm(dim=1).argmin())
    chosen = [first]
    nearest = (features - features[first]).norm(dim=1)  # [n] distance to the chosen set
    while len(chosen) < count:
        i = int(nearest.argmax())
        chosen.append(i)
        nearest = torch.minimum(nearest, (features - features[i]).norm(dim=1))
    return chosen


def _per_class_in_feature_space(
    order: Callable[[torch.Tensor, int], list[int]], train: Dataset, teacher: nn.Module, ipc: int,
    device: torch.device, report: Report | None,
) -> Dataset:
    """Pick ``ipc`` rows per class with ``order`` on L2-normalised teacher features."""
    feats = extract_features(teacher, train.features, device=device)  # [N, D]
    return select_in_feature_space(order, train, feats, ipc, report)


def select_in_feature_space(
    order: Callable[[torch.Tensor, int], list[int]], train: Dataset, features: torch.Tensor, ipc: int,
    report: Report | None = None,
) -> Dataset:
    """Pick ``ipc`` rows per class of ``train`` with ``order`` (``herding_order``, ``k_center_order``)
    on ``features`` ``[N, D]`` (one row per sample of ``train``), L2-normalised first.

    What the ``herding``/``k_center`` condensers do after extracting the teacher's features; callers
    that already hold the features (a benchmark picking at several IPCs) use it directly.
    """
    if len(features) != len(train):
        raise ValueError(f"features have {len(features)} rows, the dataset {len(train)}")
    feats = torch.nn.functional.normalize(features.float(), dim=1)
    keep = []
    for c, rows in enumerate(per_class_indices(train.labels, train.num_classes), start=1):
        keep.append(rows[order(feats[rows], ipc)])
        if report is not None:
            report(c, train.num_classes)
    return train.select(torch.cat(keep).sort().values)


@CONDENSERS.register("herding", params=HerdingParams, tracks=BOTH, needs_teacher=True, provides=())
def herding(
    train: Dataset, *, teacher: nn.Module, seed: int, device: torch.device, report: Report | None,
    ipc: int,
) -> Dataset:
    """``ipc`` samples per class by herding in the teacher's penultimate feature space.

    ``report(classes_done, classes)`` is called after each class.
    """
    return _per_class_in_feature_space(herding_order, train, teacher, ipc, device, report)


@CONDENSERS.register("k_center", params=KCenterParams, tracks=BOTH, needs_teacher=True, provides=())
def k_center(
    train: Dataset, *, teacher: nn.Module, seed: int, device: torch.device, report: Report | None,
    ipc: int,
) -> Dataset:
    """``ipc`` samples per class by greedy k-center in the teacher's penultimate feature space.

    ``report(classes_done, classes)`` is called after each class.
    """
    return _per_class_in_feature_space(k_center_order, train, teacher, ipc, device, report)
