"""student: train the declared student from the condensed data and the cached teacher signal."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kdflow import progress
from kdflow.cache import CacheReader
from kdflow.cache.replay import CachedBatches
from kdflow.errors import ParamsError
from kdflow.losses import LOSSES, build_loss
from kdflow.models import count_params
from kdflow.models.io import init_weights
from kdflow.tracks.compat import compatibility
from kdflow.train.device import seed_everything
from kdflow.train.loop import fit
from schemas.manifest import Manifest
from schemas.outputs import Logits, SeedRun, Student
from schemas.params import StudentParams
from tasks.common import StageContext, save_history


log = logging.getLogger(__name__)


def cache_readers(ctx: StageContext, logits: Logits) -> tuple[list[CacheReader], list[float]]:
    """The verified cache of every chosen teacher (one folder each when several) and the
    teachers' weights (each cache's ``cache.json`` is part of the stage output, covered by its sha256)."""
    readers = [CacheReader(ctx.input("logits") / c.dir) for c in logits.teachers]
    for reader in readers:
        reader.verify()
    return readers, [c.weight for c in logits.teachers]


def seed_dir(seed: int) -> str:
    """Folder (relative to the stage output) of the student trained with ``seed`` after the first."""
    return f"seeds/seed-{seed}"


def run(params: StudentParams, ctx: StageContext) -> Manifest:
    train = ctx.track.load(ctx.input("condense"))
    val = ctx.track.load(ctx.input("prepare")).split("val")
    logits = ctx.output("logits")
    readers, weights = cache_readers(ctx, logits)
    problems = compatibility(ctx.track, loss=params.loss.name, fmt=readers[0].format,
                             method=ctx.output("condense").method, views=logits.views)
    if problems:
        raise ParamsError(problems, source="student")
    if params.tokenizer is not None:  # the student's own ids for the same text (lm track)
        train, val = ctx.track.student_tokens(params.tokenizer, ctx.root, ctx.work, train, val)
    loss_cls = LOSSES.get(params.loss.name)
    tensors = ctx.track.fit_inputs(train, loss_cls)
    # a loss whose inputs change per epoch (DBR: a different stored view each epoch)
    per_epoch = loss_cls.batches(train) if hasattr(loss_cls, "batches") else None
    loss = build_loss(params.loss, readers[0].info, train.meta)
    # the first seed's student is the stage's model (registered in MLflow); the others go to seeds/seed-<s>/
    seeds = [ctx.seed + i for i in range(params.seeds)]
    runs = []
    for i, seed in enumerate(seeds):
        out, work = (ctx.out, ctx.work) if i == 0 else (ctx.out / seed_dir(seed), ctx.work / seed_dir(seed))
        label = "student" if params.seeds == 1 else f"student seed {seed}"
        runs.append(train_one(params, ctx, seed, train, val, tensors, readers, weights, logits, loss, out, work, label,
                              per_epoch))
    first = runs[0]
    score = (ctx.track.val_metric() or ("accuracy",))[0]
    metrics = {f"best_val_{score}": first["best_val"], "epochs_run": first["epochs_run"], "params": first["params"]}
    if params.seeds > 1:
        vals = [r["best_val"] for r in runs]
        metrics |= {f"best_val_{score}_mean": sum(vals) / len(vals), f"best_val_{score}_min": min(vals),
                    f"best_val_{score}_max": max(vals)}
    info = Student(best_epoch=first["best_epoch"], resumed_from=first["resumed_from"],
                   stopped_early=first["stopped_early"], rounds=first["rounds"],
                   seeds=[SeedRun(seed=seed, dir="." if i == 0 else seed_dir(seed), best_epoch=r["best_epoch"],
                                  best_val=r["best_val"], epochs_run=r["epochs_run"], resumed_from=r["resumed_from"])
                          for i, (seed, r) in enumerate(zip(seeds, runs))])
    ctx.clear_work = True  # the checkpoints go once the output is committed (execute_stage), not before
    return ctx.manifest(metrics=metrics, info=info)


def _warn_if_larger(ctx: StageContext, logits: Logits, student_params: int) -> None:
    """Distillation makes models smaller: say so when the student has more parameters than its teacher."""
    name = logits.teachers[0].teacher
    teacher = ctx.output("teachers").candidates[name].params
    if teacher and student_params > teacher:
        log.warning("student: %s parameters, more than the teacher %r (%s: %.1fx its size); check student.arch/args",
                    f"{student_params:,}", name, f"{teacher:,}", student_params / teacher)


def train_one(params: StudentParams, ctx: StageContext, seed: int, train: Any, val: Any, tensors: dict[str, Any],
              readers: list[CacheReader], weights: list[float], logits: Logits, loss: Any, out: Path, work: Path,
              label: str, per_epoch: Any = None) -> dict[str, Any]:
    """Train one student with ``seed`` into ``out`` (checkpoints in ``work``, resumable); what happened."""
    batches = CachedBatches(
        tensors, readers, weights, combine_mode=params.combine, temperature=getattr(params.loss, "temperature", 1.0),
        seed=seed, memory_limit=int(params.cache_in_memory_mb * 2**20), inputs=per_epoch,
    )
    seed_everything(seed, deterministic=ctx.deterministic)
    model = ctx.track.create_model(params.arch, train, params.args,
                                   teacher=ctx.input("teachers") / logits.teachers[0].teacher)
    if seed == ctx.seed:
        _warn_if_larger(ctx, logits, count_params(model))
    if params.init:  # a checkpoint instead of random weights (the seed still orders the batches)
        init_weights(model, ctx.root / params.init)
    t = params.train
    work.mkdir(parents=True, exist_ok=True)
    result = fit(
        model, tensors, loss, val=ctx.track.val_pair(val), batch_fn=batches, epochs=t.epochs, lr=t.lr,
        weight_decay=t.weight_decay, batch_size=t.batch_size, patience=t.patience, seed=seed,
        device=ctx.device, checkpoint_dir=work, resume=ctx.resume, val_metric=ctx.track.val_metric(),
        fingerprint=ctx.fingerprint, on_epoch=progress.epochs(ctx.progress, label, t.epochs),
    )
    history = list(result.history)
    rounds = []
    if params.on_policy.rounds:  # the student writes, the teacher grades (tracks with on-policy rounds)
        o = params.on_policy
        rounds = ctx.track.on_policy_rounds(
            model, train=train, val=val, teacher=ctx.input("teachers") / logits.teachers[0].teacher, loss=loss,
            rounds=o.rounds, prompt_tokens=o.prompt_tokens, max_blocks=o.max_blocks, epochs=o.epochs,
            temperature=o.temperature, cache=readers[0].info, lr=t.lr, weight_decay=t.weight_decay,
            batch_size=t.batch_size, seed=seed, device=ctx.device, work=work / "on-policy",
            report=lambda done, total: ctx.report("on-policy rounds", done, total))
        history += [{**row, "round": r["round"]} for r in rounds for row in r["history"]]
    out.mkdir(parents=True, exist_ok=True)
    ctx.track.save_model(model, out)
    save_history(out / "history.json", history)
    return {"best_val": result.best_val_accuracy or 0.0, "epochs_run": result.epochs_run, "params": count_params(model),
            "best_epoch": result.best_epoch, "resumed_from": result.resumed_from, "stopped_early": result.stopped_early,
            "rounds": [{k: v for k, v in r.items() if k != "history"} for r in rounds]}
