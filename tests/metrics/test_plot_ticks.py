"""Report pictures: no tick labels drawn over each other; reliability with bin counts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdflow.metrics import plots
from kdflow.metrics.classification import reliability_bins


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures the plot functions save (the real ``_save`` still writes each PNG)."""
    figures, real = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figures.append(fig), real(fig, path))[1])
    return figures


def test_checker_finds_crowded_labels() -> None:
    fig = plots._figure(2.0, 2.0)
    ax = fig.subplots()
    ax.set_xticks(range(30), [f"label{i}" for i in range(30)])
    assert plots.overlapping_tick_labels(fig)


@pytest.mark.parametrize("sizes", [(4810, 1210), (113_000, 6_500), (421_642, 25_066), (1_200_000, 700_000, 90_000, 5_000)])
def test_compression_ticks_do_not_overlap(tmp_path: Path, drawn: list, sizes: tuple[int, ...]) -> None:
    plots.plot_compression_png(tmp_path / "c.png", [{"name": f"m{i}", "params": s, "accuracy": 0.5 + i / 10}
                                                    for i, s in enumerate(sizes)])
    assert plots.overlapping_tick_labels(drawn[-1]) == []
    labels = [t.get_text() for t in drawn[-1].axes[0].get_xticklabels()]
    assert labels[0] == plots.compact(min(sizes)) and labels[-1] == plots.compact(max(sizes))  # the models' own sizes
    assert set(labels) <= {plots.compact(s) for s in sizes}
    assert plots.compact(421_642) == "422k" and plots.compact(1210) == "1.21k" and plots.compact(950) == "950"


def test_other_pictures_have_readable_ticks(tmp_path: Path, drawn: list) -> None:
    g = torch.Generator().manual_seed(0)
    plots.plot_curves_png(tmp_path / "k.png", {"s": [{"epoch": i, "train_loss": 1 / (i + 1), "val_accuracy": i / 300}
                                                  for i in range(300)]})
    for n in (10, 20, 40):
        plots.plot_confusion_png(tmp_path / f"m{n}.png", torch.randint(0, 500, (n, n), generator=g), "student")
    logits, y = torch.randn(90, 10, generator=g) * 3, torch.randint(0, 10, (90,), generator=g)
    plots.plot_reliability_png(tmp_path / "r.png", {"teacher": reliability_bins(logits, y, 15)})
    for fig in drawn:
        assert plots.overlapping_tick_labels(fig) == []


def test_reliability_shows_how_many_samples_each_bin_holds(tmp_path: Path, drawn: list) -> None:
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(60, 5, generator=g) * 2, torch.randint(0, 5, (60,), generator=g)
    n_bins = plots.picture_bins(len(y), 15)
    assert n_bins == 5 and plots.picture_bins(10_000, 15) == 15 and plots.picture_bins(3, 4) == 4
    bins = {"teacher": reliability_bins(logits, y, n_bins), "student": reliability_bins(logits * 0.3, y, n_bins)}
    plots.plot_reliability_png(tmp_path / "r.png", bins)
    counts = drawn[-1].axes[1]
    heights = [p.get_height() for p in counts.patches]
    assert len(heights) == 2 * n_bins and sum(heights) == 2 * len(y)
    assert "5 bins" in drawn[-1].axes[0].get_title()
