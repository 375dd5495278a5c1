"""Distance-Based Representative (DBR) knowledge transfer (NRR-DD: Tran et al., "Enhancing Dataset
Distillation via Non-Critical Region Refinement", CVPR 2025, arXiv 2503.18267; Fig. 2, stage (iii)
"Knowledge Transfer").

The paper replaces soft labels by two numbers per augmented (mixed) view ``x_mix``: the teacher's
distance ``d^T_org`` from its prediction to the one-hot original label and ``d^T_aug`` to the
one-hot label of the mixed-in image; the student is trained to reduce the gap between its own
distances ``d^S_org``, ``d^S_aug`` on the same view and the stored ones. Where the paper's text
is open, kdflow chooses:

- the distance is the cross-entropy ``d(z, y) = -log softmax(z / T)[y]`` (as produced by
  ``kdflow.condense.nrr_dd.dbr_distances``);
- the gap is the squared error, added to the mixup cross-entropy on the hard labels::

      loss = lam * CE(z^S, y) + (1 - lam) * CE(z^S, y_aug)
             + beta * [(d^S_org - d^T_org)^2 + (d^S_aug - d^T_aug)^2]

  (``beta = 0`` is mixup training on the stored views with hard labels only);
- the views: ``nrr_dd`` stores the distances of ``views`` views per image (mixup, then a random
  resized crop), and the student trains on view ``(epoch - 1) % views`` each epoch (``batches``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdflow.errors import ParamsError
from kdflow.losses import LOSSES, LossBase, check_args, check_batch, weighted_mean
from kdflow.losses.ce import ce_rows
from schemas.methods import DBRParams  # torch-free (kdflow/catalog.py)

if TYPE_CHECKING:
    from kdflow.data.dataset import Dataset


@LOSSES.register("dbr", params=DBRParams, tracks=("classify",))
class DBR(LossBase):
    """``CE + beta * [(d_org^S - d_org^T)^2 + (d_aug^S - d_aug^T)^2]`` on mixed views.

    Batch keys: ``y`` (original labels), ``y_aug`` (labels of the mixed-in partner), ``d_org`` and
    ``d_aug`` (stored teacher distances ``[B]``), optional ``lam`` (mixup weight of ``y``; the CE
    term is then ``lam * CE(y) + (1 - lam) * CE(y_aug)``, else ``CE(y)``).

    Args:
        temperature: softmax temperature of the distances; must match the one used to store them.
        beta: weight of the distance-matching term.
    """

    needs: tuple[str, ...] = ("y", "y_aug", "d_org", "d_aug")

    def __init__(self, temperature: float = 1.0, beta: float = 1.0) -> None:
        check_args("dbr", temperature)
        if not beta >= 0:
            raise ParamsError([f"dbr.beta: must be >= 0 (got {beta})"], source="loss")
        self.temperature = float(temperature)
        self.beta = float(beta)

    @classmethod
    def context(cls, cache_info: dict[str, Any], data_meta: dict[str, Any]) -> dict[str, Any]:
        """The temperature nrr_dd stored the distances at (the student must match it)."""
        return {"temperature": float(data_meta.get("dbr_temperature", 1.0))}

    @classmethod
    def inputs(cls, ds: Dataset) -> dict[str, Tensor]:
        """The first stored view of every sample with its distances (``kdflow.condense.nrr_dd.dbr_batch``)."""
        from kdflow.condense.nrr_dd import dbr_batch  # the condenser imports the training loop

        return dbr_batch(ds)

    @classmethod
    def batches(cls, ds: Dataset) -> Callable[[Tensor, int], dict[str, Tensor]]:
        """View ``(epoch - 1) % views`` of each sample in each epoch (``kdflow.condense.nrr_dd.DBRViews``)."""
        from kdflow.condense.nrr_dd import DBRViews

        return DBRViews(ds)

    def __call__(self, student_logits: Tensor, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        check_batch("dbr", self.needs, student_logits, batch)
        s = student_logits.float()  # [B, C]
        y, y_aug = batch["y"].to(s.device).long(), batch["y_aug"].to(s.device).long()  # [B]
        logp = F.log_softmax(s / self.temperature, dim=-1)  # [B, C]
        d_org = -logp.gather(1, y[:, None])[:, 0]  # [B]
        d_aug = -logp.gather(1, y_aug[:, None])[:, 0]  # [B]
        t_org = batch["d_org"].to(device=s.device, dtype=torch.float32)  # [B]
        t_aug = batch["d_aug"].to(device=s.device, dtype=torch.float32)  # [B]
        dbr = weighted_mean((d_org - t_org) ** 2 + (d_aug - t_aug) ** 2, batch)
        if "lam" in batch:
            lam = batch["lam"].to(device=s.device, dtype=torch.float32)  # [B]
            ce_each = lam * ce_rows(s, y) + (1 - lam) * ce_rows(s, y_aug)
        else:
            ce_each = ce_rows(s, y)
        ce = weighted_mean(ce_each, batch)
        return {"loss": ce + self.beta * dbr, "dbr": dbr, "ce": ce}

    def __repr__(self) -> str:
        return f"DBR(temperature={self.temperature}, beta={self.beta})"
