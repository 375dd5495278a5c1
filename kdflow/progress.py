"""Progress reporting for long work (training, condensation, logit caching).

A reporter is a callable ``report(label, done, total, info)``. ``RichProgress`` draws bars with
ETA on a terminal; ``LogProgress`` writes throttled plain log lines (CI, files, Prefect logs).
The CLI installs one per process with ``use``; stages reach it through their context.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Reporter(Protocol):
    def __call__(self, label: str, done: int, total: int | None, info: dict[str, float]) -> None: ...


def _fmt(info: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())


class LogProgress:
    """Plain log lines, at most one per ``every`` seconds per label, plus the first and last."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter | None = None, every: float = 5.0) -> None:
        self.logger, self.every = logger or log, every
        self._last: dict[str, float] = {}

    def __call__(self, label: str, done: int, total: int | None, info: dict[str, float]) -> None:
        now = time.monotonic()
        last = self._last.get(label)
        final = total is not None and done >= total
        if last is not None and not final and now - last < self.every:
            return
        self._last[label] = now
        of = f"/{total}" if total else ""
        self.logger.info("%s %d%s %s", label, done, of, _fmt(info))


class RichProgress:
    """Progress bars with ETA (one per label) on a rich console."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bars = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=console, transient=False,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> RichProgress:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def __call__(self, label: str, done: int, total: int | None, info: dict[str, float]) -> None:
        if label not in self._tasks:
            self._tasks[label] = self.bars.add_task(label, total=total, info="")
        self.bars.update(self._tasks[label], completed=done, total=total, info=_fmt(info))


_active: list[Reporter] = []


@contextmanager
def use(reporter: Reporter) -> Iterator[Reporter]:
    """Make ``reporter`` the process-wide one while the block runs."""
    _active.append(reporter)
    try:
        yield reporter
    finally:
        _active.remove(reporter)


def active() -> Reporter | None:
    return _active[-1] if _active else None


def fan_out(*reporters: Reporter | None) -> Reporter:
    """One reporter that forwards to every non-None reporter."""
    targets = [r for r in reporters if r is not None]

    def report(label: str, done: int, total: int | None, info: dict[str, float]) -> None:
        for r in targets:
            r(label, done, total, info)

    return report


def epochs(reporter: Reporter | None, label: str, total: int) -> Callable[[dict[str, float]], None] | None:
    """An ``on_epoch`` callback for ``fit`` that reports ``label`` epoch by epoch."""
    if reporter is None:
        return None

    def on_epoch(row: dict[str, float]) -> None:
        info = {k: row[k] for k in ("train_loss", "val_accuracy") if k in row}
        reporter(label, int(row["epoch"]), total, info)

    return on_epoch
