"""Prefect's run logs without tracebacks for kdflow's own errors (the CLI shows them with --debug).

Prefect logs a failed task or flow run with the full traceback (``logger.exception``). For a
``KdflowError`` (bad data, a corrupted artifact, a lock held by another run) or an ``OSError`` (a
full disk), which the CLI prints as one line, that line says everything a user can act on, so
``hide_error_tracebacks`` drops the traceback from those records and keeps the line; any other
exception (a bug) keeps its traceback.
"""
from __future__ import annotations

import logging

from kdflow.errors import KdflowError

RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


def is_kdflow_error(exc: BaseException | None) -> bool:
    """Whether ``exc`` is, or was caused by, an error the CLI prints as one line: a ``KdflowError``
    or an ``OSError`` (a full disk, a permission)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (KdflowError, OSError)):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


class HideKdflowTracebacks(logging.Filter):
    """Keeps the record, without its traceback when the exception is a kdflow error."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and is_kdflow_error(record.exc_info[1]):
            record.exc_info = None
            record.exc_text = None
        return True


_FILTER = HideKdflowTracebacks()


def hide_error_tracebacks(hide: bool = True) -> None:
    """Install (or, with ``hide=False``, remove) the filter on Prefect's task- and flow-run loggers."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if hide:
            logger.addFilter(_FILTER)  # idempotent: a filter is added once
        else:
            logger.removeFilter(_FILTER)
