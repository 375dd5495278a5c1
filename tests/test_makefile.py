"""`make install` picks the torch build: CPU index without a GPU, PyPI's CUDA build with one, a local wheel first.

Checked with `make torch-choice` and `make -n` (prints, installs nothing, needs no network); the
GPU is stood for by an `nvidia-smi` that answers, the only thing the Makefile asks.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _make(tmp_path: Path, *args: str, gpu: bool, find_links: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "TORCH_BUILD", "TORCH_INDEX", "TORCH_SPEC")}
    env["PIP_CONFIG_FILE"] = os.devnull  # ignore this machine's pip config (its own wheel folder)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.unlink(missing_ok=True)
    if gpu:
        smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\n")
        smi.chmod(0o755)
    path = [p for p in env["PATH"].split(os.pathsep) if not (Path(p) / "nvidia-smi").exists()]
    env["PATH"] = os.pathsep.join([str(bin_dir), *path])
    if find_links is not None:
        env["PIP_FIND_LINKS"] = str(find_links)
    proc = subprocess.run(["make", "-s", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_cpu_index_without_a_gpu(tmp_path: Path) -> None:
    assert _make(tmp_path, "torch-choice", gpu=False).strip() == \
        "torch: torch==2.13.0, cpu build, from index https://download.pytorch.org/whl/cpu"
    venv = tmp_path / "venv"
    dry = _make(tmp_path, "-n", "-B", f"{venv}/.installed", f"VENV={venv}", gpu=False)
    assert '-m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu' in dry
    assert not venv.exists()  # a dry run


def test_cuda_build_from_pypi_with_a_gpu(tmp_path: Path) -> None:
    assert _make(tmp_path, "torch-choice", gpu=True).strip() == "torch: torch==2.13.0, cuda build, from PyPI"
    venv = tmp_path / "venv"
    dry = _make(tmp_path, "-n", "-B", f"{venv}/.installed", f"VENV={venv}", gpu=True)
    assert "--index-url" not in dry and '-m pip install -q "torch==2.13.0"' in dry


def test_a_local_wheel_of_that_version_is_used_as_is(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    (wheels / "torch-2.12.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    out = _make(tmp_path, "torch-choice", gpu=False, find_links=wheels).strip()
    assert out == f"torch: torch==2.13.0, cpu build, from local wheel {wheels}/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    # that wheel is the CPU build: a GPU machine does not take it
    assert _make(tmp_path, "torch-choice", gpu=True, find_links=wheels).strip() == "torch: torch==2.13.0, cuda build, from PyPI"
