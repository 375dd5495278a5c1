"""Sequence-level distillation data: the teacher continues the training blocks' prompts.

``condense.method: generate`` (Kim & Rush, "Sequence-Level Knowledge Distillation"): every
training block's first ``prompt_tokens`` tokens are continued by the teacher to a full block
(greedy with ``temperature: 0``, else sampled from the seed), ``per_block`` times. The student
then trains on the teacher's own text (with the original blocks too when ``keep_original``), and
the logits stage caches the teacher's distributions over it as usual. The generated blocks are
the condense stage's output, so they are cached by fingerprint like any stage output.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from kdflow.condense import CONDENSERS, Report
from kdflow.data.dataset import Dataset
from kdflow.errors import DataError
from kdflow.tracks.lm.blocks import TokenBlocks
from kdflow.tracks.lm.corpus import targets
from schemas.base import Section

BATCH = 16  # prompts generated together


class GenerateParams(Section):
    method: Literal["generate"] = Field("generate", description="The teacher continues each training block's prompt.")
    prompt_tokens: int = Field(16, ge=1, le=100_000, description="Tokens of each block kept as the prompt.")
    per_block: int = Field(1, ge=1, le=64, description="Continuations generated per block.")
    temperature: float = Field(0.0, ge=0, le=10, description="Sampling temperature (0: greedy).")
    keep_original: bool = Field(True, description="Train on the original blocks too.")
    max_blocks: int | None = Field(None, ge=1, le=100_000_000, description="Prompts taken from the first blocks only (null: all).")

    @model_validator(mode="after")
    def _sampling(self) -> GenerateParams:
        if self.per_block > 1 and self.temperature == 0:
            raise ValueError("per_block > 1 needs temperature > 0 (greedy continuations are all the same)")
        return self


def continue_blocks(teacher: nn.Module, prompts: torch.Tensor, length: int, *, temperature: float,
                    device: torch.device) -> torch.Tensor:
    """Continuations ``[B, length]`` of ``prompts`` ``[B, P]`` by the teacher (exactly ``length`` tokens)."""
    new = length - prompts.shape[1]
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {"do_sample": False}
    with torch.inference_mode():
        out = teacher.generate(prompts.long().to(device), attention_mask=torch.ones_like(prompts).to(device),
                               max_new_tokens=new, min_new_tokens=new, pad_token_id=0, **sampling)
    return out[:, :length].to(torch.int32).cpu()


@CONDENSERS.register("generate", params=GenerateParams, tracks=("lm",), needs_teacher=True, provides=())
def generate(
    train: Dataset, *, teacher: nn.Module | None, seed: int, device: torch.device, report: Report | None,
    prompt_tokens: int, per_block: int, temperature: float, keep_original: bool, max_blocks: int | None,
) -> TokenBlocks:
    """The training blocks continued by the teacher (plus the originals when ``keep_original``)."""
    if not isinstance(train, TokenBlocks) or teacher is None:
        raise DataError("condense.method generate: needs token blocks (track lm) and a teacher")
    length = int(train.features.shape[1])
    if prompt_tokens >= length:
        raise DataError(f"condense.prompt_tokens: {prompt_tokens} leaves nothing to generate in blocks of {length}")
    torch.manual_seed(seed)
    teacher.to(device).eval()
    rows = min(len(train), max_blocks or len(train))
    made = []
    for r in range(per_block):
        for start in range(0, rows, BATCH):
            stop = min(start + BATCH, rows)
            made.append(continue_blocks(teacher, train.features[start:stop, :prompt_tokens], length,
                                        temperature=temperature, device=device))
            if report is not None:
                report(r * rows + stop, per_block * rows)
    blocks = torch.cat(made)  # [rows * per_block, L]
    labels = targets(blocks)
    ids = [f"gen-{r}-{i:06d}" for r in range(per_block) for i in range(rows)]
    if keep_original:
        blocks, labels = torch.cat([train.features, blocks]), torch.cat([train.labels.to(labels.dtype), labels])
        ids = [*train.sample_ids, *ids]
    n = len(ids)
    return TokenBlocks(features=blocks, labels=labels, sample_ids=ids, splits=["train"] * n,
                       num_classes=train.num_classes, modality="text", meta=dict(train.meta),
                       tokenizer=train.tokenizer, tokenizer_dir=train.tokenizer_dir, split_rows={"train": (0, n)})
