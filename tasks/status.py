"""``kdflow status``: which stages a run would execute, and why, without running anything.

Fingerprints come from ``tasks.common.fingerprint`` (the same function the flow and ``kdflow
stage`` use), chained through the fingerprints the upstream stages *would* have, and each stage's
committed output is checked with ``tasks.common.check_output`` (every file against its manifest's
sha256). A stage that must run is explained by comparing its manifest with what it would record
now: params keys that changed, upstream stages that changed, else its code (the import closure of
``tasks/<stage>.py`` and of the track). A stage whose wanted fingerprint is in the kept store
(``tasks/kept.py``), intact, is not run but restored (``restores``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.manifest import MANIFEST_FILE, Manifest
from schemas.params import PipelineParams
from schemas.stages import STAGE_ORDER, STAGES
from tasks.common import artifact_root, check_output, fingerprint, kept_problem, stage_params


@dataclass
class StageStatus:
    stage: str
    fingerprint: str
    runs: bool
    reasons: list[str] = field(default_factory=list)
    built: str | None = None  # fingerprint of the output there now
    restores: bool = False  # an earlier output of this fingerprint is kept: restored, not computed

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
                 runs_upstream: dict[str, str]) -> StageStatus:
    """Whether ``stage`` would run (or be restored from the kept store) given its upstream
    stages' fingerprints, and why."""
    s = _current_status(stage, pp, root, upstream, runs_upstream)
    if s.runs and kept_problem(stage, s.fingerprint, artifact_root(root, pp.name)) is None:
        s.runs, s.restores = False, True
        s.reasons.append(f"restore kept output {s.fingerprint[:12]}")
    return s


def _current_status(stage: str, pp: PipelineParams, root: Path, upstream: dict[str, str],
                    runs_upstream: dict[str, str]) -> StageStatus:
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
        reasons.append("upstream changed: " + ", ".join(f"{u}{_upstream_action(u, runs_upstream)}" for u in ups))
    if not reasons:
        reasons.append("code changed (a file it imports, or its track's)")
    return StageStatus(stage, fp, True, reasons, m.fingerprint)


def _upstream_action(stage: str, changing: dict[str, str]) -> str:
    return f" (will {changing[stage]})" if stage in changing else ""


def pipeline_status(pp: PipelineParams, root: Path) -> list[StageStatus]:
    """Every stage in order; nothing is run or written."""
    root = Path(root).resolve()
    fps: dict[str, str] = {}
    runs: dict[str, str] = {}  # upstream stages that change: "run" or "be restored"
    out = []
    for stage in STAGE_ORDER:
        s = stage_status(stage, pp, root, {u: fps[u] for u in STAGES[stage].upstream}, runs)
        fps[stage] = s.fingerprint
        if s.runs or s.restores:
            runs[stage] = "run" if s.runs else "be restored"
        out.append(s)
    return out
