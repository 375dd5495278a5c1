"""Shared fixtures: telemetry off, paths to the project and to ../shared/data, tiny pipelines."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

for _k, _v in {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    # one torch/BLAS thread in this process and in every kdflow/dvc process a test starts: under
    # pytest-xdist two workers share the cores, and multi-threaded torch on small ops then crawls
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    """``$KDFLOW_SHARED_DATA`` or ``<repo>/../shared/data``."""
    return Path(os.environ.get("KDFLOW_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def mnist_dir() -> Path:
    path = shared_data() / "mnist-t10k"
    if not (path / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST IDX files not found under {path}")
    return path


def tiny_params(name: str = "tiny", **sections: dict) -> dict:
    """A raw pipeline dict with tiny budgets on digits (seconds to run)."""
    fast = {"epochs": 3, "lr": 0.01, "batch_size": 128, "patience": None}
    raw = {
        "name": name,
        "seed": 0,
        "data": {"source": "sklearn:digits"},
        "teachers": [
            {"name": "conv", "arch": "tiny_convnet", "train": fast},
            {"name": "mlp", "arch": "mlp", "args": {"hidden": [64]}, "train": fast},
        ],
        "select": {"strategy": "val_accuracy"},
        "condense": {"method": "none"},
        "logits": {"format": "dense"},
        "student": {"arch": "tiny_mlp", "loss": {"name": "kd"}, "train": fast, "device": "cpu"},
        "evaluate": {"latency_repeats": 2},
        "tracking": {"enabled": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    return raw


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for servers the tests start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc, timeout: float = 30) -> None:
    """Stop a process a test started with ``start_new_session=True``, with its children."""
    import signal
    import subprocess

    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=timeout)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def write_params(root: Path, raw: dict, name: str = "params.yaml") -> Path:
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def dvc_project(root: Path, raw: dict, env: dict[str, str] | None = None) -> tuple[Path, dict[str, str]]:
    """A fresh git + DVC repo at ``root`` holding the pipeline code and ``raw`` as params.yaml.

    DVC reads params keys from the file itself, so ``raw`` should spell out every key.
    Returns ``(root, env)``, the environment to run ``git``/``dvc``/``kdflow`` there.
    """
    import shutil
    import subprocess
    import sys

    for item in ("dvc.yaml", ".dvcignore", ".gitignore", "kdflow", "tasks", "schemas", "flows"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, root / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, root / item)
    write_params(root, raw)
    env = {**os.environ, **(env or {}), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "pipeline"]):
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return root, env
