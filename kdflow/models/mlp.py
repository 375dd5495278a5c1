"""Multi-layer perceptron over flattened inputs."""
from __future__ import annotations

import math

import torch
from torch import nn

from kdflow.errors import ModelError
from kdflow.models import MODELS


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout] * len(hidden) -> Linear."""

    def __init__(
        self, in_features: int, num_classes: int, hidden: list[int], dropout: float
    ) -> None:
        super().__init__()
        if any(h < 1 for h in hidden):
            raise ModelError(f"mlp: hidden sizes must be >= 1 (got {hidden})")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last hidden layer, ``[B, hidden[-1]]``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))  # [B, K]


@MODELS.register("mlp")
def mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: list[int] | None = None,
    dropout: float = 0.0,
) -> MLP:
    """An MLP on any input shape (flattened)."""
    sizes = list(hidden if hidden is not None else [256, 128])
    return MLP(math.prod(input_shape), num_classes, sizes, dropout)


@MODELS.register("tiny_mlp")
def tiny_mlp(input_shape: tuple[int, ...], num_classes: int) -> MLP:
    """A one-hidden-layer MLP (16 units) for fast tests."""
    return MLP(math.prod(input_shape), num_classes, [16], 0.0)
