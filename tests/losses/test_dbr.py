"""DBR loss against a per-sample reference; zero matching term at the teacher's own logits."""
from __future__ import annotations

import math

import pytest
import torch

from kdflow.condense.nrr_dd import dbr_distances
from kdflow.errors import DataError, ParamsError
from kdflow.losses import LOSSES, create_loss

B, C = 5, 4


def ref_logsoftmax(z: list[float], T: float) -> list[float]:
    m = max(v / T for v in z)
    lse = m + math.log(sum(math.exp(v / T - m) for v in z))
    return [v / T - lse for v in z]


def batch(seed: int = 0, lam: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    b = {
        "y": torch.randint(0, C, (B,), generator=g), "y_aug": torch.randint(0, C, (B,), generator=g),
        "d_org": torch.rand(B, generator=g) * 2, "d_aug": torch.rand(B, generator=g) * 2,
    }
    if lam:
        b["lam"] = torch.rand(B, generator=g)
    return torch.randn(B, C, generator=g), b


def test_dbr_is_registered() -> None:
    assert "dbr" in LOSSES.names()


@pytest.mark.parametrize("T,beta,lam", [(1.0, 1.0, True), (2.0, 0.5, False)])
def test_dbr_matches_the_reference(T: float, beta: float, lam: bool) -> None:
    s, b = batch(lam=lam)
    out = create_loss("dbr", temperature=T, beta=beta)(s, b)
    ces, dbrs = [], []
    for i in range(B):
        z = s[i].tolist()
        y, ya = int(b["y"][i]), int(b["y_aug"][i])
        l1 = ref_logsoftmax(z, 1.0)
        w = float(b["lam"][i]) if lam else 1.0
        ces.append(-(w * l1[y] + (1 - w) * l1[ya]))
        lt = ref_logsoftmax(z, T)
        dbrs.append((-lt[y] - float(b["d_org"][i])) ** 2 + (-lt[ya] - float(b["d_aug"][i])) ** 2)
    ce, dbr = sum(ces) / B, sum(dbrs) / B
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["dbr"].item() == pytest.approx(dbr, rel=1e-5)
    assert out["loss"].item() == pytest.approx(ce + beta * dbr, rel=1e-5)


def test_matching_term_vanishes_at_the_teacher_logits() -> None:
    t, b = batch()
    b["d_org"], b["d_aug"] = dbr_distances(t, b["y"], b["y_aug"], 3.0)
    out = create_loss("dbr", temperature=3.0)(t, b)
    assert out["dbr"].item() == pytest.approx(0.0, abs=1e-10)


def test_dbr_gradient_flows_and_weights_apply() -> None:
    s, b = batch()
    s.requires_grad_(True)
    create_loss("dbr")(s, b)["loss"].backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    b["weight"] = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    one = {k: v[:1] for k, v in b.items() if k != "weight"}
    assert create_loss("dbr")(s[:1].detach(), one)["loss"].item() == pytest.approx(
        create_loss("dbr")(s.detach(), b)["loss"].item(), rel=1e-5)


def test_dbr_rejects_bad_arguments_and_batches() -> None:
    with pytest.raises(ParamsError, match="beta"):
        create_loss("dbr", beta=-1.0)
    with pytest.raises(ParamsError, match="temperature"):
        create_loss("dbr", temperature=0.0)
    s, b = batch()
    del b["d_aug"]
    with pytest.raises(DataError, match="d_aug"):
        create_loss("dbr")(s, b)
