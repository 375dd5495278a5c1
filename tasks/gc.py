"""``kdflow gc``: list the kept outputs (``tasks/kept.py``) of every pipeline and bound their disk use.

What is deleted is chosen by ``plan``: per stage, all but the ``keep_last`` most recently kept,
then, oldest first, until the kept outputs total at most ``max_bytes``. Never deleted: a current
output (``artifacts/<name>/<stage>/``), a kept output whose fingerprint is *named* (the stages of
the pipeline files given, ``params.yaml`` by default, or a fingerprint prefix), and anything that
is not a real ``artifacts/<name>/.kept/<stage>/<fingerprint>/`` folder inside the artifact root
(a link, or a store that resolves elsewhere, is reported as refused).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdflow.errors import KdflowError
from schemas.manifest import Manifest
from tasks import kept

_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
          "g": 1024**3, "gib": 1024**3, "gb": 1000**3, "t": 1024**4, "tib": 1024**4, "tb": 1000**4}


class GcError(KdflowError):
    """A ``kdflow gc`` option that cannot be used (exit 2)."""

    exit_code = 2


def parse_size(text: str) -> int:
    """Bytes of ``500M``, ``2G``, ``1.5GiB``, ``800MB``, ``1000`` (K/M/G/T and KiB... are powers of 1024,
    KB/MB/GB/TB powers of 1000)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise GcError(f"--max-bytes: {text!r} is not a size (e.g. 500M, 2G, 1.5GiB, 800MB or a number of bytes)")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass
class Item:
    """One kept output and what gc does with it (``keep``, ``named``, ``delete``) or a refused path."""

    pipeline: str
    stage: str
    fingerprint: str
    path: str
    bytes: int
    kept_at: float
    differs: str  # its params where they differ from the current output's ("" if the same)
    action: str
    mlflow_run_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def _differs(manifest: Manifest | None, current: Manifest | None) -> str:
    if manifest is None:
        return "(manifest unreadable)"
    if current is None:
        return ", ".join(f"{k}={v}" for k, v in list(_flat(manifest.params).items())[:4])
    mine, now = _flat(manifest.params), _flat(current.params)
    keys = [k for k in sorted(set(mine) | set(now)) if mine.get(k) != now.get(k)]
    if keys:
        return ", ".join(f"{k}={mine.get(k)}" for k in keys)
    ups = [u for u in manifest.upstream if manifest.upstream[u] != current.upstream.get(u)]
    return f"upstream {', '.join(ups)} differs" if ups else "same params and upstream"


def _current(folder: Path) -> Manifest | None:
    try:
        return Manifest.load(folder)
    except (ValueError, OSError):
        return None


def refused(artifacts: Path) -> list[Path]:
    """What sits in a pipeline's kept store but is not a kept output gc may delete (links, folders
    that resolve outside the artifact root)."""
    root = kept.store(artifacts)
    if root.is_symlink():
        return [root]
    if not root.is_dir():
        return []
    out = []
    for stage_dir in sorted(root.iterdir()):
        if stage_dir.is_symlink():
            out.append(stage_dir)
        elif stage_dir.is_dir():
            out += [p for p in sorted(stage_dir.iterdir()) if p.is_symlink() or not kept.inside(p, artifacts)]
    return out


def inventory(artifacts_root: Path, named: set[str], prefixes: tuple[str, ...] = ()) -> tuple[list[Item], list[Path]]:
    """Every kept output under ``<project>/artifacts/*/``, oldest first, marked ``named`` or ``keep``;
    and the refused paths."""
    items: list[Item] = []
    bad: list[Path] = []
    if not artifacts_root.is_dir():
        return items, bad
    for pipeline in sorted(p for p in artifacts_root.iterdir() if p.is_dir() and not p.is_symlink()):
        bad += refused(pipeline)
        for e in kept.entries(pipeline):
            m = e.manifest()
            is_named = e.fingerprint in named or any(e.fingerprint.startswith(p) for p in prefixes)
            items.append(Item(pipeline.name, e.stage, e.fingerprint, str(e.path), e.bytes, e.kept_at,
                              _differs(m, _current(pipeline / e.stage)), "named" if is_named else "keep",
                              m.mlflow_run_id if m else None))
    return sorted(items, key=lambda i: (i.kept_at, i.pipeline, i.stage)), bad


def plan(items: list[Item], keep_last: int | None, max_bytes: int | None) -> list[Item]:
    """Mark what to delete: per (pipeline, stage) all but the ``keep_last`` newest unnamed outputs,
    then the oldest unnamed ones until the kept total is at most ``max_bytes``."""
    if keep_last is not None:
        seen: dict[tuple[str, str], int] = {}
        for item in sorted(items, key=lambda i: -i.kept_at):  # newest first
            if item.action != "keep":
                continue
            key = (item.pipeline, item.stage)
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > keep_last:
                item.action = "delete"
    if max_bytes is not None:
        total = sum(i.bytes for i in items if i.action != "delete")
        for item in sorted(items, key=lambda i: i.kept_at):  # oldest first
            if total <= max_bytes:
                break
            if item.action == "keep":
                item.action = "delete"
                total -= item.bytes
    return items


def apply(items: list[Item], artifacts_root: Path) -> int:
    """Delete the items marked ``delete`` (each checked to be a kept output inside its pipeline's
    store); returns the bytes freed."""
    freed = 0
    for item in items:
        if item.action == "delete":
            kept.remove(Path(item.path), artifacts_root / item.pipeline)
            item.action = "deleted"
            freed += item.bytes
    return freed


def named(keep: list[str], default: Path | None) -> tuple[set[str], tuple[str, ...]]:
    """Fingerprints ``--keep`` names: each a fingerprint prefix (6+ hex digits) or a pipeline file,
    whose every stage's fingerprint (for this code) is named; ``default`` (params.yaml) too when it
    exists. An unreadable pipeline file is an error: nothing is deleted."""
    from schemas.params import load_params
    from schemas.stages import STAGE_ORDER, STAGES
    from tasks.common import fingerprint

    fps: set[str] = set()
    prefixes: list[str] = []
    files = [Path(k) for k in keep if not re.fullmatch(r"[0-9a-f]{6,64}", k)]
    prefixes = [k for k in keep if re.fullmatch(r"[0-9a-f]{6,64}", k)]
    for f in files:
        if not f.is_file():
            raise GcError(f"--keep {f}: neither a fingerprint prefix (6+ hex digits) nor a pipeline file")
    if default is not None and default.is_file():
        files.insert(0, default)
    for f in files:
        pp = load_params(f, [])
        chain: dict[str, str] = {}
        for stage in STAGE_ORDER:
            chain[stage] = fingerprint(stage, pp, {u: chain[u] for u in STAGES[stage].upstream})
        fps.update(chain.values())
    return fps, tuple(prefixes)

