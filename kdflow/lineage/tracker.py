"""Record pipeline executions in MLflow: one parent run, one child run per executed stage.

Uses ``MlflowClient`` with explicit run ids, so stages running inside Prefect tasks or threads
log to the right run (only model logging borrows the fluent API, briefly: ``backends.fluent_uri``).
Each stage run carries the tags that rebuild the chain without the artifacts: ``kdflow.stage``,
``kdflow.fingerprint``, ``kdflow.upstream.<stage>.fingerprint`` / ``.run_id`` and
``kdflow.model.<label>.id``; its inputs are logged as datasets (``datasets``), its models as
LoggedModels (``models``), and the student is registered (``registry``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdflow.lineage import datasets, models, parent, registry
from kdflow.lineage.backends import (
    TrackingUnavailableError, check_reachable, is_server, resolve_tracking_uri, store_error, uri_problem,
)

from kdflow.tracks import DEFAULT_TRACK, get_track
from schemas.stages import MODEL_STAGES  # stages whose models are logged

log = logging.getLogger(__name__)

__all__ = ["NullTracker", "Tracker", "TrackingUnavailableError", "check_reachable", "open_tracker",
           "resolve_tracking_uri"]

MAX_PARAM_LEN = 6000
SMALL_ARTIFACT_BYTES = 5 * 2**20
ARTIFACT_SUFFIXES = (".json", ".png", ".csv", ".parquet")
KIND_TAG = "mlflow.experimentKind"


def upstream_tag(stage: str, what: str) -> str:
    return f"kdflow.upstream.{stage}.{what}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params -> ``{"a.b.c": "value"}`` strings that MLflow accepts."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            out[path] = text[:MAX_PARAM_LEN]
    return out


def info_tags(info: dict[str, Any], limit: int = 500) -> dict[str, str]:
    """A manifest's simple ``info`` values (scalars, short lists of scalars) as ``kdflow.info.*`` tags."""
    out = {}
    for key, value in info.items():
        scalar = isinstance(value, (str, int, float, bool)) or value is None
        flat = isinstance(value, list) and all(isinstance(v, (str, int, float, bool)) for v in value)
        if scalar or flat:
            text = value if isinstance(value, str) else json.dumps(value)
            if len(text) <= limit:
                out[f"kdflow.info.{key}"] = text
    return out


def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _now() -> int:
    return int(time.time() * 1000)


class NullTracker:
    """Tracking disabled or unavailable: every call is a no-op."""

    enabled = False
    uri: str | None = None
    parent_run_id: str | None = None
    unavailable: str | None = None

    def start_pipeline(self, name: str, params: dict, tags: dict[str, str] | None = None,
                       overrides: list[str] | None = None, fingerprint: str | None = None) -> str | None: ...
    def link_pipeline(self, status: dict[str, dict], artifacts: Path, data: Any = None) -> None: ...
    def end_pipeline(self, status: str = "FINISHED") -> None: ...
    def start_stage(self, stage: str, params: dict, fingerprint: str, upstream: dict[str, Any] | None = None,
                    artifacts: Path | None = None) -> str | None: ...
    def finish_stage(self, run_id: str | None, manifest: Any, directory: Path) -> None: ...
    def fail_stage(self, run_id: str | None) -> None: ...
    def record_cached(self, stage: str, manifest: Any) -> None: ...
    def log_pipeline_metrics(self, metrics: dict[str, float]) -> None: ...
    def run_url(self) -> str | None:
        return None


@dataclass
class _StageRun:
    stage: str
    upstream: dict[str, Any]
    artifacts: Path | None


class Tracker(NullTracker):
    """MLflow-backed tracker for one pipeline execution."""

    enabled = True

    def __init__(self, uri: str, experiment: str, root: Path, pipeline: str) -> None:
        from mlflow.tracking import MlflowClient

        self.uri, self.root, self.pipeline = uri, Path(root), pipeline
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = (self.root / "mlruns").resolve().as_uri() if not is_server(uri) else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        if exp is None or KIND_TAG not in exp.tags:  # the UI opens on the runs table, not GenAI's overview
            self.client.set_experiment_tag(self.experiment_id, KIND_TAG, "custom_model_development")
        self.parent_run_id = None
        self._stages: dict[str, _StageRun] = {}

    # -- pipeline ---------------------------------------------------------------------------

    def start_pipeline(self, name: str, params: dict, tags: dict[str, str] | None = None,
                       overrides: list[str] | None = None, fingerprint: str | None = None) -> str:
        """Open the parent run, named by what changed (``parent.run_name``)."""
        all_tags = {"kdflow.pipeline": name, "kdflow.kind": "pipeline", **(tags or {})}
        commit = _git_commit(self.root)
        if commit:
            all_tags["mlflow.source.git.commit"] = commit
        lock = self.root / "dvc.lock"
        if lock.exists():
            all_tags["kdflow.dvc_lock_sha256"] = hashlib.sha256(lock.read_bytes()).hexdigest()
        if fingerprint:
            all_tags["kdflow.fingerprint"] = fingerprint  # the evaluate stage's: it chains every stage's
        if overrides:
            all_tags["kdflow.overrides"] = " ".join(overrides)[:5000]
        run = self.client.create_run(self.experiment_id, run_name=parent.run_name(name, overrides, fingerprint),
                                     tags=all_tags)
        self.parent_run_id = run.info.run_id
        self._log_params(self.parent_run_id, flatten(params))
        return self.parent_run_id

    def link_pipeline(self, status: dict[str, dict], artifacts: Path, data: Any = None) -> None:
        """The data, the registered student and links to the stage runs, on the parent run."""
        if self.parent_run_id:
            parent.link_pipeline(self.client, self.parent_run_id, self.pipeline, status, artifacts, self.root, data)

    def end_pipeline(self, status: str = "FINISHED") -> None:
        if self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, status=status)

    def log_pipeline_metrics(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if self.parent_run_id and metrics:
            entities = [Metric(k, float(v), _now(), 0) for k, v in metrics.items()]
            self.client.log_batch(self.parent_run_id, metrics=entities)

    def run_url(self) -> str | None:
        if self.parent_run_id and is_server(self.uri):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.parent_run_id}"
        return self.parent_run_id

    # -- stages -----------------------------------------------------------------------------

    def start_stage(self, stage: str, params: dict, fingerprint: str, upstream: dict[str, Any] | None = None,
                    artifacts: Path | None = None) -> str:
        """Open the stage's run: params, lineage tags, and its inputs as datasets and models.

        Args:
            upstream: upstream stage -> its (verified) manifest.
            artifacts: the pipeline's artifact folder (``artifacts/<pipeline>``).
        """
        upstream = upstream or {}
        tags = {"kdflow.pipeline": self.pipeline, "kdflow.stage": stage, "kdflow.fingerprint": fingerprint,
                "kdflow.kind": "stage"}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        for up, manifest in upstream.items():
            tags[upstream_tag(up, "fingerprint")] = manifest.fingerprint
            if manifest.mlflow_run_id:
                tags[upstream_tag(up, "run_id")] = manifest.mlflow_run_id
        data = params.get("data") if not upstream else None
        if isinstance(data, dict):
            tags["kdflow.data.source"] = str(data.get("source", ""))
        run_id = self.client.create_run(self.experiment_id, run_name=stage, tags=tags).info.run_id
        self._log_params(run_id, flatten(params))
        self._log_inputs(run_id, stage, upstream, artifacts, data)
        self._stages[run_id] = _StageRun(stage, upstream, Path(artifacts) if artifacts else None)
        return run_id

    def finish_stage(self, run_id: str | None, manifest: Any, directory: Path) -> None:
        """Close the stage's run: models, metrics, curves, small artifacts; link it from the parent."""
        if run_id is None:
            return
        from mlflow.entities import Metric, RunTag

        state = self._stages.pop(run_id, _StageRun(manifest.stage, {}, None))
        directory = Path(directory)
        track = manifest.params.get("track") or DEFAULT_TRACK
        model_ids = self._log_models(run_id, state, directory, track) if state.stage in MODEL_STAGES else {}
        metrics = [Metric(k, float(v), _now(), 0, model_id=_owner(k, model_ids)) for k, v in manifest.metrics.items()]
        metrics += self._curves(directory)
        tags = [RunTag(k, v) for k, v in info_tags(manifest.info).items()]
        for i in range(0, max(len(metrics), 1), 1000):
            self.client.log_batch(run_id, metrics=metrics[i : i + 1000], tags=tags if i == 0 else ())
        if state.stage == "student" and "student" in model_ids:
            registry.register_student(self.client, self.pipeline, run_id, model_ids["student"], manifest,
                                      state.upstream, state.artifacts)
        evaluation = directory / "metrics.json"
        if state.stage == "evaluate" and evaluation.is_file():
            registry.attach_evaluation(self.client, run_id, json.loads(evaluation.read_text()), state.upstream)
        self._log_artifacts(run_id, directory)
        if self.parent_run_id:
            self.client.set_tag(self.parent_run_id, f"kdflow.stage.{manifest.stage}.run_id", run_id)
            self.client.set_tag(self.parent_run_id, f"kdflow.stage.{manifest.stage}.cached", "false")
        self.client.set_terminated(run_id, status="FINISHED")

    def fail_stage(self, run_id: str | None) -> None:
        if run_id:
            self._stages.pop(run_id, None)
            self.client.set_terminated(run_id, status="FAILED")

    def record_cached(self, stage: str, manifest: Any) -> None:
        """A cached stage gets no new run: the parent points at the run that produced it."""
        if self.parent_run_id:
            producer = manifest.mlflow_run_id or "unknown"
            self.client.set_tag(self.parent_run_id, f"kdflow.stage.{stage}.run_id", producer)
            self.client.set_tag(self.parent_run_id, f"kdflow.stage.{stage}.cached", "true")

    # -- helpers ----------------------------------------------------------------------------

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def _log_inputs(self, run_id: str, stage: str, upstream: dict[str, Any], artifacts: Path | None,
                    data: Any) -> None:
        from mlflow.entities import LoggedModelInput

        inputs = []
        if artifacts is not None:
            inputs = [datasets.artifact_input(stage, up, m, Path(artifacts) / up) for up, m in upstream.items()]
        if isinstance(data, dict):
            inputs.append(datasets.source_input(data, self.root))
        used = [LoggedModelInput(model_id) for model_id in self._upstream_models(upstream).values()]
        if inputs or used:
            self.client.log_inputs(run_id, datasets=inputs or None, models=used or None)

    def _upstream_models(self, upstream: dict[str, Any]) -> dict[str, str]:
        """Label -> LoggedModel id of the models this stage reads (only the chosen teachers, if known)."""
        chosen = set(upstream["select"].info.get("teachers", [])) if "select" in upstream else None
        out = {}
        for up in MODEL_STAGES:
            manifest = upstream.get(up)
            if manifest is None or not manifest.mlflow_run_id:
                continue
            for label, model_id in models.run_model_ids(self.client, manifest.mlflow_run_id).items():
                if up == "teachers" and chosen is not None and label not in chosen:
                    continue
                out[f"{up}/{label}"] = model_id
        return out

    def _log_models(self, run_id: str, state: _StageRun, directory: Path, track: str) -> dict[str, str]:
        example = models.input_example(state.artifacts / "prepare") if state.artifacts else None
        out = {}
        for label, folder in models.model_folders(directory, root_label=state.stage).items():
            role = "student" if state.stage == "student" else "teacher"
            tags = {"kdflow.pipeline": self.pipeline, "kdflow.stage": state.stage, "kdflow.role": role}
            name = f"{self.pipeline}-student" if role == "student" else f"{self.pipeline}-teacher-{label}"
            out[label] = models.log_model(self.client, self.uri, self.experiment_id, run_id,
                                          name, folder, example, tags, loader=get_track(track).load_model)
            self.client.set_tag(run_id, models.model_tag(label), out[label])
        return out

    def _curves(self, directory: Path) -> list[Any]:
        """Training histories (``history.json``) as stepped metrics, so the UI draws the curves."""
        from mlflow.entities import Metric

        out, now = [], _now()
        for path in sorted(directory.rglob("history.json")):
            rel = path.parent.relative_to(directory).as_posix()
            prefix = "" if rel == "." else f"{rel}."
            for i, row in enumerate(json.loads(path.read_text())):
                step = int(row.get("epoch", i))
                out += [Metric(f"{prefix}{k}", float(v), now, step) for k, v in row.items()
                        if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)]
        return out

    def _log_artifacts(self, run_id: str, directory: Path) -> None:
        for path in sorted(directory.rglob("*")):
            small = path.is_file() and path.stat().st_size <= SMALL_ARTIFACT_BYTES
            if small and path.suffix in ARTIFACT_SUFFIXES:
                rel = path.parent.relative_to(directory).as_posix()
                self.client.log_artifact(run_id, str(path), artifact_path=None if rel == "." else rel)


def _owner(key: str, model_ids: dict[str, str]) -> str | None:
    """The logged model a stage metric describes: the student's, or the teacher named in the key."""
    if "student" in model_ids:
        return model_ids["student"]
    return next((model_id for label, model_id in model_ids.items() if key.startswith(f"{label}.")), None)


def open_tracker(*, enabled: bool, uri: str | None, experiment: str, required: bool, root: Path,
                 pipeline: str) -> NullTracker:
    """A tracker for the pipeline, checked before any compute.

    Raises ``TrackingUnavailableError`` when the store is unreachable and ``required``; otherwise
    returns a ``NullTracker`` whose ``unavailable`` attribute says why lineage was not recorded.
    """
    if not enabled:
        return NullTracker()
    resolved = resolve_tracking_uri(uri, root)
    try:
        check_reachable(resolved)
        problem = uri_problem(resolved)
        if problem:
            raise TrackingUnavailableError(f"tracking.uri / MLFLOW_TRACKING_URI {resolved!r}: {problem}")
        try:
            return Tracker(resolved, experiment, root, pipeline)
        except Exception as exc:  # noqa: BLE001  sqlalchemy, a missing driver, MLflow: the store is unusable
            raise store_error(resolved, exc) from None
    except TrackingUnavailableError as exc:
        if required:
            raise
        null = NullTracker()
        null.unavailable = str(exc)
        log.warning("%s", exc)
        return null
