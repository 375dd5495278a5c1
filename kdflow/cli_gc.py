"""What ``kdflow gc`` prints: the kept outputs (``tasks/kept.py``), what it deletes, what it refuses.

``kdflow/cli.py`` runs the command (``tasks/gc.py`` chooses what goes); this module only shows it.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def show_gc(root: Path, items: list[Any], refused: list[Path], dry_run: bool, freed: int, as_json: bool) -> None:
    """Print ``kdflow gc``'s result (``tasks.gc.Item`` rows, oldest first)."""
    from kdflow.cli import console, out

    remaining = sum(i.bytes for i in items if i.action not in ("delete", "deleted"))
    gone = sum(i.bytes for i in items if i.action == "delete")
    if as_json:
        doc = {"root": str(root), "dry_run": dry_run, "entries": [i.as_dict() for i in items],
               "refused": [str(p) for p in refused], "freed_bytes": freed, "kept_bytes": remaining,
               "would_free_bytes": gone}
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")
        return
    table = Table(title=f"kept outputs under {root}")
    for col in ("pipeline", "stage", "fingerprint", "size", "age", "params (vs. current)", "action"):
        table.add_column(col, overflow="fold", no_wrap=col != "params (vs. current)")
    now = time.time()
    for i in items:
        action = "would delete" if i.action == "delete" and dry_run else i.action
        table.add_row(i.pipeline, i.stage, i.fingerprint[:12], human(i.bytes), age(max(0.0, now - i.kept_at)),
                      escape(i.differs), action)
    out.print(table)
    for p in refused:
        console.print(f"refused (not a kept output inside the artifact root, left alone): {escape(str(p))}",
                      highlight=False)
    if dry_run:
        out.print(f"dry run: would free {human(gone)}; nothing deleted", highlight=False)
    else:
        out.print(f"freed {human(freed)}; kept outputs now take {human(remaining)}", highlight=False)
