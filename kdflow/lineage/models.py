"""Teachers and the student as MLflow LoggedModels; the student in the model registry.

Models are logged with ``mlflow.pytorch.log_model`` (``pt2`` format where ``torch.export`` can
trace the model, else pickle; explicit pip requirements so nothing is inferred or downloaded) into a LoggedModel created first in the stage run's
experiment, with a signature and an input example taken from the prepared dataset.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kdflow.lineage.backends import fluent_uri

log = logging.getLogger(__name__)

MODEL_SPEC = "model.json"
EXAMPLE_ROWS = 4
LATEST = "latest"  # MLflow's reserved alias: always the newest version of a registered model


def model_tag(label: str) -> str:
    """The stage-run tag that holds the LoggedModel id of the model ``label``."""
    return f"kdflow.model.{label}.id"


def run_model_ids(client: Any, run_id: str) -> dict[str, str]:
    """Label -> LoggedModel id of the models a stage run logged (empty if the run is unknown)."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_run(run_id).data.tags
    except MlflowException:  # produced under another store
        return {}
    return {k.removeprefix("kdflow.model.").removesuffix(".id"): v for k, v in tags.items()
            if k.startswith("kdflow.model.") and k.endswith(".id")}


def model_folders(directory: Path, root_label: str) -> dict[str, Path]:
    """Label -> folder of every kdflow model in a stage output (``root_label`` for the folder itself)."""
    out = {}
    for spec in sorted(Path(directory).rglob(MODEL_SPEC)):
        rel = spec.parent.relative_to(directory).as_posix()
        out[root_label if rel == "." else rel] = spec.parent
    return out


def input_example(dataset_dir: Path, rows: int = EXAMPLE_ROWS) -> Any | None:
    """The first ``rows`` feature rows of a dataset artifact, read without loading the rest."""
    from safetensors import safe_open

    path = Path(dataset_dir) / "tensors.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if "features" not in f.keys():
            return None
        return f.get_slice("features")[:rows]


def _signature(module: Any, example: Any | None) -> tuple[Any, Any]:
    """(signature, input example) from one forward pass; (None, None) if the model rejects it."""
    import torch
    from mlflow.models import infer_signature

    if example is None:
        return None, None
    try:
        with torch.no_grad():
            output = module(example)
    except Exception as exc:  # noqa: BLE001  a probe: graph models, say, take more than a feature tensor
        log.info("no signature for %s: %s", type(module).__name__, exc)
        return None, None
    if not isinstance(output, torch.Tensor):
        return None, None
    x = example.detach().cpu().numpy()
    return infer_signature(x, output.detach().cpu().float().numpy()), x


def _requirements() -> list[str]:
    import mlflow
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]


def log_model(client: Any, uri: str, experiment_id: str, run_id: str, name: str, folder: Path,
              example: Any | None, tags: dict[str, str], loader: Any = None) -> str:
    """Log the kdflow model in ``folder`` (read by ``loader``, the track's, default
    ``kdflow.models.io.load_model``) as a LoggedModel of ``run_id``; returns its model id."""
    import mlflow.pytorch

    from kdflow.models.io import load_model

    module = (loader or load_model)(folder).eval()  # exported (pt2) in inference mode
    signature, example_np = _signature(module, example)
    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, tags=tags)
    with fluent_uri(uri):
        for fmt in serialization_formats(example_np is not None):
            try:
                mlflow.pytorch.log_model(
                    module, name=name, model_id=logged.model_id, run_id=run_id, signature=signature,
                    input_example=example_np, pip_requirements=_requirements(), serialization_format=fmt,
                )
                break
            except Exception as exc:  # noqa: BLE001  torch.export cannot trace every model: pickle then
                if fmt == "pickle":
                    raise
                log.info("%s: torch.export failed (%s: %s); logging it with pickle", name, type(exc).__name__, exc)
    return logged.model_id


def serialization_formats(has_example: bool) -> tuple[str, ...]:
    """MLflow formats to try, safest first: ``pt2`` (``torch.export``: a graph and tensors, loadable
    with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``) needs an input example to trace; models
    without one (graphs, language models) and models ``torch.export`` cannot trace fall back to
    ``pickle``."""
    return ("pt2", "pickle") if has_example else ("pickle",)


def register(client: Any, name: str, model_id: str, run_id: str, tags: dict[str, str], description: str) -> str:
    """Register a LoggedModel as a new version of ``name`` (created if needed); returns the version.

    ``name@latest`` resolves to it: ``latest`` is MLflow's built-in alias for the newest version.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description=description)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    with fluent_uri(client.tracking_uri):  # the sqlite registry resolves models:/ through the global URI
        version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, tags=tags,
                                              model_id=model_id)
    return str(version.version)


def model_metrics(run_id: str, model_id: str, values: dict[str, float], dataset: tuple[str, str] | None = None,
                  timestamp: int | None = None) -> list[Any]:
    """``Metric`` entities of ``run_id`` attached to ``model_id`` (and to an evaluation dataset)."""
    import time

    from mlflow.entities import Metric

    now = timestamp or int(time.time() * 1000)
    name, digest = dataset or (None, None)
    return [Metric(k, float(v), now, 0, model_id=model_id, dataset_name=name, dataset_digest=digest)
            for k, v in values.items()]


def evaluation_values(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``metrics.json`` of the evaluate stage -> numeric metrics per model role.

    The student gets its own numbers plus the pair metrics (agreement, KL, gap, compression);
    keys are prefixed with the role so both fit in one run.
    """
    def numbers(tree: dict[str, Any], prefix: str) -> dict[str, float]:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out.update(numbers(value, f"{prefix}{key}."))
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{prefix}{key}"] = float(value)
        return out

    pairs = {k: v for k, v in metrics.items() if k not in ("teacher", "student", "ece_student", "n_test")}
    return {
        "student": {**numbers(metrics.get("student", {}), "student."), **numbers(pairs, "student.")},
        "teacher": numbers(metrics.get("teacher", {}), "teacher."),
    }
