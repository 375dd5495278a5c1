"""The training loop shared by teachers and students.

AdamW with a per-epoch cosine schedule, validation accuracy per epoch, best-epoch restore,
early stopping, and atomic per-epoch checkpoints that resume bit-identically on CPU: every
epoch reseeds torch and the shuffling generator from ``(seed, epoch)``.

Under torchrun (a process group of several ranks, ``kdflow.train.distributed``) the same loop
trains with ``DistributedDataParallel``: every rank draws the same global order and takes its share
of each batch, the loss is scaled so the averaged gradient is the whole batch's, and history,
validation and early stopping follow rank 0, which alone writes the checkpoint.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdflow.errors import DataError, KdflowError
from kdflow.train import distributed
from kdflow.train.device import autocast, eval_mode

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_VERSION = 1
Pair = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
BatchFn = Callable[[torch.Tensor, int], dict[str, torch.Tensor]]  # (indices [B], epoch) -> batch
ValMetric = tuple[str, Callable[..., float]]  # (name, score(model, x, y, batch_size=, device=)), higher is better


@dataclass
class FitResult:
    """What ``fit`` did.

    Attributes:
        history: one row per epoch (``epoch`` counts from 1): ``train_loss``, ``train_<term>`` for
            each other loss term, ``val_accuracy`` (with ``val``), ``lr``, ``seconds``.
        best_epoch: the epoch whose weights the model holds on return (the last without ``val``).
        best_val_accuracy: validation score of ``best_epoch`` (accuracy unless ``val_metric``), or
            None without ``val``.
        epochs_run: epochs completed in total, including those done before a resume.
        resumed_from: the last completed epoch of the checkpoint resumed from, or None.
        stopped_early: whether ``patience`` ended the run.
    """

    history: list[dict[str, float]]
    best_epoch: int
    best_val_accuracy: float | None
    epochs_run: int
    resumed_from: int | None
    stopped_early: bool


@dataclass
class _Progress:
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int = 0
    best_val_accuracy: float | None = None
    stopped_early: bool = False


def epoch_seeds(seed: int, epoch: int) -> tuple[int, int]:
    """Two independent 63-bit seeds (torch global RNG, shuffling) derived from ``(seed, epoch)``."""
    a, b = np.random.SeedSequence([seed % 2**64, epoch]).generate_state(2, dtype=np.uint64)
    return int(a >> 1), int(b >> 1)


def fit(
    model: nn.Module,
    train: dict[str, torch.Tensor],
    loss_fn: LossFn,
    *,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    batch_size: int,
    patience: int | None = None,
    seed: int,
    device: torch.device,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    fingerprint: str = "",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    batch_fn: BatchFn | None = None,
    val_metric: ValMetric | None = None,
) -> FitResult:
    """Train ``model`` in place on ``train`` and return the history.

    Args:
        model: any module mapping ``x`` to logits ``[B, K]``.
        train: tensors sharing the first axis ``N``: ``x``, int64 ``y``, and any per-sample
            extras (teacher logits/indices, weights, ...); each batch slices all of them.
        loss_fn: ``loss_fn(logits_fp32, batch)`` returning named terms, ``"loss"`` the total.
        val: ``(x, y)`` for per-epoch accuracy, best-epoch restore and early stopping.
        epochs: total epochs (a resumed run counts the checkpoint's epochs too).
        lr: peak AdamW learning rate, cosine-annealed to 0 over ``epochs``.
        weight_decay: AdamW decoupled weight decay.
        batch_size: samples per optimiser step.
        patience: stop after this many epochs without a better ``val`` accuracy.
        seed: determines shuffling and every random op of each epoch.
        device: where to train; inputs are moved per batch (under DDP on CUDA, each rank
            trains on ``cuda:LOCAL_RANK``).
        checkpoint_dir: write ``checkpoint.pt`` there atomically after every epoch.
        resume: continue from ``checkpoint_dir``'s checkpoint when it matches this run.
        fingerprint: identifies the run; a checkpoint with another fingerprint is ignored.
        on_epoch: called with each history row, after the checkpoint is written.
        batch_fn: ``batch_fn(indices, epoch)`` builds each batch instead of slicing ``train``
            (e.g. replayed augmented views and teacher rows read from a cache); ``train`` then
            only fixes N and is checked. It must be a pure function of its arguments (and of
            the torch RNG, which is seeded per epoch) for resumed runs to stay bit-identical.
        val_metric: ``(name, score(model, x, y, batch_size=, device=))`` on ``val``, higher is better, recorded as
            ``val_<name>``; default top-1 accuracy (``val_accuracy``) with int64 class labels.
    """
    n = _check_train(train, batch_size, epochs, classes=val_metric is None)
    val = _check_val(val)
    device = distributed.train_device(device)
    main = distributed.is_main()
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    run_key = {"fingerprint": fingerprint, "epochs": epochs, "lr": lr, "weight_decay": weight_decay,
               "batch_size": batch_size, "patience": patience, "seed": seed, "n": n}
    path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    progress, start = _Progress(), 0
    if path is not None and resume:
        start = _resume(path, run_key, model, optimizer, scheduler, progress, loss_fn)
    net = distributed.wrap(model, device)  # DDP under a process group of several ranks
    for epoch in range(start + 1, epochs + 1):
        if progress.stopped_early:
            break
        row = _run_epoch(net, train, loss_fn, optimizer, n, batch_size, seed, epoch, device,
                         batch_fn)
        scheduler.step()
        distributed.sync_buffers(model)  # every rank validates the same weights, rank 0's row wins
        raw = _swap_in_average(model, loss_fn)  # a loss's moving average is what is validated and kept
        if val is not None:
            eval_bs = max(batch_size, 512)
            if val_metric is None:
                row["val_accuracy"] = accuracy_of(model, *val, batch_size=eval_bs, device=device)
            else:
                row[f"val_{val_metric[0]}"] = val_metric[1](model, *val, batch_size=eval_bs, device=device)
        row = distributed.from_main(row)  # every rank keeps rank 0's history and decisions
        _track_best(progress, model, row, epoch, patience, f"val_{val_metric[0]}" if val_metric else "val_accuracy")
        if raw is not None:
            model.load_state_dict(raw)  # training (and its checkpoint) continues on the raw weights
        progress.history.append(row)
        if path is not None and main:
            _save_checkpoint(path, run_key, epoch, model, optimizer, scheduler, progress, loss_fn)
        if main:
            _log_epoch(row, epochs, progress.stopped_early)
        if on_epoch is not None:
            on_epoch(row)
    distributed.barrier()  # no rank leaves (and may clear the checkpoint folder) while rank 0 writes
    if progress.best_state is not None:
        model.load_state_dict(progress.best_state)
    else:
        _swap_in_average(model, loss_fn)
    return FitResult(
        history=progress.history,
        best_epoch=progress.best_epoch,
        best_val_accuracy=progress.best_val_accuracy,
        epochs_run=len(progress.history),
        resumed_from=start or None,
        stopped_early=progress.stopped_early,
    )


def _check_train(train: dict[str, torch.Tensor], batch_size: int, epochs: int, classes: bool = True) -> int:
    missing = [k for k in ("x", "y") if k not in train]
    if missing:
        raise DataError(f"training data: missing tensor(s) {missing} (have {sorted(train)})")
    n = int(train["x"].shape[0])
    bad = {k: int(v.shape[0]) for k, v in train.items() if v.shape[0] != n}
    if bad:
        raise DataError(f"training data: tensors must share the first axis N={n} of 'x' ({bad})")
    if n == 0:
        raise DataError("training data: no samples")
    if classes and train["y"].dtype != torch.int64:
        raise DataError(f"training data: 'y' must be int64 class indices (got {train['y'].dtype})")
    if batch_size < 1 or epochs < 1:
        raise KdflowError(f"fit: batch_size and epochs must be >= 1 (got {batch_size}, {epochs})")
    return n


def _check_val(val: Pair | None) -> Pair | None:
    if val is not None and len(val[1]) == 0:
        logger.warning("empty validation set: no val accuracy, best-epoch restore or early stop")
        return None
    return val


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _run_epoch(
    model: nn.Module,
    train: dict[str, torch.Tensor],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    n: int,
    batch_size: int,
    seed: int,
    epoch: int,
    device: torch.device,
    batch_fn: BatchFn | None = None,
) -> dict[str, float]:
    """One pass over ``train`` in an order fixed by ``(seed, epoch)``; returns the history row.

    Under DDP each rank runs its share of every batch (``distributed.shard``) and the row holds
    the means over all ranks."""
    t0 = time.perf_counter()
    torch_seed, shuffle_seed = epoch_seeds(seed, epoch)
    torch.manual_seed(torch_seed)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed))
    lr = float(optimizer.param_groups[0]["lr"])
    rank, world_size = distributed.world()
    model.train()
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        if len(idx) == 1 and n > 1:  # a lone sample breaks batch norm; it is seen in other epochs
            continue
        mine, share = distributed.shard(idx, rank, world_size)  # (idx, len(idx)) in one process
        cpu = batch_fn(mine, epoch) if batch_fn is not None else {k: v[mine] for k, v in train.items()}
        batch = {k: _to_device(v, device) for k, v in cpu.items()}
        # DDP averages over ranks: weight this share's mean loss by its part of the batch
        terms = _step(model, batch, loss_fn, optimizer, device, scale=world_size * share / len(idx))
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float() * share
        seen += share
    *totals, seen = distributed.all_sum([*(float(v) for v in sums.values()), seen])  # over ranks
    row = {"epoch": epoch, **{f"train_{k}": total / seen for k, total in zip(sums, totals)}}
    if not math.isfinite(row["train_loss"]):
        loss = row["train_loss"]
        raise KdflowError(f"training diverged at epoch {epoch}: loss is {loss}; lower lr")
    return {**row, "lr": lr, "seconds": time.perf_counter() - t0}


def _step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Forward under autocast, loss in float32, backward of ``scale * loss``, optimiser step.

    A loss with a ``run_model(model, batch)`` method runs the model itself (training objectives that
    call it several times, at inputs they draw: diffusion's denoising, consistency and
    distribution-matching losses) and returns the terms."""
    if hasattr(loss_fn, "run_model"):
        with autocast(device):
            terms = loss_fn.run_model(model, batch)
    else:
        with autocast(device):
            logits = model(batch["x"])  # [B, K]
        terms = loss_fn(logits.float(), batch)
    if "loss" not in terms:
        raise KdflowError(f"loss function returned {sorted(terms)}; it must return a 'loss' total")
    optimizer.zero_grad(set_to_none=True)
    (terms["loss"] if scale == 1.0 else terms["loss"] * scale).backward()
    optimizer.step()
    return terms


def _swap_in_average(model: nn.Module, loss_fn: LossFn) -> dict[str, torch.Tensor] | None:
    """Load a loss's moving average of the weights (``loss_fn.averaged_state(model)``, e.g. DMD's
    ``ema``) into ``model``; the raw weights it replaced, or None when the loss keeps none."""
    averaged = getattr(loss_fn, "averaged_state", None)
    state = averaged(model) if averaged is not None else None
    if state is None:
        return None
    raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return raw


def _track_best(progress: _Progress, model: nn.Module, row: dict[str, float], epoch: int,
                patience: int | None, key: str = "val_accuracy") -> None:
    """Keep the weights of the best val score (first epoch on ties); flag early stopping."""
    acc = row.get(key)
    if acc is None:
        progress.best_epoch = epoch
        return
    if progress.best_val_accuracy is None or acc > progress.best_val_accuracy:
        progress.best_val_accuracy, progress.best_epoch = acc, epoch
        progress.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    elif patience is not None and epoch - progress.best_epoch >= patience:
        progress.stopped_early = True


def _log_epoch(row: dict[str, float], epochs: int, stopped: bool) -> None:
    terms = " ".join(f"{k}={v:.4f}" for k, v in row.items() if k not in ("epoch", "lr", "seconds"))
    epoch, lr, seconds = row["epoch"], row["lr"], row["seconds"]
    logger.info("epoch %d/%d %s lr=%.3g (%.1fs)", epoch, epochs, terms, lr, seconds)
    if stopped:
        logger.info("early stopping after epoch %d: no val improvement", row["epoch"])


def _save_checkpoint(path: Path, run_key: dict[str, Any], epoch: int, model: nn.Module,
                     optimizer: torch.optim.Optimizer, scheduler: Any, progress: _Progress,
                     loss_fn: Any = None) -> None:
    """Write the checkpoint to a temporary sibling, fsync it, then rename it into place. A loss
    with training state of its own (``state_dict()``: DMD's fake score, consistency's EMA target)
    is saved with it."""
    state = {
        "version": CHECKPOINT_VERSION,
        "run_key": run_key,
        "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": progress.history,
        "best_state": progress.best_state,
        "best_epoch": progress.best_epoch,
        "best_val_accuracy": progress.best_val_accuracy,
        "stopped_early": progress.stopped_early,
        "loss": loss_fn.state_dict() if hasattr(loss_fn, "state_dict") else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_checkpoint(path: Path, run_key: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it is readable and belongs to this run, else None (logged)."""
    if not path.is_file():
        logger.info("no checkpoint at %s; starting fresh", path)
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        logger.warning("checkpoint %s is unreadable (%s); starting fresh", path, exc)
        return None
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        logger.warning("checkpoint %s has an unknown format; starting fresh", path)
        return None
    theirs = ckpt.get("run_key", {})
    if theirs != run_key:
        diff = sorted(k for k in run_key if theirs.get(k) != run_key[k])
        logger.warning("checkpoint %s is from another run (%s differ); starting fresh", path, diff)
        return None
    return ckpt


def _resume(path: Path, run_key: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any, progress: _Progress, loss_fn: Any = None) -> int:
    """Restore the training state from ``path``; returns the last completed epoch (0 if fresh).

    Under DDP rank 0 reads the checkpoint and hands it to the other ranks."""
    ckpt = distributed.from_main(_read_checkpoint(path, run_key) if distributed.is_main() else None)
    if ckpt is None:
        return 0
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("loss") and hasattr(loss_fn, "load_state_dict"):
            loss_fn.load_state_dict(ckpt["loss"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise KdflowError(
            f"checkpoint {path} does not fit this model ({exc}); delete it to start fresh"
        ) from None
    scheduler.load_state_dict(ckpt["scheduler"])
    progress.history = list(ckpt["history"])
    progress.best_state = ckpt["best_state"]
    progress.best_epoch = int(ckpt["best_epoch"])
    progress.best_val_accuracy = ckpt["best_val_accuracy"]
    progress.stopped_early = bool(ckpt["stopped_early"])
    logger.info("resumed from %s after epoch %d", path, ckpt["epoch"])
    return int(ckpt["epoch"])


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _batched(model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             batch_size: int, device: torch.device | None) -> torch.Tensor:
    """``fn`` over ``x`` in batches, in eval mode without autograd; float32 results on CPU."""
    device = device if device is not None else _device_of(model)
    model.to(device)
    outs = []
    with eval_mode(model), torch.inference_mode(), autocast(device):
        for i in range(0, max(len(x), 1), batch_size):
            outs.append(fn(x[i : i + batch_size].to(device)).float().cpu())
    return torch.cat(outs)


def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 512,
            device: torch.device | None = None) -> torch.Tensor:
    """Logits ``[N, K]`` (float32, CPU).

    ``device`` defaults to the model's; a model elsewhere is moved there (in place).
    """
    return _batched(model, model, x, batch_size, device)


def extract_features(model: nn.Module, x: torch.Tensor, *, batch_size: int = 512,
                     device: torch.device | None = None) -> torch.Tensor:
    """Penultimate features ``[N, D]`` from ``model.features`` (float32, CPU)."""
    return _batched(model, model.features, x, batch_size, device)


def accuracy_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512,
                device: torch.device | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``; NaN when empty."""
    if len(y) == 0:
        return float("nan")
    logits = predict(model, x, batch_size=batch_size, device=device)
    return float((logits.argmax(1) == y.cpu()).float().mean())
