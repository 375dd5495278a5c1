"""select: rank the teacher candidates and choose the teacher(s) the student learns from."""
from __future__ import annotations

import json

import polars as pl

from kdflow.data.dataset import load_dataset
from kdflow.metrics.plots import plot_ranking_png
from kdflow.models import create_model
from kdflow.models.io import load_model
from kdflow.select import SelectionData, choose, rank
from kdflow.train.device import resolve_device
from schemas.manifest import Manifest
from schemas.params import SelectParams
from tasks.common import StageContext

CHOSEN_FILE = "chosen.json"


def run(params: SelectParams, ctx: StageContext) -> Manifest:
    ds = load_dataset(ctx.input("prepare"))
    train, val = ds.split("train"), ds.split("val")
    names = list(ctx.upstream["teachers"].info["candidates"])
    candidates = {n: load_model(ctx.input("teachers") / n) for n in names}
    data = SelectionData(train.features, train.labels, val.features, val.labels, ds.num_classes, ctx.seed, resolve_device("auto"))
    kwargs = {}
    if params.strategy == "probe":
        student = ctx.pipeline.student
        p = params.probe
        kwargs = dict(
            student_factory=lambda: create_model(student.arch, ds.input_shape, ds.num_classes, **student.args),
            epochs=p.epochs, subset=p.subset, temperature=p.temperature, alpha=p.alpha,
        )
    rows = rank(candidates, data, params.strategy, **kwargs)
    pl.DataFrame(rows).write_parquet(ctx.out / "ranking.parquet")
    teachers, weights = choose(rows, params.top, params.weight_temperature)
    chosen = {"teachers": teachers, "weights": weights, "strategy": params.strategy}
    (ctx.out / CHOSEN_FILE).write_text(json.dumps(chosen, indent=1) + "\n")
    plot_ranking_png(ctx.out / "figures" / "ranking.png", rows, chosen["teachers"])
    return ctx.manifest(metrics={"best_score": rows[0]["score"]}, info={**chosen, "ranking": rows})


def chosen_teacher(ctx: StageContext) -> str:
    """Name of the first chosen teacher, read from the select stage's manifest."""
    return ctx.upstream["select"].info["teachers"][0]


def chosen_teachers(ctx: StageContext) -> list[tuple[str, float]]:
    """Every chosen teacher with its weight, best ranked first."""
    info = ctx.upstream["select"].info
    return list(zip(info["teachers"], info["weights"]))
