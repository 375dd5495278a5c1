"""Mirage condensation on TU datasets: time (tree extraction vs. mining) and size vs. the full train set.

For each dataset found under ``--root`` (``<root>/<NAME>/raw/<NAME>_A.txt``): a stratified 80/10/10
split from ``--seed``; on the training split, ``--repeats`` timed runs of

- extraction: canonical depth-``hops`` tree ids of all nodes + one transaction per graph;
- threshold search (automatic mode only) and mining: exact per-class frequent tree sets (Eclat)
  at the final thresholds, shared sets dropped;
- materialisation of the condensed graphs;

with the thresholds either fixed per dataset (``--thresholds NAME=t0,t1``; NCI1 defaults to the
official script's 440,570) or chosen automatically for ``--target`` condensed graphs. The baseline
in the same run is the full training set (graphs, nodes, edges, bytes of the in-memory arrays), and
for speed a recursive canonical-string extraction in Python (``--no-reference`` skips it).
GNN training on the condensed sets is not measured yet.

    .venv/bin/python benchmarks/condense_graphs.py --out condense_graphs.json
    .venv/bin/python benchmarks/condense_graphs.py --datasets MUTAG NCI1 --hops 2 --target 10
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from kdflow.condense.mirage import mirage, transactions, tree_ids
from kdflow.data.graphs import GraphSet
from kdflow.data.split import stratified_split
from kdflow.data.tu import read_tu

DATASETS = ["MUTAG", "PROTEINS", "NCI1", "IMDB-BINARY"]
FIXED = {"NCI1": [440, 570]}  # the official Mirage NCI1 script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path(os.environ.get("KDFLOW_SHARED_DATA", "../shared/data")) / "tu")
    p.add_argument("--datasets", nargs="+", default=DATASETS)
    p.add_argument("--hops", type=int, default=2)
    p.add_argument("--target", type=int, default=10, help="condensed graphs wanted in automatic mode")
    p.add_argument("--thresholds", nargs="*", default=[], help="NAME=t0,t1 fixed per-class thresholds")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-reference", action="store_true", help="skip the recursive-string baseline")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def reference_extract(g: GraphSet, hops: int) -> list[set[str]]:
    """Baseline: recursive canonical strings per node (memoised per depth), one set per graph."""
    adj: list[list[tuple[int, int]]] = [[] for _ in range(g.num_nodes)]
    el = g.edge_labels.tolist() if g.edge_labels is not None else [0] * g.num_edges
    for e, (u, v) in enumerate(g.edge_index.T.tolist()):
        adj[v].append((u, el[e]))
    cur = [f"({x})" for x in g.node_labels.tolist()]
    labels = g.node_labels.tolist()
    for _ in range(hops):
        cur = [f"({labels[v]}|" + ",".join(sorted(f"{e}:{cur[u]}" for u, e in adj[v])) + ")" for v in range(g.num_nodes)]
    off = g.node_offsets.tolist()
    return [{cur[v] for v in range(a, b) if adj[v]} for a, b in zip(off[:-1], off[1:])]


def stats(values: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}


def run_one(train: GraphSet, args: argparse.Namespace, mode: str, thresholds: list[int] | None) -> dict:
    extract, search, mine, mat, out = [], [], [], [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ids = tree_ids(train.node_labels, train.edge_index, train.edge_labels, args.hops)
        keep = np.bincount(train.edge_index[1], minlength=train.num_nodes) > 0
        transactions(ids.ids, train.node_offsets, keep)
        extract.append(time.perf_counter() - t0)
        kw = {"thresholds": thresholds} if thresholds else {"target_graphs": args.target}
        out = mirage(train, hops=args.hops, **kw)
        search.append(out.timings["thresholds"])
        mine.append(out.timings["mine"])
        mat.append(out.timings["materialise"])
    c = out.graphs
    return {
        "mode": mode,
        "thresholds": out.thresholds,
        "distinct_trees": ids.counts[-1],
        "extract": stats(extract),
        "threshold_search": stats(search),
        "mine": stats(mine),
        "materialise": stats(mat),
        "graphs": c.num_graphs,
        "graphs_per_class": np.bincount(c.graph_labels, minlength=train.num_classes).tolist(),
        "nodes": c.num_nodes,
        "edges": c.num_edges,
        "bytes": out.nbytes,
        "bytes_ratio": out.nbytes / train.nbytes,
        "max_set_size": max((len(s) for s in out.itemsets), default=0),
    }


def bench_dataset(name: str, args: argparse.Namespace, fixed: dict[str, list[int]]) -> dict:
    full = read_tu(args.root / name)
    split = np.array(stratified_split(full.graph_labels, seed=args.seed, val_fraction=0.1, test_fraction=0.1))
    train = full.subset(np.flatnonzero(split == "train"))
    row = {
        "dataset": name,
        "hops": args.hops,
        "train": {"graphs": train.num_graphs, "nodes": train.num_nodes, "edges": train.num_edges, "bytes": train.nbytes},
        "runs": [run_one(train, args, f"auto(target={args.target})", None)],
    }
    if name in fixed:
        row["runs"].append(run_one(train, args, "fixed", fixed[name]))
    if not args.no_reference:
        t0 = time.perf_counter()
        reference_extract(train, args.hops)
        row["reference_extract_s"] = time.perf_counter() - t0
        row["extract_speedup"] = row["reference_extract_s"] / row["runs"][0]["extract"]["median_s"]
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fixed = dict(FIXED)
    for spec in args.thresholds:
        key, _, values = spec.partition("=")
        fixed[key] = [int(v) for v in values.split(",")]
    console = Console()
    rows = []
    for name in args.datasets:
        if not (args.root / name).exists():
            console.print(f"[yellow]skip {name}: not found under {args.root}[/]")
            continue
        rows.append(bench_dataset(name, args, fixed))
    table = Table(title=f"Mirage, {args.hops} hops, training split (seed {args.seed}), median of {args.repeats}")
    cols = ("dataset", "mode", "thresholds", "extract s", "ref. extract s", "search s", "mine s", "graphs", "nodes", "bytes", "vs. train")
    for col in cols:
        table.add_column(col)
    for row in rows:
        for run in row["runs"]:
            table.add_row(
                row["dataset"], run["mode"], str(run["thresholds"]), f"{run['extract']['median_s']:.3f}",
                f"{row.get('reference_extract_s', float('nan')):.2f}",
                f"{run['threshold_search']['median_s']:.3f}", f"{run['mine']['median_s']:.4f}",
                f"{run['graphs']} {run['graphs_per_class']}", str(run["nodes"]), str(run["bytes"]),
                f"{run['bytes_ratio']:.2e}",
            )
    console.print(table)
    if args.out:
        meta = {"python": sys.version.split()[0], "machine": platform.machine(), "cpus": os.cpu_count()}
        args.out.write_text(json.dumps({"meta": meta, "args": {k: str(v) for k, v in vars(args).items()}, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
