"""Metrics against sklearn and slow loop references; latency and plot files."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import f1_score
from torch import nn

from kdflow.errors import DataError
from kdflow.metrics import (
    accuracy,
    agreement,
    confusion_matrix,
    expected_calibration_error,
    kl_divergence,
    macro_f1,
    measure_latency,
    reliability_bins,
)
from kdflow.metrics.plots import (
    plot_compression_png,
    plot_confusion_png,
    plot_curves_png,
    plot_reliability_png,
    write_confusion_plot_data,
    write_reliability_plot_data,
)

N, C = 200, 6
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, C, (N,), generator=g)
    logits = torch.randn(N, C, generator=g) * 2
    logits[torch.arange(N), labels] += 1.5  # better than chance
    other = logits + torch.randn(N, C, generator=g)
    return logits, labels, other


def softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def test_accuracy_and_agreement(data) -> None:
    logits, labels, other = data
    pred = logits.argmax(-1).tolist()
    right = sum(p == y for p, y in zip(pred, labels.tolist()))
    assert accuracy(logits, labels) == pytest.approx(right / N)
    assert agreement(logits, logits) == 1.0
    pred_b = other.argmax(-1).tolist()
    assert agreement(logits, other) == pytest.approx(sum(a == b for a, b in zip(pred, pred_b)) / N)


def test_confusion_and_f1_match_sklearn(data) -> None:
    logits, labels, _ = data
    pred = logits.argmax(-1).numpy()
    cm = confusion_matrix(logits, labels, C)
    assert cm.shape == (C, C) and cm.sum() == N
    assert (cm.numpy() == sk_confusion(labels.numpy(), pred, labels=list(range(C)))).all()
    expected = f1_score(labels.numpy(), pred, average="macro")
    assert macro_f1(logits, labels, C) == pytest.approx(expected)


def test_macro_f1_skips_absent_classes() -> None:
    logits = torch.eye(3)[[0, 1, 1]] * 5  # predicts 0, 1, 1; class 2 absent everywhere
    labels = torch.tensor([0, 1, 0])
    expected = f1_score(labels.numpy(), logits.argmax(-1).numpy(), average="macro")
    assert macro_f1(logits, labels, 3) == pytest.approx(expected)


def test_kl_divergence_matches_loop(data) -> None:
    teacher, _, student = data
    ref = 0.0
    for t_row, s_row in zip(teacher.tolist(), student.tolist()):
        p, q = softmax_row(t_row), softmax_row(s_row)
        ref += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert kl_divergence(teacher, student) == pytest.approx(ref / N, rel=1e-6)
    assert kl_divergence(teacher, teacher) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_and_bins_match_loop(data, n_bins: int) -> None:
    logits, labels, _ = data
    ece, rows = 0.0, []
    probs = [softmax_row(r) for r in logits.tolist()]
    for i in range(n_bins):
        lo, hi = i / n_bins, (i + 1) / n_bins
        members = [
            (max(p), p.index(max(p)) == y)
            for p, y in zip(probs, labels.tolist())
            if lo < max(p) <= hi
        ]
        if members:
            conf = sum(c for c, _ in members) / len(members)
            acc = sum(ok for _, ok in members) / len(members)
            ece += len(members) / N * abs(acc - conf)
        rows.append(len(members))
    bins = reliability_bins(logits, labels, n_bins)
    assert [b["count"] for b in bins] == rows
    assert bins[0]["lower"] == 0.0 and bins[-1]["upper"] == 1.0
    assert set(bins[0]) == {"lower", "upper", "confidence", "accuracy", "count"}
    assert expected_calibration_error(logits, labels, n_bins) == pytest.approx(ece, abs=1e-9)


def test_perfectly_confident_and_right_is_calibrated() -> None:
    labels = torch.tensor([0, 1, 2, 1])
    logits = torch.nn.functional.one_hot(labels, 3).float() * 100
    assert expected_calibration_error(logits, labels) == pytest.approx(0.0, abs=1e-9)
    assert accuracy(logits, labels) == 1.0


def test_bad_inputs_raise() -> None:
    with pytest.raises(DataError, match="labels"):
        accuracy(torch.zeros(3, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(DataError):
        agreement(torch.zeros(3, 2), torch.zeros(3, 3))


def test_measure_latency_restores_state() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    model.train()
    before = torch.get_num_threads()
    out = measure_latency(model, (8,), 4, repeats=5, warmup=1, threads=1)
    assert set(out) == {"median_ms", "p90_ms", "repeats", "batch_size"}
    assert out["repeats"] == 5 and out["batch_size"] == 4
    assert 0 < out["median_ms"] <= out["p90_ms"]
    assert torch.get_num_threads() == before
    assert model.training


def test_plot_data_files(tmp_path, data) -> None:
    logits, labels, _ = data
    target = tmp_path / "plots" / "confusion.json"
    path = write_confusion_plot_data(target, labels, logits.argmax(-1))
    rows = json.loads(path.read_text())
    assert len(rows) == N
    assert rows[0] == {"actual": int(labels[0]), "predicted": int(logits[0].argmax())}

    bins = reliability_bins(logits, labels, 10)
    path = write_reliability_plot_data(tmp_path / "reliability.csv", bins)
    with path.open() as f:
        table = list(csv.DictReader(f))
    full = [(i, b) for i, b in enumerate(bins) if b["count"]]
    assert [int(r["bin"]) for r in table] == [i for i, _ in full]
    assert sum(int(r["count"]) for r in table) == N
    assert float(table[0]["confidence"]) == pytest.approx(full[0][1]["confidence"], abs=1e-6)
    assert float(table[0]["accuracy"]) == pytest.approx(full[0][1]["accuracy"], abs=1e-6)


def test_png_plots(tmp_path, data) -> None:
    import matplotlib

    logits, labels, other = data
    figures_before = len(matplotlib._pylab_helpers.Gcf.figs)
    bins = {"teacher": reliability_bins(logits, labels), "student": reliability_bins(other, labels)}
    histories = {
        "student": [
            {"epoch": e, "train_loss": 1 / (e + 1), "val_accuracy": 0.5 + e / 10} for e in range(4)
        ],
        "baseline": [{"train_loss": 1.0}, {"train_loss": 0.8, "val_accuracy": 0.6}],
    }
    points = [
        {"name": "teacher", "params": 1e6, "accuracy": 0.95},
        {"name": "student", "params": 2e4, "accuracy": 0.9},
    ]
    paths = [
        plot_confusion_png(tmp_path / "cm.png", confusion_matrix(logits, labels, C), "student"),
        plot_reliability_png(tmp_path / "rel.png", bins),
        plot_curves_png(tmp_path / "curves.png", histories),
        plot_compression_png(tmp_path / "sub" / "compression.png", points),
    ]
    for path in paths:
        assert path.exists() and path.read_bytes()[:8] == PNG_MAGIC
    assert len(matplotlib._pylab_helpers.Gcf.figs) == figures_before


def test_ranking_png_is_stable_and_orders_best_first(tmp_path) -> None:
    from kdflow.metrics.plots import plot_ranking_png

    rows = [{"teacher": "b", "score": 0.7, "rank": 2}, {"teacher": "a", "score": 0.9, "rank": 1}]
    first = plot_ranking_png(tmp_path / "figs" / "ranking.png", rows, chosen=["a"])
    again = plot_ranking_png(tmp_path / "again.png", list(reversed(rows)), chosen=["a"])
    assert first.read_bytes()[:8] == PNG_MAGIC
    assert first.read_bytes() == again.read_bytes()  # same bytes whatever the input order
