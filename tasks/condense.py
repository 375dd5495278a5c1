"""condense: shrink the training split with a registered method (the student trains on it)."""
from __future__ import annotations

from kdflow.condense import condense
from kdflow.condense.grid import plot_class_grid
from kdflow.data.dataset import load_dataset, save_dataset
from kdflow.models.io import load_model
from kdflow.train.device import resolve_device
from schemas.manifest import Manifest
from schemas.params import CondenseParams
from tasks.common import StageContext
from tasks.select import chosen_teacher


def run(params: CondenseParams, ctx: StageContext) -> Manifest:
    train = load_dataset(ctx.input("prepare")).split("train")
    teacher_name = chosen_teacher(ctx)
    teacher = load_model(ctx.input("teachers") / teacher_name)
    options = params.model_dump(exclude={"method", "ipc", "scale_min", "scale_max"})  # methods ignore what they do not use
    small = condense(
        params.method, train, teacher=teacher, ipc=params.ipc, seed=ctx.seed, device=resolve_device("auto"),
        scale=(params.scale_min, params.scale_max), **options,
        report=lambda done, total: ctx.report(f"condense {params.method}", done, total),
    )
    small.meta.update(condensed_by=params.method, teacher=teacher_name)
    save_dataset(small, ctx.out)
    if small.modality == "image" and small.features.dim() == 4:  # a picture of what the student sees
        plot_class_grid(ctx.out / "figures" / "samples.png", small.features, small.labels, small.num_classes,
                        title=f"condense: {params.method}" + (f", ipc {params.ipc}" if params.method != "none" else ""))
    metrics = {"n_train": len(train), "n_condensed": len(small), "ratio": len(small) / len(train)}
    return ctx.manifest(metrics=metrics, info={"method": params.method, "teacher": teacher_name})
