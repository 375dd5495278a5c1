"""``kdflow status``: which stages a run would execute, and why, without running anything.

Fingerprints come from ``tasks.common.fingerprint`` (the same function the flow and ``kdflow
stage`` use), chained through the fingerprints the upstream stages *would* have, and each stage's
committed output is checked with ``tasks.common.check_output`` (every file against its manifest's
sha256). A stage that must run is explained by comparing its manifest with what it would record
now: params keys that changed, upstream stages that changed, else its code (the import closure of
``tasks/<stage>.py`` and of the track).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.manifest import MANIFEST_FILE, Manifest
from schemas.params import PipelineParams
from schemas.stages import STAGE_ORDER, STAGES
from tasks.common import artifact_root, check_output, fingerprint, stage_params


@dataclass
class StageStatus:
    stage: str
    fingerprint: str
    runs: bool
    reasons: list[str] = field(default_factory=list)
    built: str | None = None  # fingerprint of the output there now

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _diff(old: Any, new: Any, prefix: str) -> list[str]:
    """Dotted keys whose values differ between two params trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if old == new else [prefix]


def stage_status(stage: str, pp: PipelineParams, root: Path, upstream: dict[str, str],
                 runs_upstream: set[str]) -> StageStatus:
    """Whether ``stage`` would run given its upstream stages' fingerprints, and why."""
    fp = fingerprint(stage, pp, upstream)
    folder = artifact_root(root, pp.name) / stage
    if not (folder / MANIFEST_FILE).is_file():
        return StageStatus(stage, fp, True, ["no output yet"])
    try:
        m = Manifest.load(folder)
    except (ValueError, OSError) as exc:
        return StageStatus(stage, fp, True, [f"its manifest is unreadable: {exc}"])
    if m.fingerprint == fp:
        problem = check_output(folder, fp)
        return StageStatus(stage, fp, problem is not None, [problem] if problem else [], m.fingerprint)
    reasons = []
    changed = _diff(m.params, stage_params(stage, pp), "")
    if changed:
        reasons.append("params changed: " + ", ".join(changed))
    ups = [u for u in STAGES[stage].upstream if m.upstream.get(u) != upstream[u]]
    if ups:
        reasons.append("upstream changed: " + ", ".join(f"{u}{' (will run)' if u in runs_upstream else ''}" for u in ups))
    if not reasons:
        reasons.append("code changed (a file it imports, or its track's)")
    return StageStatus(stage, fp, True, reasons, m.fingerprint)


def pipeline_status(pp: PipelineParams, root: Path) -> list[StageStatus]:
    """Every stage in order; nothing is run or written."""
    root = Path(root).resolve()
    fps: dict[str, str] = {}
    runs: set[str] = set()
    out = []
    for stage in STAGE_ORDER:
        s = stage_status(stage, pp, root, {u: fps[u] for u in STAGES[stage].upstream}, runs)
        fps[stage] = s.fingerprint
        if s.runs:
            runs.add(stage)
        out.append(s)
    return out
