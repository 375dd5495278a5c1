"""On-policy distillation rounds (GKD, Agarwal et al. 2024): the student writes, the teacher grades.

After the student has trained from the cache, each round: the student continues prompts taken
from the training blocks (sampled from the seed and the round); the teacher scores every position
of those blocks once, into a per-token top-k cache keyed by the student's weights (so a changed
student never reuses another's grades); the student trains on them with the same loss. The
teacher is loaded only to grade, never while the student trains. Every round leaves its cache,
the student's weights and a ``round.json`` in the stage's work folder, so a killed stage resumes
at the first unfinished round.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdflow.cache import CacheReader, write_cache
from kdflow.cache.replay import CachedBatches
from kdflow.tracks.lm.corpus import targets
from kdflow.tracks.lm.generate import continue_blocks

log = logging.getLogger(__name__)

ROUND_FILE, WEIGHTS = "round.json", "student.safetensors"


@dataclass(frozen=True)
class Rounds:
    """How the rounds run (from ``student.on_policy``)."""

    rounds: int
    prompt_tokens: int
    max_blocks: int
    epochs: int
    temperature: float
    k: int
    format: str
    dtype: str
    capture_temperature: float  # the loss reads grades at the main cache's capture temperature


def weights_digest(model: nn.Module) -> str:
    """sha256 of the model's weights (the key of the grades a round's student gets)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def grade(teacher: nn.Module, blocks: torch.Tensor, folder: Path, spec: Rounds, *, vocab: int,
          batch_size: int, device: torch.device) -> CacheReader:
    """The teacher's per-token top-k cache over ``blocks`` ``[N, L]`` (every position but the last)."""
    n, length = blocks.shape
    teacher.to(device).eval()

    def batches():  # noqa: ANN202
        with torch.inference_mode():
            for i in range(0, n, batch_size):
                x = blocks[i : i + batch_size]
                logits = teacher(x.to(device)).float().cpu()  # [B, L, V]
                yield logits, torch.full((len(x),), length - 1, dtype=torch.int64)

    info = write_cache(folder, batches(), num_rows=n, num_classes=vocab, format=spec.format, k=min(spec.k, vocab),
                       dtype=spec.dtype, capture_temperature=spec.capture_temperature, shard_rows=max(n, 1), seq_len=length)
    reader = CacheReader(folder, info)
    reader.verify()
    return reader


def run_rounds(student: nn.Module, *, teacher_loader: Callable[[], nn.Module], train: Any, spec: Rounds,
               work: Path, seed: int, device: torch.device, batch_size: int,
               train_round: Callable[[dict[str, torch.Tensor], CachedBatches, int], list[dict[str, float]]],
               report: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Run the rounds on ``student`` in place; returns one record per round.

    Args:
        teacher_loader: loads the teacher (called only when a round must grade).
        train: the training blocks (``TokenBlocks``); prompts are the first ``max_blocks``.
        work: the stage's work folder; ``round-<r>/`` holds each round's grades and weights.
        train_round: trains the student on ``(tensors, batches, round)`` and returns its history.
    """
    records, teacher = [], None
    prompts = train.features[: min(spec.max_blocks, len(train)), : spec.prompt_tokens]
    length = int(train.features.shape[1])
    for r in range(1, spec.rounds + 1):
        folder = Path(work) / f"round-{r}"
        before = weights_digest(student)
        done = folder / ROUND_FILE
        if done.is_file() and json.loads(done.read_text()).get("student_before") == before:
            record = json.loads(done.read_text())
            student.load_state_dict(load_file(folder / WEIGHTS))
            log.info("on-policy round %d: done before (student %s), resumed", r, before[:12])
            records.append(record)
            continue
        torch.manual_seed(seed * 1000 + r)
        blocks = continue_blocks(student, prompts, length, temperature=spec.temperature, device=device)
        if teacher is None:
            teacher = teacher_loader()
        reader = grade(teacher, blocks, folder / f"grades-{before[:16]}", spec, vocab=train.num_classes,
                       batch_size=batch_size, device=device)
        labels = targets(blocks)
        tensors = {"x": blocks, "y": labels}
        history = train_round(tensors, CachedBatches(tensors, [reader], [1.0], seed=seed + r), r)
        save_file({k: v.detach().cpu().clone() for k, v in student.state_dict().items()}, folder / WEIGHTS)  # tied: copies
        record = {"round": r, "student_before": before, "student_after": weights_digest(student),
                  "blocks": int(len(blocks)), "grades": reader.info["key"] if reader.info.get("key") else None,
                  "grades_sha256": [s["sha256"] for s in reader.info["shards"]], "history": history}
        done.write_text(json.dumps(record, indent=1) + "\n")
        records.append(record)
        if report is not None:
            report(r, spec.rounds)
        log.info("on-policy round %d/%d: %d student blocks graded by the teacher", r, spec.rounds, len(blocks))
    return records
