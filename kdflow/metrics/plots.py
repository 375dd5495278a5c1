"""Plot data for ``dvc plots`` (JSON/CSV) and PNG pictures for reports.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, never through
``pyplot``, so no global figure state is created or leaked.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter, NullLocator
from torch import Tensor


def _ints(values: Tensor | Iterable[int]) -> list[int]:
    if isinstance(values, Tensor):
        return [int(v) for v in values.reshape(-1).tolist()]
    return [int(v) for v in values]


def _figure(width: float = 5.0, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})  # no version stamp: stable bytes
    return path


def write_confusion_plot_data(
    path: Path, labels: Tensor | Iterable[int], predictions: Tensor | Iterable[int]
) -> Path:
    """Writes ``[{"actual": int, "predicted": int}, ...]`` for DVC's ``confusion`` template."""
    actual, predicted = _ints(labels), _ints(predictions)
    if len(actual) != len(predicted):
        raise ValueError(f"{len(actual)} labels but {len(predicted)} predictions")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"actual": a, "predicted": p} for a, p in zip(actual, predicted)]
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return path


def write_reliability_plot_data(path: Path, bins: list[dict]) -> Path:
    """Writes a CSV with columns ``bin, confidence, accuracy, count``; empty bins are left out."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["bin", "confidence", "accuracy", "count"])
        for i, b in enumerate(bins):
            if b["count"] > 0:
                writer.writerow([i, f"{b['confidence']:.6f}", f"{b['accuracy']:.6f}", b["count"]])
    return path


def plot_confusion_png(path: Path, cm: Tensor, title: str) -> Path:
    """Heat map of a confusion matrix ``[C, C]`` (rows actual), counts written in small ones."""
    counts = cm.detach().cpu().numpy()
    n = counts.shape[0]
    fig = _figure(max(4.0, 0.45 * n + 2), max(3.5, 0.45 * n + 1.5))
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set(title=title, xlabel="predicted", ylabel="actual")
    if n <= 20:
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        threshold = counts.max() / 2 if counts.size else 0
        for i in range(n):
            for j in range(n):
                color = "white" if counts[i, j] > threshold else "black"
                text = str(int(counts[i, j]))
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
    return _save(fig, path)


def picture_bins(n_samples: int, bins: int) -> int:
    """Confidence bins for a reliability picture of ``n_samples``: ``bins``, fewer on a small test
    set (about 25 samples per bin on average, at least 5 bins)."""
    return max(1, min(bins, max(5, n_samples // 25)))


def plot_reliability_png(path: Path, bins_by_model: dict[str, list[dict]]) -> Path:
    """Reliability diagram: accuracy against confidence per model, with the diagonal; below it,
    how many samples each bin holds (a point of a few samples says little)."""
    fig = _figure(5.0, 5.2)
    ax, counts = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    width = 0.8 / max(1, len(bins_by_model))
    for i, (name, bins) in enumerate(bins_by_model.items()):
        full = [b for b in bins if b["count"] > 0]
        conf, acc = [b["confidence"] for b in full], [b["accuracy"] for b in full]
        line, = ax.plot(conf, acc, marker="o", label=name)
        lo = [b["lower"] + (b["upper"] - b["lower"]) * (0.1 + i * width) for b in bins]
        counts.bar(lo, [b["count"] for b in bins], width=[(b["upper"] - b["lower"]) * width for b in bins],
                   align="edge", color=line.get_color(), alpha=0.7)
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"reliability ({len(next(iter(bins_by_model.values()), []))} bins)")
    ax.legend(loc="upper left", fontsize=8)
    counts.set(xlabel="confidence", ylabel="samples")
    counts.yaxis.set_major_locator(MaxNLocator(3, integer=True))
    return _save(fig, path)


def plot_curves_png(
    path: Path,
    histories: dict[str, list[dict]],
    keys: Sequence[str] = ("train_loss", "val_accuracy"),
) -> Path:
    """One panel per key; one line per run. x is each record's ``epoch`` (else its index)."""
    fig = _figure(4.0 * max(1, len(keys)), 3.5)
    axes = fig.subplots(1, max(1, len(keys)), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        for name, history in histories.items():
            rows = [
                (r.get("epoch", i), r[key]) for i, r in enumerate(history) if r.get(key) is not None
            ]
            if rows:
                ax.plot([x for x, _ in rows], [y for _, y in rows], marker=".", label=name)
        ax.set(title=key, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(8, integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, path)


def plot_compression_png(path: Path, points: list[dict]) -> Path:
    """Accuracy against parameter count (log scale); each point labelled by ``name``."""
    fig = _figure()
    ax = fig.subplots()
    for p in points:
        ax.scatter([p["params"]], [p["accuracy"]])
        xy = (p["params"], p["accuracy"])
        ax.annotate(str(p["name"]), xy, textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    sizes = sorted({int(p["params"]) for p in points if p["params"] > 0})
    if sizes:  # ticks at the models' own sizes: log axes over one decade label crowded minor ticks
        ax.set_xlim(sizes[0] / 2, sizes[-1] * 2)
        ax.xaxis.set_major_locator(FixedLocator(_spread(sizes, gap=0.14 * math.log10(4 * sizes[-1] / sizes[0]))))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: compact(v)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="parameters", ylabel="accuracy", title="accuracy vs. size")
    return _save(fig, path)


def _spread(sizes: list[int], gap: float) -> list[int]:
    """The smallest and largest of ``sizes`` and those between at least ``gap`` decades from
    their labelled neighbours (the others are still drawn and named by their annotation)."""
    keep = [sizes[0]]
    for s in sizes[1:-1]:
        if math.log10(s / keep[-1]) >= gap and math.log10(sizes[-1] / s) >= gap:
            keep.append(s)
    return keep + sizes[-1:] if len(sizes) > 1 else keep  # the middle ones kept are far from the largest


def compact(value: float) -> str:
    """A count in a few characters: 950, 4.81k, 1.2M."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def overlapping_tick_labels(fig: Figure) -> list[tuple[str, str]]:
    """Pairs of tick labels of one axis whose drawn boxes overlap (empty: every label readable)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    pairs = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [lb for lb in [*axis.get_ticklabels(), *axis.get_ticklabels(minor=True)]
                      if lb.get_visible() and lb.get_text().strip()]
            boxes = [(lb.get_text(), lb.get_window_extent(renderer)) for lb in labels]
            for i, (a, box_a) in enumerate(boxes):
                for b, box_b in boxes[i + 1:]:
                    if box_a.overlaps(box_b):
                        pairs.append((a, b))
    return pairs


def plot_ranking_png(path: Path, rows: list[dict], chosen: Sequence[str] = ()) -> Path:
    """Horizontal bars of each teacher candidate's ``score``, best on top; ``chosen`` highlighted.

    Args:
        rows: one dict per candidate with ``teacher`` and ``score`` (e.g. ``kdflow.select.rank``).
        chosen: names drawn in a second colour (the selected teacher(s)).
    """
    ordered = sorted(rows, key=lambda r: (-float(r["score"]), str(r["teacher"])))
    names = [str(r["teacher"]) for r in ordered]
    scores = [float(r["score"]) for r in ordered]
    fig = _figure(5.0, max(2.0, 0.45 * len(names) + 1.2))
    ax = fig.subplots()
    colors = ["tab:orange" if n in chosen else "tab:blue" for n in names]
    bars = ax.barh(range(len(names)), scores, color=colors)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    for bar, score in zip(bars, scores):
        ax.annotate(f"{score:.4f}", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                    textcoords="offset points", xytext=(3, 0), va="center", fontsize=8)
    ax.set(xlabel="score", title="teacher ranking")
    ax.margins(x=0.2)
    return _save(fig, path)
