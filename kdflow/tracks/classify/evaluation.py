"""Classification evaluation: teacher vs. student on the test split, metrics.json and pictures."""
from __future__ import annotations

from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdflow.report import fmt, table

if TYPE_CHECKING:  # torch and the metrics are imported where they compute: the summary needs neither
    import torch
    from torch import nn

BATCHES = (1, 256)


def model_metrics(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                  input_shape: tuple[int, ...], latency_inputs: dict[int, Any], repeats: int,
                  threads: int | None, ece_bins: int) -> dict[str, float]:
    """Accuracy (with its 95% Wilson interval), macro-F1, ECE, size and CPU latency at batch 1 and
    256 of one model."""
    from kdflow.metrics import accuracy, expected_calibration_error, macro_f1
    from kdflow.metrics.intervals import proportion_interval
    from kdflow.metrics.latency import measure_latency
    from kdflow.models import count_params, model_bytes

    lat = {b: measure_latency(model, input_shape, b, repeats=repeats, threads=threads, inputs=latency_inputs.get(b))
           for b in BATCHES}
    acc = accuracy(logits, labels)
    return {
        "accuracy": acc,
        "accuracy_ci95": proportion_interval(acc, len(labels)),
        "macro_f1": macro_f1(logits, labels, num_classes),
        "ece": expected_calibration_error(logits, labels, ece_bins),
        "params": count_params(model),
        "bytes": model_bytes(model),
        "latency_ms_b1": lat[1]["median_ms"],
        "latency_ms_b256": lat[256]["median_ms"],
    }


def compare(per: dict[str, dict], logits: dict[str, torch.Tensor], teacher_name: str, n_test: int) -> dict[str, Any]:
    """metrics.json: both models, their agreement and the compression ratios."""
    from kdflow.metrics import agreement, kl_divergence
    from kdflow.metrics.intervals import METHOD, proportion_interval

    t, s = per["teacher"], per["student"]
    agree = agreement(logits["teacher"], logits["student"])
    return {
        "teacher": {"name": teacher_name, **t},
        "student": s,
        "agreement": agree,
        "agreement_ci95": proportion_interval(agree, n_test),
        "ci_method": METHOD,
        "kl_teacher_student": kl_divergence(logits["teacher"], logits["student"]),
        "ece_student": s["ece"],
        "compression": {
            "params_ratio": t["params"] / s["params"],
            "bytes_ratio": t["bytes"] / s["bytes"],
            "latency_ratio_b1": t["latency_ms_b1"] / s["latency_ms_b1"],
            "latency_ratio_b256": t["latency_ms_b256"] / s["latency_ms_b256"],
        },
        "accuracy_gap": t["accuracy"] - s["accuracy"],
        "n_test": n_test,
    }


def seed_metrics(teacher_logits: torch.Tensor, students: dict[int, torch.Tensor], labels: torch.Tensor
                 ) -> dict[str, Any]:
    """Test accuracy, agreement with the teacher and accuracy gap of every seed's student
    (``students``: seed -> logits ``[N, C]``), each as mean, std, min, max and the values in seed order."""
    from kdflow.metrics import accuracy, agreement
    from kdflow.metrics.intervals import spread

    acc = [accuracy(v, labels) for v in students.values()]
    agree = [agreement(teacher_logits, v) for v in students.values()]
    t = accuracy(teacher_logits, labels)
    return {"seeds": list(students), "accuracy": spread(acc), "agreement": spread(agree),
            "accuracy_gap": spread([t - a for a in acc])}


def write_pictures(folder: Path, teacher_name: str, logits: dict[str, torch.Tensor], y: torch.Tensor,
                   num_classes: int, ece_bins: int, per: dict[str, dict], histories: dict[str, list[dict]]) -> None:
    """``plots/`` (data for ``dvc plots``) and ``figures/`` (PNG) of the evaluation."""
    from kdflow.metrics import confusion_matrix, reliability_bins
    from kdflow.metrics.plots import (  # matplotlib: loaded only to draw
        picture_bins,
        plot_compression_png,
        plot_confusion_png,
        plot_curves_png,
        plot_reliability_png,
        write_confusion_plot_data,
        write_reliability_plot_data,
    )

    plots, figs = folder / "plots", folder / "figures"
    plots.mkdir(exist_ok=True)
    figs.mkdir(exist_ok=True)
    bins = {k: reliability_bins(v, y, ece_bins) for k, v in logits.items()}
    for k, v in logits.items():
        write_confusion_plot_data(plots / f"confusion_{k}.json", y, v.argmax(dim=1))
        write_reliability_plot_data(plots / f"reliability_{k}.csv", bins[k])
        title = f"{k} ({teacher_name if k == 'teacher' else 'student'})"
        plot_confusion_png(figs / f"confusion_{k}.png", confusion_matrix(v, y, num_classes), title)
    few = picture_bins(len(y), ece_bins)  # the picture: fewer bins on a small test set, with their counts
    plot_reliability_png(figs / "reliability.png", {k: reliability_bins(v, y, few) for k, v in logits.items()})
    plot_curves_png(figs / "curves.png", histories)
    points = [{"name": k, "params": per[k]["params"], "accuracy": per[k]["accuracy"]} for k in per]
    plot_compression_png(figs / "compression.png", points)


def summary_rows(m: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(label, teacher, student, ratio) rows of the teacher vs. student table."""
    t, s, c = m["teacher"], m["student"], m["compression"]
    return [
        ("accuracy", f"{t['accuracy']:.4f}", f"{s['accuracy']:.4f}", f"gap {m['accuracy_gap'] * 100:+.2f} pts"),
        *([("  95% CI (Wilson)", _ci(t["accuracy_ci95"]), _ci(s["accuracy_ci95"]), f"n = {m['n_test']}")]
          if "accuracy_ci95" in s else []),
        ("macro-F1", f"{t['macro_f1']:.4f}", f"{s['macro_f1']:.4f}", ""),
        ("ECE", f"{t['ece']:.4f}", f"{s['ece']:.4f}", ""),
        ("params", f"{t['params']:,}", f"{s['params']:,}", f"{c['params_ratio']:.1f}x"),
        ("bytes", f"{t['bytes']:,}", f"{s['bytes']:,}", f"{c['bytes_ratio']:.1f}x"),
        ("latency b1 (ms)", f"{t['latency_ms_b1']:.3f}", f"{s['latency_ms_b1']:.3f}", f"{c['latency_ratio_b1']:.1f}x"),
        ("latency b256 (ms)", f"{t['latency_ms_b256']:.2f}", f"{s['latency_ms_b256']:.2f}", f"{c['latency_ratio_b256']:.1f}x"),
    ]


def _ci(ci: dict[str, float]) -> str:
    return f"[{ci['low']:.4f}, {ci['high']:.4f}]"


DVC_PLOTS = [
    {"plots/confusion_teacher.json": {"template": "confusion", "x": "actual", "y": "predicted"}},
    {"plots/confusion_student.json": {"template": "confusion", "x": "actual", "y": "predicted"}},
    {"plots/reliability_teacher.csv": {"x": "confidence", "y": "accuracy"}},
    {"plots/reliability_student.csv": {"x": "confidence", "y": "accuracy"}},
]


# (label, key in the teacher/student dicts, format, key of the ratio in metrics["compression"])
COMPARED = [
    ("accuracy", "accuracy", "{:.4f}", None),
    ("macro-F1", "macro_f1", "{:.4f}", None),
    ("ECE", "ece", "{:.4f}", None),
    ("params", "params", "{:,}", "params_ratio"),
    ("bytes", "bytes", "{:,}", "bytes_ratio"),
    ("latency b1 (ms)", "latency_ms_b1", "{:.3f}", "latency_ratio_b1"),
    ("latency b256 (ms)", "latency_ms_b256", "{:.2f}", "latency_ratio_b256"),
]


def report_section(m: dict[str, Any]) -> str:
    """The report's teacher vs. student table (HTML)."""
    t, s, ratios = m.get("teacher", {}), m.get("student", {}), m.get("compression", {})
    rows = []
    for label, key, form, ratio_key in COMPARED:
        if key not in t or key not in s:
            continue
        if ratio_key is not None and ratio_key in ratios:
            ratio = f"{ratios[ratio_key]:.2f}x"
        elif key == "accuracy" and "accuracy_gap" in m:
            ratio = f"gap {m['accuracy_gap'] * 100:+.2f} pts"
        else:
            ratio = ""
        rows.append([label, form.format(t[key]), form.format(s[key]), ratio])
        if key == "accuracy" and "accuracy_ci95" in s:
            rows.append(["  95% CI (Wilson)", _ci(t["accuracy_ci95"]), _ci(s["accuracy_ci95"]), ""])
    html = table(["", f"teacher ({t.get('name', '?')})", "student", "teacher / student"], rows, numeric=(1, 2, 3))
    extra = {"agreement": "top-1 agreement", "kl_teacher_student": "KL(teacher || student)", "n_test": "test samples"}
    shown = [f"{label} {fmt(m[k])}" for k, label in extra.items() if k in m]
    if "agreement_ci95" in m:
        shown.insert(1, f"agreement 95% CI {_ci(m['agreement_ci95'])}")
    if shown:
        html += "\n<p>" + escape(" · ".join(shown)) + "</p>"
    return html
