"""Causal language models of the LM track: a ``transformers`` model behind kdflow's interface.

``CausalLM(x)`` maps token ids ``[B, L]`` to next-token logits ``[B, L, V]``. Architectures:

- ``llama``: a Llama-family model from scratch (``layers``, ``hidden``, ``heads``, ``kv_heads``,
  ``intermediate``, ``max_positions``, ``tie_embeddings``), vocabulary = the data's, or trimmed
  (``keep_tokens: N``): embeddings and LM head of N + 1 rows, the N most frequent token ids of
  the training blocks plus one tail id for all others (see ``CausalLM``);
- ``llama_from_teacher``: the teacher's width, heads and vocabulary with a subset of its decoder
  layers (``layers: [0, 15, 29]``), weights copied.

A model folder is a ``save_pretrained`` folder (``config.json`` + ``model.safetensors``), the
tokenizer, and ``model.json`` (``arch: causal_lm``), so ``AutoModelForCausalLM.from_pretrained``
and ``pipeline("text-generation")`` load it offline. A trimmed model adds ``vocab_map.json`` (the
kept ids, in student-id order); transformers alone loads it as an (N + 1)-token model whose ids
are those positions.
"""
from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any

import math

import numpy as np
import torch
from torch import nn

from kdflow.errors import ModelError

SPEC_FILE = "model.json"
VOCAB_MAP_FILE = "vocab_map.json"
ARCHS: dict[str, str] = {
    "llama": "a Llama-family causal LM from scratch",
    "llama_from_teacher": "the teacher's width and vocabulary with a subset of its layers",
}


class CausalLM(nn.Module):
    """Next-token logits ``[B, L, V]`` of a ``transformers`` causal LM for ids ``[B, L]``.

    Trimmed (``kept``: the N full-vocabulary ids the inner model keeps, ``[N]``): the inner model
    has N + 1 ids, id N standing for every other token. Ids are mapped in; the logits come back
    over the full vocabulary V, the tail id's probability spread evenly over the V - N dropped
    tokens (``logit_i = z_N - log(V - N)``), so the student is a proper distribution over the
    teacher's tokens: losses, perplexity, KL and agreement compare it with the teacher as is.
    """

    def __init__(self, model: nn.Module, spec: dict[str, Any], kept: torch.Tensor | None = None,
                 full_vocab: int | None = None) -> None:
        from kdflow.models.causal_lm import quiet_transformers

        quiet_transformers()
        super().__init__()
        self.model = model
        self.kdflow_spec = spec
        self.kept = None if kept is None else kept.long()
        if self.kept is not None:
            n, full = len(self.kept), int(full_vocab)
            if int(model.config.vocab_size) != n + 1 or not 0 < n < full:
                raise ModelError(f"trimmed vocabulary: {n} kept ids of {full} need an inner "
                                 f"vocabulary of {n + 1}, got {model.config.vocab_size}")
            to_student = torch.full((full,), n, dtype=torch.long)
            to_student[self.kept] = torch.arange(n)
            penalty = torch.full((full,), -math.log(full - n))
            penalty[self.kept] = 0.0
            self.register_buffer("to_student", to_student, persistent=False)  # [V]
            self.register_buffer("spread", penalty, persistent=False)  # [V]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kept is None:
            return self.model(input_ids=x, use_cache=False).logits  # [B, L, V]
        z = self.model(input_ids=self.to_student[x], use_cache=False).logits  # [B, L, N + 1]
        return z[..., self.to_student] + self.spread.to(z.dtype)  # [B, L, V] (faster than index_select here)

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``transformers``' ``generate`` over full-vocabulary ids ``[B, P]`` -> ``[B, P + n]``.

        Trimmed: the prompt is mapped in, the tail id's logit is lowered by ``log(V - N)`` at each
        step (so greedy and sampled choices follow the full-vocabulary distribution, the tail id
        standing for "one of the dropped tokens"), and a chosen tail id comes back as the smallest
        dropped id (every dropped id reads back in as the tail id)."""
        if self.kept is None:
            return self.model.generate(input_ids, **kwargs)
        from transformers import LogitsProcessorList

        n, full = len(self.kept), len(self.to_student)
        dropped = int((self.to_student == n).nonzero()[0])
        back = torch.cat([self.kept, torch.tensor([dropped])]).to(input_ids.device)  # [N + 1]
        spread = math.log(full - n)

        def lower_tail(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            scores = scores.clone()
            scores[:, n] -= spread
            return scores

        processors = LogitsProcessorList([lower_tail, *kwargs.pop("logits_processor", [])])
        out = self.model.generate(self.to_student[input_ids], logits_processor=processors, **kwargs)
        return back[out]

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size) if self.kept is None else len(self.to_student)

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 1 << 30))


def _llama(vocab: int, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int | None = None,
           intermediate: int | None = None, max_positions: int = 512, tie_embeddings: bool = True,
           keep_tokens: int | None = None) -> nn.Module:
    from kdflow.models.causal_lm import tiny_llama

    if keep_tokens is not None:
        vocab = int(keep_tokens) + 1  # the kept ids + one tail id
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
    """Unknown constructor arguments of ``arch`` (checked without building), and a
    ``keep_tokens`` that is not a positive integer."""
    try:
        inspect.signature(BUILDERS[arch]).bind(1, **args)
    except TypeError as exc:
        return [f"{where}.args: {exc} (architecture {arch!r})"]
    keep = args.get("keep_tokens")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        return [f"{where}.args.keep_tokens: must be an integer >= 1 (got {keep!r})"]
    return []


def most_frequent(tokens: np.ndarray | torch.Tensor, vocab: int, n: int) -> torch.Tensor:
    """The ``n`` most frequent ids of ``tokens`` (ties: the smaller id first), most frequent first."""
    counts = np.bincount(np.asarray(tokens).ravel(), minlength=vocab)[:vocab]
    order = np.lexsort((np.arange(vocab), -counts))  # by count descending, then id
    return torch.from_numpy(order[:n].copy())


def create_causal_lm(arch: str, vocab: int, args: dict[str, Any], teacher: Path | None = None,
                     tokens: np.ndarray | torch.Tensor | None = None) -> CausalLM:
    """Build ``arch`` for a vocabulary of ``vocab`` tokens (``teacher``: the chosen teacher's folder;
    ``tokens``: the training token ids, whose most frequent ``args.keep_tokens`` a trimmed model keeps)."""
    extra = {"teacher": teacher} if arch == "llama_from_teacher" else {}
    keep = args.get("keep_tokens")
    if keep is not None and not 1 <= int(keep) < vocab:
        raise ModelError(f"model {arch!r}: keep_tokens {keep} must be in [1, {vocab - 1}] (vocabulary {vocab})")
    if keep is not None and tokens is None:
        raise ModelError(f"model {arch!r}: keep_tokens needs the training tokens to count")
    try:
        model = BUILDERS[arch](vocab, **args, **extra)
    except TypeError as exc:
        raise ModelError(f"model {arch!r}: bad arguments {sorted(args)}: {exc}") from None
    kept = None if keep is None else most_frequent(tokens, vocab, int(keep))
    spec = {"arch": "causal_lm", "built_as": arch, "args": dict(args), "num_classes": vocab}
    return CausalLM(model, spec, kept, vocab)


def save_causal_lm(model: CausalLM, folder: Path, tokenizer_dir: Path | None) -> None:
    """``save_pretrained`` + the tokenizer + ``model.json``, into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.model.save_pretrained(folder, safe_serialization=True)
    if model.kept is not None:
        (folder / VOCAB_MAP_FILE).write_text(json.dumps({"vocab_size": model.vocab_size,
                                                         "kept": model.kept.tolist()}) + "\n")
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
    trimmed = folder / VOCAB_MAP_FILE
    if not trimmed.is_file():
        return CausalLM(model, {**spec, "num_classes": int(model.config.vocab_size)}).eval()
    try:
        vocab_map = json.loads(trimmed.read_text())
        kept, full = torch.tensor(vocab_map["kept"], dtype=torch.long), int(vocab_map["vocab_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{trimmed}: not a vocabulary map ({exc})") from None
    return CausalLM(model, {**spec, "num_classes": full}, kept, full).eval()
