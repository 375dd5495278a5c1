"""Teacher-selection strategies, registered by name.

A strategy takes the candidate teachers and the data and returns one row per candidate
(``teacher``, ``score`` and strategy-specific columns); higher scores rank first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from kdflow.catalog import STRATEGIES as _STRATEGIES
from kdflow.registry import Registry


@dataclass
class SelectionData:
    """Tensors a strategy may use."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    seed: int
    device: torch.device

    @classmethod
    def of_splits(cls, ds: Any, seed: int, device: torch.device) -> SelectionData:
        """The train and val splits of a track's dataset (``features``/``labels``/``split``)."""
        train, val = ds.split("train"), ds.split("val")
        return cls(train.features, train.labels, val.features, val.labels, ds.num_classes, seed, device)


class Strategy(Protocol):
    def __call__(self, candidates: dict[str, nn.Module], data: SelectionData, **kwargs: Any) -> list[dict]: ...


STRATEGIES: Registry[Strategy] = _STRATEGIES  # its names and metadata: kdflow/catalog.py


def rank(candidates: dict[str, nn.Module], data: SelectionData, strategy: str, **kwargs: Any) -> list[dict]:
    """Score every candidate with ``strategy``; rows sorted best first with a ``rank`` column."""
    rows = STRATEGIES.get(strategy)(candidates, data, **kwargs)
    rows = sorted(rows, key=lambda r: (-r["score"], r["teacher"]))
    for i, row in enumerate(rows, start=1):
        row["rank"] = i
    return rows


def ranking_weights(scores: list[float], temperature: float) -> list[float]:
    """Weights of the chosen teachers from their scores: ``softmax(score / temperature)``.

    The best-scored teacher weighs most; equal scores weigh equally; one teacher weighs 1.
    """
    if not temperature > 0:
        raise ValueError(f"weight temperature must be > 0, got {temperature}")
    z = torch.tensor(scores, dtype=torch.float64) / temperature
    return [float(w) for w in torch.softmax(z, dim=0)]


def choose(rows: list[dict], top: int, temperature: float) -> tuple[list[str], list[float]]:
    """The ``top`` best rows of a ranking (sorted best first) and their weights."""
    chosen = rows[: max(1, top)]
    return [r["teacher"] for r in chosen], ranking_weights([r["score"] for r in chosen], temperature)


from kdflow.select import probe, val_accuracy  # noqa: E402,F401  (register)
