"""student: train the declared student from the condensed data and the cached teacher logits."""
from __future__ import annotations

import shutil

import torch

from kdflow import progress
from kdflow.cache import CacheReader
from kdflow.cache.replay import CachedBatches
from kdflow.condense.nrr_dd import dbr_batch
from kdflow.data.dataset import Dataset, load_dataset
from kdflow.errors import KdflowError
from kdflow.losses import create_loss
from kdflow.models import count_params, create_model
from kdflow.models.io import save_model
from kdflow.train.device import resolve_device, seed_everything
from kdflow.train.loop import fit
from schemas.manifest import Manifest
from schemas.params import LossParams, StudentParams
from tasks.common import StageContext, save_history


def loss_kwargs(loss: LossParams, capture_temperature: float, train_meta: dict) -> dict:
    if loss.name == "ce":
        return {}
    if loss.name == "dbr":  # distances were stored at nrr_dd's temperature; the student must match it
        return {"temperature": float(train_meta.get("dbr_temperature", 1.0)), "beta": loss.beta}
    kwargs = {"temperature": loss.temperature, "alpha": loss.alpha}
    if loss.name == "topk_kd":
        kwargs["capture_temperature"] = capture_temperature
    return kwargs


def training_tensors(train: Dataset, loss: str) -> dict[str, torch.Tensor]:
    """Inputs and labels for the loss: the stored DBR views for ``dbr``, else the condensed
    samples; a ``weight`` extra (e.g. Mirage frequencies) weighs each sample's loss terms."""
    tensors = dbr_batch(train) if loss == "dbr" else {"x": train.features, "y": train.labels}
    if "weight" in train.extras:
        tensors["weight"] = train.extras["weight"]
    return tensors


def cache_readers(ctx: StageContext) -> tuple[list[CacheReader], list[float]]:
    """The verified logit cache of every chosen teacher (one folder each when several) and the
    teachers' weights, from the logits stage's manifest (each cache's ``cache.json`` is part of
    the stage output, covered by its sha256)."""
    entries = ctx.upstream["logits"].info["teachers"]
    readers = [CacheReader(ctx.input("logits") / e["dir"]) for e in entries]
    for reader in readers:
        reader.verify()
    return readers, [float(e["weight"]) for e in entries]


def run(params: StudentParams, ctx: StageContext) -> Manifest:
    train = load_dataset(ctx.input("condense"))
    val = load_dataset(ctx.input("prepare")).split("val")
    readers, weights = cache_readers(ctx)
    tensors = training_tensors(train, params.loss.name)
    batches = CachedBatches(
        tensors, readers, weights, combine_mode=params.combine, temperature=params.loss.temperature,
        seed=ctx.seed, memory_limit=int(params.cache_in_memory_mb * 2**20),
    )
    kwargs = loss_kwargs(params.loss, readers[0].info["capture_temperature"], train.meta)
    loss = create_loss(params.loss.name, **kwargs)
    provided = batches(torch.arange(1), 1)
    missing = [k for k in loss.needs if k not in provided]
    if missing:
        raise KdflowError(f"student.loss.name: {params.loss.name!r} needs {missing} but the cache provides {sorted(provided)}")
    seed_everything(ctx.seed)
    model = create_model(params.arch, train.input_shape, train.num_classes, **params.args)
    t = params.train
    result = fit(
        model, tensors, loss, val=(val.features, val.labels), batch_fn=batches, epochs=t.epochs, lr=t.lr,
        weight_decay=t.weight_decay, batch_size=t.batch_size, patience=t.patience, seed=ctx.seed,
        device=resolve_device(params.device), checkpoint_dir=ctx.work, resume=ctx.resume,
        fingerprint=ctx.fingerprint, on_epoch=progress.epochs(ctx.progress, "student", t.epochs),
    )
    save_model(model, ctx.out)
    save_history(ctx.out / "history.json", result.history)
    metrics = {"best_val_accuracy": result.best_val_accuracy or 0.0, "epochs_run": result.epochs_run, "params": count_params(model)}
    info = {"best_epoch": result.best_epoch, "resumed_from": result.resumed_from, "stopped_early": result.stopped_early}
    manifest = ctx.manifest(metrics=metrics, info=info)
    shutil.rmtree(ctx.work, ignore_errors=True)  # the checkpoint served its purpose
    return manifest
