"""The training loop: devices, precision, checkpoints/resume, progress."""
from __future__ import annotations

from kdflow.train.device import autocast, resolve_device, seed_everything
from kdflow.train.loop import FitResult, accuracy_of, extract_features, fit, predict

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
