"""Dataset-condensation methods, registered by name.

A method takes the training split (and the chosen teacher) and returns a smaller training set in
the same ``Dataset`` format, optionally with label extras, so the rest of the pipeline does not
change. NRR-DD, RDED and Mirage join this registry.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from kdflow.data.dataset import Dataset
from kdflow.registry import Registry


class Condenser(Protocol):
    def __call__(self, train: Dataset, *, teacher: nn.Module | None, seed: int, device: torch.device, **kwargs: Any) -> Dataset: ...


CONDENSERS: Registry[Condenser] = Registry("condensation method")


def condense(method: str, train: Dataset, **kwargs: Any) -> Dataset:
    """Run a registered method on the training split."""
    return CONDENSERS.get(method)(train, **kwargs)


def per_class_indices(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Row indices of each class, in row order."""
    return [(labels == c).nonzero().flatten() for c in range(num_classes)]


from kdflow.condense import coreset, mirage, nrr_dd, rded  # noqa: E402,F401  (register)
