"""Text-classification evaluation: accuracy, macro-F1, ECE, size, CPU latency at batch 1 and 64.

Latency is timed on real test articles (token ids as stored, each batch trimmed to its longest
text by the model), repeated to fill the batch, not on random input.
"""
from __future__ import annotations

from html import escape
from typing import Any

import torch
from torch import nn

from kdflow.metrics import accuracy, agreement, expected_calibration_error, kl_divergence, macro_f1
from kdflow.metrics.latency import measure_latency
from kdflow.models import count_params, model_bytes
from kdflow.report import table

BATCHES = (1, 64)


def latency_inputs(features: torch.Tensor, batches: tuple[int, ...] = BATCHES) -> dict[int, torch.Tensor]:
    """Real test texts, repeated to fill each batch (batch 1: the first test text)."""
    if len(features) == 0:
        return {}
    return {b: features[torch.arange(b) % len(features)] for b in batches}


def model_metrics(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                  inputs: dict[int, torch.Tensor], repeats: int, threads: int | None, ece_bins: int) -> dict[str, float]:
    """One model's quality, size and latency (``latency_ms_b1``, ``latency_ms_b64``)."""
    out = {
        "accuracy": accuracy(logits, labels),
        "macro_f1": macro_f1(logits, labels, num_classes),
        "ece": expected_calibration_error(logits, labels, ece_bins),
        "params": count_params(model) + getattr(model, "frozen_params", 0),  # + a frozen ONNX encoder's
        "bytes": model_bytes(model) + getattr(model, "frozen_bytes", 0),
    }
    for b, x in inputs.items():
        out[f"latency_ms_b{b}"] = measure_latency(model, tuple(x.shape[1:]), b, repeats=repeats, threads=threads,
                                                  inputs=x)["median_ms"]
    return out


def compare(per: dict[str, dict], logits: dict[str, torch.Tensor], teacher_name: str, n_test: int,
            mean_tokens: float) -> dict[str, Any]:
    """metrics.json: both models, agreement, KL and the compression ratios."""
    t, s = per["teacher"], per["student"]
    return {
        "teacher": {"name": teacher_name, **t},
        "student": s,
        "agreement": agreement(logits["teacher"], logits["student"]),
        "kl_teacher_student": kl_divergence(logits["teacher"], logits["student"]),
        "ece_student": s["ece"],
        "compression": {"params_ratio": t["params"] / s["params"], "bytes_ratio": t["bytes"] / s["bytes"],
                        **{f"latency_ratio_b{b}": t[f"latency_ms_b{b}"] / s[f"latency_ms_b{b}"]
                           for b in BATCHES if f"latency_ms_b{b}" in s}},
        "accuracy_gap": t["accuracy"] - s["accuracy"],
        "n_test": n_test,
        "mean_test_tokens": mean_tokens,
    }


def summary_rows(m: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(label, teacher, student, ratio) rows."""
    t, s, c = m["teacher"], m["student"], m["compression"]
    rows = [
        ("accuracy", f"{t['accuracy']:.4f}", f"{s['accuracy']:.4f}", f"gap {m['accuracy_gap'] * 100:+.2f} pts"),
        ("macro-F1", f"{t['macro_f1']:.4f}", f"{s['macro_f1']:.4f}", ""),
        ("ECE", f"{t['ece']:.4f}", f"{s['ece']:.4f}", ""),
        ("params", f"{t['params']:,}", f"{s['params']:,}", f"{c['params_ratio']:.1f}x"),
        ("bytes", f"{t['bytes']:,}", f"{s['bytes']:,}", f"{c['bytes_ratio']:.1f}x"),
    ]
    for b in BATCHES:
        k = f"latency_ms_b{b}"
        if k in t and k in s:
            rows.append((f"latency b{b} (ms)", f"{t[k]:.3f}", f"{s[k]:.3f}", f"{c[f'latency_ratio_b{b}']:.1f}x"))
    return rows


def report_section(m: dict[str, Any]) -> str:
    """The report's teacher vs. student table (HTML)."""
    rows = [list(r) for r in summary_rows(m)]
    html = table(["", f"teacher ({m['teacher'].get('name', '?')})", "student", "teacher / student"], rows,
                 numeric=(1, 2, 3))
    note = (f"top-1 agreement {m['agreement']:.4f} · KL(teacher || student) {m['kl_teacher_student']:.4f} · "
            f"{m['n_test']} test texts, {m['mean_test_tokens']:.0f} tokens on average (latency on real texts)")
    return html + f"\n<p>{escape(note)}</p>"
