"""teachers: train each declared candidate (early stopping on validation) or load its checkpoint."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from kdflow import progress
from kdflow.data.dataset import load_dataset
from kdflow.errors import ModelError
from kdflow.metrics import accuracy
from kdflow.models import count_params, create_model, model_bytes
from kdflow.models.io import load_model, save_model
from kdflow.train.device import resolve_device, seed_everything
from kdflow.train.loop import fit, predict
from kdflow.losses import create_loss
from schemas.manifest import Manifest
from schemas.params import TeacherParams
from tasks.common import StageContext, save_history

log = logging.getLogger(__name__)


def _load(candidate: TeacherParams, root: Path, out: Path):
    src = (root / candidate.checkpoint).resolve()
    if not src.is_dir():
        raise ModelError(f"teachers[{candidate.name}].checkpoint: folder not found: {src}")
    model = load_model(src)
    shutil.copytree(src, out, dirs_exist_ok=True)
    return model, {"origin": "checkpoint", "checkpoint": candidate.checkpoint}


def _train(candidate: TeacherParams, index: int, ctx: StageContext, ds, out: Path):
    seed_everything(ctx.seed + index)
    train, val = ds.split("train"), ds.split("val")
    model = create_model(candidate.arch, ds.input_shape, ds.num_classes, **candidate.args)
    t = candidate.train
    result = fit(
        model, {"x": train.features, "y": train.labels}, create_loss("ce"),
        val=(val.features, val.labels), epochs=t.epochs, lr=t.lr, weight_decay=t.weight_decay,
        batch_size=t.batch_size, patience=t.patience, seed=ctx.seed + index, device=resolve_device("auto"),
        on_epoch=progress.epochs(ctx.progress, f"teacher {candidate.name}", t.epochs),
    )
    save_model(model, out)
    save_history(out / "history.json", result.history)
    return model, {"origin": "trained", "best_epoch": result.best_epoch, "epochs_run": result.epochs_run}


def run(params: list[TeacherParams], ctx: StageContext) -> Manifest:
    ds = load_dataset(ctx.input("prepare"))
    val = ds.split("val")
    info, metrics = {"candidates": {}}, {}
    for i, cand in enumerate(params):
        out = ctx.out / cand.name
        out.mkdir()
        model, meta = _load(cand, ctx.root, out) if cand.checkpoint else _train(cand, i, ctx, ds, out)
        acc = accuracy(predict(model, val.features), val.labels)
        meta.update(val_accuracy=acc, params=count_params(model), bytes=model_bytes(model))
        (out / "teacher.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        info["candidates"][cand.name] = meta
        metrics[f"{cand.name}.val_accuracy"] = acc
        log.info("teacher %s: val accuracy %.4f, %d params", cand.name, acc, meta["params"])
    return ctx.manifest(metrics=metrics, info=info)
