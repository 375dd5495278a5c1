"""Rank teachers by their accuracy on the validation split."""
from __future__ import annotations

from torch import nn

from kdflow.metrics import accuracy
from kdflow.select import STRATEGIES, SelectionData
from kdflow.train.loop import predict


@STRATEGIES.register("val_accuracy")
def val_accuracy(candidates: dict[str, nn.Module], data: SelectionData) -> list[dict]:
    rows = []
    for name, model in candidates.items():
        acc = accuracy(predict(model, data.val_x, device=data.device), data.val_y)
        rows.append({"teacher": name, "score": acc, "val_accuracy": acc})
    return rows
