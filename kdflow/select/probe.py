"""Rank teachers by how well they teach: a short KD trial of the student from each candidate.

The most accurate teacher is not always the best teacher (a capacity gap can make its soft
labels harder to imitate), so every candidate trains the same student, from the same
initialisation, on the same subset, for the same budget; the score is that student's
validation accuracy.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kdflow.losses import create_loss
from kdflow.metrics import accuracy
from kdflow.select import STRATEGIES, SelectionData
from kdflow.train.loop import fit, predict


def _subset(n: int, share: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[: max(1, round(n * share))].sort().values


@STRATEGIES.register("probe")
def probe(
    candidates: dict[str, nn.Module],
    data: SelectionData,
    *,
    student_factory: Callable[[], nn.Module],
    epochs: int,
    subset: float,
    temperature: float,
    alpha: float,
    batch_size: int = 128,
    lr: float = 3e-3,
) -> list[dict]:
    idx = _subset(len(data.train_y), subset, data.seed)
    x, y = data.train_x[idx], data.train_y[idx]
    loss = create_loss("kd", temperature=temperature, alpha=alpha)
    rows = []
    for name, teacher in candidates.items():
        torch.manual_seed(data.seed)
        student = student_factory()
        train = {"x": x, "y": y, "teacher_logits": predict(teacher, x, device=data.device)}
        fit(student, train, loss, epochs=epochs, lr=lr, batch_size=batch_size, seed=data.seed, device=data.device)
        score = accuracy(predict(student, data.val_x, device=data.device), data.val_y)
        teacher_acc = accuracy(predict(teacher, data.val_x, device=data.device), data.val_y)
        rows.append({"teacher": name, "score": score, "probe_student_val_accuracy": score, "val_accuracy": teacher_acc})
    return rows
