"""Record pipeline executions in MLflow: one parent run, one child run per executed stage.

Uses ``MlflowClient`` with explicit run ids (no fluent global state), so stages running inside
Prefect tasks or threads log to the right run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from kdflow.errors import KdflowError

log = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000
SMALL_ARTIFACT_BYTES = 5 * 2**20


class TrackingUnavailableError(KdflowError):
    """The tracking server cannot be reached."""


def resolve_tracking_uri(uri: str | None, root: Path) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlflow.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise ``TrackingUnavailableError`` if an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status >= 400:
                raise OSError(f"HTTP {resp.status}")
    except OSError as exc:
        raise TrackingUnavailableError(
            f"MLflow tracking server {uri} is unreachable ({exc}). Start it, fix tracking.uri / "
            "MLFLOW_TRACKING_URI, or set tracking.required: false to run without lineage."
        ) from None


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


def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class NullTracker:
    """Tracking disabled or unavailable: every call is a no-op."""

    enabled = False
    uri = None
    parent_run_id = None

    def start_pipeline(self, name: str, params: dict, tags: dict[str, str] | None = None) -> None: ...
    def end_pipeline(self, status: str = "FINISHED") -> None: ...
    def start_stage(self, stage: str, params: dict, fingerprint: str) -> None: ...
    def finish_stage(self, run_id: str | None, manifest: Any, directory: Path) -> None: ...
    def fail_stage(self, run_id: str | None) -> None: ...
    def record_cached(self, stage: str, manifest: Any) -> None: ...
    def run_url(self) -> str | None:
        return None


class Tracker(NullTracker):
    """MLflow-backed tracker for one pipeline execution."""

    enabled = True

    def __init__(self, uri: str, experiment: str, root: Path, pipeline: str) -> None:
        from mlflow.tracking import MlflowClient

        self.uri, self.root, self.pipeline = uri, Path(root), pipeline
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = (self.root / "mlruns").resolve().as_uri() if not uri.startswith("http") else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        self.parent_run_id: str | None = None

    def start_pipeline(self, name: str, params: dict, tags: dict[str, str] | None = None) -> str:
        all_tags = {"kdflow.pipeline": name, "kdflow.kind": "pipeline", **(tags or {})}
        commit = _git_commit(self.root)
        if commit:
            all_tags["mlflow.source.git.commit"] = commit
        lock = self.root / "dvc.lock"
        if lock.exists():
            all_tags["kdflow.dvc_lock_sha256"] = hashlib.sha256(lock.read_bytes()).hexdigest()
        run = self.client.create_run(self.experiment_id, run_name=f"{name}", tags=all_tags)
        self.parent_run_id = run.info.run_id
        self._log_params(self.parent_run_id, flatten(params))
        return self.parent_run_id

    def end_pipeline(self, status: str = "FINISHED") -> None:
        if self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, status=status)

    def start_stage(self, stage: str, params: dict, fingerprint: str) -> str:
        tags = {"kdflow.pipeline": self.pipeline, "kdflow.stage": stage, "kdflow.fingerprint": fingerprint, "kdflow.kind": "stage"}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=stage, tags=tags)
        self._log_params(run.info.run_id, flatten(params))
        return run.info.run_id

    def finish_stage(self, run_id: str | None, manifest: Any, directory: Path) -> None:
        if run_id is None:
            return
        from mlflow.entities import Metric

        import time

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in manifest.metrics.items()]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        for path in sorted(Path(directory).rglob("*")):
            if path.is_file() and path.stat().st_size <= SMALL_ARTIFACT_BYTES and path.suffix in (".json", ".png", ".csv", ".parquet"):
                rel = path.parent.relative_to(directory).as_posix()
                self.client.log_artifact(run_id, str(path), artifact_path=None if rel == "." else rel)
        if self.parent_run_id:
            self.client.set_tag(self.parent_run_id, f"kdflow.stage.{manifest.stage}.run_id", run_id)
            self.client.set_tag(self.parent_run_id, f"kdflow.stage.{manifest.stage}.cached", "false")
        self.client.set_terminated(run_id, status="FINISHED")

    def fail_stage(self, run_id: str | None) -> None:
        if run_id:
            self.client.set_terminated(run_id, status="FAILED")

    def record_cached(self, stage: str, manifest: Any) -> None:
        """A cached stage gets no new run: the parent points at the run that produced it."""
        if self.parent_run_id:
            self.client.set_tag(self.parent_run_id, f"kdflow.stage.{stage}.run_id", manifest.mlflow_run_id or "unknown")
            self.client.set_tag(self.parent_run_id, f"kdflow.stage.{stage}.cached", "true")

    def log_pipeline_metrics(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        import time

        now = int(time.time() * 1000)
        if self.parent_run_id and metrics:
            self.client.log_batch(self.parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])

    def run_url(self) -> str | None:
        if self.parent_run_id and self.uri.startswith("http"):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.parent_run_id}"
        return self.parent_run_id

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])


def open_tracker(*, enabled: bool, uri: str | None, experiment: str, required: bool, root: Path, pipeline: str) -> NullTracker:
    """A tracker for the pipeline, checked before any compute.

    Raises ``TrackingUnavailableError`` when the store is unreachable and ``required``; otherwise
    returns a ``NullTracker`` whose ``unavailable`` attribute says why lineage was not recorded.
    """
    if not enabled:
        return NullTracker()
    resolved = resolve_tracking_uri(uri, root)
    try:
        check_reachable(resolved)
        return Tracker(resolved, experiment, root, pipeline)
    except TrackingUnavailableError as exc:
        if required:
            raise
        null = NullTracker()
        null.unavailable = str(exc)  # type: ignore[attr-defined]
        log.warning("%s", exc)
        return null
