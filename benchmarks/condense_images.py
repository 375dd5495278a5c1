"""Image dataset distillation: student test accuracy from condensed sets, per method and label mode.

One teacher is trained per dataset (seeded by ``--split-seed``). Then, for each IPC and each seed,
every method condenses the training split through ``kdflow.condense.condense`` and a fresh student
is trained on the result with ``kdflow.train.loop.fit``. Three protocols (``--protocol``):

**standard** (the default; issue 15): the evaluation protocol of the dataset-distillation
literature, so the figures line up with published tables (``/work/shared/ANCHORS.md``):

- data: ``fashion`` (Fashion-MNIST, full 60k train / 10k test IDX files from the Debian package
  ``dataset-fashion-mnist``, ``--fashion``), pixels in [0, 1]; ``--test-limit`` evaluates on the
  first n test images (a reduced, clearly reported test set for CPU-sized runs);
- methods: ``random``, ``herding``, ``k_center`` (real images), ``rded``, ``nrr_dd`` (synthetic),
  ``full`` (the whole training split, IPC-independent), each with the library's default params
  (``nrr_dd``: ``--nrr-iterations`` refinement steps, and one stored DBR view per student epoch
  with the student's augmentation); ``--ablations`` adds ``rded_factor1``/``nrr_dd_factor1`` (no
  stitching) and ``nrr_dd_no_refine``;
- student: ``convnet3`` (ConvNet-3: 128 channels, instance norm, average pooling, 309k params);
- budget: 300 epochs, i.e. the published 300 / 600 / 1500 steps at IPC 1 / 10 / 50 (batch
  ``N * 300 / steps``: 10 / 50 / 100 on 10 classes), AdamW lr 1e-3, weight decay 0.01, cosine;
- labels: ``soft`` = KD at T=20 with no CE term (the official RDED student loss) on augmented views
  relabelled by the live teacher every step (FKD-style: an unbounded view cache); ``hard`` = CE on
  augmented views (random, full); ``dbr_beta<b>`` for nrr_dd, one row per ``--dbr-betas`` value
  (default 0 and 1): the ``dbr`` loss ``lam CE(y) + (1 - lam) CE(y_aug) + b * distance term`` on
  the stored view ``(epoch - 1) % views`` (mixup + crop + flip, rebuilt from its seed), whose two
  teacher distances were stored at condensation (``kdflow.losses.dbr``);
- augmentation: random resized crops (area 50-100%) + horizontal flip, the same for the teacher's
  training (the teacher is trained with the augmentation it relabels); CutMix and RDED's patch
  shuffling are not implemented here;
- teacher: the benchmark's ``convnet`` [16, 32, 64], hidden 128 (33k params; not ConvNet-3: its
  60k-image training is too slow on this CPU), ``--teacher-epochs`` (default 6), batch 128;
  ``--teacher-cache DIR`` keeps it for later runs;
- reported: the last epoch's test accuracy and the best test accuracy over the last 20% of epochs
  (evaluated every ``--eval-every`` epochs there, and at the last), over ``--seeds`` seeds (default
  3, from ``--first-seed``).

**legacy** (the earlier benchmark, kept for comparison): sklearn digits 8x8 and MNIST 28x28 (the
10k IDX test images split 8k train / 2k test, stratified from ``--split-seed``); the small
student ``convnet`` [8, 16, 32], hidden 32 (7.3k params) for ``--steps`` (200) AdamW steps (lr 3e-3,
cosine, weight decay 5e-4) of batch ``min(64, N)``; soft = ``kd`` T=4, alpha=0.9; augmentation
random resized crops area 50-100%, no flip; teacher digits 20 epochs, MNIST 6; test accuracy of the
last weights.

Reported for both: test accuracy mean +- std over seeds, the ratio to ``random`` with the same
labels (``soft`` for dbr), bytes of the images (float32) and of the labels of one view of each
sample (hard: int64 labels; soft: fp16 logits ``[N, K]`` as the dense logit cache; dbr: two fp16
distances) and of every view the student sees (``label_bytes_all_views``: soft labels of every
epoch's views; dbr: all stored distances), condensation and student seconds, and the teacher's
accuracy on the condensed images (a diagnostic).

    .venv/bin/python benchmarks/condense_images.py --ipc 1 --seeds 3 --eval-every 60 \
        --teacher-cache /tmp/kdflow-teacher --out condense_images.json
    .venv/bin/python benchmarks/condense_images.py --quick          # seconds: smoke test (digits)
    .venv/bin/python benchmarks/condense_images.py --protocol legacy --out condense_images_legacy.json

``--protocol dc`` reproduces the coreset baselines of the DC paper (Zhao, Mopuri & Bilen, "Dataset
Condensation with Gradient Matching", ICLR 2021; Fashion-MNIST figures in ``/work/shared/ANCHORS.md``):
``random``, ``herding``, ``k_center`` real images at each IPC with **hard labels**, each set training a
fresh ConvNet-3 (``dc_train``: SGD momentum 0.9, lr 0.01 then 0.001 for the second half, weight decay
5e-4, batch 256, 300 epochs, no augmentation, pixels standardised by the training split's mean/std),
test accuracy of the last weights on the whole test split; herding/k_center in the L2-normalised
penultimate features of a ConvNet-3 trained on the whole training set for ``--full-epochs`` (also the
"whole dataset" row), or, cheaper, of the benchmark's small convnet teacher (``--feature-net teacher``).

    .venv/bin/python benchmarks/condense_images.py --protocol dc --ipc 1 10 --seeds 2 \
        --feature-net teacher --teacher-epochs 2
    .venv/bin/python benchmarks/condense_images.py --protocol dc --ipc 1 --methods herding full \
        --full-epochs 4 --feature-cache /tmp/kdflow-dc   # later runs with the same settings reuse the network
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from kdflow.condense import condense
from kdflow.condense.nrr_dd import DBRViews
from kdflow.condense.coreset import herding_order, k_center_order, select_in_feature_space
from kdflow.data.augment import Augment, apply_views, boxes_from_seeds
from kdflow.data.dataset import Dataset
from kdflow.data.sources import load_source
from kdflow.losses import build_loss, create_loss
from kdflow.losses.dbr import DBRParams
from kdflow.models import count_params, create_model
from kdflow.train.device import seed_everything
from kdflow.train.loop import accuracy_of, extract_features, fit, predict

CPU = torch.device("cpu")
METHODS = ["random", "herding", "k_center", "rded", "nrr_dd"]
MODES = {"random": ["hard", "soft"], "herding": ["soft"], "k_center": ["soft"], "rded": ["soft"],
         "nrr_dd": ["soft", "dbr"], "full": ["hard", "soft"]}  # dbr: one mode per --dbr-betas value
ABLATIONS = {  # --ablations: variants that separate the parts of rded/nrr_dd (soft labels, + dbr)
    "rded_factor1": ("rded", {"factor": 1}),            # no stitching: one crop per image
    "nrr_dd_factor1": ("nrr_dd", {"factor": 1}),
    "nrr_dd_no_refine": ("nrr_dd", {"iterations": 0}),  # CAM crop discovery only
}
TEACHER = {"arch": "convnet", "args": {"channels": [16, 32, 64], "hidden": 128, "dropout": 0.1}}
STUDENT = {"arch": "convnet", "args": {"channels": [8, 16, 32], "hidden": 32}}
TEACHER_EPOCHS = {"digits": 20, "mnist": 6, "fashion": 6}
AUG = Augment(scale_min=0.5, scale_max=1.0, flip=False)
BATCH, LR, WD = 64, 3e-3, 5e-4
# --protocol standard (the dataset-distillation literature's evaluation)
STANDARD_STUDENT = {"arch": "convnet3", "args": {}}
STANDARD_STEPS = {1: 300, 10: 600, 50: 1500}  # 300 epochs on 10 classes (the published budgets)
STANDARD_EPOCHS = 300
STANDARD_AUG = Augment(scale_min=0.5, scale_max=1.0, flip=True)
STANDARD_LR, STANDARD_WD, STANDARD_T = 1e-3, 0.01, 20.0
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# --protocol dc: the DC paper's evaluation of coreset baselines (Zhao, Mopuri & Bilen, ICLR 2021)
DC_METHODS = ["random", "herding", "k_center", "full"]
DC_EPOCHS, DC_LR, DC_MOMENTUM, DC_WD, DC_BATCH = 300, 0.01, 0.9, 5e-4, 256
DC_FULL_EPOCHS = 3  # the whole-dataset reference on this CPU (the paper does not state its budget)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    shared = Path(os.environ.get("KDFLOW_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", choices=["legacy", "standard", "dc"], default="standard",
                   help="standard: ConvNet-3 student, published epoch budgets, last and best-of-last-20%% accuracy; "
                        "dc: the DC paper's coreset baselines (hard labels, SGD, 300 epochs)")
    p.add_argument("--feature-net", choices=["convnet3", "teacher"], default="convnet3",
                   help="dc: herding/k_center feature space: the ConvNet-3 trained on the whole set (the DC "
                        "paper's; also the 'whole dataset' row) or the benchmark's small convnet teacher (cheaper)")
    p.add_argument("--full-epochs", type=int, default=DC_FULL_EPOCHS,
                   help="dc: epochs of the ConvNet-3 trained on the whole training set (the 'whole dataset' row "
                        "and the feature space of herding/k_center)")
    p.add_argument("--feature-cache", type=Path, default=None,
                   help="dc: keep the whole-set ConvNet-3 (keyed by dataset, epochs, split seed, settings and a "
                        "digest of the data), its test accuracy and the herding/k_center picks in this folder, "
                        "and reuse them in later runs")
    p.add_argument("--datasets", nargs="+", default=None, choices=["digits", "mnist", "fashion"],
                   help="default: digits mnist (legacy), fashion (standard)")
    p.add_argument("--mnist", type=Path, default=shared / "mnist-t10k", help="folder of the MNIST IDX files")
    p.add_argument("--fashion", type=Path, default=FASHION_DIR,
                   help="folder of the Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist)")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first n test images only")
    p.add_argument("--eval-every", type=int, default=1, help="standard: evaluate every n epochs in the last 20%%")
    p.add_argument("--ipc", nargs="+", type=int, default=[1, 10, 50])
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS + ["full"],
                   help="default: all (legacy, standard); random herding k_center full (dc)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..n-1 (condensation + student)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="legacy/standard: seeds first..first+n-1 (to split one measurement over several runs)")
    p.add_argument("--steps", type=int, default=None,
                   help="student optimiser steps, for every run (legacy default 200; standard: 300/600/1500 by IPC)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="default: digits 20, mnist 6")
    p.add_argument("--ablations", action="store_true", help=f"also run {sorted(ABLATIONS)}")
    p.add_argument("--teacher-cache", type=Path, default=None,
                   help="legacy/standard: keep the trained teacher in this folder and reuse it in later runs")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/test split and the teacher")
    p.add_argument("--dbr-betas", nargs="+", type=float, default=[0.0, 1.0],
                   help="nrr_dd dbr rows: one per weight beta of the distance term (0: mixup CE on the stored views)")
    p.add_argument("--nrr-iterations", type=int, default=100, help="nrr_dd refinement steps (library default 100)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a loaded machine)")
    p.add_argument("--quick", action="store_true", help="tiny run for a smoke test")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.datasets is None:
        args.datasets = ["fashion"] if args.protocol in ("standard", "dc") else ["digits", "mnist"]
    if args.methods is None:
        args.methods = DC_METHODS if args.protocol == "dc" else METHODS + ["full"]
    if args.protocol == "dc" and (bad := sorted(set(args.methods) - set(DC_METHODS))):
        p.error(f"--protocol dc: methods {bad} are not DC-paper baselines (use {DC_METHODS})")
    if args.protocol == "dc" and args.full_epochs < 1:
        p.error("--full-epochs must be >= 1")
    if args.quick:
        args.datasets, args.ipc, args.seeds, args.steps = ["digits"], [1], 2, 8
        args.teacher_epochs, args.nrr_iterations, args.ablations = 1, 2, False
    if args.steps is None and args.protocol == "legacy":
        args.steps = 200
    if args.steps is None and (odd := sorted(set(args.ipc) - set(STANDARD_STEPS))):
        p.error(f"--protocol standard: no published budget for --ipc {odd} (known: {sorted(STANDARD_STEPS)}); "
                "give --steps")
    if args.test_limit is not None and args.test_limit < 1 or args.eval_every < 1:
        p.error("--test-limit and --eval-every must be >= 1")
    return args


def load(name: str, args: argparse.Namespace) -> tuple[Dataset, Dataset]:
    """Train and test splits (80/20, stratified, from ``--split-seed``)."""
    folder = {"mnist": args.mnist, "fashion": args.fashion}.get(name)
    spec = "sklearn:digits" if name == "digits" else f"idx:{folder}"
    ds = load_source(spec, seed=args.split_seed, val_fraction=0.0, test_fraction=0.2)  # fashion: own 10k test
    ds.meta["bench_name"] = name
    train, test = ds.split("train"), ds.split("test")
    if args.test_limit is not None and args.test_limit < len(test):
        test = test.select(torch.arange(args.test_limit))
    return train, test


def epochs_for(n: int, steps: int) -> tuple[int, int]:
    """Batch size and epochs giving about ``steps`` optimiser steps over ``n`` samples."""
    batch = min(BATCH, n)
    return batch, max(1, round(steps / math.ceil(n / batch)))


class Augmented(nn.Module):
    """Training-mode wrapper: fresh random-resized-crop views of every batch (``kdflow.data.augment``,
    boxes drawn from torch's RNG, which ``fit`` reseeds per epoch); with a teacher, its logits on
    the same views are kept in ``teacher_logits`` for the loss (FKD-style relabelling)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, aug: Augment = AUG) -> None:
        super().__init__()
        self.student, self.aug = student, aug
        self._teacher = [teacher.eval()] if teacher is not None else []  # not a submodule: frozen
        self.teacher_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            seeds = torch.randint(0, 2**62, (len(x),))
            box, flip = boxes_from_seeds(seeds, tuple(x.shape[1:]), self.aug)
            x = apply_views(x, box, flip)
            if self._teacher:
                with torch.no_grad():
                    self.teacher_logits = self._teacher[0](x)  # [B, K]
        return self.student(x)


def train_teacher(train: Dataset, args: argparse.Namespace) -> tuple[nn.Module, float]:
    seed_everything(args.split_seed)
    model = create_model(TEACHER["arch"], train.input_shape, train.num_classes, **TEACHER["args"])
    t0 = time.perf_counter()
    epochs = args.teacher_epochs or TEACHER_EPOCHS[train.meta["bench_name"]]
    # standard: the teacher learns on the augmentation whose views it relabels for the student
    net = Augmented(model, None, STANDARD_AUG) if args.protocol == "standard" else model
    fit(net, {"x": train.features, "y": train.labels}, create_loss("ce"), epochs=epochs,
        lr=LR, weight_decay=WD, batch_size=128, seed=args.split_seed, device=CPU)
    return model.eval(), time.perf_counter() - t0


def cached_teacher(train: Dataset, args: argparse.Namespace) -> tuple[nn.Module, float]:
    """``train_teacher``, or with ``--teacher-cache DIR`` the teacher saved there by an earlier run with
    the same dataset, protocol, epochs and split seed (its state dict; seconds are those of the run that
    trained it), so that runs split over several invocations share one teacher."""
    if args.teacher_cache is None:
        return train_teacher(train, args)
    epochs = args.teacher_epochs or TEACHER_EPOCHS[train.meta["bench_name"]]
    path = args.teacher_cache / f"teacher-{train.meta['bench_name']}-{args.protocol}-e{epochs}-s{args.split_seed}.pt"
    if path.exists():
        state = torch.load(path, weights_only=True)
        model = create_model(TEACHER["arch"], train.input_shape, train.num_classes, **TEACHER["args"])
        model.load_state_dict(state["model"])
        return model.eval(), float(state["seconds"])
    model, seconds = train_teacher(train, args)
    args.teacher_cache.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "seconds": seconds}, path)
    return model, seconds


def standard_budget(n: int, ipc: int, steps: int | None) -> tuple[int, int]:
    """Batch and epochs of the standard protocol: 300 epochs with the published step count at the
    published IPCs (batch ``N * 300 / steps``); ``steps`` (``--steps``) shortens or lengthens it."""
    published = STANDARD_STEPS.get(ipc)
    batch = min(n, math.ceil(n * STANDARD_EPOCHS / published)) if published else min(n, 100)
    if steps is None:
        return batch, STANDARD_EPOCHS
    return batch, max(1, round(steps / math.ceil(n / batch)))


def train_student(
    small: Dataset, mode: str, teacher: nn.Module, steps: int | None, seed: int, *,
    protocol: str = "legacy", ipc: int = 1, test: Dataset | None = None, eval_every: int = 1,
) -> tuple[nn.Module, float | None, float | None]:
    """A fresh student trained on ``small`` with the label ``mode``.

    Returns the student and, for the standard protocol, the best test accuracy over the last 20%
    of epochs (every ``eval_every`` epochs there, and the last) and the last epoch's test accuracy
    (so the caller need not evaluate again); None, None for legacy.
    """
    standard = protocol == "standard"
    seed_everything(seed)
    spec = STANDARD_STUDENT if standard else STUDENT
    student = create_model(spec["arch"], small.input_shape, small.num_classes, **spec["args"])
    batch_fn = None
    if mode.startswith("dbr"):  # nrr_dd's temperature from the data; stored view (epoch - 1) % views per epoch
        loss = build_loss(DBRParams(beta=dbr_beta(mode)), {}, small.meta)
        views = DBRViews(small)
        model, tensors, batch_fn = student, views.tensors(), views
    else:
        model = Augmented(student, teacher if mode == "soft" else None, STANDARD_AUG if standard else AUG)
        tensors = {"x": small.features, "y": small.labels}
        if mode == "soft":  # standard: the official RDED student loss, KL at T=20 without CE
            kd = create_loss("kd", temperature=STANDARD_T, alpha=1.0) if standard else \
                create_loss("kd", temperature=4.0, alpha=0.9)
            loss = lambda logits, batch: kd(logits, {**batch, "teacher_logits": model.teacher_logits})  # noqa: E731
        else:
            loss = create_loss("ce")
    if not standard:
        batch, epochs = epochs_for(len(tensors["x"]), steps)
        fit(model, tensors, loss, epochs=epochs, lr=LR, weight_decay=WD, batch_size=batch, seed=seed, device=CPU,
            batch_fn=batch_fn)
        return student.eval(), None, None
    batch, epochs = standard_budget(len(tensors["x"]), ipc, steps)
    first = epochs - max(1, round(0.2 * epochs))  # epochs [first, epochs) are the last 20%
    seen: list[float] = []
    done = [0]

    def evaluate(_row: dict[str, float]) -> None:
        done[0] += 1
        k = done[0]
        if k > first and ((k - first) % eval_every == 0 or k == epochs):
            seen.append(accuracy_of(student, test.features, test.labels, batch_size=512, device=CPU))
            student.train()

    fit(model, tensors, loss, epochs=epochs, lr=STANDARD_LR, weight_decay=STANDARD_WD, batch_size=batch,
        seed=seed, device=CPU, on_epoch=evaluate, batch_fn=batch_fn)
    return student.eval(), max(seen), seen[-1]


def dbr_beta(mode: str) -> float:
    """The distance-term weight of a ``dbr_beta<b>`` mode."""
    return float(mode.removeprefix("dbr_beta"))


def student_epochs(n: int, ipc: int, args: argparse.Namespace) -> int:
    """Epochs a student trains on ``n`` condensed samples (legacy or standard budget)."""
    return standard_budget(n, ipc, args.steps)[1] if args.protocol == "standard" else epochs_for(n, args.steps)[1]


def label_bytes(small: Dataset, mode: str, epochs: int) -> tuple[int, int]:
    """Bytes of the labels ``mode`` needs for one view of each sample, and for every view the student
    sees in ``epochs`` epochs: hard int64 labels (one view: hard labels do not depend on the view);
    soft fp16 logits ``[N, K]`` per view (a dense logit cache of every epoch's view, as FKD stores);
    dbr the stored ``dbr_*`` extras (two fp16 distances per stored view; the views themselves are
    rebuilt from one seed)."""
    n, k = len(small), small.num_classes
    if mode == "hard":
        return n * 8, n * 8
    if mode == "soft":
        return n * k * 2, n * k * 2 * epochs
    stored = sum(t.numel() * t.element_size() for key, t in small.extras.items() if key.startswith("dbr_"))
    return stored // small.meta.get("dbr_views", 1), stored


def summarise(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def bench_dataset(name: str, args: argparse.Namespace, console: Console) -> dict:
    train, test = load(name, args)
    teacher, teacher_s = cached_teacher(train, args)
    teacher_acc = accuracy_of(teacher, test.features, test.labels, batch_size=512, device=CPU)
    console.print(f"{name}: train {len(train)}, test {len(test)}, teacher test acc {teacher_acc:.4f} "
                  f"({count_params(teacher)} params, {teacher_s:.1f} s)")
    variants = {m: (m, {}) for m in args.methods}
    if args.ablations:
        variants.update(ABLATIONS)
    rows = []
    for ipc in args.ipc:
        for method, (base, options) in variants.items():
            if base == "nrr_dd":  # store a DBR view for every epoch, with the student's augmentation
                aug = STANDARD_AUG if args.protocol == "standard" else AUG
                options = {"iterations": args.nrr_iterations, "views": student_epochs(ipc * train.num_classes, ipc, args),
                           "view_scale_min": aug.scale_min, "view_scale_max": aug.scale_max, "view_flip": aug.flip,
                           **options}
            if method == "full" and ipc != args.ipc[0]:
                continue  # IPC-independent: measured once
            modes = [m for mode in MODES[base]
                     for m in ([f"dbr_beta{b:g}" for b in args.dbr_betas] if mode == "dbr" else [mode])]
            runs: dict[str, list[float]] = {m: [] for m in modes}
            best: dict[str, list[float]] = {m: [] for m in modes}
            student_s: dict[str, list[float]] = {m: [] for m in modes}  # training + its test evaluations
            seconds, teacher_on_set, small = [], [], None
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                t0 = time.perf_counter()
                if method == "full":
                    small = train
                else:
                    small = condense(base, train, teacher=teacher, ipc=ipc, seed=seed, device=CPU, **options)
                seconds.append(time.perf_counter() - t0)
                teacher_on_set.append(float((predict(teacher, small.features).argmax(-1) == small.labels).float().mean()))
                for mode in modes:
                    t1 = time.perf_counter()
                    student, top, last = train_student(small, mode, teacher, args.steps, seed, protocol=args.protocol,
                                                       ipc=ipc, test=test, eval_every=args.eval_every)
                    if last is None:  # legacy: not evaluated during training
                        last = accuracy_of(student, test.features, test.labels, batch_size=512, device=CPU)
                    runs[mode].append(last)
                    student_s[mode].append(time.perf_counter() - t1)
                    console.print(f"    {name} ipc={ipc} {method}/{mode} seed {seed}: last {last:.4f} "
                                  f"(student {student_s[mode][-1]:.0f} s)")  # a run cut short keeps these
                    if top is not None:
                        best[mode].append(top)
            for mode, accs in runs.items():
                mean, std = summarise(accs)
                one_view, all_views = label_bytes(small, mode, student_epochs(len(small), ipc, args))
                rows.append({
                    "dataset": name, "ipc": None if method == "full" else ipc, "method": method, "labels": mode,
                    "n": len(small), "accuracy_mean": mean, "accuracy_std": std, "accuracies": accs,
                    "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
                    "image_bytes": small.features.numel() * 4, "label_bytes": one_view,
                    "label_bytes_all_views": all_views,
                    "condense_seconds_mean": statistics.fmean(seconds), "student_seconds": student_s[mode],
                    "teacher_acc_on_set": statistics.fmean(teacher_on_set),
                })
                extra = ""
                if best[mode]:
                    b_mean, b_std = summarise(best[mode])
                    rows[-1].update(best_last20_mean=b_mean, best_last20_std=b_std, best_last20=best[mode])
                    extra = f", best of last 20% {b_mean:.4f} +- {b_std:.4f}"
                console.print(f"  {name} ipc={ipc} {method}/{mode}: last {mean:.4f} +- {std:.4f}{extra} "
                              f"(seeds {rows[-1]['seeds']}: {', '.join(f'{a:.4f}' for a in accs)}; condense "
                              f"{statistics.fmean(seconds):.2f} s, student {statistics.fmean(student_s[mode]):.0f} s)")
    add_ratios(rows)
    return {"dataset": name, "n_train": len(train), "n_test": len(test), "teacher_accuracy": teacher_acc,
            "teacher_params": count_params(teacher), "teacher_seconds": teacher_s, "rows": rows}


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks in the heap (no ``mmap`` for big blocks, no trimming), so
    ConvNet-3's ~100 MB activations of a 256-image batch are reused instead of being unmapped and
    page-faulted (zeroed) again on every step: 4.8 -> 3.2 ms of CPU per training image-step, 1.5x, same
    losses bit for bit (measured, ``benchmarks/README.md``). Process-wide; the price is a resident size
    that stays at its peak. False where there is no glibc ``mallopt`` (then nothing changes)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 2**30)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def dc_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int,
             on_epoch: Callable[[int], None] | None = None) -> nn.Module:
    """Train ``model`` the way the DC paper evaluates a (condensed or coreset) training set: cross-entropy
    on hard labels, SGD momentum 0.9, lr 0.01 divided by 10 after half of the epochs, weight decay 5e-4,
    batch 256 (all of a smaller set), reshuffled every epoch, no augmentation (the DC code augments only
    MNIST, and only for its own synthetic sets), last weights."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=DC_LR, momentum=DC_MOMENTUM, weight_decay=DC_WD)
    model.train()
    for epoch in range(epochs):
        if epoch == epochs // 2:
            for group in opt.param_groups:
                group["lr"] = DC_LR * 0.1
        for rows in torch.randperm(len(x), generator=gen).split(DC_BATCH):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return model.eval()


def dc_cache_key(name: str, train: Dataset, epochs: int, split_seed: int) -> str:
    """Name of the whole-set ConvNet-3's cache entry: dataset, size, epochs, split seed, and a digest of
    the DC training settings and of the (standardised) training images and labels."""
    digest = hashlib.sha256(json.dumps({"arch": "convnet3", "lr": DC_LR, "momentum": DC_MOMENTUM, "wd": DC_WD,
                                        "batch": DC_BATCH}, sort_keys=True).encode())
    digest.update(train.features.contiguous().numpy().tobytes())
    digest.update(train.labels.contiguous().numpy().tobytes())
    return f"dc-convnet3-{name}-n{len(train)}-e{epochs}-s{split_seed}-{digest.hexdigest()[:12]}"


def dc_feature_net(name: str, train: Dataset, args: argparse.Namespace,
                   console: Console) -> tuple[nn.Module, float, Path | None]:
    """The ConvNet-3 trained with ``dc_train`` on the whole training split for ``--full-epochs`` (seeded by
    ``--split-seed``), its training seconds, and its cache side file. With ``--feature-cache DIR`` the
    network is saved there (``<key>.pt``, ``dc_cache_key``) and an earlier run's is loaded instead of
    retraining (the seconds are then those of the run that trained it)."""
    path = None
    if args.feature_cache is not None:
        path = args.feature_cache / f"{dc_cache_key(name, train, args.full_epochs, args.split_seed)}.pt"
        if path.exists():
            state = torch.load(path, weights_only=True)
            model = create_model("convnet3", train.input_shape, train.num_classes)
            model.load_state_dict(state["model"])
            console.print(f"  whole set: ConvNet-3 loaded from {path} (trained {state['seconds']:.0f} s earlier)")
            return model.eval(), float(state["seconds"]), path.with_suffix(".json")
    t0 = time.perf_counter()
    seed_everything(args.split_seed)
    model = create_model("convnet3", train.input_shape, train.num_classes)
    dc_train(model, train.features, train.labels, args.full_epochs, args.split_seed,
             on_epoch=lambda e: console.print(f"  whole set: epoch {e}/{args.full_epochs} "
                                              f"({time.perf_counter() - t0:.0f} s)"))
    seconds = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "seconds": seconds, "epochs": args.full_epochs}, tmp)
        tmp.replace(path)  # whole or absent: a run killed while saving leaves no half file under the key
        path = path.with_suffix(".json")
    return model, seconds, path


class DCSideCache:
    """What depends only on the cached whole-set network: its test accuracy (per test-set size) and the
    rows herding/k_center pick (per method and IPC; deterministic), kept as JSON next to the network so
    that a later run skips the 60k-image feature extraction when all its picks are known."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        data = json.loads(path.read_text()) if path is not None and path.exists() else {}
        self.accuracy: dict[str, float] = data.get("test_accuracy", {})
        self.picks: dict[str, list[int]] = data.get("picks", {})

    def save(self) -> None:
        if self.path is not None:
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({"test_accuracy": self.accuracy, "picks": self.picks}))
            tmp.replace(self.path)


def dc_picks(method: str, ipc: int, train: Dataset, features: Callable[[], torch.Tensor],
             side: DCSideCache) -> list[int]:
    """Training rows ``select_in_feature_space`` keeps for ``method`` at ``ipc`` (sorted), from the side
    cache when known; ``features()`` is called only when they are not."""
    key = f"{method}-{ipc}"
    if key not in side.picks:
        order = {"herding": herding_order, "k_center": k_center_order}[method]
        row_of = {sid: i for i, sid in enumerate(train.sample_ids)}
        small = select_in_feature_space(order, train, features(), ipc)
        side.picks[key] = sorted(row_of[sid] for sid in small.sample_ids)
        side.save()
    return side.picks[key]


def bench_dc(name: str, args: argparse.Namespace, console: Console) -> dict:
    """``--protocol dc``: random / herding / k_center at each IPC and the whole training set, each set
    training fresh ConvNet-3s with ``dc_train`` (300 epochs; the whole set ``--full-epochs``), test
    accuracy of the last weights on the test split. Pixels standardised by the training split's mean
    and std (as the DC code does). Herding and k_center pick per class in the L2-normalised penultimate
    features of the ConvNet-3 trained on the whole training set (the DC paper's feature space; what the
    library's ``herding``/``k_center`` condensers do with that network as the ``teacher``), or with
    ``--feature-net teacher`` of the benchmark's small convnet teacher (``--teacher-epochs``; no whole-set
    row then). Seeds are the outer loop, so a run cut short has every method at the first seeds."""
    train, test = load(name, args)
    mean, std = train.features.mean(), train.features.std()
    train = dataclasses.replace(train, features=(train.features - mean) / std)
    test = dataclasses.replace(test, features=(test.features - mean) / std)
    t0 = time.perf_counter()
    rows = []
    side = DCSideCache(None)
    if args.feature_net == "teacher":  # cheaper: the benchmark's small convnet, trained --teacher-epochs
        full, full_s = train_teacher(train, args)
        full_acc = accuracy_of(full, test.features, test.labels, batch_size=512, device=CPU)
        console.print(f"{name}: train {len(train)}, test {len(test)}; feature net: the benchmark's convnet teacher "
                      f"({full_s:.0f} s): test acc {full_acc:.4f}; no whole-set ConvNet-3 row")
    else:
        full, full_s, side_path = dc_feature_net(name, train, args, console)
        side = DCSideCache(side_path)
        if (full_acc := side.accuracy.get(str(len(test)))) is None:
            full_acc = accuracy_of(full, test.features, test.labels, batch_size=512, device=CPU)
            side.accuracy[str(len(test))] = full_acc
            side.save()
        console.print(f"{name}: train {len(train)}, test {len(test)}; ConvNet-3 on the whole training set "
                      f"({args.full_epochs} epochs, {full_s:.0f} s): test acc {full_acc:.4f}")
        if "full" in args.methods:
            rows.append({"dataset": name, "ipc": None, "method": "full", "labels": "hard", "n": len(train),
                         "epochs": args.full_epochs, "accuracy_mean": full_acc, "accuracy_std": 0.0,
                         "accuracies": [full_acc], "train_seconds": [full_s],
                         "image_bytes": train.features.numel() * 4, "label_bytes": len(train) * 8,
                         "label_bytes_all_views": len(train) * 8, "condense_seconds_mean": 0.0,
                         "teacher_acc_on_set": 1.0})
    feats: list[torch.Tensor] = []

    def features() -> torch.Tensor:  # once, and only when a pick is not in the side cache
        if not feats:
            t1 = time.perf_counter()
            feats.append(extract_features(full, train.features, device=CPU))
            console.print(f"  features of the training set: {tuple(feats[0].shape)} ({time.perf_counter() - t1:.0f} s)")
        return feats[0]

    for ipc in args.ipc:
        methods = [m for m in args.methods if m != "full"]
        runs: dict[str, dict[str, list]] = {m: {"acc": [], "train_s": [], "condense_s": [], "on_set": []}
                                           for m in methods}
        trained: dict[tuple, tuple[float, float, str]] = {}  # (seed, images) -> accuracy, seconds, method
        for seed in range(args.seeds):  # seeds outermost: a cut-short run has every method at seed 0
            for method in methods:
                t1 = time.perf_counter()
                small = (condense("random", train, teacher=None, ipc=ipc, seed=seed, device=CPU)
                         if method == "random" else train.select(dc_picks(method, ipc, train, features, side)))
                run = runs[method]
                run["condense_s"].append(time.perf_counter() - t1)
                run["on_set"].append(float((predict(full, small.features).argmax(-1) == small.labels).float().mean()))
                run["n"] = len(small)
                same = (seed, tuple(small.sample_ids))
                if same in trained:  # e.g. herding and k_center at IPC 1 (both start at the class mean)
                    acc, train_s, other = trained[same]
                    run["acc"].append(acc)
                    run["train_s"].append(train_s)
                    console.print(f"  {name} ipc={ipc} {method} seed {seed}: {acc:.4f} (the same images as {other}: "
                                  "the same deterministic run, not repeated)")
                    continue
                seed_everything(seed)
                student = create_model("convnet3", small.input_shape, small.num_classes)
                t1 = time.perf_counter()
                dc_train(student, small.features, small.labels, DC_EPOCHS, seed)
                run["train_s"].append(time.perf_counter() - t1)
                run["acc"].append(accuracy_of(student, test.features, test.labels, batch_size=512, device=CPU))
                trained[same] = (run["acc"][-1], run["train_s"][-1], method)
                console.print(f"  {name} ipc={ipc} {method} seed {seed}: {run['acc'][-1]:.4f} "
                              f"(train {run['train_s'][-1]:.0f} s, wall {time.perf_counter() - t0:.0f} s)")
        for method, run in runs.items():
            m, sd = summarise(run["acc"])
            n = run["n"]
            rows.append({"dataset": name, "ipc": ipc, "method": method, "labels": "hard", "n": n,
                         "epochs": DC_EPOCHS, "accuracy_mean": m, "accuracy_std": sd, "accuracies": run["acc"],
                         "train_seconds": run["train_s"], "image_bytes": n * math.prod(train.input_shape) * 4,
                         "label_bytes": n * 8, "label_bytes_all_views": n * 8,
                         "condense_seconds_mean": statistics.fmean(run["condense_s"]),
                         "teacher_acc_on_set": statistics.fmean(run["on_set"])})
            console.print(f"  {name} ipc={ipc} {method}: {m:.4f} +- {sd:.4f}")
    add_ratios(rows)
    return {"dataset": name, "n_train": len(train), "n_test": len(test), "teacher_accuracy": full_acc,
            "teacher_params": count_params(full), "teacher_seconds": full_s, "rows": rows}


def add_ratios(rows: list[dict]) -> None:
    """``vs_random``: accuracy over ``random`` with the same labels (``soft`` for dbr), same IPC;
    ``full`` rows are compared with the random rows of each IPC in the table instead."""
    base = {(r["ipc"], r["labels"]): r["accuracy_mean"] for r in rows if r["method"] == "random"}
    for r in rows:
        ref = base.get((r["ipc"], "soft" if r["labels"].startswith("dbr") else r["labels"]))
        r["vs_random"] = r["accuracy_mean"] / ref if ref else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # every protocol: 1.5x on ConvNet-3 training, same numbers (process-wide)
    console = Console(width=170)
    t0 = time.perf_counter()
    results = []
    for name in args.datasets:
        folder = {"mnist": args.mnist, "fashion": args.fashion}.get(name)
        if folder is not None and not folder.exists():
            hint = " (apt-get install -y dataset-fashion-mnist)" if name == "fashion" else ""
            console.print(f"[yellow]skip {name}: {folder} not found{hint}[/]")
            continue
        results.append((bench_dc if args.protocol == "dc" else bench_dataset)(name, args, console))
    wall = time.perf_counter() - t0
    steps = args.steps or "published"
    table = Table(title=f"condensed-set student accuracy ({args.protocol} protocol, {args.seeds} seeds, "
                        f"{steps} steps, wall {wall:.0f} s)")
    for col in ("data", "ipc", "method", "labels", "acc mean +- std", "best last 20%", "vs random", "img KB", "label KB",
                "label KB all views", "condense s", "teacher on set"):
        table.add_column(col, justify="right")
    for res in results:
        for r in res["rows"]:
            ratio = f"{r['vs_random']:.2f}" if r["vs_random"] else "-"
            table.add_row(res["dataset"], str(r["ipc"] or "all"), r["method"], r["labels"],
                          f"{r['accuracy_mean']:.4f} +- {r['accuracy_std']:.4f}",
                          f"{r['best_last20_mean']:.4f} +- {r['best_last20_std']:.4f}" if "best_last20_mean" in r else "-",
                          ratio,
                          f"{r['image_bytes'] / 1e3:.1f}", f"{r['label_bytes'] / 1e3:.2f}",
                          f"{r['label_bytes_all_views'] / 1e3:.1f}", f"{r['condense_seconds_mean']:.2f}",
                          f"{r['teacher_acc_on_set']:.2f}")
    console.print(table)
    if args.out:
        standard = args.protocol == "standard"
        meta = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                "threads": torch.get_num_threads(), "wall_seconds": wall, "protocol": args.protocol,
                "student": STANDARD_STUDENT if standard else STUDENT, "teacher": TEACHER,
                "augment": (STANDARD_AUG if standard else AUG).as_dict(),
                "batch": "N*300/steps" if standard else BATCH, "lr": STANDARD_LR if standard else LR,
                "weight_decay": STANDARD_WD if standard else WD}
        args.out.write_text(json.dumps({"meta": meta, "args": {k: str(v) for k, v in vars(args).items()},
                                        "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
