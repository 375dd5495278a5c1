"""evaluate: teacher vs. student on the test split; metrics.json, plots for dvc, PNG pictures."""
from __future__ import annotations

import json

from kdflow.metrics.intervals import seed_headline
from schemas.manifest import Manifest
from schemas.outputs import Evaluated
from schemas.params import EvaluateParams
from tasks.common import StageContext


def _history(ctx: StageContext, stage: str, name: str = "") -> list[dict]:
    path = ctx.input(stage) / name / "history.json"
    return json.loads(path.read_text()) if path.exists() else []


def run(params: EvaluateParams, ctx: StageContext) -> Manifest:
    test = ctx.track.load(ctx.input("prepare")).split("test")
    name = ctx.output("select").best
    models = {"teacher": ctx.track.load_model(ctx.input("teachers") / name),
              "student": ctx.track.load_model(ctx.input("student"))}
    histories = {"teacher": _history(ctx, "teachers", name), "student": _history(ctx, "student")}
    metrics = ctx.track.evaluate(models, test, names={"teacher": name}, histories=histories,
                                 latency_repeats=params.latency_repeats, latency_threads=params.latency_threads,
                                 ece_bins=params.ece_bins, folder=ctx.out)
    seeds = ctx.output("student").seeds
    if len(seeds) > 1:  # every seed's student on the same test split, the first being the stage's model
        students = {r.seed: ctx.track.load_model(ctx.input("student") / r.dir) for r in seeds}
        metrics["student_seeds"] = ctx.track.seed_metrics(models["teacher"], students, test)
    (ctx.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    headline = ctx.track.headline(metrics) | seed_headline(metrics.get("student_seeds", {}))
    return ctx.manifest(metrics=headline, info=Evaluated(teacher=name))
