"""select: rank the teacher candidates and choose the teacher(s) the student learns from."""
from __future__ import annotations

import json

import polars as pl

from kdflow.metrics.plots import plot_ranking_png
from kdflow.select import choose, rank
from schemas.manifest import Manifest
from schemas.outputs import Selection
from schemas.params import SelectParams
from tasks.common import StageContext

CHOSEN_FILE = "chosen.json"


def run(params: SelectParams, ctx: StageContext) -> Manifest:
    ds = ctx.track.load(ctx.input("prepare"))
    names = list(ctx.output("teachers").candidates)
    candidates = {n: ctx.track.load_model(ctx.input("teachers") / n) for n in names}
    data = ctx.track.selection_data(ds, ctx.seed, ctx.device)
    kwargs = {}
    if params.strategy == "probe":
        student, p = ctx.pipeline.student, params.probe
        kwargs = dict(student_factory=lambda: ctx.track.create_model(student.arch, ds, student.args),
                      epochs=p.epochs, subset=p.subset, temperature=p.temperature, alpha=p.alpha)
    rows = rank(candidates, data, params.strategy, **kwargs)
    pl.DataFrame(rows).write_parquet(ctx.out / "ranking.parquet")
    teachers, weights = choose(rows, params.top, params.weight_temperature)
    chosen = Selection(teachers=teachers, weights=weights, strategy=params.strategy)
    (ctx.out / CHOSEN_FILE).write_text(json.dumps(chosen.model_dump(exclude={"ranking"}), indent=1) + "\n")
    plot_ranking_png(ctx.out / "figures" / "ranking.png", rows, teachers)
    chosen.ranking = rows
    return ctx.manifest(metrics={"best_score": rows[0]["score"]}, info=chosen)
