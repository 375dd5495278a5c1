"""Local Hugging Face ``transformers`` classifiers behind the kdflow model interface.

``transformers`` is imported lazily, so importing this module stays cheap. Nothing is ever
downloaded: models load with ``local_files_only=True``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from kdflow.errors import ModelError


class HFClassifier(nn.Module):
    """Wraps a ``*ForImageClassification`` or ``*ForSequenceClassification`` model.

    Image models take ``pixel_values`` ``[B, C, H, W]``. Sequence models take integer
    ``input_ids`` ``[B, L]``, or float sequences ``[B, C, L]`` passed as ``inputs_embeds``
    ``[B, L, C]`` (``C`` must equal the model's hidden size).
    """

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task  # "image" or "sequence"

    def _inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.task == "image":
            return {"pixel_values": x}
        if not torch.is_floating_point(x):
            return {"input_ids": x}
        return {"inputs_embeds": x.transpose(1, 2)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(**self._inputs(x)).logits  # [B, K]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Mean-pooled last hidden state, ``[B, D]``."""
        h = self.model(**self._inputs(x), output_hidden_states=True).hidden_states[-1]
        if h.dim() == 4:  # convolutional layout [B, C, H, W]
            return h.flatten(2).mean(-1)
        return h.mean(1)  # tokens [B, T, D]


def _from_pretrained(directory: Path) -> tuple[nn.Module, str]:
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    try:
        model = AutoModelForImageClassification.from_pretrained(directory, local_files_only=True, use_safetensors=True,
                                                                trust_remote_code=False)
        return model, "image"
    except ValueError:  # the config is not an image-classification architecture
        model = AutoModelForSequenceClassification.from_pretrained(directory, local_files_only=True, use_safetensors=True,
                                                                   trust_remote_code=False)
        return model, "sequence"


def _input_shape(config: Any) -> list[int]:
    """``[C, S, S]`` when the config records the image size, ``[C]`` or ``[]`` otherwise."""
    channels, size = getattr(config, "num_channels", None), getattr(config, "image_size", None)
    if channels is None:
        return []
    if isinstance(size, int):
        return [channels, size, size]
    if isinstance(size, (list, tuple)):
        return [channels, *size]
    return [channels]


def load_hf_classifier(directory: Path) -> HFClassifier:
    """Load a local ``save_pretrained`` directory as an ``HFClassifier`` in eval mode.

    Raises:
        ModelError: the directory is not a loadable classification model.
    """
    from kdflow.models.causal_lm import hf_weight_files

    directory = Path(directory)
    try:
        model, task = _from_pretrained(directory)  # safetensors only: a pickle .bin is never loaded
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        if isinstance(exc, (OSError, SafetensorError)):
            hf_weight_files(directory)  # names pickle-only, garbage or absent weights
        raise ModelError(
            f"{directory / 'config.json'}: cannot load as a transformers image or sequence "
            f"classifier ({type(exc).__name__}: {exc})"
        ) from None
    wrapped = HFClassifier(model, task).eval()
    wrapped.kdflow_spec = {
        "arch": "hf",
        "args": {"path": str(directory)},
        "input_shape": _input_shape(model.config),
        "num_classes": int(model.config.num_labels),
    }
    return wrapped
