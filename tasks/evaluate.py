"""evaluate: teacher vs. student on the test split; metrics.json, plots for dvc, PNG pictures."""
from __future__ import annotations

import json

import torch

from kdflow.data.dataset import load_dataset
from kdflow.metrics import (
    accuracy, agreement, confusion_matrix, expected_calibration_error, kl_divergence, macro_f1, reliability_bins,
)
from kdflow.metrics.latency import measure_latency
from kdflow.metrics.plots import (
    plot_compression_png, plot_confusion_png, plot_curves_png, plot_reliability_png,
    write_confusion_plot_data, write_reliability_plot_data,
)
from kdflow.models import count_params, model_bytes
from kdflow.models.io import load_model
from kdflow.train.loop import predict
from schemas.manifest import Manifest
from schemas.params import EvaluateParams
from tasks.common import StageContext
from tasks.select import chosen_teacher


def latency_inputs(test, batch_size: int):
    """A real batch for timing graph models (test graphs, repeated to fill it); None: random input."""
    if test.modality != "graph" or len(test) == 0:
        return None
    return test.features[torch.arange(batch_size) % len(test)]


def model_metrics(model, logits, labels, num_classes: int, params: EvaluateParams, input_shape, test=None) -> dict:
    lat = {
        b: measure_latency(model, input_shape, b, repeats=params.latency_repeats, threads=params.latency_threads,
                           inputs=None if test is None else latency_inputs(test, b))
        for b in (1, 256)
    }
    return {
        "accuracy": accuracy(logits, labels),
        "macro_f1": macro_f1(logits, labels, num_classes),
        "ece": expected_calibration_error(logits, labels, params.ece_bins),
        "params": count_params(model),
        "bytes": model_bytes(model),
        "latency_ms_b1": lat[1]["median_ms"],
        "latency_ms_b256": lat[256]["median_ms"],
    }


def _history(ctx: StageContext, stage: str, name: str = "") -> list[dict]:
    path = ctx.input(stage) / name / "history.json"
    return json.loads(path.read_text()) if path.exists() else []


def run(params: EvaluateParams, ctx: StageContext) -> Manifest:
    test = load_dataset(ctx.input("prepare")).split("test")
    name = chosen_teacher(ctx)
    models = {"teacher": load_model(ctx.input("teachers") / name), "student": load_model(ctx.input("student"))}
    logits = {k: predict(m, test.features) for k, m in models.items()}
    y, c = test.labels, test.num_classes
    per = {k: model_metrics(models[k], logits[k], y, c, params, test.input_shape, test) for k in models}
    t, s = per["teacher"], per["student"]
    metrics = {
        "teacher": {"name": name, **t},
        "student": s,
        "agreement": agreement(logits["teacher"], logits["student"]),
        "kl_teacher_student": kl_divergence(logits["teacher"], logits["student"]),
        "ece_student": s["ece"],
        "compression": {
            "params_ratio": t["params"] / s["params"],
            "bytes_ratio": t["bytes"] / s["bytes"],
            "latency_ratio_b1": t["latency_ms_b1"] / s["latency_ms_b1"],
            "latency_ratio_b256": t["latency_ms_b256"] / s["latency_ms_b256"],
        },
        "accuracy_gap": t["accuracy"] - s["accuracy"],
        "n_test": len(test),
    }
    (ctx.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _write_plots(ctx, name, models, logits, y, c, params, per)
    flat = {"teacher_accuracy": t["accuracy"], "student_accuracy": s["accuracy"], "agreement": metrics["agreement"],
            "params_ratio": metrics["compression"]["params_ratio"]}
    return ctx.manifest(metrics=flat, info={"teacher": name})


def _write_plots(ctx, name, models, logits, y, c, params, per) -> None:
    plots, figs = ctx.out / "plots", ctx.out / "figures"
    plots.mkdir()
    figs.mkdir()
    bins = {k: reliability_bins(v, y, params.ece_bins) for k, v in logits.items()}
    for k, v in logits.items():
        write_confusion_plot_data(plots / f"confusion_{k}.json", y, v.argmax(dim=1))
        write_reliability_plot_data(plots / f"reliability_{k}.csv", bins[k])
        plot_confusion_png(figs / f"confusion_{k}.png", confusion_matrix(v, y, c), f"{k} ({name if k == 'teacher' else 'student'})")
    plot_reliability_png(figs / "reliability.png", bins)
    plot_curves_png(figs / "curves.png", {"teacher": _history(ctx, "teachers", name), "student": _history(ctx, "student")})
    points = [{"name": k, "params": per[k]["params"], "accuracy": per[k]["accuracy"]} for k in per]
    plot_compression_png(figs / "compression.png", points)
