"""Which stages of a pipeline must run, found without Prefect.

``kdflow run`` asks this first: when every stage's committed output matches the fingerprint the
stage would have now (every file checked against its manifest's sha256, as the flow's cache does),
the run is a no-op and needs neither Prefect nor MLflow.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from schemas.manifest import Manifest
from schemas.params import PipelineParams
from schemas.stages import STAGE_ORDER, STAGES
from tasks.common import artifact_root, check_output, fingerprint


@dataclass(frozen=True)
class StagePlan:
    stage: str
    fingerprint: str
    stale: str | None  # why its output cannot be reused (None: up to date)


def plan_pipeline(pp: PipelineParams, root: Path) -> list[StagePlan]:
    """Every stage in order, with its fingerprint and whether its output is up to date."""
    base = artifact_root(Path(root).resolve(), pp.name)
    fps: dict[str, str] = {}
    plan = []
    for stage in STAGE_ORDER:
        fps[stage] = fingerprint(stage, pp, {u: fps[u] for u in STAGES[stage].upstream})
        plan.append(StagePlan(stage, fps[stage], check_output(base / stage, fps[stage])))
    return plan


def up_to_date(plan: list[StagePlan]) -> bool:
    return all(p.stale is None for p in plan)


def cached_status(pp: PipelineParams, root: Path) -> dict[str, dict]:
    """The stage table of a run that reused every output (what the flow returns for its stages)."""
    base = artifact_root(Path(root).resolve(), pp.name)
    return {s: {"state": "Cached", "cached": True, "seconds": Manifest.load(base / s).seconds} for s in STAGE_ORDER}
