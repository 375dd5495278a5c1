"""Devices, mixed precision and seeding."""
from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

from kdflow.errors import KdflowError


_CHOICES = "use auto, cpu, cuda, cuda:N or mps"


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(name: str) -> torch.device:
    """Turn a device name into a ``torch.device``.

    ``"auto"`` picks cuda, then mps, then cpu; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` and ``"mps"``
    are explicit.

    Raises:
        KdflowError: the name is unknown or the device is not available here.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise KdflowError(f"device: unknown device {name!r}; {_CHOICES}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise KdflowError(f"device: {name!r} requested but CUDA is not available; {_CHOICES}")
        if device.index is not None and device.index >= count:
            raise KdflowError(f"device: {name!r} requested but {count} CUDA device(s) are visible")
        return device
    if device.type == "mps":
        if not _mps_available():
            raise KdflowError(f"device: {name!r} requested but MPS is not available; {_CHOICES}")
        return device
    raise KdflowError(f"device: unsupported device {name!r}; {_CHOICES}")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op elsewhere (full float32 on CPU keeps runs deterministic)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int, *, deterministic: bool | None = None) -> None:
    """Seed ``random``, numpy and torch.

    Args:
        seed: the run's seed.
        deterministic: ask torch for deterministic kernels (warn-only), or not. ``None`` means
            "when CUDA is absent": CPU runs are exact, CUDA runs keep their fast kernels.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    set_deterministic(deterministic if deterministic is not None else not torch.cuda.is_available())


def set_deterministic(on: bool) -> None:
    """``torch.use_deterministic_algorithms(on)`` (warn-only: an op without a deterministic kernel
    warns instead of failing); on CUDA also the cuBLAS workspace setting it needs."""
    if on and torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)


@contextlib.contextmanager
def deterministic_algorithms(on: bool) -> Iterator[None]:
    """Run with ``set_deterministic(on)``, restoring the previous setting afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    set_deterministic(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=True)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op threads (None: leave torch's setting), restored afterwards."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``model`` in eval mode, restoring its previous mode on exit."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
