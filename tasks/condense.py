"""condense: shrink the training split with a registered method (the student trains on it)."""
from __future__ import annotations

from kdflow.condense import CONDENSERS, condense
from schemas.manifest import Manifest
from schemas.outputs import Condensed
from schemas.params import CondenseParams
from tasks.common import StageContext


def run(params: CondenseParams, ctx: StageContext) -> Manifest:
    train = ctx.track.load(ctx.input("prepare")).split("train")
    teacher_name = ctx.output("select").best
    needs_teacher = CONDENSERS.meta(params.method).get("needs_teacher", True)
    teacher = ctx.track.load_model(ctx.input("teachers") / teacher_name) if needs_teacher else None
    small = condense(
        params.method, train, teacher=teacher, seed=ctx.seed, device=ctx.device,
        report=lambda done, total: ctx.report(f"condense {params.method}", done, total),
        **params.model_dump(exclude={"method"}),
    )
    small.meta.update(condensed_by=params.method, teacher=teacher_name)
    ctx.track.save(small, ctx.out)
    ipc = getattr(params, "ipc", None)
    ctx.track.condense_figure(small, ctx.out, f"condense: {params.method}" + (f", ipc {ipc}" if ipc else ""))
    metrics = {"n_train": len(train), "n_condensed": len(small), "ratio": len(small) / len(train)}
    return ctx.manifest(metrics=metrics, info=Condensed(method=params.method, teacher=teacher_name))
