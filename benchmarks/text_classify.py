"""Text classification on BBC News: a pretrained MiniLM teacher distilled into tiny students, on a CPU.

Reads the artifacts of a ``kdflow run -c configs/bbc-minilm.yaml`` (``--artifacts``; runs it into
``--workdir`` first when they are missing): the prepared split (2,127 articles after dropping 98
repeated ones, whole articles up to 2,048 wordpieces), both teacher candidates (all-MiniLM-L6-v2
fine-tuned here on the first 64 + last 64 wordpieces; paraphrase-MiniLM-L3-v2 as a frozen ONNX
encoder over the whole article + trained head) and the chosen teacher's logit cache over the
training split. Then, on that one split:

- every teacher: test accuracy, macro-F1, parameters (the ONNX encoder's estimated from its file),
  CPU latency at batch 1 and 64 on real test articles;
- every student of ``--students`` (``text_bag``: fastText-style wordpiece + hashed bigram bag,
  ``text_gru``, ``text_cnn``, ``text_bert``: a 2-layer BERT of width 128), trained twice from the
  same initial weights, batch order and optimiser (``kdflow.train.loop.fit``): with ``kd`` from the
  cache (the student stage's ``CachedBatches``; ``--temperature``, ``--alpha``) and with ``ce`` only
  (the baseline), ``--seeds`` seeds each (mean, standard deviation, range); ``--student-tokens N``
  gives the students only the first N wordpieces (default: the whole stored article);
- TF-IDF (word 1-2 grams) + logistic regression (scikit-learn), C chosen on the validation split,
  trained on the same training articles (its latency includes vectorising the raw text).

Ratios are against all-MiniLM-L6-v2 in the same run; the accuracy gap is against the teacher the
student learned from (the cached one). Every accuracy comes with its 95% Wilson interval on the
test articles, and each student is compared with TF-IDF + LR article by article (how many each
gets right that the other gets wrong, per seed, and an exact McNemar p-value). Goal of the issue:
a student >= 20x smaller and >= 5x faster at batch 1, within 2 points of the teacher and ahead
of TF-IDF + LR.
Threads are pinned (``--threads``, default 1). Run from the repository root::

    .venv/bin/python benchmarks/text_classify.py --artifacts /tmp/bbc/artifacts/bbc-minilm --out text.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdflow.cache import CacheReader  # noqa: E402
from kdflow.cache.replay import CachedBatches  # noqa: E402
from kdflow.losses import build_loss  # noqa: E402
from kdflow.metrics import accuracy, macro_f1  # noqa: E402
from kdflow.metrics.intervals import proportion_interval  # noqa: E402
from kdflow.metrics.intervals import spread as interval_spread  # noqa: E402
from kdflow.tracks import get_track  # noqa: E402
from kdflow.tracks.text import evaluation  # noqa: E402
from kdflow.train.device import seed_everything  # noqa: E402
from kdflow.train.loop import fit, predict  # noqa: E402

STUDENTS = {
    "text_bag": {"vocab": 12000, "dim": 16, "buckets": 40000},
    "text_gru": {"vocab": 8000, "dim": 64, "hidden": 64},
    "text_cnn": {"vocab": 8000, "dim": 64, "channels": 96},
    "text_bert": {"layers": 2, "hidden": 128, "heads": 2, "intermediate": 512},
}
TRAIN = {"text_bag": (20, 1e-2), "text_gru": (15, 3e-3), "text_cnn": (15, 3e-3), "text_bert": (15, 1e-3)}  # epochs, lr


def ensure_artifacts(args: argparse.Namespace) -> Path:
    art = Path(args.artifacts)
    if (art / "logits" / "manifest.json").is_file():
        return art
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "bbc-minilm.yaml"
    cfg.write_text((ROOT / "configs/bbc-minilm.yaml").read_text())
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kdflow.cli", "run", "-c", cfg.name], cwd=work, check=True)
    print(f"pipeline: {time.perf_counter() - t0:.0f} s")
    return work / "artifacts" / "bbc-minilm"


def latency(model: torch.nn.Module, test, repeats: int) -> dict[str, float]:
    inputs = evaluation.latency_inputs(test.features)
    return {f"latency_ms_b{b}": evaluation.measure_latency(model, tuple(x.shape[1:]), b, repeats=repeats,
                                                           inputs=x)["median_ms"] for b, x in inputs.items()}


def quality(model: torch.nn.Module, test) -> dict:
    logits = predict(model, test.features, batch_size=64)
    acc = accuracy(logits, test.labels)
    return {"accuracy": acc, "macro_f1": macro_f1(logits, test.labels, test.num_classes),
            "nll": float(torch.nn.functional.cross_entropy(logits.float(), test.labels.long())),
            "accuracy_95": proportion_interval(acc, len(test)), "correct": (logits.argmax(1) == test.labels).tolist()}


def mcnemar(a: list[bool], b: list[bool]) -> dict[str, float]:
    """Articles only ``a`` gets right, only ``b`` gets right, and the exact two-sided McNemar p-value
    (a binomial test of the discordant articles at 1/2)."""
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return {"only_student": only_a, "only_baseline": only_b, "p": p}


def cut(ds, tokens: int | None):
    """The dataset with only the first ``tokens`` wordpieces of each text (students' input length)."""
    if tokens is None or tokens >= ds.features.shape[1]:
        return ds
    out = ds.select(torch.arange(len(ds)))
    out.features = ds.features[:, :tokens].clone()
    return out


def size(model: torch.nn.Module) -> dict[str, int]:
    from kdflow.models import count_params, model_bytes

    return {"params": count_params(model) + getattr(model, "frozen_params", 0),
            "bytes": model_bytes(model) + getattr(model, "frozen_bytes", 0)}


def train_student(track, arch: str, loss_name: str, train, val, reader: CacheReader | None, seed: int,
                  epochs: int, lr: float, kd: dict[str, float], args: dict | None = None) -> tuple[torch.nn.Module, float]:
    from schemas.params import LOSS

    params = LOSS.validate({"name": loss_name, **(kd if loss_name == "kd" else {})})
    tensors = track.fit_inputs(train)
    if reader is None:  # CE: plain batches of the samples
        batches = None
        loss = build_loss(params, {}, train.meta)
    else:  # the student stage's path: samples + the cached teacher rows
        batches = CachedBatches(tensors, [reader], [1.0], temperature=getattr(params, "temperature", 1.0), seed=seed)
        loss = build_loss(params, reader.info, train.meta)
    seed_everything(seed)
    model = track.create_model(arch, train, args or STUDENTS[arch])  # same seed: same initial weights for kd and ce
    t0 = time.perf_counter()
    fit(model, tensors, loss, val=track.val_pair(val), batch_fn=batches, epochs=epochs, lr=lr, weight_decay=1e-4,
        batch_size=32, patience=5, seed=seed, device=torch.device("cpu"))
    return model.eval(), time.perf_counter() - t0


def tfidf_lr(train, val, test) -> dict[str, float]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline

    best = None
    for c in (1.0, 10.0, 100.0):
        pipe = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2),
                             LogisticRegression(C=c, max_iter=2000))
        pipe.fit(train.texts, train.labels.numpy())
        score = float((pipe.predict(val.texts) == val.labels.numpy()).mean())
        if best is None or score > best[0]:
            best = (score, c, pipe)
    _, c, pipe = best
    pred = pipe.predict(test.texts)
    y = test.labels.numpy()
    acc = float((pred == y).mean())
    times = []
    for i in range(20):
        t0 = time.perf_counter()
        pipe.predict(test.texts[i % len(test.texts) : i % len(test.texts) + 1])
        times.append((time.perf_counter() - t0) * 1000)
    batch = [test.texts[i % len(test.texts)] for i in range(64)]
    t64 = []
    for _ in range(5):
        t0 = time.perf_counter()
        pipe.predict(batch)
        t64.append((time.perf_counter() - t0) * 1000)
    vocab = len(pipe[0].vocabulary_)
    return {"accuracy": acc, "macro_f1": float(f1_score(y, pred, average="macro")),
            "accuracy_95": proportion_interval(acc, len(y)), "correct": (pred == y).tolist(),
            "C": c, "params": int(pipe[1].coef_.size + pipe[1].intercept_.size), "vocabulary": vocab,
            "latency_ms_b1": statistics.median(times), "latency_ms_b64": statistics.median(t64)}


def spread(values: list[float]) -> dict[str, float]:
    return {**interval_spread(values), "n": len(values)}


def derive(result: dict) -> None:
    """Ratios against all-MiniLM-L6-v2 and the KD - CE / KD - TF-IDF differences, where measured."""
    teachers = result.get("teachers", {})
    ref = teachers.get("minilm_l6") or next(iter(teachers.values()), None)
    source = teachers.get(result.get("chosen_teacher", ""), ref)  # the teacher the KD students learned from
    tfidf = result.get("tfidf_lr")
    for row in result["students"].values():
        kd, ce = row.get("kd"), row.get("ce")
        if ref is not None:
            row["params_ratio"] = ref["params"] / row["params"]
            row["speedup_b1"] = ref["latency_ms_b1"] / row["latency_ms_b1"]
            row["speedup_b64"] = ref["latency_ms_b64"] / row["latency_ms_b64"]
            if kd:
                row["gap_kd_pts"] = (source["accuracy"] - kd["accuracy"]["mean"]) * 100
                row["gap_kd_vs_l6_pts"] = (ref["accuracy"] - kd["accuracy"]["mean"]) * 100
        if kd and ce:
            row["kd_minus_ce_pts"] = (kd["accuracy"]["mean"] - ce["accuracy"]["mean"]) * 100
        if kd and tfidf:
            row["kd_minus_tfidf_pts"] = (kd["accuracy"]["mean"] - tfidf["accuracy"]) * 100
            if "correct" in tfidf and kd.get("correct"):  # article by article, per seed
                row["kd_vs_tfidf"] = [mcnemar(c, tfidf["correct"]) for c in kd["correct"]]
        if {"params_ratio", "gap_kd_pts", "kd_minus_tfidf_pts"} <= set(row):
            row["goal_met"] = bool(row["params_ratio"] >= 20 and row["speedup_b1"] >= 5 and row["gap_kd_pts"] <= 2
                                   and row["kd_minus_tfidf_pts"] > 0)


def merge(paths: list[str]) -> dict:
    """One result from parts run separately (e.g. ``--losses ce`` while the teacher trains, then ``kd``)."""
    out: dict = {"students": {}}
    for path in paths:
        part = json.loads(Path(path).read_text())
        for key, value in part.items():
            if key == "students":
                for arch, row in value.items():
                    out["students"].setdefault(arch, {}).update(row)
            elif key == "teachers":
                for name, row in value.items():
                    out.setdefault("teachers", {}).setdefault(name, {}).update(row)
            else:
                out.setdefault(key, value)
    return out


def show(result: dict) -> None:
    print(f"\ntest: {result['n_test']} articles, {result['mean_test_tokens']:.0f} tokens on average; "
          f"reference teacher all-MiniLM-L6-v2; chosen teacher (cache): {result.get('chosen_teacher')}")
    print(f"{'model':<22}{'acc':>8}{'F1':>8}{'params':>12}{'b1 ms':>9}{'b64 ms':>9}{'x smaller':>10}{'x faster b1':>12}")
    def ci(row: dict) -> str:
        c = row.get("accuracy_95")
        return f"   95% [{c['low']:.4f}, {c['high']:.4f}]" if c else ""

    for name, t in result.get("teachers", {}).items():
        print(f"{'teacher ' + name:<22}{t['accuracy']:>8.4f}{t['macro_f1']:>8.4f}{t['params']:>12,}"
              f"{t['latency_ms_b1']:>9.2f}{t['latency_ms_b64']:>9.1f}{'':>22}{ci(t)}")
    if "tfidf_lr" in result:
        tl = result["tfidf_lr"]
        print(f"{'tfidf+lr':<22}{tl['accuracy']:>8.4f}{tl['macro_f1']:>8.4f}{tl['params']:>12,}"
              f"{tl['latency_ms_b1']:>9.2f}{tl['latency_ms_b64']:>9.1f}{'':>22}{ci(tl)}")
    for arch, r in result["students"].items():
        for loss_name in ("kd", "ce"):
            if loss_name not in r:
                continue
            a = r[loss_name]["accuracy"]
            print(f"{arch + ' ' + loss_name:<22}{a['mean']:>8.4f}{r[loss_name]['macro_f1']['mean']:>8.4f}"
                  f"{r['params']:>12,}{r['latency_ms_b1']:>9.2f}{r['latency_ms_b64']:>9.1f}"
                  f"{r.get('params_ratio', float('nan')):>10.1f}{r.get('speedup_b1', float('nan')):>12.1f}"
                  f"   acc {a['mean']:.4f} +- {a.get('std', 0):.4f} (sd), range [{a['min']:.4f}, {a['max']:.4f}] "
                  f"over {a['n']} seed(s)"
                  + (f", val acc {r[loss_name]['val_accuracy']['mean']:.4f} NLL {r[loss_name]['val_nll']['mean']:.4f}"
                     if "val_nll" in r[loss_name] else ""))
        diffs = [f"{label} {r[k]:+.2f} pts" for k, label in (("kd_minus_ce_pts", "KD - CE"), ("gap_kd_pts", "teacher - KD"),
                                                             ("gap_kd_vs_l6_pts", "L6 - KD"),
                                                             ("kd_minus_tfidf_pts", "KD - TF-IDF")) if k in r]
        if r.get("kd_vs_tfidf"):
            diffs.append("vs TF-IDF per seed (only KD right / only TF-IDF right, p): " + ", ".join(
                f"{m['only_student']}/{m['only_baseline']} p={m['p']:.2f}" for m in r["kd_vs_tfidf"]))
        if diffs:
            print(f"{'':<22}{', '.join(diffs)}" + (f", goal met: {r['goal_met']}" if "goal_met" in r else ""))


def latency_pass(args: argparse.Namespace) -> None:
    """Every model's latency in one process, rounds interleaved, so the ratios share the machine's load."""
    art = Path(args.artifacts)
    track = get_track("text")
    ds = track.load(art / "prepare")
    train, test = ds.split("train"), ds.split("test")
    models = {f"teacher:{p.name}": track.load_model(p) for p in sorted((art / "teachers").iterdir()) if p.is_dir()}
    models.update({f"student:{a}": track.create_model(a, train, STUDENTS[a]).eval() for a in args.students})
    inputs = {k: test if k.startswith("teacher:") else cut(test, args.student_tokens) for k in models}
    times: dict[str, list[dict[str, float]]] = {k: [] for k in models}
    for r in range(args.rounds):
        for k, m in models.items():
            times[k].append(latency(m, inputs[k], args.repeats))
        print(f"round {r + 1}/{args.rounds}", flush=True)
    result: dict = {"teachers": {}, "students": {}, "latency_rounds": args.rounds}
    for k, rows in times.items():
        kind, name = k.split(":")
        med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        med.update({f"{key}_range": [min(r[key] for r in rows), max(r[key] for r in rows)] for key in rows[0]})
        result["teachers" if kind == "teacher" else "students"][name] = {**med, **size(models[k])}
        print(k, {key: round(v, 3) for key, v in med.items() if not key.endswith("_range")}, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifacts", default="/tmp/bbc/artifacts/bbc-minilm")
    p.add_argument("--workdir", default="/tmp/bbc")
    p.add_argument("--students", nargs="*", default=list(STUDENTS), help="none: the teachers and TF-IDF + LR only")
    p.add_argument("--losses", nargs="+", default=["kd", "ce"], choices=["kd", "ce"])
    p.add_argument("--no-teachers", action="store_true", help="skip the teachers and TF-IDF + LR rows")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--temperature", type=float, default=2.0, help="kd temperature")
    p.add_argument("--alpha", type=float, default=0.7, help="kd weight of the teacher term (1 - alpha: labels)")
    p.add_argument("--student-tokens", type=int, default=None,
                   help="students read only the first N wordpieces (default: the whole stored article)")
    p.add_argument("--epochs", type=int, default=None, help="override every student's epochs")
    p.add_argument("--lr", type=float, default=None, help="override every student's learning rate")
    p.add_argument("--student-args", default=None, metavar="JSON",
                   help='arguments merged into every student\'s (e.g. \'{"units": "word", "weighting": "tfidf"}\')')
    p.add_argument("--repeats", type=int, default=10, help="timed forward passes per latency")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--latency-only", action="store_true",
                   help="time the teachers and (untrained) students in one process, interleaved over --rounds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--merge", nargs="+", default=None, help="combine JSON parts written by --out and print them")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.merge:
        result = merge(args.merge)
        derive(result)
        show(result)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.latency_only:
        latency_pass(args)
        return

    needs_cache = "kd" in args.losses and bool(args.students)
    art = ensure_artifacts(args) if needs_cache else Path(args.artifacts)
    track = get_track("text")
    ds = track.load(art / "prepare")
    train, val, test = ds.split("train"), ds.split("val"), ds.split("test")
    result: dict = {"machine": platform.platform(), "threads": args.threads, "n_train": len(train),
                    "n_val": len(val), "n_test": len(test), "max_length": ds.meta["max_length"],
                    "mean_test_tokens": float((test.features != 0).sum(1).float().mean()),
                    "student_tokens": args.student_tokens, "kd": {"temperature": args.temperature, "alpha": args.alpha},
                    "students": {}}
    reader = None
    if needs_cache:
        logits_manifest = json.loads((art / "logits" / "manifest.json").read_text())
        result["chosen_teacher"] = logits_manifest["info"]["teachers"][0]["teacher"]
        reader = CacheReader(art / "logits")
        reader.verify()
    else:  # CE students read the labels only: a cache of the right shape is not needed
        reader = None

    if not args.no_teachers:
        result["teachers"] = {}
        for name in sorted(p.name for p in (art / "teachers").iterdir() if p.is_dir()):
            model = track.load_model(art / "teachers" / name)
            result["teachers"][name] = {**quality(model, test), **size(model), **latency(model, test, args.repeats)}
            print(f"teacher {name}: acc {result['teachers'][name]['accuracy']:.4f}", flush=True)
        result["tfidf_lr"] = tfidf_lr(train, val, test)
        print(f"tfidf+lr: acc {result['tfidf_lr']['accuracy']:.4f} (C = {result['tfidf_lr']['C']})", flush=True)

    s_train, s_val, s_test = (cut(d, args.student_tokens) for d in (train, val, test))
    kd = {"temperature": args.temperature, "alpha": args.alpha}
    extra_args = json.loads(args.student_args) if args.student_args else {}
    result["student_args"] = extra_args
    for arch in args.students:
        epochs, lr = TRAIN[arch]
        epochs, lr = args.epochs or epochs, args.lr or lr
        model_args = {**STUDENTS[arch], **extra_args}
        row: dict = {"args": model_args, "epochs": epochs, "lr": lr}
        for loss_name in args.losses:
            accs, f1s, secs, correct, val_accs, val_nlls = [], [], [], [], [], []
            for seed in range(args.seeds):
                model, sec = train_student(track, arch, loss_name, s_train, s_val, reader, seed, epochs, lr, kd,
                                           model_args)
                q = quality(model, s_test)
                on_val = quality(model, s_val)  # what settings are chosen on
                val_accs.append(on_val["accuracy"])
                val_nlls.append(on_val["nll"])
                accs.append(q["accuracy"])
                f1s.append(q["macro_f1"])
                secs.append(sec)
                correct.append(q["correct"])
                print(f"{arch} {loss_name} seed {seed}: val acc {val_accs[-1]:.4f} NLL {val_nlls[-1]:.4f}, test acc {q['accuracy']:.4f} "
                      f"F1 {q['macro_f1']:.4f} ({sec:.0f} s)", flush=True)
            row[loss_name] = {"accuracy": spread(accs), "macro_f1": spread(f1s), "train_s": spread(secs),
                              "val_accuracy": spread(val_accs), "val_nll": spread(val_nlls), "correct": correct}
        row.update(size(model), **latency(model, s_test, args.repeats))
        result["students"][arch] = row
        if args.out:  # written after every student: a long run keeps what it measured
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    derive(result)
    show(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
