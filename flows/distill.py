"""The ``distill`` flow: the pipeline's stages as cached Prefect tasks.

Each stage is one task run whose cache key is the stage fingerprint (plus the project root), with
results persisted under ``<root>/.kdflow/prefect``. A stage whose output folder is missing or
altered is refreshed instead of handing downstream a stale manifest. An earlier output of the
wanted fingerprint kept in ``artifacts/<name>/.kept/`` is restored first (state ``Restored``:
no new run, the parent links to the run that built it).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext
from prefect.runtime import flow_run

from flows.shards import run_shards_on_dask
from kdflow import progress
from kdflow.errors import ArtifactError
from kdflow.lineage import open_tracker
from kdflow.lock import clean_stale_temps, project_lock
from kdflow.tracks import get_track
from schemas.manifest import Manifest
from schemas.params import PipelineParams, load_params
from schemas.stages import STAGE_ORDER, STAGES
from tasks import kept
from tasks.common import artifact_root, execute_stage, fingerprint, reuse_output

RUNNERS = {"dask": run_shards_on_dask}  # fan-out engines the logits stage may use

log = logging.getLogger(__name__)


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key of a stage task: its fingerprint, scoped to the project root."""
    scope = hashlib.sha256(str(parameters["root"]).encode()).hexdigest()[:16]
    return f"kdflow-{parameters['stage']}-{parameters['fp']}-{scope}"


@task(persist_result=True, cache_key_fn=stage_cache_key, cache_expiration=None)
def run_stage(stage: str, fp: str, pp: PipelineParams, root: str, tracker: Any = None, resume: bool = False) -> Manifest:
    """Run one stage (the same code path as ``kdflow stage <name>``)."""
    logger = get_run_logger()
    report = progress.fan_out(progress.LogProgress(logger, every=10.0), progress.active())
    manifest, executed = execute_stage(stage, pp, Path(root), tracker=tracker, resume=resume, progress=report,
                                       runners=RUNNERS)
    if manifest.fingerprint != fp:
        raise ArtifactError(f"{stage}: the code or inputs changed while the pipeline ran (fingerprint "
                            f"{manifest.fingerprint[:12]} != {fp[:12]} when it started): run it again")
    logger.info("%s: %s in %.1fs", stage, "done" if executed else "up to date", manifest.seconds)
    return manifest


def pipeline_fingerprints(pp: PipelineParams) -> dict[str, str]:
    """Every stage's fingerprint for these params and this code (nothing read from disk)."""
    fps: dict[str, str] = {}
    for stage in STAGE_ORDER:
        fps[stage] = fingerprint(stage, pp, {u: fps[u] for u in STAGES[stage].upstream})
    return fps


def run_pipeline(pp: PipelineParams, root: Path, *, tracker: Any = None, resume: bool = False) -> dict[str, dict]:
    """Run every stage in order inside the current flow; returns per-stage status and manifest."""
    root = Path(root).resolve()
    storage = root / ".kdflow" / "prefect"  # a Path: Prefect stores results there (no block needed)
    base = artifact_root(root, pp.name)
    done: dict[str, Manifest] = {}
    status: dict[str, dict] = {}
    for stage in STAGE_ORDER:
        fp = fingerprint(stage, pp, {u: done[u].fingerprint for u in STAGES[stage].upstream})
        # current on disk, or an earlier output of this fingerprint kept by tasks/kept.py swapped back in
        current, restored = reuse_output(stage, fp, base, pp.runtime.keep_outputs)
        stale = current is None
        options = run_stage.with_options(name=stage, task_run_name=stage, result_storage=storage, refresh_cache=stale)
        state = options(stage, fp, pp, str(root), tracker, resume, return_state=True)
        done[stage] = state.result()
        # current on disk (made by `kdflow stage`/`dvc repro`, or Prefect's record lost): the task
        # found it up to date and ran nothing, so it is as cached as a Prefect cache hit
        cached = state.name == "Cached" or not stale
        if cached and tracker is not None:
            tracker.record_cached(stage, done[stage])
        label = "Restored" if restored else "Cached" if cached else state.name
        status[stage] = {"state": label, "cached": cached, "manifest": done[stage]}
    return status


def summary_markdown(name: str, status: dict[str, dict], m: dict, mlflow_run: str | None, track: str = "classify") -> str:
    """The flow run's summary as markdown: stages, then teacher vs. student (rows from the track)."""
    lines = [f"# kdflow pipeline `{name}`", "", "| stage | state | seconds | fingerprint |", "|---|---|---|---|"]
    for stage, s in status.items():
        mf = s["manifest"]
        lines.append(f"| {stage} | {s['state']} | {'-' if s['cached'] else f'{mf.seconds:.1f}'} | `{mf.fingerprint[:12]}` |")
    t = get_track(track)
    lines += ["", "| | teacher | student | ratio |", "|---|---|---|---|"]
    lines += [f"| {label} | {a} | {b} | {r} |" for label, a, b, r in t.summary_rows(m)]
    lines += ["", t.summary_line(m)]
    if mlflow_run:
        link = f"[{mlflow_run}]({mlflow_run})" if mlflow_run.startswith("http") else f"`{mlflow_run}`"
        lines += ["", f"MLflow parent run: {link}"]
    return "\n".join(lines) + "\n"


def _record_context(root: Path, params_file: Path, overrides: list[str], pp: PipelineParams,
                    status: dict[str, dict], tracker: Any) -> None:
    """``artifacts/<name>/run.json``: what the report shows of this run (file, overrides, git, run ids)."""
    from datetime import datetime, timezone

    from kdflow.report import git_state, write_run_context

    path = params_file if params_file.is_absolute() else root / params_file
    shown = path.relative_to(root) if path.is_relative_to(root) else path
    write_run_context(artifact_root(root, pp.name), {
        "params_file": str(shown), "overrides": list(overrides), "git": git_state(root),
        "prefect_flow_run_id": str(flow_run.get_id() or ""), "mlflow_run": tracker.run_url(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fingerprints": {s: v["manifest"].fingerprint for s, v in status.items()},
        "params": pp.model_dump(mode="json")})


@flow(name="distill", log_prints=True)
def distill(params_file: str = "params.yaml", overrides: list[str] | None = None, root: str = ".", resume: bool = False) -> dict:
    """Distill a teacher into a student as declared in ``params_file`` (relative to ``root``)."""
    root_path = Path(root).resolve()
    path = Path(params_file)
    pp = load_params(path if path.is_absolute() else root_path / path, overrides or [])
    # one writer per project; `kdflow run` already holds it (re-entrant), a deployment's run queues here
    with project_lock(root_path, f"prefect flow run {flow_run.get_name() or ''} of distill", wait=True):
        clean_stale_temps(artifact_root(root_path, pp.name))
        return _distill(pp, root_path, resume, path, overrides or [])


def _distill(pp: PipelineParams, root_path: Path, resume: bool, path: Path, overrides: list[str]) -> dict:
    t = pp.tracking
    tracker = open_tracker(enabled=t.enabled, uri=t.uri, experiment=t.experiment, required=t.required, root=root_path, pipeline=pp.name)
    tracker.start_pipeline(pp.name, pp.model_dump(mode="json"), tags={"prefect.flow_run_id": str(flow_run.get_id() or "")},
                           overrides=overrides, fingerprint=pipeline_fingerprints(pp)["evaluate"])
    try:
        status = run_pipeline(pp, root_path, tracker=tracker, resume=resume)
    except BaseException:
        tracker.end_pipeline("FAILED")
        raise
    for stage in STAGE_ORDER:  # runtime.keep_outputs, also after it was lowered
        kept.prune(artifact_root(root_path, pp.name), stage, pp.runtime.keep_outputs)
    metrics = status["evaluate"]["manifest"].metrics
    tracker.log_pipeline_metrics(metrics)
    tracker.link_pipeline(status, artifact_root(root_path, pp.name), pp.data.model_dump(mode="json"))
    tracker.end_pipeline("FINISHED")
    metrics_file = artifact_root(root_path, pp.name) / "evaluate" / "metrics.json"
    _record_context(root_path, path, overrides or [], pp, status, tracker)
    create_markdown_artifact(
        markdown=summary_markdown(pp.name, status, json.loads(metrics_file.read_text()), tracker.run_url(), pp.track),
        key=f"kdflow-{pp.name.lower().replace('_', '-').replace('.', '-')}-summary",
        description=f"kdflow pipeline {pp.name}: stages and teacher vs. student",
    )
    return {
        "pipeline": pp.name,
        "track": pp.track,
        "stages": {s: {"state": v["state"], "cached": v["cached"], "seconds": v["manifest"].seconds} for s, v in status.items()},
        "metrics_file": str(metrics_file),
        "mlflow_run": tracker.run_url(),
        "tracking_unavailable": tracker.unavailable,
    }
