"""Rebuild the chain from a model (or any stage run) back to its data source, from MLflow alone.

Every stage run is tagged with ``kdflow.upstream.<stage>.run_id`` / ``.fingerprint``; following
them from the student's run walks evaluate/student <- logits <- condense <- select <- teachers <-
prepare, and the ``prepare`` run's ``source`` dataset input names the data source.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdflow.errors import KdflowError
from kdflow.lineage.backends import check_reachable, resolve_tracking_uri
from kdflow.lineage.models import LATEST

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
UPSTREAM = re.compile(r"^kdflow\.upstream\.(?P<stage>[^.]+)\.(?P<what>run_id|fingerprint)$")

# what each stage's row shows: ("tag"|"param"|"metric"|"info", key, label)
DETAILS: dict[str, list[tuple[str, str, str]]] = {
    "prepare": [("tag", "kdflow.data.source", "source"), ("metric", "n_train", "train"), ("metric", "n_val", "val"),
                ("metric", "n_test", "test"), ("metric", "num_classes", "classes")],
    "teachers": [],  # candidates are listed from the run's model tags
    "select": [("param", "select.strategy", "strategy"), ("info", "teachers", "chosen"),
               ("metric", "best_score", "score")],
    "condense": [("param", "condense.method", "method"), ("info", "teacher", "teacher"),
                 ("metric", "n_condensed", "samples"), ("metric", "ratio", "ratio")],
    "logits": [("param", "logits.format", "format"), ("info", "teacher_names", "teachers"),
               ("metric", "top1_agreement", "top1")],
    "student": [("param", "student.arch", "arch"), ("param", "student.loss.name", "loss"),
                ("metric", "best_val_accuracy", "val acc"), ("metric", "best_val_neg_perplexity", "val -ppl"),
                ("tag", "kdflow.registered_model", "registered")],
    "evaluate": [("info", "teacher", "teacher"), ("metric", "teacher_accuracy", "teacher acc"),
                 ("metric", "student_accuracy", "student acc"), ("metric", "teacher_perplexity", "teacher ppl"),
                 ("metric", "student_perplexity", "student ppl"), ("metric", "agreement", "agreement")],
}


class LineageError(KdflowError):
    """The reference names nothing in the tracking store, or its chain is broken."""


@dataclass
class Step:
    """One stage of the chain (or the data source, with ``stage == "source"``)."""

    stage: str
    run_id: str | None
    fingerprint: str | None
    reads: list[str] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)
    status: str = ""


@dataclass
class Lineage:
    """What ``ref`` resolved to, and its chain from the most downstream stage to the data source."""

    ref: str
    uri: str
    target: str
    model: dict[str, str] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)

    def facts(self) -> dict[str, str]:
        """One line per lineage fact recorded on a model version (teacher, data, condensation, score)."""
        m = self.model
        facts = {
            "logged model": m.get("model_id"),
            "teacher": m.get("kdflow.teacher.name")
            and f"{m['kdflow.teacher.name']} (run {m.get('kdflow.teacher.run_id', '-')})",
            "data": m.get("kdflow.data.source")
            and f"{m['kdflow.data.source']} (fingerprint {m.get('kdflow.data.fingerprint', '-')[:16]})",
            "condensation": m.get("kdflow.condense.method"),
            "test accuracy": m.get("kdflow.eval.accuracy"),
        }
        return {k: v for k, v in facts.items() if v}


def open_store(uri: str | None, root: Path) -> str:
    """The resolved tracking URI, checked: a server must answer, a default sqlite file must exist.

    Raises:
        LineageError: no store at the default location.
        TrackingUnavailableError: the server does not answer.
    """
    resolved = resolve_tracking_uri(uri, root)
    check_reachable(resolved)
    if resolved.startswith("sqlite:///"):
        path = Path(resolved.removeprefix("sqlite:///"))
        if not path.is_absolute():
            path = Path(root) / path
        if not path.is_file():
            raise LineageError(f"no MLflow store at {path}: run `kdflow run` first, or pass --tracking-uri")
    return resolved


def trace(uri: str, ref: str) -> Lineage:
    """The chain behind ``ref``: ``name[@alias]``, ``name/version``, ``models:/...``, a LoggedModel id
    (``m-...``) or a run id (a stage run, or a pipeline's parent run).

    Raises:
        LineageError: nothing matches ``ref`` or the store cannot be read.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        lineage, starts = _resolve(client, uri, ref)
        runs, edges = _walk(client, starts)
        evaluation = _evaluation_of(client, runs[starts[0]]) if len(starts) == 1 else None
    except MlflowException as exc:
        raise LineageError(f"{ref}: {exc.message} (tracking store {uri})") from None
    if evaluation is not None and evaluation.info.run_id not in runs:
        runs[evaluation.info.run_id] = evaluation
        edges[evaluation.info.run_id] = _upstream(evaluation)
        starts = [evaluation.info.run_id]
    lineage.steps = _steps(runs, edges, starts)
    return lineage


def _resolve(client: Any, uri: str, ref: str) -> tuple[Lineage, list[str]]:
    name = ref.removeprefix("models:/")
    if RUN_ID.match(name):
        run = client.get_run(name)
        tags = run.data.tags
        if tags.get("kdflow.kind") == "pipeline":
            stages = {k.split(".")[2]: v for k, v in tags.items()
                      if k.startswith("kdflow.stage.") and k.endswith(".run_id")}
            starts = [v for v in stages.values() if RUN_ID.match(v)]
            last = [stages["evaluate"]] if RUN_ID.match(stages.get("evaluate", "")) else starts
            if not last:
                raise LineageError(f"{ref}: pipeline run {run.info.run_name!r} recorded no stage runs")
            return Lineage(ref, uri, f"pipeline run {run.info.run_name} ({name})"), last
        return Lineage(ref, uri, f"{tags.get('kdflow.stage', 'run')} run {name}"), [name]
    if name.startswith("m-"):
        model = client.get_logged_model(name)
        found = Lineage(ref, uri, f"logged model {model.name} ({name})", {"model_id": name})
        return found, [_source_run(model.source_run_id, ref)]
    if "@" in name:
        model_name, alias = name.rsplit("@", 1)
        version = client.get_model_version_by_alias(model_name, alias)
    elif "/" in name and name.rsplit("/", 1)[1].isdigit():
        model_name, number = name.rsplit("/", 1)
        version, alias = client.get_model_version(model_name, number), None
    else:
        model_name, alias = name, LATEST
        version = client.get_model_version_by_alias(model_name, alias)
    model_id = getattr(version, "model_id", None) or (version.source or "").removeprefix("models:/")
    info = {"name": model_name, "version": str(version.version), "model_id": model_id, **version.tags}
    target = f"{model_name} version {version.version}" + (f" (@{alias})" if alias else "")
    return Lineage(ref, uri, target, info), [_source_run(version.run_id, ref)]


def _source_run(run_id: str | None, ref: str) -> str:
    if not run_id:
        raise LineageError(f"{ref}: the model has no source run, so its lineage is unknown")
    return run_id


def _upstream(run: Any) -> dict[str, dict[str, str]]:
    """Upstream stage -> {"run_id", "fingerprint"} from a stage run's tags."""
    out: dict[str, dict[str, str]] = {}
    for key, value in run.data.tags.items():
        m = UPSTREAM.match(key)
        if m:
            out.setdefault(m["stage"], {})[m["what"]] = value
    return out


def _walk(client: Any, starts: list[str]) -> tuple[dict[str, Any], dict[str, dict[str, dict[str, str]]]]:
    """Every run reachable through upstream tags (runs missing from the store are left out)."""
    from mlflow.exceptions import MlflowException

    runs: dict[str, Any] = {}
    edges: dict[str, dict[str, dict[str, str]]] = {}
    todo = list(starts)
    while todo:
        run_id = todo.pop()
        if run_id in runs:
            continue
        try:
            run = client.get_run(run_id)
        except MlflowException:
            if run_id in starts:
                raise
            continue
        runs[run_id], edges[run_id] = run, _upstream(run)
        todo += [u["run_id"] for u in edges[run_id].values() if u.get("run_id")]
    return runs, edges


def _evaluation_of(client: Any, run: Any) -> Any | None:
    """The newest evaluate run that read this student run (None for other stages)."""
    if run.data.tags.get("kdflow.stage") != "student":
        return None
    found = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`kdflow.upstream.student.run_id` = '{run.info.run_id}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def _steps(runs: dict[str, Any], edges: dict[str, dict[str, dict[str, str]]], starts: list[str]) -> list[Step]:
    """Runs ordered from the most downstream stage to ``prepare`` (longest path), then the source."""
    depth = {s: 0 for s in starts}
    order = list(starts)
    while order:  # relax along upstream edges: a DAG of a handful of runs
        run_id = order.pop(0)
        for up in edges.get(run_id, {}).values():
            key = up.get("run_id") or f"fp:{up.get('fingerprint', '?')}"
            if depth.get(key, -1) < depth[run_id] + 1:
                depth[key] = depth[run_id] + 1
                order.append(key)
    steps = []
    for key in sorted(depth, key=lambda k: (depth[k], k)):
        if key in runs:
            steps.append(_step(runs[key], edges[key]))
        else:  # recorded upstream without a run in this store (tracking was off, or another store)
            stage, fp = _describe_missing(key, edges)
            steps.append(Step(stage, None if key.startswith("fp:") else key, fp, status="no run in this store"))
    prepare = next((runs[k] for k in depth if k in runs and runs[k].data.tags.get("kdflow.stage") == "prepare"), None)
    if prepare is not None:
        source = _source_step(prepare)
        if source is not None:
            steps.append(source)
    return steps


def _describe_missing(key: str, edges: dict[str, dict[str, dict[str, str]]]) -> tuple[str, str | None]:
    for ups in edges.values():
        for stage, up in ups.items():
            if up.get("run_id") == key or f"fp:{up.get('fingerprint')}" == key:
                return stage, up.get("fingerprint")
    return "?", None


def _step(run: Any, upstream: dict[str, dict[str, str]]) -> Step:
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    stage = tags.get("kdflow.stage", run.info.run_name or "?")
    info = {k.removeprefix("kdflow.info."): v for k, v in tags.items() if k.startswith("kdflow.info.")}
    sources = {"tag": tags, "param": params, "metric": metrics, "info": info}
    details: dict[str, str] = {}
    for kind, key, label in DETAILS.get(stage, []):
        value = sources[kind].get(key)
        if kind == "info" and isinstance(value, str) and value.startswith("["):
            value = ", ".join(str(v) for v in json.loads(value))
        if value is not None and value != "":
            details[label] = f"{value:.4g}" if isinstance(value, float) else str(value)
    if stage == "teachers":
        for label in sorted(k.split(".")[2] for k in tags if k.startswith("kdflow.model.") and k.endswith(".id")):
            acc, ppl = metrics.get(f"{label}.val_accuracy"), metrics.get(f"{label}.val_perplexity")
            details[label] = (f"val acc {acc:.4g}" if acc is not None else f"val ppl {ppl:.4g}" if ppl is not None
                              else "logged")
    return Step(stage, run.info.run_id, tags.get("kdflow.fingerprint"), sorted(upstream), details, run.info.status)


def _source_step(prepare: Any) -> Step | None:
    for item in getattr(prepare.inputs, "dataset_inputs", None) or []:
        if item.dataset.name != "source":
            continue
        tags = {t.key: t.value for t in item.tags}
        source = json.loads(item.dataset.source or "{}")
        details = {"spec": str(source.get("spec", source.get("uri", ""))), "type": item.dataset.source_type}
        return Step("source", None, tags.get("kdflow.fingerprint", item.dataset.digest), [], details, "data")
    spec = prepare.data.tags.get("kdflow.data.source")
    return Step("source", None, None, [], {"spec": spec}, "data") if spec else None
