"""Where lineage goes: the embedded sqlite store or a tracking server, and how to reach it."""
from __future__ import annotations

import logging
import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kdflow.errors import KdflowError

ENV_URI = "MLFLOW_TRACKING_URI"


class TrackingUnavailableError(KdflowError):
    """The tracking server cannot be reached."""


def resolve_tracking_uri(uri: str | None, root: Path) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlflow.db``."""
    return uri or os.environ.get(ENV_URI) or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def uri_problem(uri: str) -> str | None:
    """Why MLflow has no tracking store for ``uri``'s scheme (None: it has one, or a plain path)."""
    import urllib.parse

    scheme = urllib.parse.urlparse(uri).scheme
    if len(scheme) <= 1:  # a path (or a Windows drive letter): MLflow's file store
        return None
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry
        known = sorted(s for s in _tracking_store_registry._registry if s)
    except (ImportError, AttributeError):  # MLflow moved it: let MLflow itself decide
        return None
    if scheme.split("+")[0] not in known:  # postgresql+psycopg2: a database dialect and its driver
        return f"unsupported scheme {scheme!r} (MLflow tracking stores: {', '.join(known)}, or a folder path)"
    return None


def store_error(uri: str, exc: BaseException) -> TrackingUnavailableError:
    """A store MLflow cannot open (a corrupt ``mlflow.db``, a missing database driver), in words."""
    where = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else uri
    first = (str(exc).strip().splitlines() or [""])[0]
    return TrackingUnavailableError(
        f"{where}: cannot open the MLflow tracking store ({type(exc).__name__}: {first}); move a corrupt file "
        "aside to start a new store, fix tracking.uri / MLFLOW_TRACKING_URI, or set tracking.required: false "
        "to run without lineage.")


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise ``TrackingUnavailableError`` if an http(s) tracking server does not answer."""
    if not is_server(uri):
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


@contextmanager
def fluent_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for a moment, then restore it (and the env var).

    ``mlflow.pytorch.log_model``/``load_model`` resolve stores through the global tracking URI;
    everything else in kdflow passes the URI explicitly to an ``MlflowClient``.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    old_uri, old_env = utils._tracking_uri, os.environ.get(ENV_URI)
    quiet = logging.getLogger("mlflow.pytorch")  # warns about pickle on every log_model
    old_level = quiet.level
    mlflow.set_tracking_uri(uri)
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(old_level)
        mlflow.set_tracking_uri(old_uri)
        if old_env is None:
            os.environ.pop(ENV_URI, None)
        else:
            os.environ[ENV_URI] = old_env
