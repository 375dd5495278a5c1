"""The training loop: devices, precision, checkpoints/resume, progress.

The names below are imported on first use (PEP 562), so ``kdflow.train.distributed`` can be
asked whether this process is the main one without importing torch.
"""
from __future__ import annotations

from typing import Any

__all__ = [
    "FitResult",
    "accuracy_of",
    "autocast",
    "extract_features",
    "fit",
    "predict",
    "resolve_device",
    "seed_everything",
]


def __getattr__(name: str) -> Any:
    if name in ("autocast", "resolve_device", "seed_everything"):
        from kdflow.train import device

        return getattr(device, name)
    if name in ("FitResult", "accuracy_of", "extract_features", "fit", "predict"):
        from kdflow.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
