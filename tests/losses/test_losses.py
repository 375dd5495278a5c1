"""Losses against slow per-sample reference implementations on tiny tensors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdflow.errors import DataError, ParamsError, UnknownNameError
from kdflow.losses import LOSSES, create_loss

B, C = 5, 7


def ref_softmax(z: list[float], T: float = 1.0) -> list[float]:
    m = max(v / T for v in z)
    e = [math.exp(v / T - m) for v in z]
    return [v / sum(e) for v in e]


def ref_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def ref_ce(s: list[float], y: int) -> float:
    return -math.log(ref_softmax(s)[y])


def ref_mean(values: list[float], weight: list[float] | None) -> float:
    if weight is None:
        return sum(values) / len(values)
    return sum(v * w for v, w in zip(values, weight)) / sum(weight)


def ref_kd(s, t, y, T, alpha, weight=None) -> dict[str, float]:
    kls = [ref_kl(ref_softmax(t[i], T), ref_softmax(s[i], T)) for i in range(len(s))]
    ces = [ref_ce(s[i], y[i]) for i in range(len(s))]
    kd = T * T * ref_mean(kls, weight)
    ce = ref_mean(ces, weight)
    return {"loss": alpha * kd + (1 - alpha) * ce, "kd": kd, "ce": ce}


def ref_topk(s, logprobs, indices, tail, y, T, alpha, capture_T, weight=None) -> dict[str, float]:
    kls, ces = [], []
    for i in range(len(s)):
        if T == capture_T:
            p = [math.exp(v) for v in logprobs[i]] + [tail[i]]
        else:
            z = list(logprobs[i]) + [math.log(tail[i]) if tail[i] > 0 else -math.inf]
            z = [v * capture_T / T for v in z]
            m = max(z)
            e = [math.exp(v - m) for v in z]
            p = [v / sum(e) for v in e]
        q_all = ref_softmax(s[i], T)
        q = [q_all[c] for c in indices[i]]
        q.append(sum(q_all[c] for c in range(len(q_all)) if c not in set(indices[i])))
        kls.append(ref_kl(p, q))
        ces.append(ref_ce(s[i], y[i]))
    kd = T * T * ref_mean(kls, weight)
    ce = ref_mean(ces, weight)
    return {"loss": alpha * kd + (1 - alpha) * ce, "kd": kd, "ce": ce}


@pytest.fixture
def data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "s": torch.randn(B, C, generator=g) * 2,
        "t": torch.randn(B, C, generator=g) * 3,
        "y": torch.randint(0, C, (B,), generator=g),
        "w": torch.rand(B, generator=g) + 0.1,
    }


def topk_batch(
    t: torch.Tensor, y: torch.Tensor, k: int, capture_T: float, dtype: torch.dtype = torch.uint8
) -> dict:
    logp = torch.log_softmax(t / capture_T, -1)  # [B, C]
    top, idx = logp.topk(k, dim=-1)  # [B, k]
    tail = (1 - top.exp().sum(-1)).clamp_min(0)  # [B]
    return {"y": y, "teacher_logprobs": top, "teacher_indices": idx.to(dtype), "teacher_tail": tail}


def assert_close(out: dict[str, torch.Tensor], ref: dict[str, float], tol: float = 1e-5) -> None:
    assert set(out) == set(ref)
    for key, value in ref.items():
        assert out[key].item() == pytest.approx(value, rel=tol, abs=tol), key


def test_registry_and_needs() -> None:
    assert {"ce", "kd", "topk_kd"} <= set(LOSSES.names())
    assert create_loss("ce").needs == ("y",)
    assert create_loss("kd").needs == ("y", "teacher_logits")
    topk_needs = {"y", "teacher_logprobs", "teacher_indices", "teacher_tail"}
    assert set(create_loss("topk_kd").needs) == topk_needs
    with pytest.raises(UnknownNameError, match="did you mean 'kd'"):
        create_loss("kdd")
    with pytest.raises(ParamsError, match="temperature"):
        create_loss("kd", temperature=-1.0)
    with pytest.raises(ParamsError, match="alpha"):
        create_loss("kd", alpha=1.5)
    with pytest.raises(ParamsError, match="beta"):
        create_loss("kd", beta=1.0)


@pytest.mark.parametrize("weighted", [False, True])
def test_ce_matches_reference(data, weighted: bool) -> None:
    batch = {"y": data["y"]} | ({"weight": data["w"]} if weighted else {})
    out = create_loss("ce")(data["s"], batch)
    w = data["w"].tolist() if weighted else None
    ce = ref_mean([ref_ce(data["s"][i].tolist(), int(data["y"][i])) for i in range(B)], w)
    assert_close(out, {"loss": ce, "ce": ce})


@pytest.mark.parametrize(
    ("T", "alpha", "weighted"), [(4.0, 0.9, False), (1.0, 0.5, True), (2.5, 1.0, True)]
)
def test_kd_matches_reference(data, T: float, alpha: float, weighted: bool) -> None:
    batch = {"y": data["y"], "teacher_logits": data["t"]}
    batch |= {"weight": data["w"]} if weighted else {}
    out = create_loss("kd", temperature=T, alpha=alpha)(data["s"], batch)
    w = data["w"].tolist() if weighted else None
    ref = ref_kd(data["s"].tolist(), data["t"].tolist(), data["y"].tolist(), T, alpha, w)
    assert_close(out, ref)


@pytest.mark.parametrize(
    ("k", "T", "capture_T", "weighted"),
    [
        (3, 4.0, 4.0, False),
        (3, 4.0, 1.0, False),
        (1, 2.0, 1.0, True),
        (5, 1.0, 1.0, True),
        (4, 1.0, 2.0, False),
    ],
)
def test_topk_kd_matches_reference(
    data, k: int, T: float, capture_T: float, weighted: bool
) -> None:
    batch = topk_batch(data["t"], data["y"], k, capture_T)
    batch |= {"weight": data["w"]} if weighted else {}
    loss = create_loss("topk_kd", temperature=T, alpha=0.7, capture_temperature=capture_T)
    out = loss(data["s"], batch)
    ref = ref_topk(
        data["s"].tolist(),
        batch["teacher_logprobs"].tolist(),
        batch["teacher_indices"].long().tolist(),
        batch["teacher_tail"].tolist(),
        data["y"].tolist(),
        T,
        0.7,
        capture_T,
        data["w"].tolist() if weighted else None,
    )
    assert_close(out, ref, tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.int64])
@pytest.mark.parametrize("T", [1.0, 3.0])
def test_topk_with_all_classes_equals_kd(data, dtype: torch.dtype, T: float) -> None:
    batch = topk_batch(data["t"], data["y"], C, T, dtype)
    batch["teacher_tail"] = torch.zeros(B)
    s = data["s"].clone().requires_grad_(True)
    topk = create_loss("topk_kd", temperature=T, capture_temperature=T)(s, batch)
    kd = create_loss("kd", temperature=T)(data["s"], {"y": data["y"], "teacher_logits": data["t"]})
    for key in ("loss", "kd", "ce"):
        assert topk[key].item() == pytest.approx(kd[key].item(), abs=1e-5)
    topk["loss"].backward()
    assert torch.isfinite(s.grad).all()


def test_topk_full_cover_with_rounding_tail_stays_finite(data) -> None:
    batch = topk_batch(data["t"], data["y"], C, 1.0)
    # fp16 rounding of a capture that covered all classes
    batch["teacher_tail"] = torch.full((B,), 1e-4)
    out = create_loss("topk_kd", temperature=1.0)(data["s"], batch)
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("name", ["ce", "kd", "topk_kd"])
def test_gradients_flow(data, name: str) -> None:
    s = data["s"].clone().requires_grad_(True)
    batch = {"teacher_logits": data["t"]} | topk_batch(data["t"], data["y"], 3, 1.0)
    out = create_loss(name)(s, batch)
    out["loss"].backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_half_precision_teacher_accepted(data) -> None:
    kd = create_loss("kd")
    full = kd(data["s"], {"y": data["y"], "teacher_logits": data["t"]})
    for dtype in (torch.float16, torch.bfloat16):
        low = kd(data["s"], {"y": data["y"], "teacher_logits": data["t"].to(dtype)})
        assert low["loss"].dtype == torch.float32
        assert low["loss"].item() == pytest.approx(full["loss"].item(), rel=2e-2)
    batch = topk_batch(data["t"], data["y"], 3, 1.0)
    batch["teacher_logprobs"] = batch["teacher_logprobs"].half()
    batch["teacher_tail"] = batch["teacher_tail"].half()
    out = create_loss("topk_kd", temperature=1.0)(data["s"].half(), batch)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


@pytest.mark.parametrize("name", ["kd", "topk_kd"])
def test_alpha_zero_is_cross_entropy(data, name: str) -> None:
    batch = {"teacher_logits": data["t"]} | topk_batch(data["t"], data["y"], 3, 1.0)
    out = create_loss(name, alpha=0.0)(data["s"], batch)
    ce = create_loss("ce")(data["s"], {"y": data["y"]})
    assert out["loss"].item() == pytest.approx(ce["loss"].item(), abs=1e-6)


def test_unit_weights_equal_unweighted(data) -> None:
    batch = {"y": data["y"], "teacher_logits": data["t"]}
    kd = create_loss("kd")
    plain = kd(data["s"], batch)["loss"]
    ones = kd(data["s"], batch | {"weight": torch.ones(B)})["loss"]
    assert ones.item() == pytest.approx(plain.item(), abs=1e-6)
    only_first = kd(data["s"], batch | {"weight": torch.tensor([1.0, 0, 0, 0, 0])})["loss"]
    first = kd(data["s"][:1], {"y": data["y"][:1], "teacher_logits": data["t"][:1]})["loss"]
    assert only_first.item() == pytest.approx(first.item(), abs=1e-6)


def test_missing_batch_key_names_it(data) -> None:
    with pytest.raises(DataError, match="teacher_logits"):
        create_loss("kd")(data["s"], {"y": data["y"]})
    with pytest.raises(DataError, match="rows"):
        create_loss("kd")(data["s"], {"y": data["y"], "teacher_logits": data["t"][:2]})


def test_reference_self_check() -> None:
    p = ref_softmax([1.0, 2.0, 3.0])
    assert np.isclose(sum(p), 1.0) and ref_kl(p, p) == pytest.approx(0.0)


@pytest.mark.parametrize(("T", "alpha", "weighted"), [(4.0, 0.9, False), (1.0, 0.5, True), (2.5, 0.0, True)])
def test_kd_gradient_equals_autograd_of_the_plain_formula(data, T: float, alpha: float, weighted: bool) -> None:
    """The fused KD's closed-form gradient against autograd through the textbook expression."""
    w = data["w"] if weighted else torch.ones(B)
    s1 = data["s"].clone().double().requires_grad_(True)
    log_p = torch.log_softmax(data["t"].double() / T, -1)
    log_q = torch.log_softmax(s1 / T, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    ce = torch.nn.functional.cross_entropy(s1, data["y"], reduction="none")
    ref = alpha * T * T * (kl * w).sum() / w.sum() + (1 - alpha) * (ce * w).sum() / w.sum()
    ref.backward()
    s2 = data["s"].clone().requires_grad_(True)
    batch = {"y": data["y"], "teacher_logits": data["t"]} | ({"weight": w} if weighted else {})
    out = create_loss("kd", temperature=T, alpha=alpha)(s2, batch)
    (out["loss"] * 3.0).backward()  # an upstream gradient scales it
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(s2.grad.double(), 3.0 * s1.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("T", "alpha"), [(4.0, 0.9), (1.0, 0.0), (2.0, 1.0), (1.0, 0.5)])
def test_fused_kd_equals_the_plain_formula_in_its_file(data, T: float, alpha: float) -> None:
    """kd.py's reference ``kd_loss`` and the fused loss: same value, terms and gradient, fp16
    teacher rows too."""
    from kdflow.losses.kd import kd_loss

    t16 = data["t"].half()
    s1 = data["s"].clone().requires_grad_(True)
    ref = kd_loss(s1, t16.float(), data["y"], T, alpha)
    ref.backward()
    s2 = data["s"].clone().requires_grad_(True)
    out = create_loss("kd", temperature=T, alpha=alpha)(s2, {"y": data["y"], "teacher_logits": t16})
    out["loss"].backward()
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-5, atol=1e-6)
    assert out["kd"].item() == pytest.approx(kd_loss(data["s"], t16.float(), data["y"], T, 1.0).item(), rel=1e-5)
    assert out["ce"].item() == pytest.approx(kd_loss(data["s"], t16.float(), data["y"], T, 0.0).item(), rel=1e-5)
