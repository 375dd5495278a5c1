"""``kdflow params`` and the output of ``kdflow status``: what a pipeline file may say, and what a
run would do.

``register(app)`` adds ``params`` to the typer app of ``kdflow.cli`` (which calls it); ``status``
lives in ``kdflow.cli`` (the one library module that may import ``tasks/``) and prints through
``show_status``. Like every reporting command, both print a table or, with ``--json``, one JSON
document.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from kdflow.errors import KdflowError, ParamsError

# the options of kdflow.cli (declared again: kdflow.cli imports this module while it loads)
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]


def print_json(doc: Any) -> None:
    """One JSON document on stdout (never wrapped or coloured)."""
    sys.stdout.write(json.dumps(doc, indent=1, default=str) + "\n")


def params_(
    prefix: Annotated[Optional[str], typer.Argument(help="Only keys under this one, e.g. student.loss or condense.")] = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Every key a pipeline file may set: type, default, bounds and description (from the schema)."""
    from kdflow.cli import _fail, out

    try:
        from schemas.describe import schema_rows

        rows = [r for r in schema_rows() if prefix is None or r.key == prefix or r.key.startswith(prefix + ".")
                or r.key.startswith(prefix + "[]")]
        if not rows:
            raise ParamsError([f"{prefix}: no such key; `kdflow params` lists them all"], "kdflow params")
    except KdflowError as exc:
        _fail(exc, debug)
    if as_json:
        print_json([r.as_dict() for r in rows])
        return
    table = Table(title="pipeline keys (schemas/params.py)")
    for col, wrap in (("key", False), ("type", True), ("default", True), ("bounds", True), ("description", True)):
        table.add_column(col, no_wrap=not wrap, overflow="fold")
    for r in rows:
        key = r.key + (f"\n  when {r.when}" if r.when else "")
        table.add_row(*(escape(v) for v in (key, r.type, r.default, r.bounds, r.description)))
    out.print(table)


def show_status(pp: Any, config: Path, overrides: list[str], stages: list[Any], as_json: bool) -> None:
    """Print ``kdflow status``: which stages would run and why (``tasks.status.StageStatus`` rows)."""
    from kdflow.cli import out

    if as_json:
        print_json({"pipeline": pp.name, "config": str(config), "overrides": overrides,
                    "stages": [s.as_dict() for s in stages]})
        return
    table = Table(title=f"pipeline {pp.name}: what `kdflow run` would do")
    for col, wrap in (("stage", False), ("action", False), ("fingerprint", False), ("why", True)):
        table.add_column(col, no_wrap=not wrap, overflow="fold")
    for s in stages:
        action = "[yellow]run[/]" if s.runs else "[cyan]restore kept output[/]" if s.restores else "[green]up to date[/]"
        table.add_row(s.stage, action, s.fingerprint[:12], escape("; ".join(s.reasons)))
    out.print(table)
    n, kept = sum(s.runs for s in stages), sum(s.restores for s in stages)
    restore = f"{kept} restored from kept outputs" if kept else ""
    if n:
        out.print(f"{n} of {len(stages)} stage(s) would run" + (f", {restore}" if kept else ""), highlight=False)
    else:
        out.print(f"nothing to run{', ' + restore if kept else ''}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("params")(params_)
