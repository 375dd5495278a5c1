"""``kdflow gc``: the kept outputs of every pipeline (``tasks/kept.py``), listed and bounded.

Part of the command line (``kdflow/cli.py`` registers it); the policy lives in ``tasks/gc.py``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from kdflow.errors import KdflowError


def gc(
    keep_last: Annotated[Optional[int], typer.Option("--keep-last", min=0, help="Keep the N most recently kept "
                                                     "outputs of each stage; delete the older ones.")] = None,
    max_bytes: Annotated[Optional[str], typer.Option("--max-bytes", help="Delete the oldest kept outputs until all "
                                                     "of them take at most this much (500M, 2G, 1.5GiB, 800MB).")] = None,
    keep: Annotated[Optional[list[str]], typer.Option("--keep", "-k", help="Never delete what this names: a pipeline "
                                                      "file (its stages' fingerprints) or a fingerprint prefix.")] = None,
    config: Annotated[Path, typer.Option("--config", "-c", help="Pipeline file whose outputs are always kept.")]
    = Path("params.yaml"),
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Say what would be deleted; delete nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for another kdflow process holding the project lock.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """List the earlier outputs kept by fingerprint (artifacts/<name>/.kept/) and bound them.

    Without --keep-last/--max-bytes it only lists. Current outputs, what --config and --keep name,
    and anything outside the artifact root are never deleted.
    """
    from kdflow.cli import _fail, _setup_logging, console, out

    _setup_logging(debug)
    try:
        from kdflow.lock import project_lock
        from tasks import gc as policy

        limit = policy.parse_size(max_bytes) if max_bytes is not None else None
        if config != Path("params.yaml") and not config.is_file():
            raise policy.GcError(f"--config {config}: no such pipeline file")
        root = Path.cwd() / "artifacts"
        fps, prefixes = policy.named(list(keep or []), config)
        with project_lock(Path.cwd(), wait=wait):  # no run moves outputs while they are counted and deleted
            items, refused = policy.inventory(root, fps, prefixes)
            policy.plan(items, keep_last, limit)
            freed = 0 if dry_run else policy.apply(items, root)
    except (KdflowError, OSError, ValueError) as exc:
        _fail(exc, debug)
    remaining = sum(i.bytes for i in items if i.action not in ("delete", "deleted"))
    if as_json:
        doc = {"root": str(root), "dry_run": dry_run, "entries": [i.as_dict() for i in items],
               "refused": [str(p) for p in refused], "freed_bytes": freed, "kept_bytes": remaining,
               "would_free_bytes": sum(i.bytes for i in items if i.action == "delete")}
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")
        return
    table = Table(title=f"kept outputs under {root}")
    for col in ("pipeline", "stage", "fingerprint", "size", "age", "params (vs. current)", "action"):
        table.add_column(col, overflow="fold", no_wrap=col not in ("params (vs. current)",))
    for i in items:
        action = {"delete": "would delete" if dry_run else "delete"}.get(i.action, i.action)
        table.add_row(i.pipeline, i.stage, i.fingerprint[:12], policy.human(i.bytes), policy.age_of(i),
                      escape(i.differs), action)
    out.print(table)
    for p in refused:
        console.print(f"refused (not a kept output inside the artifact root, left alone): {escape(str(p))}",
                      highlight=False)
    gone = sum(i.bytes for i in items if i.action == "delete")
    if dry_run:
        out.print(f"dry run: would free {policy.human(gone)}; nothing deleted", highlight=False)
    else:
        out.print(f"freed {policy.human(freed)}; kept outputs now take {policy.human(remaining)}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("gc")(gc)
