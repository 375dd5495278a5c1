"""A per-class grid picture of a condensed image set (one row per class, one column per image).

Built with ``matplotlib.figure.Figure`` on an Agg canvas (no ``pyplot`` state), PNG metadata
without a version stamp so equal inputs give equal bytes.
"""
from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kdflow.errors import DataError


def display_images(images: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` images scaled per image to [0, 1], as ``[N, H, W]`` (1 channel) or
    ``[N, H, W, 3]`` (3 channels); other channel counts show their channel mean."""
    x = images.detach().float().cpu()
    lo = x.flatten(1).min(1).values.view(-1, 1, 1, 1)
    hi = x.flatten(1).max(1).values.view(-1, 1, 1, 1)
    x = (x - lo) / (hi - lo).clamp_min(1e-12)
    if x.shape[1] == 3:
        return x.permute(0, 2, 3, 1)
    return x.mean(1)


def plot_class_grid(
    path: Path, images: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
    per_class: int = 10, title: str | None = None,
) -> Path:
    """Write a PNG with the first ``per_class`` images of each class in a row.

    Args:
        path: the PNG to write (parent folders are created).
        images: ``[N, C, H, W]`` images.
        labels: ``[N]`` class indices.
        num_classes: number of rows (a class without images leaves its row empty).
        per_class: most images shown per class.
        title: optional figure title.

    Raises:
        DataError: ``images`` are not ``[N, C, H, W]`` or do not match ``labels``.
    """
    if images.dim() != 4 or images.shape[0] != labels.shape[0]:
        raise DataError(f"class grid: need images [N, C, H, W] and labels [N], got "
                        f"{list(images.shape)} and {list(labels.shape)}")
    shown = display_images(images)
    rows = [(labels == c).nonzero().flatten()[:per_class] for c in range(num_classes)]
    cols = max(1, max((len(r) for r in rows), default=1))
    cell = 0.7
    fig = Figure(figsize=(0.6 + cell * cols, 0.3 + cell * num_classes), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(num_classes, cols, squeeze=False)
    for c, idx in enumerate(rows):
        for j in range(cols):
            ax = axes[c][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if j < len(idx):
                ax.imshow(shown[int(idx[j])].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if j == 0:
                ax.set_ylabel(str(c), rotation=0, labelpad=10, va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.5 / (0.6 + cell * cols), wspace=0.05, hspace=0.05)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})
    return path
