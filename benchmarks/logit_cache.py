"""The teacher-logit cache: write throughput, read throughput vs. raw reads, and bytes/KL per token.

Measures, in one run:

- ``write``: samples/s of ``write_cache`` (encode + shard + sha256 + fsync) for classification
  logits ``[N, C]`` in each format, and tokens/s for 32k-vocabulary sequence logits; the logits
  are generated beforehand and not timed.
- ``read``: GB/s of stored cache bytes through ``CacheReader.iter_batches`` (memory-mapped shards,
  decoded to the float32/int64 loss keys; with and without the per-shard sha256 check) and
  ``CacheReader.get`` on random training batches, against the baselines of reading a raw file of
  the same size with ``numpy.fromfile`` and ``torch.load``. All reads are warm (the files were
  just written, so their pages are in the OS page cache; one untimed read first).
- ``sequence``: bytes/token and mean KL(full || cached) (the tail spread uniformly, as
  ``kdflow.cache.fidelity``), the storage KL (over the k + 1 buckets, stored vs. float32: the
  rounding/quantisation error alone) and top-1 agreement, for sequence logits over a 32k
  vocabulary at k in {16, 32, 64, 128} in ``topk`` (bf16 values) and ``topk_q8``, next to
  DistillKit's published ~296 B/token at k = 128 and naive top-32 (bf16 + int32) at 192 B/token.

Synthetic LM-like logits (no model is downloaded): a Zipf prior over a random global frequency
order of the vocabulary (``-1.1 * beta * log(rank)``, beta ~ U(0.6, 1.2) per token), Gaussian
noise (sd 0.5), and 32 context tokens per position boosted by ``U(10.5, 14.5) - 2 * Exp(1)``. This
gives a mean entropy of about 2.6 nats, mean top-1 probability about 0.36 and about 0.98 of the
mass in the top 128 (the run reports the exact statistics). Sequence lengths are drawn from
``[3L/4, L]``; bytes/token counts file bytes (padding and headers included) per real token, and
``payload`` the bytes of one token's row.

Runs single-threaded by default (``--threads``). Run from the repository root::

    .venv/bin/python benchmarks/logit_cache.py --out logit_cache.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from kdflow.cache import CacheReader, fidelity, flatten_tokens, write_cache
from kdflow.cache.formats import topk_logprobs
from kdflow.cache.tokens import encode_sequences

DISTILLKIT_BYTES_PER_TOKEN = 296.0  # ANCHORS.md: bit-packed Parquet, k = 128, 32k vocabulary
NAIVE_TOP32_BYTES_PER_TOKEN = 192.0  # bf16 values + int32 indices
KS = (16, 32, 64, 128)
SEQ_FORMATS = ("topk", "topk_q8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=32768, help="classification rows N")
    p.add_argument("--classes", type=int, default=1000, help="classification classes C")
    p.add_argument("--k", type=int, default=10, help="k of the classification top-k caches")
    p.add_argument("--sequences", type=int, default=8, help="sequences in the 32k-vocab table")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence L")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-rows", type=int, default=8192, help="rows per shard (classification)")
    p.add_argument("--batch-size", type=int, default=256, help="rows per read batch")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (after 1 untimed)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (0: torch's default); copies and decodes are "
                        "memory-bound, and on a shared machine OpenMP threads that lose their "
                        "core stall small ops by 10-50x")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def lm_logits(tokens: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    """Synthetic LM-like next-token logits ``[tokens, vocab]`` (see the module docstring)."""
    rank = torch.randperm(vocab, generator=g).float() + 1.0  # [V] a global frequency order
    beta = 0.6 + 0.6 * torch.rand(tokens, 1, generator=g)  # [T, 1]
    logits = beta * (-1.1 * rank.log()) + 0.5 * torch.randn(tokens, vocab, generator=g)
    context = torch.randint(0, vocab, (tokens, 32), generator=g)  # [T, 32]
    exp = -torch.rand(tokens, 32, generator=g).clamp_min(1e-12).log()  # Exp(1)
    boost = 10.5 + 4.0 * torch.rand(tokens, 1, generator=g) - 2.0 * exp  # [T, 32]
    return logits.scatter_add_(1, context, boost)


def distribution_stats(logits: torch.Tensor) -> dict[str, float]:
    logp = logits.log_softmax(-1)
    p = logp.exp()
    out = {"entropy_nats_mean": float(-(p * logp).sum(-1).mean()),
           "top1_prob_mean": float(p.max(-1).values.mean())}
    for k in KS:
        out[f"top{k}_mass_mean"] = float(p.topk(k, dim=-1).values.sum(-1).mean())
    return out


def bucket_kl(logits: torch.Tensor, cached: dict[str, torch.Tensor], k: int) -> float:
    """Mean KL over the k + 1 buckets (top k + tail) between the float32 top-k log-probs and
    the stored ones: the storage error alone, without the truncation."""
    values, _, tail = topk_logprobs(logits, k, 1.0)  # [T, k], [T]
    p = torch.cat([values.exp(), tail[:, None]], dim=-1)
    q = torch.cat([cached["teacher_logprobs"].exp(), cached["teacher_tail"][:, None]], dim=-1)
    q = q / q.sum(-1, keepdim=True)
    terms = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log()), 0.0)
    return float(terms.sum(-1).clamp_min(0).mean())


def timed(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    """Median, min and max seconds of ``fn`` over ``repeats`` calls after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def bench_write(logits: torch.Tensor, root: Path, args: argparse.Namespace) -> list[dict]:
    """samples/s of write_cache per format on classification logits."""
    rows = []
    for fmt in ("dense", "topk", "topk_q8"):
        directory = root / f"cls-{fmt}"
        info: dict = {}

        def write() -> None:
            info.update(write_cache(
                directory, logits.split(1024), num_rows=len(logits),
                num_classes=logits.shape[1], format=fmt, k=None if fmt == "dense" else args.k,
                dtype="float16", capture_temperature=1.0, shard_rows=args.shard_rows))

        t = timed(write, args.repeats)
        rows.append({"format": fmt, **t, "samples_per_s": len(logits) / t["median_s"],
                     "bytes_total": info["bytes_total"],
                     "bytes_per_sample": info["bytes_per_sample"], "directory": str(directory)})
    return rows


def _drain(reader: CacheReader, batch_size: int, verify: bool) -> None:
    for _ in reader.iter_batches(batch_size, verify=verify):
        pass


def bench_read(directory: Path, nbytes: int, root: Path, args: argparse.Namespace) -> dict:
    """GB/s of the cache reads and of raw reads of a file of the same size."""
    raw = root / "raw.bin"
    raw.write_bytes(os.urandom(nbytes))
    pt = root / "raw.pt"
    torch.save(torch.from_numpy(np.fromfile(raw, dtype=np.uint8)), pt)
    info = json.loads((directory / "cache.json").read_text())
    n = info["num_rows"]
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(n, generator=g).split(args.batch_size)

    def get_epoch() -> None:
        reader = CacheReader(directory, info)
        for idx in order:
            reader.get(idx)

    ways: dict[str, Callable[[], object]] = {
        "iter_batches": lambda: _drain(CacheReader(directory, info), args.batch_size, False),
        "iter_batches+sha256": lambda: _drain(CacheReader(directory, info), args.batch_size,
                                              True),
        "get(random batches)": get_epoch,
        "numpy.fromfile (raw)": lambda: np.fromfile(raw, dtype=np.uint8),
        "torch.load (raw)": lambda: torch.load(pt),
    }
    out = {}
    for name, fn in ways.items():
        t = timed(fn, args.repeats)
        out[name] = {**t, "gb_per_s": nbytes / t["median_s"] / 1e9}
    base = out["numpy.fromfile (raw)"]["gb_per_s"]
    for row in out.values():
        row["vs_numpy_fromfile"] = row["gb_per_s"] / base
    return {"format": info["format"], "bytes": nbytes, "batch_size": args.batch_size,
            "ways": out}


def bench_sequences(root: Path, args: argparse.Namespace) -> dict:
    """bytes/token, KL and write tokens/s at each k for the two top-k formats."""
    g = torch.Generator().manual_seed(args.seed + 1)
    n, L, V = args.sequences, args.seq_len, args.vocab
    lengths = torch.randint(3 * L // 4, L + 1, (n,), generator=g)
    logits = lm_logits(n * L, V, g).view(n, L, V)
    mask = torch.arange(L) < lengths[:, None]
    stats = distribution_stats(logits[mask])
    rows = []
    for k in KS:
        for fmt in SEQ_FORMATS:
            directory = root / f"seq-{fmt}-{k}"
            batches = [(logits[i : i + 2], lengths[i : i + 2]) for i in range(0, n, 2)]
            t0 = time.perf_counter()
            info = write_cache(directory, batches, num_rows=n, num_classes=V, format=fmt, k=k,
                               dtype="bfloat16", capture_temperature=1.0, shard_rows=n,
                               seq_len=L)
            seconds = time.perf_counter() - t0
            cached = CacheReader(directory).load_all()
            fid = fidelity(logits, cached, capture_temperature=1.0)
            storage_kl = bucket_kl(logits[mask], flatten_tokens(cached), k)
            one = encode_sequences(logits[:1, :1], torch.tensor([1]), format=fmt, k=k,
                                   dtype="bfloat16", capture_temperature=1.0)
            payload = sum(v.numel() * v.element_size() for key, v in one.items()
                          if key != "lengths")
            rows.append({"format": fmt, "k": k, "bytes_per_token": info["bytes_per_token"],
                         "payload_bytes_per_token": payload,
                         "vs_distillkit": info["bytes_per_token"] / DISTILLKIT_BYTES_PER_TOKEN,
                         "compression_vs_fp32": V * 4 / info["bytes_per_token"],
                         "kl_mean": fid["kl"], "kl_max": fid["kl_max"],
                         "storage_kl_mean": storage_kl,
                         "top1_agreement": fid["top1_agreement"],
                         "write_tokens_per_s": info["num_tokens"] / seconds})
    return {"sequences": n, "seq_len": L, "vocab": V, "tokens": int(lengths.sum()),
            "values_dtype_topk": "bfloat16", "distribution": stats, "rows": rows,
            "distillkit_bytes_per_token_k128": DISTILLKIT_BYTES_PER_TOKEN,
            "naive_top32_bytes_per_token": NAIVE_TOP32_BYTES_PER_TOKEN}


def report(result: dict, console: Console) -> None:
    table = Table(title=f"write: {result['config']['rows']} x {result['config']['classes']} "
                        "classification logits")
    for col in ("format", "samples/s", "s (median)", "min", "max", "B/sample"):
        table.add_column(col, justify="left" if col == "format" else "right")
    for r in result["write"]:
        table.add_row(r["format"], f"{r['samples_per_s']:,.0f}", f"{r['median_s']:.3f}",
                      f"{r['min_s']:.3f}", f"{r['max_s']:.3f}", f"{r['bytes_per_sample']:.1f}")
    console.print(table)
    read = result["read"]
    table = Table(title=f"read (warm): {read['format']} cache, {read['bytes'] / 1e6:.1f} MB, "
                        f"batch {read['batch_size']}")
    for col in ("way", "GB/s", "s (median)", "min", "max", "vs fromfile"):
        table.add_column(col, justify="left" if col == "way" else "right")
    for name, r in read["ways"].items():
        table.add_row(name, f"{r['gb_per_s']:.2f}", f"{r['median_s']:.4f}", f"{r['min_s']:.4f}",
                      f"{r['max_s']:.4f}", f"{r['vs_numpy_fromfile']:.2f}x")
    console.print(table)
    seq = result["sequence"]
    table = Table(title=f"{seq['tokens']} tokens, vocabulary {seq['vocab']} (DistillKit ~"
                        f"{seq['distillkit_bytes_per_token_k128']:.0f} B/token at k=128)")
    for col in ("format", "k", "B/token", "payload", "vs DistillKit", "KL mean", "KL max",
                "storage KL", "top-1", "tokens/s"):
        table.add_column(col, justify="left" if col == "format" else "right")
    for r in seq["rows"]:
        table.add_row(r["format"], str(r["k"]), f"{r['bytes_per_token']:.1f}",
                      str(r["payload_bytes_per_token"]), f"{r['vs_distillkit']:.2f}x",
                      f"{r['kl_mean']:.4f}", f"{r['kl_max']:.3f}", f"{r['storage_kl_mean']:.1e}",
                      f"{r['top1_agreement']:.3f}",
                      f"{r['write_tokens_per_s']:,.0f}")
    console.print(table)
    d = seq["distribution"]
    console.print(f"synthetic LM logits: entropy {d['entropy_nats_mean']:.2f} nats, top-1 "
                  f"{d['top1_prob_mean']:.2f}, top-128 mass {d['top128_mass_mean']:.3f}")
    env = result["environment"]
    console.print(f"{env['threads']} thread(s) on {env['cpus']} CPU(s), load "
                  f"{env['loadavg_1m_at_start']:.1f} -> {env['loadavg_1m_at_end']:.1f}; "
                  f"{result['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 120)
    start, load = time.perf_counter(), os.getloadavg()[0]
    g = torch.Generator().manual_seed(args.seed)
    logits = 3.0 * torch.randn(args.rows, args.classes, generator=g)  # [N, C]
    with tempfile.TemporaryDirectory(prefix="kdflow-bench-logit-cache-") as tmp:
        root = Path(tmp)
        write = bench_write(logits, root, args)
        dense = write[0]
        read = bench_read(Path(dense["directory"]), dense["bytes_total"], root, args)
        sequence = bench_sequences(root, args)
    for row in write:
        row.pop("directory")
    result = {
        "config": vars(args) | {"out": str(args.out) if args.out else None},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                        "loadavg_1m_at_start": load, "loadavg_1m_at_end": os.getloadavg()[0]},
        "write": write, "read": read, "sequence": sequence,
        "seconds": time.perf_counter() - start,
    }
    report(result, console)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
