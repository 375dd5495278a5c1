"""Prefect deployments of the ``distill`` flow: ``kdflow serve`` registers and serves ``distill/default``."""
from __future__ import annotations

from pathlib import Path

from prefect.deployments.runner import EntrypointType
from prefect.settings import PREFECT_API_URL

from flows.distill import distill
from kdflow.errors import KdflowError

DEPLOYMENT = "default"


def serve(root: Path, params_file: str = "params.yaml", limit: int | None = None) -> None:
    """Register ``distill/default`` with the configured Prefect server and run its flow runs here.

    Args:
        root: project folder the flow runs in (artifacts, mlflow.db, params files).
        params_file: default pipeline file; a run may pass ``--param params_file=...``.
        limit: maximum concurrent flow runs.
    """
    if not PREFECT_API_URL.value():
        raise KdflowError(
            "kdflow serve needs a Prefect server: run `prefect server start` and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (or `prefect config set PREFECT_API_URL=...`)"
        )
    distill.serve(
        name=DEPLOYMENT,
        parameters={"params_file": params_file, "overrides": [], "root": str(Path(root).resolve())},
        description="Distill a teacher into a student as declared in a kdflow pipeline file.",
        tags=["kdflow"],
        limit=limit,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
