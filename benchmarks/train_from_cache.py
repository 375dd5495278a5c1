"""Epoch time of student training: plain CE vs. KD from the logit cache vs. KD with a live teacher.

Measures, in one run, on the same student, data, batch size, optimiser (AdamW) and per-epoch data
order, the seconds per epoch of

- ``plain``: cross-entropy on the labels, student only (the baseline);
- ``cache``: KD whose teacher rows come from a kdflow logit cache, written once beforehand with
  ``write_cache`` and read the way the student stage reads it: decoded into memory once by
  ``CachedBatches`` (caches up to ``student.cache_in_memory_mb``), each step gathering its rows by
  index; with ``--stream``, every step calls ``CacheReader.get(batch_indices)`` on the
  memory-mapped shards instead (larger caches), so decoding is part of the timed step (loss ``kd``
  for a dense cache, ``topk_kd`` for a top-k one);
- ``live``: KD with a teacher forward every step (eval mode, ``torch.inference_mode``, loss ``kd``);
- ``control`` (with ``--control``): plain CE again on its own student, the same work as ``plain``:
  control/plain shows how far the ratios move from noise and position alone;
- ``views`` (with ``--views K`` > 1): like ``cache``, from a cache of K augmented views per sample
  (random resized crops, ``logits.views``): every step replays one cached view per sample
  through ``CachedBatches`` (rebuilds the crop with ``apply_views``, reads that view's row).

All use one small timed loop (not ``kdflow.train.loop.fit``) that differs only in where the
teacher signal comes from. Each mode runs 1 untimed warm-up epoch then ``--epochs`` timed epochs,
``--repeats`` times, from the same initial student weights. By default the modes take turns step
by step (``--interleave step``; order rotated every epoch), so a burst of load from other
processes hits every mode alike; an epoch's time is the sum of its steps. ``--interleave epoch``
runs whole epochs in turn (the protocol before 2026-11-30). Epoch times are medians over all timed
epochs with their min and max; ``paired`` ratios divide epoch by epoch (same round). ``CPU
s/epoch`` is the same from ``time.thread_time`` (this thread's CPU time: with one torch thread,
time lost to other processes on a busy machine does not count), with its own cache/plain ratio.
``teacher s``
is the median part of an epoch spent getting the teacher keys (cache gather/decode, or the
forward). It also reports the one-time cost of the cache (teacher inference over the training
set plus ``write_cache``) and the number of epochs after which it is repaid vs. ``live``.
Ratios to watch: cache/plain (goal <= 1.05) and live/cache.

The teacher is randomly initialised unless ``--teacher-epochs`` > 0: its weights do not change the
cost of a forward pass. The cache is read right after being written, so its pages are usually in
the OS page cache (a warm read). On a busy machine, OpenMP threads that lose their core stall
small ops (a 128x10 log_softmax can take milliseconds); compare with ``--threads 1`` there.

Run from the repository root::

    .venv/bin/python benchmarks/train_from_cache.py --threads 1 --repeats 6 --out bench.json
    .venv/bin/python benchmarks/train_from_cache.py --data sklearn:digits --format topk --k 5
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from kdflow.cache import CacheReader, CachedBatches, write_cache, write_views
from kdflow.data.augment import Augment, apply_views, draw_views
from kdflow.data.sources import load_source
from kdflow.losses import Loss, create_loss
from kdflow.models import count_params, create_model
from kdflow.train.device import resolve_device, seed_everything
from kdflow.train.loop import epoch_seeds, fit, predict

Batch = dict[str, torch.Tensor]
TeacherFn = Callable[[torch.Tensor, torch.Tensor, int], Batch]  # (indices [B], x [B, ...], epoch) -> keys
MODES = ("plain", "cache", "live")
GOAL_CACHE_OVER_PLAIN = 1.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="mnist1d", help="data source spec (mnist1d, sklearn:digits)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per mode and repeat")
    p.add_argument("--repeats", type=int, default=3, help="repeats of every mode")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--format", choices=("dense", "topk", "topk_q8"), default="dense", help="cache format")
    p.add_argument("--k", type=int, default=5, help="kept classes of a topk cache")
    p.add_argument("--temperature", type=float, default=4.0, help="KD temperature")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto, ...")
    p.add_argument("--teacher-epochs", type=int, default=0,
                   help="train the teacher this many CE epochs first (0: random init)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where to write the cache (default: a temporary folder)")
    p.add_argument("--views", type=int, default=1,
                   help="K > 1 adds the 'views' mode: a cache of K augmented views per sample")
    p.add_argument("--stream", action="store_true",
                   help="cache mode reads every batch's rows from the memory-mapped shards (CacheReader.get), "
                        "as the student stage does for caches above student.cache_in_memory_mb; default: "
                        "decoded into memory once (CachedBatches), as it does below")
    p.add_argument("--interleave", choices=("step", "epoch"), default="step",
                   help="modes take turns step by step (default: load bursts hit all alike) or epoch by epoch")
    p.add_argument("--flush-denormal", action="store_true",
                   help="torch.set_flush_denormal(True): subnormal floats become 0 (x86 SSE3)")
    p.add_argument("--control", action="store_true",
                   help="add the 'control' mode: plain CE again on its own student (control/plain is the "
                        "noise floor of the ratios: 1 on a quiet machine)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.repeats < 1 or args.batch_size < 2:
        p.error("--epochs and --repeats must be >= 1, --batch-size >= 2")
    return args


def build_models(shape: tuple[int, ...], num_classes: int,
                 seed: int) -> tuple[nn.Module, nn.Module]:
    """The teacher and the student, seeded."""
    torch.manual_seed(seed)
    teacher = create_model("convnet", shape, num_classes, channels=[64, 128, 128],
                           kernel_size=5, hidden=256)
    student = create_model("convnet", shape, num_classes, channels=[24, 48],
                           kernel_size=5, hidden=64)
    return teacher, student


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_teacher_cache(teacher: nn.Module, x: torch.Tensor, directory: Path,
                        args: argparse.Namespace, num_classes: int, device: torch.device) -> dict:
    """Teacher inference over ``x`` then ``write_cache``, each timed; timings and cache size."""
    t0 = time.perf_counter()
    logits = predict(teacher, x, batch_size=512, device=device)  # [N, C]
    sync(device)
    t1 = time.perf_counter()
    chunks = (logits[i : i + 512] for i in range(0, len(logits), 512))
    info = write_cache(directory, chunks, num_rows=len(logits), num_classes=num_classes,
                       format=args.format, k=args.k if args.format != "dense" else None,
                       dtype="float16", capture_temperature=args.temperature, shard_rows=4096)
    t2 = time.perf_counter()
    return {"inference_s": t1 - t0, "write_s": t2 - t1, "total_s": t2 - t0,
            "bytes_total": info["bytes_total"], "bytes_per_sample": info["bytes_per_sample"],
            "shards": len(info["shards"])}


def write_views_cache(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, directory: Path,
                      args: argparse.Namespace, num_classes: int, device: torch.device
                      ) -> tuple[CachedBatches, dict]:
    """A cache of ``args.views`` augmented views per sample (teacher inference over every view)
    and the ``CachedBatches`` that replays it, streamed from the memory-mapped shards."""
    modality = "image" if x.ndim == 4 else "sequence"
    table = draw_views(tuple(x.shape[1:]), modality, len(y), args.views, args.seed, Augment())
    t0 = time.perf_counter()
    rows = len(y) * args.views
    chunks = (predict(teacher, apply_views(x[torch.arange(a, min(a + 512, rows)) // args.views],
                                           table["box"][a : a + 512], table["flip"][a : a + 512]),
                      device=device) for a in range(0, rows, 512))
    info = write_cache(directory, chunks, num_rows=rows, num_classes=num_classes,
                       format=args.format, k=args.k if args.format != "dense" else None,
                       dtype="float16", capture_temperature=args.temperature, shard_rows=4096)
    entry = write_views(directory, table, views=args.views, augment=Augment().as_dict())
    seconds = time.perf_counter() - t0
    reader = CacheReader(directory, {**info, "views": entry})
    batches = CachedBatches({"x": x, "y": y}, [reader], [1.0], temperature=args.temperature,
                            seed=args.seed, memory_limit=0)
    return batches, {"views": args.views, "total_s": seconds, "bytes_total": info["bytes_total"]}


def teacher_sources(teacher: nn.Module, reader: CacheReader,
                    device: torch.device, views: CachedBatches | None = None,
                    replay: CachedBatches | None = None) -> dict[str, TeacherFn]:
    """Per mode, how a batch gets its teacher keys (``cache``: through ``replay``, the student
    stage's ``CachedBatches``, when given; else ``CacheReader.get`` per batch)."""
    teacher.to(device).eval()

    def live(idx: torch.Tensor, xb: torch.Tensor, epoch: int) -> Batch:
        with torch.inference_mode():
            out = teacher(xb)  # [B, C]
        return {"teacher_logits": out}

    def cached(idx: torch.Tensor, xb: torch.Tensor, epoch: int) -> Batch:
        rows = replay.teacher(idx, None) if replay is not None else reader.get(idx)
        return {k: v.to(device) for k, v in rows.items()}

    def replayed(idx: torch.Tensor, xb: torch.Tensor, epoch: int) -> Batch:
        batch = views(idx, epoch + 1)  # this epoch's replayed input (key "x") and its view's row
        return {k: v.to(device) for k, v in batch.items() if k != "y"}

    sources = {"plain": lambda idx, xb, epoch: {}, "cache": cached, "live": live}
    return sources if views is None else {**sources, "views": replayed}


def _step(student: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Loss, teacher_fn: TeacherFn,
          x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, epoch: int,
          device: torch.device) -> tuple[float, float, torch.Tensor, float]:
    """One optimiser step on samples ``idx``: (seconds, of which getting the teacher keys, loss,
    CPU seconds of this thread)."""
    sync(device)
    c0 = time.thread_time()
    t0 = time.perf_counter()
    xb, yb = x[idx].to(device), y[idx].to(device)
    t = time.perf_counter()
    batch = {"x": xb, "y": yb, **teacher_fn(idx, xb, epoch)}
    teacher_s = time.perf_counter() - t
    terms = loss_fn(student(batch["x"]).float(), batch)  # "views" replaces "x"
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    sync(device)
    return time.perf_counter() - t0, teacher_s, terms["loss"].detach(), time.thread_time() - c0


def run_epoch(students: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
              losses: dict[str, Loss], sources: dict[str, TeacherFn], x: torch.Tensor, y: torch.Tensor,
              batch_size: int, seed: int, epoch: int, device: torch.device, modes: tuple[str, ...],
              interleave: str) -> dict[str, tuple[float, float, float, float]]:
    """One epoch of every mode in the order fixed by ``(seed, epoch)``.

    ``interleave="step"``: the modes take turns step by step (in the order ``modes``), so a burst
    of background load hits all of them alike; ``"epoch"``: each mode runs its whole epoch in turn.
    An epoch's time is the sum of its steps' times (fetching the batch, the teacher keys, forward,
    loss, backward, optimiser step).

    Returns:
        per mode the epoch's seconds, the part of them spent getting the teacher keys (host time:
        not synchronised on CUDA), the mean training loss, and the CPU seconds of this thread
        (``time.thread_time``: time the process was descheduled by other load does not count;
        with one torch thread on a CPU every op runs in this thread).
    """
    torch_seed, shuffle_seed = epoch_seeds(seed, epoch)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(shuffle_seed))
    batches = [order[i : i + batch_size] for i in range(0, len(y), batch_size)]
    batches = [b for b in batches if len(b) > 1]  # a lone sample breaks batch norm (as in fit)
    sums = {m: [0.0, 0.0, torch.zeros((), device=device), 0.0] for m in modes}
    for m in modes:
        students[m].train()
    rounds = [[(m, b) for m in modes] for b in batches] if interleave == "step" \
        else [[(m, b) for b in batches] for m in modes]
    for turn in rounds:
        for m, idx in turn:
            seconds, teacher_s, loss, cpu = _step(students[m], optimizers[m], losses[m], sources[m], x, y,
                                                  idx, epoch, device)
            acc = sums[m]
            acc[0] += seconds
            acc[1] += teacher_s
            acc[2] += loss * len(idx)
            acc[3] += cpu
    seen = sum(len(b) for b in batches)
    torch.manual_seed(torch_seed)
    return {m: (a[0], a[1], float(a[2]) / seen, a[3]) for m, a in sums.items()}


def time_repeat(init: dict[str, torch.Tensor], student: nn.Module, losses: dict[str, Loss],
                sources: dict[str, TeacherFn], x: torch.Tensor, y: torch.Tensor,
                args: argparse.Namespace, device: torch.device,
                repeat: int) -> tuple[dict[str, list[tuple[float, float, float]]], dict[str, float]]:
    """One repeat: per mode a fresh student (same init) and AdamW, 1 warm-up epoch, then
    ``args.epochs`` timed epochs; the order of the modes is rotated every epoch.

    Returns:
        per mode the timed epochs' (seconds, teacher-part seconds, CPU seconds), and the last
        epoch's mean training loss.
    """
    modes = tuple(sources)
    students = {m: copy.deepcopy(student) for m in modes}
    optimizers = {m: torch.optim.AdamW(students[m].parameters(), lr=args.lr) for m in modes}
    for m in modes:
        students[m].load_state_dict(init)
    times: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
    loss: dict[str, float] = {}
    for epoch in range(args.epochs + 1):
        shift = (repeat + epoch) % len(modes)
        result = run_epoch(students, optimizers, losses, sources, x, y, args.batch_size, args.seed, epoch,
                           device, modes[shift:] + modes[:shift], args.interleave)
        for m, (seconds, teacher_s, loss[m], cpu) in result.items():
            if epoch > 0:
                times[m].append((seconds, teacher_s, cpu))
    return times, loss


def summarise(times: list[float]) -> dict[str, float]:
    """Median, min, max and mean of ``times``."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "mean_s": statistics.fmean(times)}


def time_modes(student: nn.Module, loss_specs: dict[str, tuple[str, dict[str, float]]],
               sources: dict[str, TeacherFn], x: torch.Tensor, y: torch.Tensor,
               args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """All repeats; per mode the loss, the raw epoch times, their summary and the teacher part.

    Args:
        loss_specs: per mode the registered loss name and its arguments.
    """
    losses = {m: create_loss(name, **kw) for m, (name, kw) in loss_specs.items()}
    init = {k: v.detach().clone() for k, v in student.state_dict().items()}
    modes = tuple(sources)
    raw: dict[str, list[list[float]]] = {m: [] for m in modes}
    part: dict[str, list[list[float]]] = {m: [] for m in modes}
    cpu: dict[str, list[list[float]]] = {m: [] for m in modes}
    final_loss: dict[str, float] = {}
    for repeat in range(args.repeats):
        times, final_loss = time_repeat(init, student, losses, sources, x, y, args, device, repeat)
        for m in modes:
            raw[m].append([t for t, _, _ in times[m]])
            part[m].append([u for _, u, _ in times[m]])
            cpu[m].append([c for _, _, c in times[m]])
    return {m: {"loss": loss_specs[m][0], "loss_args": repr(losses[m]), "epoch_seconds": raw[m],
                "teacher_part_seconds": part[m],
                "teacher_part_median_s": statistics.median(u for r in part[m] for u in r),
                "epoch_cpu_seconds": cpu[m], "cpu_median_s": statistics.median(c for r in cpu[m] for c in r),
                "final_train_loss": final_loss[m], **summarise([t for r in raw[m] for t in r])}
            for m in modes}


def load_train(spec: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], int]:
    """The train split as ``(x, y, input_shape, num_classes)``; no val split (timing only)."""
    ds = load_source(spec, seed=seed, val_fraction=0.0, test_fraction=0.2)
    train = ds.split("train")
    return train.features, train.labels, train.input_shape, train.num_classes


def benchmark(args: argparse.Namespace, cache_dir: Path) -> dict:
    """Everything measured, as a JSON-able dict."""
    load_start = os.getloadavg()[0]
    seed_everything(args.seed, deterministic=False)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    device = resolve_device(args.device)
    x, y, shape, num_classes = load_train(args.data, args.seed)
    teacher, student = build_models(shape, num_classes, args.seed)
    if args.teacher_epochs > 0:
        fit(teacher, {"x": x, "y": y}, create_loss("ce"), epochs=args.teacher_epochs, lr=args.lr,
            batch_size=args.batch_size, seed=args.seed, device=device)
    cache = write_teacher_cache(teacher, x, cache_dir, args, num_classes, device)
    reader = CacheReader(cache_dir)
    kd = {"temperature": args.temperature}
    loss_specs = {"plain": ("ce", {}), "live": ("kd", kd),
                  "cache": ("topk_kd", {**kd, "capture_temperature": args.temperature})
                  if args.format != "dense" else ("kd", kd)}
    views, views_cache = None, None
    if args.views > 1:
        views, views_cache = write_views_cache(teacher, x, y, cache_dir / "views", args,
                                               num_classes, device)
        loss_specs["views"] = loss_specs["cache"]
    if args.control:
        loss_specs["control"] = loss_specs["plain"]
    # as the student stage reads the cache: decoded into memory once (up to student.cache_in_memory_mb),
    # or, with --stream, CacheReader.get per batch from the memory-mapped shards
    replay = None if args.stream else CachedBatches({"x": x, "y": y}, [reader], [1.0],
                                                    temperature=args.temperature, seed=args.seed)
    sources = teacher_sources(teacher, reader, device, views, replay)
    if args.control:
        sources["control"] = sources["plain"]  # plain CE again, on its own student: the A/A noise floor
    modes = time_modes(student.to(device), loss_specs, sources, x, y, args, device)
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "device": str(device), "threads": torch.get_num_threads(),
                        "machine": platform.machine(), "cpus": os.cpu_count(),
                        "loadavg_1m_at_start": load_start, "loadavg_1m_at_end": os.getloadavg()[0]},
        "data": {"spec": args.data, "train_rows": len(y), "input_shape": list(shape),
                 "num_classes": num_classes},
        "models": {"teacher_params": count_params(teacher), "student_params": count_params(student),
                   "teacher_init": "trained %d epoch(s)" % args.teacher_epochs
                   if args.teacher_epochs else "random (untrained)"},
        "cache": cache,
        "views_cache": views_cache,
        "modes": modes,
        **ratios(modes, cache),
    }


def ratios(modes: dict[str, dict], cache: dict) -> dict:
    """cache/plain and live/cache, from the medians and paired epoch by epoch (same round), and
    the epochs that repay the cache's one-time cost vs. live."""
    plain, cached, live = (modes[m]["median_s"] for m in MODES)
    epochs = {m: [t for r in modes[m]["epoch_seconds"] for t in r] for m in MODES}
    cpu = {m: [t for r in modes[m]["epoch_cpu_seconds"] for t in r] for m in MODES}
    paired = {
        "cache_over_plain": summarise([b / a for a, b in zip(epochs["plain"], epochs["cache"])]),
        "cache_over_plain_cpu": summarise([b / a for a, b in zip(cpu["plain"], cpu["cache"])]),
        "live_over_cache": summarise([c / b for b, c in zip(epochs["cache"], epochs["live"])]),
    }
    saving = live - cached
    amortise = cache["total_s"] / saving if saving > 0 else None
    extra = {}
    if "views" in modes:
        extra = {"views_over_plain": modes["views"]["median_s"] / plain,
                 "views_over_cache": modes["views"]["median_s"] / cached}
    if "control" in modes:
        extra["control_over_plain"] = modes["control"]["median_s"] / plain
        control = [t for r in modes["control"]["epoch_seconds"] for t in r]
        paired["control_over_plain"] = summarise([b / a for a, b in zip(epochs["plain"], control)])
    return {"ratios": {"cache_over_plain": cached / plain, "live_over_cache": live / cached,
                       "cache_over_plain_cpu": modes["cache"]["cpu_median_s"] / modes["plain"]["cpu_median_s"],
                       "live_over_plain": live / plain, **extra},
            "paired_ratios": {k: {n.removesuffix("_s"): v for n, v in d.items()}
                              for k, d in paired.items()},
            "goal_cache_over_plain": GOAL_CACHE_OVER_PLAIN,
            "meets_goal": cached / plain <= GOAL_CACHE_OVER_PLAIN,
            "saving_per_epoch_s": saving, "amortise_epochs": amortise}


def report(result: dict, console: Console) -> None:
    """Print the table and the one-time cache cost."""
    d, m, c = result["data"], result["models"], result["cache"]
    env = result["environment"]
    title = (f"{d['spec']}: {d['train_rows']} train rows {d['input_shape']}, "
             f"batch {result['config']['batch_size']}")
    table = Table(title=title)
    for col in ("mode", "loss", "s/epoch", "min", "max", "vs plain", "teacher s", "CPU s/epoch"):
        table.add_column(col, justify="left" if col in ("mode", "loss") else "right")
    plain = result["modes"]["plain"]["median_s"]
    for name, row in result["modes"].items():
        table.add_row(name, row["loss"], f"{row['median_s']:.3f}", f"{row['min_s']:.3f}",
                      f"{row['max_s']:.3f}", f"{row['median_s'] / plain:.2f}x",
                      f"{row['teacher_part_median_s']:.3f}", f"{row['cpu_median_s']:.3f}")
    console.print(table)
    r, pr = result["ratios"], result["paired_ratios"]
    verdict = "meets" if result["meets_goal"] else "misses"
    for key, label, goal in (("cache_over_plain", "cache/plain", f" ({verdict} goal <= "
                              f"{result['goal_cache_over_plain']:.2f})"),
                             ("live_over_cache", "live/cache", "")):
        p = pr[key]
        console.print(f"{label} = {r[key]:.3f}{goal}; paired {p['median']:.3f} "
                      f"[{p['min']:.3f}, {p['max']:.3f}]")
    p = pr["cache_over_plain_cpu"]
    console.print(f"cache/plain in CPU time (this thread's, not the time other processes held the "
                  f"CPU) = {r['cache_over_plain_cpu']:.3f}; paired {p['median']:.3f} "
                  f"[{p['min']:.3f}, {p['max']:.3f}]")
    if "control_over_plain" in r:
        p = pr["control_over_plain"]
        console.print(f"control/plain = {r['control_over_plain']:.3f} (the same work twice: the noise floor); "
                      f"paired {p['median']:.3f} [{p['min']:.3f}, {p['max']:.3f}]")
    if "views_over_plain" in r:
        console.print(f"views/plain = {r['views_over_plain']:.3f}, views/cache = "
                      f"{r['views_over_cache']:.3f} ({result['views_cache']['views']} cached views "
                      f"per sample, replayed per step)")
    console.print(f"cache one-time cost: {c['total_s']:.3f} s (teacher inference "
                  f"{c['inference_s']:.3f} s + write {c['write_s']:.3f} s), "
                  f"{c['bytes_total']} bytes "
                  f"({c['bytes_per_sample']:.1f} B/sample, {result['config']['format']})")
    amortise = result["amortise_epochs"]
    console.print("amortised vs. live after " + (f"{amortise:.2f} epoch(s)" if amortise is not None
                  else "never (live is not slower per epoch)"))
    console.print(f"teacher {m['teacher_params']} params, {m['teacher_init']}; student "
                  f"{m['student_params']} params; {result['config']['repeats']} repeats x "
                  f"{result['config']['epochs']} timed epochs per mode (after 1 warm-up)")
    console.print(f"{env['device']}, {env['threads']} thread(s) on {env['cpus']} CPU(s), load "
                  f"{env['loadavg_1m_at_start']:.1f} -> {env['loadavg_1m_at_end']:.1f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console()
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load >= cpus and (args.threads or torch.get_num_threads()) > 1:
        console.print(f"[yellow]load average {load:.1f} on {cpus} CPU(s): multi-threaded epoch "
                      "times will be noisy; consider --threads 1[/yellow]")
    if args.cache_dir is not None:
        result = benchmark(args, args.cache_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="kdflow-bench-cache-") as tmp:
            result = benchmark(args, Path(tmp))
    report(result, console)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
