"""The student in the model registry, and the evaluation attached to the models it measured.

Every trained student becomes a new version of ``<pipeline>-student``; ``@latest`` (MLflow's
built-in alias) is the newest, ``@champion`` the one whose evaluation measured the best student
accuracy so far (set by ``promote``; a tie keeps the earlier champion). The version and the LoggedModel carry the lineage as tags: the
teacher (name, run, model), the data (source, prepare fingerprint) and the condensation.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kdflow.lineage import datasets, models

log = logging.getLogger(__name__)

EVAL_TAGS = ("accuracy", "macro_f1", "ece")
CHAMPION = "champion"
CHAMPION_METRIC = "accuracy"  # the version tag kdflow.eval.<it> that ranks versions (higher is better)


def promote(client: Any, name: str, version: str, value: float | None) -> bool:
    """Move ``name@champion`` to ``version`` if its ``value`` beats the champion's; True if moved."""
    from mlflow.exceptions import MlflowException

    if value is None:
        return False
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    if current is not None and str(current.version) != str(version):
        best = current.tags.get(f"kdflow.eval.{CHAMPION_METRIC}")
        if best is not None and float(best) >= round(value, 4):
            return False
    client.set_registered_model_alias(name, CHAMPION, str(version))
    log.info("%s@%s is now version %s (%s %.4f)", name, CHAMPION, version, CHAMPION_METRIC, value)
    return True


def ancestor(artifacts: Path | None, manifest: Any, stage: str) -> Any | None:
    """The manifest of ``stage`` on disk if it is the one ``manifest`` was built from."""
    from schemas.manifest import Manifest

    if artifacts is None or manifest is None or stage not in manifest.upstream:
        return None
    try:
        found = Manifest.load(Path(artifacts) / stage)
    except (OSError, ValueError):
        return None
    return found if found.fingerprint == manifest.upstream[stage] else None


def student_tags(client: Any, pipeline: str, run_id: str, manifest: Any, upstream: dict[str, Any],
                 artifacts: Path | None) -> dict[str, str]:
    """Lineage tags of a student: its teacher, data and condensation."""
    condense, prepare, logits = upstream.get("condense"), upstream.get("prepare"), upstream.get("logits")
    tags = {"kdflow.pipeline": pipeline, "kdflow.student.fingerprint": manifest.fingerprint,
            "kdflow.student.run_id": run_id}
    if prepare is not None:
        tags["kdflow.data.fingerprint"] = prepare.fingerprint
        tags["kdflow.data.source"] = str(prepare.params.get("data", {}).get("source", ""))
    if condense is not None:
        tags["kdflow.condense.method"] = str(condense.info.get("method", ""))
        tags["kdflow.condense.fingerprint"] = condense.fingerprint
    caches = logits.info.get("teachers") if logits else None
    teacher = (caches[0].get("teacher") if caches else None) or (condense.info.get("teacher") if condense else None)
    if teacher:
        tags["kdflow.teacher.name"] = str(teacher)
    teachers = ancestor(artifacts, condense, "teachers")  # not a direct input of the student
    if teachers is not None and teachers.mlflow_run_id:
        tags["kdflow.teacher.run_id"] = teachers.mlflow_run_id
        model_id = models.run_model_ids(client, teachers.mlflow_run_id).get(str(teacher))
        if model_id:
            tags["kdflow.teacher.model_id"] = model_id
    return tags


def register_student(client: Any, pipeline: str, run_id: str, model_id: str, manifest: Any,
                     upstream: dict[str, Any], artifacts: Path | None) -> str:
    """Register the student's LoggedModel as a new version of ``<pipeline>-student``; returns it."""
    tags = student_tags(client, pipeline, run_id, manifest, upstream, artifacts)
    name = f"{pipeline}-student"
    version = models.register(client, name, model_id, run_id, tags,
                              description=f"Students distilled by the kdflow pipeline {pipeline!r}.")
    client.set_logged_model_tags(model_id, tags)
    client.set_tag(run_id, "kdflow.registered_model", f"{name}/{version}")
    log.info("registered %s version %s (alias %s)", name, version, models.LATEST)
    return version


def attach_evaluation(client: Any, run_id: str, metrics: dict[str, Any], upstream: dict[str, Any]) -> None:
    """Test metrics onto the evaluated student's and teacher's LoggedModels, and onto the version.

    Args:
        metrics: the evaluate stage's ``metrics.json``.
        upstream: the evaluate stage's upstream manifests (their run ids lead to the models).
    """
    from mlflow.exceptions import MlflowException

    values = models.evaluation_values(metrics)
    prepare = upstream.get("prepare")
    dataset = ("prepare", datasets.digest(prepare.fingerprint)) if prepare is not None else None
    teacher = str(metrics.get("teacher", {}).get("name", ""))
    owners = {"student": ("student", "student"), "teacher": ("teachers", teacher)}
    entities = []
    for role, (stage, label) in owners.items():
        manifest = upstream.get(stage)
        if manifest is not None and manifest.mlflow_run_id:
            model_id = models.run_model_ids(client, manifest.mlflow_run_id).get(label)
            if model_id:
                entities += models.model_metrics(run_id, model_id, values[role], dataset)
    if entities:
        client.log_batch(run_id, metrics=entities)
    student = upstream.get("student")
    if student is None or not student.mlflow_run_id:
        return
    try:
        versions = client.search_model_versions(f"run_id = '{student.mlflow_run_id}'")
    except MlflowException:
        return
    for v in versions:
        client.set_model_version_tag(v.name, v.version, "kdflow.eval.run_id", run_id)
        for key in EVAL_TAGS:
            value = values["student"].get(f"student.{key}")
            if value is not None:
                client.set_model_version_tag(v.name, v.version, f"kdflow.eval.{key}", f"{value:.4f}")
        promote(client, v.name, v.version, values["student"].get(f"student.{CHAMPION_METRIC}"))
