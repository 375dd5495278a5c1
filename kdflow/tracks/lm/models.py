"""Causal language models of the LM track: a ``transformers`` model behind kdflow's interface.

``CausalLM(x)`` maps token ids ``[B, L]`` to next-token logits ``[B, L, V]``. Architectures:

- ``llama``: a Llama-family model from scratch (``layers``, ``hidden``, ``heads``, ``kv_heads``,
  ``intermediate``, ``max_positions``, ``tie_embeddings``), vocabulary = the data's;
- ``llama_from_teacher``: the teacher's width, heads and vocabulary with a subset of its decoder
  layers (``layers: [0, 15, 29]``), weights copied.

A model folder is a ``save_pretrained`` folder (``config.json`` + ``model.safetensors``), the
tokenizer, and ``model.json`` (``arch: causal_lm``), so ``AutoModelForCausalLM.from_pretrained``
and ``pipeline("text-generation")`` load it offline.
"""
from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdflow.errors import ModelError

SPEC_FILE = "model.json"
ARCHS: dict[str, str] = {
    "llama": "a Llama-family causal LM from scratch",
    "llama_from_teacher": "the teacher's width and vocabulary with a subset of its layers",
}


class CausalLM(nn.Module):
    """Next-token logits ``[B, L, V]`` of a ``transformers`` causal LM for ids ``[B, L]``."""

    def __init__(self, model: nn.Module, spec: dict[str, Any]) -> None:
        from kdflow.models.causal_lm import quiet_transformers

        quiet_transformers()
        super().__init__()
        self.model = model
        self.kdflow_spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x, use_cache=False).logits  # [B, L, V]

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 1 << 30))


def _llama(vocab: int, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int | None = None,
           intermediate: int | None = None, max_positions: int = 512, tie_embeddings: bool = True) -> nn.Module:
    from kdflow.models.causal_lm import tiny_llama

    return tiny_llama(vocab, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                      intermediate=intermediate, max_positions=max_positions, tie_embeddings=tie_embeddings)


def _from_teacher(vocab: int, *, layers: list[int], teacher: Path | None = None) -> nn.Module:
    from kdflow.models.causal_lm import llama_from_teacher

    if teacher is None:
        raise ModelError("llama_from_teacher: needs the chosen teacher (a student architecture only)")
    source = load_causal_lm(teacher).model
    if int(source.config.vocab_size) != vocab:
        raise ModelError(f"llama_from_teacher: teacher vocabulary {source.config.vocab_size} != the data's {vocab}")
    return llama_from_teacher(source, list(layers))


BUILDERS = {"llama": _llama, "llama_from_teacher": _from_teacher}


def arg_problems(arch: str, args: dict[str, Any], where: str) -> list[str]:
    """Unknown constructor arguments of ``arch`` (checked without building)."""
    try:
        inspect.signature(BUILDERS[arch]).bind(1, **args)
    except TypeError as exc:
        return [f"{where}.args: {exc} (architecture {arch!r})"]
    return []


def create_causal_lm(arch: str, vocab: int, args: dict[str, Any], teacher: Path | None = None) -> CausalLM:
    """Build ``arch`` for a vocabulary of ``vocab`` tokens (``teacher``: the chosen teacher's folder)."""
    extra = {"teacher": teacher} if arch == "llama_from_teacher" else {}
    try:
        model = BUILDERS[arch](vocab, **args, **extra)
    except TypeError as exc:
        raise ModelError(f"model {arch!r}: bad arguments {sorted(args)}: {exc}") from None
    return CausalLM(model, {"arch": "causal_lm", "built_as": arch, "args": dict(args), "num_classes": vocab})


def save_causal_lm(model: CausalLM, folder: Path, tokenizer_dir: Path | None) -> None:
    """``save_pretrained`` + the tokenizer + ``model.json``, into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.model.save_pretrained(folder, safe_serialization=True)
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, folder / f.name)
    write_spec(model, folder)


def write_spec(model: CausalLM, folder: Path) -> None:
    """``model.json``: how kdflow reads the folder back (``arch: causal_lm``)."""
    spec = {**model.kdflow_spec, "format": "kdflow", "input_shape": [], "num_classes": model.vocab_size}
    (Path(folder) / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


def load_causal_lm(folder: Path) -> CausalLM:
    """A ``save_pretrained`` causal LM folder (safetensors only: pickle weights are refused)."""
    from kdflow.models.causal_lm import load_hf_causal_lm

    folder = Path(folder)
    model = load_hf_causal_lm(folder)
    spec_path = folder / SPEC_FILE
    spec = json.loads(spec_path.read_text()) if spec_path.is_file() else {"arch": "causal_lm", "args": {}}
    spec.pop("format", None)
    return CausalLM(model, {**spec, "num_classes": int(model.config.vocab_size)}).eval()
