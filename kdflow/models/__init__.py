"""Registry of model architectures, built by name like timm's ``create_model``.

Every registered factory has the signature ``factory(input_shape, num_classes, **args)`` and
returns an ``nn.Module`` with ``forward(x) -> logits [B, num_classes]`` and
``features(x) -> [B, D]`` (penultimate features).
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from kdflow.catalog import MODELS as _MODELS
from kdflow.catalog import is_import_path
from kdflow.errors import ModelError
from kdflow.registry import Registry

MODELS: Registry = _MODELS  # its names and metadata: kdflow/catalog.py


def create_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any
) -> nn.Module:
    """Build the registered model ``name`` for inputs ``[B, *input_shape]``.

    The constructor arguments are recorded in ``model.kdflow_spec`` so that
    ``kdflow.models.io.save_model`` can write a pickle-free ``model.json``.

    Raises:
        UnknownNameError: ``name`` is not registered.
        ModelError: the arguments or the input shape do not fit the architecture.
    """
    factory = resolve_architecture(name)
    if num_classes < 1:
        raise ModelError(f"model {name!r}: num_classes must be >= 1 (got {num_classes})")
    try:
        model = factory(tuple(int(d) for d in input_shape), int(num_classes), **kwargs)
    except TypeError as exc:  # unknown or missing constructor argument
        raise ModelError(f"model {name!r}: bad arguments {sorted(kwargs)}: {exc}") from None
    model.kdflow_spec = {
        "arch": name,
        "args": dict(kwargs),
        "input_shape": [int(d) for d in input_shape],
        "num_classes": int(num_classes),
    }
    return model


def resolve_architecture(name: str) -> Callable[..., nn.Module]:
    """The factory of ``name``: a registered architecture, or a user's class or function given by
    import path (``mypkg.models:MyNet``), called like a registered one: ``(input_shape,
    num_classes, **args)``. A module in the project folder (the working directory) is found too.

    Raises:
        UnknownNameError: an unknown registered name.
        ModelError: the import path cannot be imported or does not name a callable.
    """
    if not is_import_path(name):
        return MODELS.get(name)
    module_name, _, attr = name.partition(":")
    try:
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            here = str(Path.cwd())
            if exc.name != module_name.split(".")[0] or here in sys.path:
                raise
            sys.path.append(here)  # like `python -m`: the project folder's own modules
            obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"architecture {name!r}: cannot import it ({type(exc).__name__}: {exc})") from None
    if not callable(obj):
        raise ModelError(f"architecture {name!r}: {type(obj).__name__} is not a class or function")
    return obj


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def model_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


# Registration side effects; imported last because they use MODELS.
from kdflow.models import convnet, gnn, mlp, resnet  # noqa: E402,F401

__all__ = ["MODELS", "count_params", "create_model", "is_import_path", "model_bytes", "resolve_architecture"]
