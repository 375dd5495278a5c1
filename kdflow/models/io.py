"""Pickle-free model files: ``model.safetensors`` (weights) + ``model.json`` (how to rebuild).

Models wrapping ``transformers`` are written with ``save_pretrained`` instead of our
``model.safetensors``, next to a ``model.json`` whose ``arch`` is ``"hf"``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from kdflow.errors import ModelError, UnknownNameError
from kdflow.models import create_model
from kdflow.models.hf import HFClassifier, load_hf_classifier

SPEC_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
HF_CONFIG_FILE = "config.json"


def save_model(model: nn.Module, directory: Path) -> list[Path]:
    """Write ``model`` into ``directory`` (created if needed); returns the files written.

    Raises:
        ModelError: the model was not built by ``create_model``/``load_model`` (no ``kdflow_spec``).
    """
    spec = getattr(model, "kdflow_spec", None)
    if spec is None:
        raise ModelError(
            f"cannot save {type(model).__name__}: no kdflow_spec (build it with create_model)"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(model, HFClassifier):
        files = _save_hf(model, directory)
        spec = {**spec, "args": {"path": "."}}  # no absolute path: artifacts stay relocatable
    else:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})
        files = [directory / WEIGHTS_FILE]
    try:
        text = json.dumps({**spec, "format": "kdflow"}, indent=2, sort_keys=True)
    except TypeError as exc:
        raise ModelError(
            f"model arguments are not JSON-serialisable: {spec['args']} ({exc})"
        ) from None
    (directory / SPEC_FILE).write_text(text + "\n")
    return [*files, directory / SPEC_FILE]


def _save_hf(model: HFClassifier, directory: Path) -> list[Path]:
    model.model.save_pretrained(directory)
    names = [HF_CONFIG_FILE, WEIGHTS_FILE, "generation_config.json"]
    return [directory / n for n in names if (directory / n).is_file()]


def load_model(directory: Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model directory written by ``save_model`` or by ``transformers``' ``save_pretrained``.

    Returns the model in eval mode on ``map_location``.

    Raises:
        ModelError: files missing, unreadable, or not matching the declared architecture.
    """
    directory = Path(directory)
    if (directory / SPEC_FILE).is_file():
        model = _load_kdflow(directory)
    elif (directory / HF_CONFIG_FILE).is_file():
        model = load_hf_classifier(directory)
    else:
        where = directory if directory.is_dir() else f"{directory} (no such directory)"
        raise ModelError(
            f"{where}: no model found; expected {SPEC_FILE} + {WEIGHTS_FILE} (a kdflow model) "
            f"or {HF_CONFIG_FILE} (a transformers save_pretrained directory)"
        )
    return model.to(map_location).eval()


def _read_spec(path: Path) -> dict:
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable model spec ({exc})") from None
    required = ("arch", "input_shape", "num_classes")
    missing = [k for k in required if not isinstance(spec, dict) or k not in spec]
    if missing or spec.get("format") != "kdflow":
        missing = missing or ["format: kdflow"]
        raise ModelError(f"{path}: not a kdflow model spec (missing {missing})")
    return spec


def _load_kdflow(directory: Path) -> nn.Module:
    spec_path, weights = directory / SPEC_FILE, directory / WEIGHTS_FILE
    spec = _read_spec(spec_path)
    if spec["arch"] == "hf":
        return load_hf_classifier(directory)
    try:
        shape, args = tuple(spec["input_shape"]), spec.get("args", {})
        model = create_model(spec["arch"], shape, spec["num_classes"], **args)
    except (UnknownNameError, ModelError) as exc:
        raise ModelError(f"{spec_path}: {exc}") from None
    if not weights.is_file():
        raise ModelError(f"{weights}: missing; {spec_path} needs its weights file next to it")
    try:
        state = load_file(weights, device="cpu")
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{weights}: unreadable or corrupt safetensors file ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[1:3]
        raise ModelError(
            f"{weights}: weights do not match {spec_path} (arch {spec['arch']!r}): "
            + " ".join(detail).strip()
        ) from None
    return model


def init_weights(model: nn.Module, directory: Path) -> nn.Module:
    """Copy the weights of the model folder ``directory`` (its ``model.safetensors``, written by
    ``save_model`` or ``save_pretrained``) into ``model``: every tensor, same names and shapes.

    Raises:
        ModelError: the folder or its weights are missing, or they do not fit ``model``.
    """
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        where = directory if Path(directory).is_dir() else f"{directory} (no such folder)"
        raise ModelError(f"student.init: {where}: no {WEIGHTS_FILE} to start from")
    try:
        state = load_file(weights, device="cpu")
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelError(f"student.init: {weights}: unreadable safetensors file ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).splitlines()[1:3]).strip()
        raise ModelError(f"student.init: {weights} does not fit the student (arch and args must be the ones it was "
                         f"saved with): {detail}") from None
    return model
