"""Progress reporters: throttled log lines, fan-out, epoch callbacks."""
from __future__ import annotations

import logging

from kdflow import progress


def test_log_progress_throttles_but_keeps_first_and_last(caplog) -> None:
    rep = progress.LogProgress(logging.getLogger("t.progress"), every=3600)
    with caplog.at_level(logging.INFO, logger="t.progress"):
        for i in range(1, 11):
            rep("student", i, 10, {"train_loss": 1.0 / i})
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["student 1/10 train_loss=1", "student 10/10 train_loss=0.1"]


def test_fan_out_and_epochs_callback() -> None:
    seen_a, seen_b = [], []
    rep = progress.fan_out(lambda *a: seen_a.append(a), None, lambda *a: seen_b.append(a))
    on_epoch = progress.epochs(rep, "teacher x", 5)
    on_epoch({"epoch": 2, "train_loss": 0.5, "val_accuracy": 0.9, "lr": 0.1})
    assert seen_a == seen_b == [("teacher x", 2, 5, {"train_loss": 0.5, "val_accuracy": 0.9})]
    assert progress.epochs(None, "x", 5) is None


def test_use_sets_the_active_reporter() -> None:
    assert progress.active() is None
    rep = progress.LogProgress()
    with progress.use(rep):
        assert progress.active() is rep
    assert progress.active() is None
