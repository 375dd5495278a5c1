"""Classification metrics on logits: accuracy, F1, agreement, KL, calibration, confusion.

Inputs are float logits ``[N, C]`` and int64 labels ``[N]``; scalar metrics return Python floats.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdflow.errors import DataError


def _check(logits: Tensor, labels: Tensor | None = None, num_classes: int | None = None) -> None:
    if logits.dim() != 2 or logits.shape[0] == 0:
        shape = tuple(logits.shape)
        raise DataError(f"metrics: logits must be a non-empty [N, C] tensor, got {shape}")
    if labels is None:
        return
    if labels.shape != logits.shape[:1]:
        shapes = f"{tuple(labels.shape)} vs. logits {tuple(logits.shape)}"
        raise DataError(f"metrics: labels do not match logits: labels {shapes}")
    high = num_classes if num_classes is not None else logits.shape[1]
    if labels.min() < 0 or labels.max() >= high:
        got = f"[{labels.min().item()}, {labels.max().item()}]"
        raise DataError(f"metrics: labels must lie in [0, {high}), got {got}")


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy."""
    _check(logits, labels)
    return (logits.argmax(-1) == labels).float().mean().item()


def agreement(logits_a: Tensor, logits_b: Tensor) -> float:
    """Fraction of samples where two models make the same top-1 prediction."""
    _check(logits_a)
    if logits_a.shape != logits_b.shape:
        shapes = f"{tuple(logits_a.shape)} and {tuple(logits_b.shape)}"
        raise DataError(f"metrics: agreement needs equal shapes, got {shapes}")
    return (logits_a.argmax(-1) == logits_b.argmax(-1)).float().mean().item()


def confusion_matrix(logits: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Counts ``[C, C]`` int64; rows are actual classes, columns predicted ones."""
    _check(logits, labels, num_classes)
    pred = logits.argmax(-1).long()  # [N]
    flat = labels.long() * num_classes + pred  # [N]
    counts = torch.bincount(flat.cpu(), minlength=num_classes * num_classes)  # [C * C]
    return counts.reshape(num_classes, num_classes)


def macro_f1(logits: Tensor, labels: Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1.

    Classes absent from both labels and predictions are left out of the mean (as in
    ``sklearn.metrics.f1_score(average="macro")`` without ``labels=``).
    """
    cm = confusion_matrix(logits, labels, num_classes).double()  # [C, C]
    tp = cm.diag()  # [C]
    actual, predicted = cm.sum(1), cm.sum(0)  # [C], [C]
    denom = actual + predicted  # F1 = 2 tp / (2 tp + fp + fn)
    present = denom > 0
    f1 = 2 * tp[present] / denom[present]
    return f1.mean().item()


def kl_divergence(teacher_logits: Tensor, student_logits: Tensor) -> float:
    """Mean over samples of KL(softmax(teacher) || softmax(student)) at T = 1, in nats."""
    _check(teacher_logits)
    if teacher_logits.shape != student_logits.shape:
        raise DataError(
            f"metrics: KL needs equal shapes, got {tuple(teacher_logits.shape)} "
            f"and {tuple(student_logits.shape)}"
        )
    log_p = F.log_softmax(teacher_logits.double(), dim=-1)  # [N, C]
    log_q = F.log_softmax(student_logits.double(), dim=-1)  # [N, C]
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))  # [N, C]
    return terms.sum(-1).mean().item()


def reliability_bins(logits: Tensor, labels: Tensor, n_bins: int = 15) -> list[dict]:
    """Equal-width confidence bins over (0, 1], each ``(lower, upper]``.

    Returns:
        One dict per bin, empty bins included: ``lower``, ``upper``, ``confidence`` (mean max
        probability), ``accuracy`` and ``count``. Empty bins hold 0.0 for both means.
    """
    _check(logits, labels)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    probs = F.softmax(logits.double(), dim=-1)  # [N, C]
    conf, pred = probs.max(-1)  # [N], [N]
    correct = (pred == labels).double()  # [N]
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)  # [n_bins + 1]
    idx = torch.bucketize(conf, edges[1:-1], right=False)  # [N], x in (edges[i], edges[i+1]] -> i
    count = torch.bincount(idx, minlength=n_bins).double()  # [n_bins]
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)  # [n_bins]
    acc_sum = torch.bincount(idx, weights=correct, minlength=n_bins)  # [n_bins]
    safe = count.clamp_min(1.0)
    return [
        {
            "lower": edges[i].item(),
            "upper": edges[i + 1].item(),
            "confidence": (conf_sum[i] / safe[i]).item(),
            "accuracy": (acc_sum[i] / safe[i]).item(),
            "count": int(count[i].item()),
        }
        for i in range(n_bins)
    ]


def expected_calibration_error(logits: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """ECE: sum over bins of ``count / N * |accuracy - confidence|`` (equal-width bins)."""
    bins = reliability_bins(logits, labels, n_bins)
    total = sum(b["count"] for b in bins)
    return sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins)
