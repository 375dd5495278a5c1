"""Evaluation metrics: classification quality, calibration, latency and plots."""
from __future__ import annotations

from kdflow.metrics.classification import (
    accuracy,
    agreement,
    confusion_matrix,
    expected_calibration_error,
    kl_divergence,
    macro_f1,
    reliability_bins,
)
from kdflow.metrics.latency import measure_latency

__all__ = [
    "accuracy",
    "agreement",
    "confusion_matrix",
    "expected_calibration_error",
    "kl_divergence",
    "macro_f1",
    "measure_latency",
    "reliability_bins",
]
