"""Plain cross-entropy with the labels: the no-teacher baseline."""
from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

from kdflow.losses import LOSSES, LossBase, check_batch, weighted_mean
from schemas.methods import CEParams  # torch-free (kdflow/catalog.py)


def ce_rows(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample cross-entropy ``[B]`` of float32 logits ``[B, C]`` against labels ``[B]``."""
    return F.cross_entropy(student_logits.float(), labels.long(), reduction="none")


@LOSSES.register("ce", params=CEParams, tracks=("classify", "graph", "text"))
class CE(LossBase):
    """Cross-entropy with the hard labels."""

    needs: tuple[str, ...] = ("y",)

    def __call__(self, student_logits: Tensor, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        check_batch("ce", self.needs, student_logits, batch)
        ce = weighted_mean(ce_rows(student_logits, batch["y"]), batch)
        return {"loss": ce, "ce": ce}

    def __repr__(self) -> str:
        return "CE()"
