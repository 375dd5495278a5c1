"""teachers: train each declared candidate (early stopping on validation) or load its checkpoint."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from kdflow import progress
from kdflow.data.dataset import Dataset
from kdflow.errors import ModelError
from kdflow.models import count_params, model_bytes
from kdflow.train.device import seed_everything
from kdflow.train.loop import fit
from schemas.manifest import Manifest
from schemas.outputs import Candidate, Teachers
from schemas.params import TeacherParams
from tasks.common import StageContext, save_history

log = logging.getLogger(__name__)


def _load(candidate: TeacherParams, ctx: StageContext, out: Path) -> tuple[nn.Module, dict]:
    try:
        model = ctx.track.load_checkpoint(candidate.checkpoint, ctx.root, out)
    except ModelError as exc:
        raise ModelError(f"teachers[{candidate.name}].{exc}") from None
    return model, {"origin": "checkpoint", "checkpoint": candidate.checkpoint}


def _train(candidate: TeacherParams, index: int, ctx: StageContext, ds: Dataset, out: Path) -> tuple[nn.Module, dict]:
    seed_everything(ctx.seed + index, deterministic=ctx.deterministic)
    train, val = ds.split("train"), ds.split("val")
    model = ctx.track.create_model(candidate.arch, ds, candidate.args)
    t = candidate.train
    result = fit(
        model, ctx.track.fit_inputs(train), ctx.track.teacher_loss(),
        val=ctx.track.val_pair(val), epochs=t.epochs, lr=t.lr, weight_decay=t.weight_decay,
        batch_size=t.batch_size, patience=t.patience, seed=ctx.seed + index, device=ctx.device,
        val_metric=ctx.track.val_metric(), on_epoch=progress.epochs(ctx.progress, f"teacher {candidate.name}", t.epochs),
    )
    ctx.track.save_model(model, out)
    save_history(out / "history.json", result.history)
    return model, {"origin": "trained", "best_epoch": result.best_epoch, "epochs_run": result.epochs_run}


def run(params: list[TeacherParams], ctx: StageContext) -> Manifest:
    ds = ctx.track.load(ctx.input("prepare"))
    val = ds.split("val")
    candidates, metrics = {}, {}
    for i, cand in enumerate(params):
        out = ctx.out / cand.name
        out.mkdir()
        model, meta = _load(cand, ctx, out) if cand.checkpoint else _train(cand, i, ctx, ds, out)
        scores = ctx.track.val_score(model, val, ctx.device)
        meta.update(scores, params=count_params(model), bytes=model_bytes(model))
        (out / "teacher.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        candidates[cand.name] = Candidate(**meta)
        metrics.update({f"{cand.name}.{k}": v for k, v in scores.items()})
        log.info("teacher %s: %s, %d params", cand.name, scores, meta["params"])
    return ctx.manifest(metrics=metrics, info=Teachers(candidates=candidates))
