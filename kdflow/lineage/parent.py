"""The parent run as users browse it: a name that says what changed, the data and the registered
student on the run itself, and the stage runs it used as readable links.

``run_name`` names the run ``<pipeline> <overrides>`` (``<pipeline> @<fingerprint[:8]>`` without
overrides: the evaluate fingerprint, which chains every stage's). ``link_pipeline`` logs the
prepared data and the data source as dataset inputs of the parent, the student's LoggedModel as
its output, ``kdflow.registered_model`` / ``kdflow.student.model_id`` tags, and a description
plus ``lineage.md``/``lineage.json`` artifacts: one row per stage with a link to the run that
produced its output (this run's child, or an earlier run's when the stage was cached).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from kdflow.lineage import datasets, models

MAX_NAME = 200  # MLflow accepts 250 characters; the run list shows far fewer


def run_name(pipeline: str, overrides: list[str] | None, fingerprint: str | None) -> str:
    """``tiny student.loss.temperature=2``, or ``tiny @1a2b3c4d`` when nothing was overridden."""
    if overrides:
        name = f"{pipeline} {' '.join(overrides)}"
        return name if len(name) <= MAX_NAME else name[: MAX_NAME - 1] + "…"
    return f"{pipeline} @{fingerprint[:8]}" if fingerprint else pipeline


def run_link(experiment_id: str, run_id: str) -> str:
    """A link the MLflow UI resolves (relative to the UI's page, so it works behind any host)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def model_link(name: str, version: str) -> str:
    return f"#/models/{name}/versions/{version}"


def student_version(client: Any, student_run_id: str | None) -> Any | None:
    """The registered version made by the student run (also when this pipeline run cached it)."""
    from mlflow.exceptions import MlflowException

    if not student_run_id:
        return None
    try:
        found = client.search_model_versions(f"run_id = '{student_run_id}'")
    except MlflowException:
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


def lineage_rows(client: Any, status: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per stage: state, fingerprint, the run that produced its output and that run's experiment."""
    rows = []
    for stage, s in status.items():
        manifest = s["manifest"]
        run_id = manifest.mlflow_run_id
        experiment = None
        if run_id:
            try:
                experiment = client.get_run(run_id).info.experiment_id
            except Exception:  # noqa: BLE001  a run from another store (a pulled output): no link
                run_id = None
        rows.append({"stage": stage, "cached": bool(s["cached"]), "fingerprint": manifest.fingerprint,
                     "run_id": run_id, "experiment_id": experiment, "seconds": manifest.seconds})
    return rows


def markdown(pipeline: str, rows: list[dict[str, Any]], version: Any | None) -> str:
    lines = [f"kdflow pipeline **{pipeline}**", ""]
    if version is not None:
        lines += [f"Registered student: [{version.name} v{version.version}]({model_link(version.name, version.version)})",
                  ""]
    lines += ["| stage | state | run | fingerprint |", "|---|---|---|---|"]
    for r in rows:
        run = f"[{r['run_id'][:12]}]({run_link(r['experiment_id'], r['run_id'])})" if r["run_id"] else "-"
        lines.append(f"| {r['stage']} | {'cached' if r['cached'] else 'ran'} | {run} | `{r['fingerprint'][:16]}` |")
    return "\n".join(lines) + "\n"


def link_pipeline(client: Any, run_id: str, pipeline: str, status: dict[str, dict], artifacts: Path,
                  root: Path, data: Any) -> None:
    """Put the data, the registered student and the stage runs on the parent run ``run_id``."""
    from mlflow.entities import LoggedModelOutput

    inputs = []
    prepare = status.get("prepare", {}).get("manifest")
    if prepare is not None:
        inputs.append(datasets.artifact_input("pipeline", "prepare", prepare, Path(artifacts) / "prepare"))
    if isinstance(data, dict):
        inputs.append(datasets.source_input(data, root))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
    student = status.get("student", {}).get("manifest")
    student_run = student.mlflow_run_id if student is not None else None
    tags = {}
    if student_run:
        model_id = models.run_model_ids(client, student_run).get("student")
        if model_id:
            tags["kdflow.student.model_id"] = model_id
            client.log_outputs(run_id, [LoggedModelOutput(model_id, 0)])
    version = student_version(client, student_run)
    if version is not None:
        tags["kdflow.registered_model"] = f"{version.name}/{version.version}"
    rows = lineage_rows(client, status)
    text = markdown(pipeline, rows, version)
    tags["mlflow.note.content"] = text  # the run's description in the UI
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "lineage.md").write_text(text)
        doc = {"pipeline": pipeline, "stages": rows,
               "registered_model": tags.get("kdflow.registered_model"), "student_model_id": tags.get("kdflow.student.model_id")}
        (Path(tmp) / "lineage.json").write_text(json.dumps(doc, indent=1) + "\n")
        client.log_artifacts(run_id, tmp)
