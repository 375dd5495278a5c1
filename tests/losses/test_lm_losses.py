"""Language-model losses (track ``lm``) against their reference formulas on tiny [B, L, V]."""
from __future__ import annotations

import typing

import pytest
import torch

from kdflow.cache import decode_to_batch, encode_sequences, flatten_tokens
from kdflow.errors import DataError, ParamsError
from kdflow.losses import LOSSES, build_loss, create_loss, loss_needs, loss_params
from kdflow.losses.lm_ce import lm_ce_reference
from kdflow.losses.lm_jsd import lm_jsd_reference
from kdflow.losses.lm_kd import lm_kd_dense_reference, lm_kd_topk_reference
from kdflow.losses.lm_rkl import lm_rkl_reference
from kdflow.losses.lm_uld import lm_uld_reference

B, L, V, K = 3, 5, 11, 4
TOPK = ("y", "teacher_logprobs", "teacher_indices", "teacher_tail")
NEEDS = {
    "lm_ce": ("y",), "lm_kd": TOPK, "lm_kd_dense": ("y", "teacher_logits"), "lm_rkl": TOPK,
    "lm_jsd": TOPK, "lm_uld": ("y", "teacher_logprobs"),
}
KEY = {"lm_ce": None, "lm_kd": "kd", "lm_kd_dense": "kd", "lm_rkl": "rkl", "lm_jsd": "jsd",
       "lm_uld": "uld"}
TOL = 1e-5


def labels(seed: int = 0, vocab: int = V) -> torch.Tensor:
    """``[B, L]`` labels, -100 at a block's last position and at padding."""
    y = torch.randint(0, vocab, (B, L), generator=torch.Generator().manual_seed(seed))
    y[0, -1] = -100  # the last position of a block
    y[1, 2:] = -100  # padding
    return y


def topk_teacher(t: torch.Tensor, k: int, capture_T: float, seed: int = 1) -> dict:
    """A per-token top-k cache of teacher logits ``t`` ``[B, L, V]``, each token's k shuffled."""
    top, idx = torch.log_softmax(t / capture_T, -1).topk(k, dim=-1)  # [B, L, k]
    tail = (1 - top.exp().sum(-1)).clamp_min(0)  # [B, L]
    if k == t.shape[-1]:
        tail.zero_()
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(k, generator=g) for _ in range(t.shape[0] * t.shape[1])])
    perm = perm.view(*t.shape[:2], k)  # sorted descending is not guaranteed
    return {"teacher_logprobs": top.gather(-1, perm),
            "teacher_indices": idx.gather(-1, perm).to(torch.uint8), "teacher_tail": tail}


@pytest.fixture
def data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"s": torch.randn(B, L, V, generator=g) * 2, "t": torch.randn(B, L, V, generator=g) * 3,
            "y": labels()}


def full_batch(data: dict[str, torch.Tensor], k: int = K) -> dict[str, torch.Tensor]:
    return {"y": data["y"], "teacher_logits": data["t"], **topk_teacher(data["t"], k, 1.0)}


def d64(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The top-k teacher in float64 (references run in double precision), ids as int64."""
    return [batch["teacher_logprobs"].double(), batch["teacher_indices"].long(),
            batch["teacher_tail"].double()]


def check(out: dict[str, torch.Tensor], key: str, distill: float, ce: float, alpha: float) -> None:
    assert set(out) == {"loss", key, "ce"}
    assert out[key].item() == pytest.approx(distill, rel=TOL, abs=TOL), key
    assert out["ce"].item() == pytest.approx(ce, rel=TOL, abs=TOL)
    want = alpha * distill + (1 - alpha) * ce
    assert out["loss"].item() == pytest.approx(want, rel=TOL, abs=TOL)


# --- registry, params, build_loss -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_registered_for_the_lm_track(name: str) -> None:
    meta, params = LOSSES.meta(name), loss_params(name)
    assert meta["tracks"] == ("lm",)
    assert loss_needs(name) == NEEDS[name]
    assert typing.get_args(params.model_fields["name"].annotation) == (name,)
    assert all(f.description for f in params.model_fields.values())
    built = build_loss(params(), {"capture_temperature": 2.0}, {})
    assert type(built) is LOSSES.get(name)
    if "teacher_tail" in NEEDS[name]:
        assert built.capture_temperature == 2.0


def test_params_defaults_and_bounds() -> None:
    assert loss_params("lm_ce")().model_dump() == {"name": "lm_ce"}
    for name in ("lm_kd", "lm_kd_dense", "lm_rkl", "lm_uld"):
        assert loss_params(name)().model_dump() == {"name": name, "temperature": 1.0, "alpha": 0.9}
    jsd_params = loss_params("lm_jsd")
    assert jsd_params().model_dump() == {"name": "lm_jsd", "beta": 0.5, "temperature": 1.0,
                                         "alpha": 0.9}
    params = jsd_params(beta=0.2, temperature=2.0, alpha=0.5)
    jsd = build_loss(params, {"capture_temperature": 1.5}, {})
    assert (jsd.beta, jsd.temperature, jsd.alpha, jsd.capture_temperature) == (0.2, 2.0, 0.5, 1.5)
    for bad in ({"beta": -0.1}, {"beta": 1.1}, {"temperature": 0}, {"alpha": 2}, {"gamma": 1}):
        with pytest.raises(ValueError):
            jsd_params(**bad)
    with pytest.raises(ParamsError, match="beta"):
        create_loss("lm_jsd", beta=1.5)
    with pytest.raises(ParamsError, match="capture_temperature"):
        create_loss("lm_kd", capture_temperature=0.0)
    with pytest.raises(ParamsError, match="temperature"):
        create_loss("lm_uld", temperature=-1.0)


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_each_loss_reads_only_its_needs(data, name: str) -> None:
    full = full_batch(data)
    out = create_loss(name)(data["s"], {key: full[key] for key in NEEDS[name]})
    assert torch.isfinite(out["loss"])
    with pytest.raises(DataError, match="missing"):
        create_loss(name)(data["s"], {"y": data["y"]} if name != "lm_ce" else {})


# --- against the references -------------------------------------------------------------------


@pytest.mark.parametrize("y_dtype", [torch.int64, torch.int32])
def test_lm_ce_matches_reference(data, y_dtype: torch.dtype) -> None:
    out = create_loss("lm_ce")(data["s"], {"y": data["y"].to(y_dtype)})
    ref = lm_ce_reference(data["s"].double(), data["y"]).item()
    assert set(out) == {"loss", "ce"}
    assert out["loss"].item() == pytest.approx(ref, rel=TOL)
    assert out["ce"].item() == pytest.approx(ref, rel=TOL)


@pytest.mark.parametrize(("T", "alpha"), [(1.0, 0.9), (2.5, 0.5), (0.7, 1.0)])
def test_lm_kd_dense_matches_reference(data, T: float, alpha: float) -> None:
    batch = {"y": data["y"], "teacher_logits": data["t"]}
    out = create_loss("lm_kd_dense", temperature=T, alpha=alpha)(data["s"], batch)
    s, t = data["s"].double(), data["t"].double()
    kd = lm_kd_dense_reference(s, t, data["y"], T).item()
    check(out, "kd", kd, lm_ce_reference(s, data["y"]).item(), alpha)


@pytest.mark.parametrize(("k", "T", "capture_T", "alpha"),
                         [(K, 1.0, 1.0, 0.9), (K, 2.0, 1.0, 0.5), (1, 1.5, 1.5, 1.0),
                          (7, 1.0, 2.0, 0.3)])
def test_lm_kd_topk_matches_reference(data, k: int, T: float, capture_T: float,
                                      alpha: float) -> None:
    teacher = topk_teacher(data["t"], k, capture_T)
    loss = create_loss("lm_kd", temperature=T, alpha=alpha, capture_temperature=capture_T)
    out = loss(data["s"], {"y": data["y"], **teacher})
    s = data["s"].double()
    kd = lm_kd_topk_reference(s, *d64(teacher), data["y"], T, capture_T).item()
    check(out, "kd", kd, lm_ce_reference(s, data["y"]).item(), alpha)


@pytest.mark.parametrize(("T", "capture_T", "alpha"), [(1.0, 1.0, 0.9), (2.0, 1.0, 0.5)])
def test_lm_rkl_matches_reference(data, T: float, capture_T: float, alpha: float) -> None:
    teacher = topk_teacher(data["t"], K, capture_T)
    loss = create_loss("lm_rkl", temperature=T, alpha=alpha, capture_temperature=capture_T)
    out = loss(data["s"], {"y": data["y"], **teacher})
    s = data["s"].double()
    rkl = lm_rkl_reference(s, *d64(teacher), data["y"], T, capture_T).item()
    check(out, "rkl", rkl, lm_ce_reference(s, data["y"]).item(), alpha)


@pytest.mark.parametrize(("beta", "T", "capture_T"),
                         [(0.0, 1.0, 1.0), (0.1, 1.0, 1.0), (0.5, 2.0, 1.0), (0.9, 1.0, 1.0),
                          (1.0, 1.5, 1.5)])
def test_lm_jsd_matches_reference(data, beta: float, T: float, capture_T: float) -> None:
    teacher = topk_teacher(data["t"], K, capture_T)
    loss = create_loss("lm_jsd", beta=beta, temperature=T, alpha=0.7, capture_temperature=capture_T)
    out = loss(data["s"], {"y": data["y"], **teacher})
    s = data["s"].double()
    jsd = lm_jsd_reference(s, *d64(teacher), data["y"], beta, T, capture_T).item()
    check(out, "jsd", jsd, lm_ce_reference(s, data["y"]).item(), 0.7)


@pytest.mark.parametrize(("student_V", "k", "T"),
                         [(V, K, 1.0), (V, V, 2.0), (20, K, 1.0), (3, K, 1.0), (3, 7, 0.5)])
def test_lm_uld_matches_reference(data, student_V: int, k: int, T: float) -> None:
    """Student vocabularies larger and smaller than k and than the teacher ids' range."""
    s = torch.randn(B, L, student_V, generator=torch.Generator().manual_seed(3)) * 2
    y = labels(vocab=student_V)
    logprobs = topk_teacher(data["t"], k, 1.0)["teacher_logprobs"]  # ids up to V - 1
    out = create_loss("lm_uld", temperature=T, alpha=0.6)(s, {"y": y, "teacher_logprobs": logprobs})
    uld = lm_uld_reference(s.double(), logprobs.double(), y, T).item()
    check(out, "uld", uld, lm_ce_reference(s.double(), y).item(), 0.6)


# --- limits and special cases -----------------------------------------------------------------


@pytest.mark.parametrize(("T", "capture_T"), [(1.0, 1.0), (2.0, 1.0)])
def test_jsd_endpoints_are_forward_and_reverse_kl(data, T: float, capture_T: float) -> None:
    batch = {"y": data["y"], **topk_teacher(data["t"], K, capture_T)}
    args = {"temperature": T, "capture_temperature": capture_T}
    kd = create_loss("lm_kd", **args)(data["s"], batch)["kd"].item()
    rkl = create_loss("lm_rkl", **args)(data["s"], batch)["rkl"].item()
    assert create_loss("lm_jsd", beta=0.0, **args)(data["s"], batch)["jsd"].item() == \
        pytest.approx(kd, abs=TOL)
    assert create_loss("lm_jsd", beta=1.0, **args)(data["s"], batch)["jsd"].item() == \
        pytest.approx(rkl, abs=TOL)
    # the limits of the normalised divergence: JSD/beta -> KL(P||Q), JSD/(1-beta) -> KL(Q||P)
    eps, s = 1e-7, data["s"].double()
    for beta, limit in ((eps, kd), (1 - eps, rkl)):
        near = lm_jsd_reference(s, *d64(batch), data["y"], beta, T, capture_T).item() / eps
        assert near == pytest.approx(limit, rel=1e-3)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_lm_kd_topk_with_k_equal_v_equals_dense(data, T: float) -> None:
    batch = {"y": data["y"], **topk_teacher(data["t"], V, T)}
    topk = create_loss("lm_kd", temperature=T, alpha=0.6, capture_temperature=T)(data["s"], batch)
    dense = create_loss("lm_kd_dense", temperature=T, alpha=0.6)(
        data["s"], {"y": data["y"], "teacher_logits": data["t"]})
    for key in ("loss", "kd", "ce"):
        assert topk[key].item() == pytest.approx(dense[key].item(), rel=TOL, abs=TOL), key


def test_uld_of_identical_distributions_is_zero(data) -> None:
    """Zero even when the teacher's vocabulary is a permutation of the student's (a tokenizer
    of its own): ULD compares sorted probabilities, not token ids."""
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(5))
    teacher = torch.log_softmax(data["s"][..., perm], -1)  # [B, L, V]
    out = create_loss("lm_uld", alpha=1.0)(data["s"], {"y": data["y"], "teacher_logprobs": teacher})
    assert out["uld"].item() == pytest.approx(0.0, abs=1e-6)
    top = {"y": data["y"], "teacher_logprobs": teacher[..., :K]}
    assert create_loss("lm_uld")(data["s"], top)["uld"] > 0


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_ignored_positions_change_nothing(data, name: str) -> None:
    """Student and teacher values at y == -100 (teacher_mask too) do not enter any term."""
    batch = full_batch(data)
    ignored = data["y"] == -100
    noisy = {key: value.clone() for key, value in batch.items()}
    s = data["s"].clone()
    s[ignored] = 50.0 * torch.randn(int(ignored.sum()), V)
    noisy["teacher_logits"][ignored] = -7.0
    noisy["teacher_logprobs"][ignored] = 0.0
    noisy["teacher_indices"][ignored] = 0
    noisy["teacher_tail"][ignored] = 0.0
    loss = create_loss(name)
    want = loss(data["s"], {key: batch[key] for key in NEEDS[name]})
    got = loss(s, {"teacher_mask": ~ignored, **{key: noisy[key] for key in NEEDS[name]}})
    for key in want:
        assert got[key].item() == pytest.approx(want[key].item(), rel=1e-6), key


def test_weights_count_a_sequence_that_many_times(data) -> None:
    """Integer per-sequence weights equal repeating each sequence that many times."""
    w = torch.tensor([2, 1, 3])
    batch = full_batch(data)
    repeated = {key: value.repeat_interleave(w, dim=0) for key, value in batch.items()}
    s_rep = data["s"].repeat_interleave(w, dim=0)
    for name in NEEDS:
        loss = create_loss(name)
        got, want = loss(data["s"], batch | {"weight": w.float()}), loss(s_rep, repeated)
        for key in want:
            assert got[key].item() == pytest.approx(want[key].item(), rel=TOL), (name, key)


@pytest.mark.parametrize("name", sorted(NEEDS))
@pytest.mark.parametrize("case", ["random", "k_equals_v", "no_labels", "all_labelled"])
def test_gradients_are_finite(data, name: str, case: str) -> None:
    y = {"no_labels": torch.full((B, L), -100), "all_labelled": data["y"].clamp_min(0)}
    batch = full_batch(data, V if case == "k_equals_v" else K) | {"y": y.get(case, data["y"])}
    s = data["s"].clone().requires_grad_(True)
    loss = create_loss(name, **({"alpha": 0.5} if name != "lm_ce" else {}))
    out = loss(s, {key: batch[key] for key in NEEDS[name]})
    out["loss"].backward()
    assert all(torch.isfinite(v) for v in out.values()) and torch.isfinite(s.grad).all()
    assert not s.grad[batch["y"] == -100].any()  # ignored positions get no gradient
    if case == "no_labels":
        assert out["loss"].item() == 0.0
    else:
        assert s.grad.abs().sum() > 0


def test_lm_kd_matches_topk_kd_on_a_sequence_cache() -> None:
    """Through a real sequence cache: lm_kd over y != -100 is topk_kd over the flattened tokens."""
    g = torch.Generator().manual_seed(7)
    n, seq, vocab = 3, 6, 300
    lengths = torch.tensor([6, 2, 4])
    teacher_logits = torch.randn(n, seq, vocab, generator=g) * 3
    s = torch.randn(n, seq, vocab, generator=g)
    stored = encode_sequences(teacher_logits, lengths, format="topk_q8", k=16, dtype="float16",
                              capture_temperature=2.0)
    batch = decode_to_batch(stored)
    mask = batch["teacher_mask"]
    y = torch.randint(0, vocab, (n, seq), generator=g).masked_fill(~mask, -100).to(torch.int32)
    params = loss_params("lm_kd")(temperature=2.0, alpha=0.5)
    out = build_loss(params, {"capture_temperature": 2.0}, {})(s, {"y": y, **batch})
    ref = create_loss("topk_kd", temperature=2.0, alpha=0.5, capture_temperature=2.0)(
        s[mask], {"y": y[mask].long(), **flatten_tokens(batch)})
    for key in ("loss", "kd", "ce"):
        assert out[key].item() == pytest.approx(ref[key].item(), rel=TOL), key


def test_shape_and_range_errors(data) -> None:
    teacher = topk_teacher(data["t"], K, 1.0)
    with pytest.raises(DataError, match=r"\[B, L, V\]"):
        create_loss("lm_ce")(data["s"][0], {"y": data["y"][0]})
    with pytest.raises(DataError, match="teacher_tail"):
        bad_tail = teacher | {"teacher_tail": teacher["teacher_tail"][:2]}
        create_loss("lm_kd")(data["s"], {"y": data["y"], **bad_tail})
    with pytest.raises(DataError, match="outside the student vocabulary"):
        create_loss("lm_rkl")(data["s"][..., :5], {"y": data["y"].clamp_max(4), **teacher})
    with pytest.raises(DataError, match="k <= V"):
        create_loss("lm_jsd")(data["s"][..., :3], {"y": data["y"].clamp_max(2), **teacher})
    with pytest.raises(DataError, match="teacher logits"):
        short = {"y": data["y"], "teacher_logits": data["t"][..., :5]}
        create_loss("lm_kd_dense")(data["s"], short)
    with pytest.raises(DataError, match="per sequence"):
        batch = {"y": data["y"], "teacher_logprobs": teacher["teacher_logprobs"],
                 "weight": torch.ones(B, L)}
        create_loss("lm_uld")(data["s"], batch)


# --- the fused top-k path against the unfused reference ---------------------------------------


def _terms_and_grad(fn, loss, s: torch.Tensor, batch: dict) -> tuple[dict, torch.Tensor]:
    s = s.clone().requires_grad_(True)
    out = fn(loss.loss_name, loss.term, loss.divergence, s, batch, temperature=loss.temperature,
             alpha=loss.alpha, capture_temperature=loss.capture_temperature)
    out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}, s.grad


@pytest.mark.parametrize("name", ["lm_kd", "lm_rkl", "lm_jsd"])
@pytest.mark.parametrize(("k", "T", "capture_T", "weighted"),
                         [(K, 1.0, 1.0, False), (K, 2.0, 1.0, True), (1, 0.7, 0.7, False),
                          (V, 1.0, 1.0, True), (V - 1, 1.0, 1.0, False)])
def test_fused_topk_terms_match_the_reference(name: str, k: int, T: float, capture_T: float,
                                              weighted: bool) -> None:
    """Loss terms and the gradient w.r.t. the student logits, to float32 rounding; the student is
    sharp on two tokens (with k = V - 1 a tail of ~1e-36 takes the exact masked path; one of
    e^-160 hits the floor at T = 1)."""
    from kdflow.losses.lm_tokens import topk_terms, topk_terms_reference

    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(B, L, V, generator=g) * 2, torch.randn(B, L, V, generator=g) * 3
    s[0, 0, :] = -80.0
    s[0, 0, :V - 1] = 0.0  # one id with ~1e-35 of the mass
    s[2, 1, 3] = 160.0  # everything but id 3 below e^-100
    t[0, 0, V - 1], t[2, 1, 3] = -50.0, 50.0  # the teacher's last and first id there
    batch = {"y": labels(), **topk_teacher(t, k, capture_T)}
    if weighted:
        batch["weight"] = torch.tensor([0.5, 2.0, 1.0])
    loss = create_loss(name, temperature=T, alpha=0.6, capture_temperature=capture_T)
    fused, g_fused = _terms_and_grad(topk_terms, loss, s, batch)
    ref, g_ref = _terms_and_grad(topk_terms_reference, loss, s, batch)
    assert set(fused) == set(ref)
    for key in ref:
        assert fused[key].item() == pytest.approx(ref[key].item(), rel=1e-6, abs=1e-6), key
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-5, atol=1e-6)
    assert g_fused.abs().max() > 1e-3


def test_fused_buckets_match_the_reference_in_double() -> None:
    """``bucket_logprobs`` is exact: forward and gradient equal the masked-logsumexp path in
    float64 to 1e-10 (gradcheck against finite differences too)."""
    from kdflow.losses.lm_buckets import bucket_logprobs
    from kdflow.losses.topk_kd import student_bucket_logprobs

    g = torch.Generator().manual_seed(2)
    z = (torch.randn(6, V, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    idx = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(6)])
    y = torch.randint(0, V, (6,), generator=g)
    gb, gy = torch.randn(6, K + 1, generator=g, dtype=torch.float64), torch.randn(6, generator=g,
                                                                                    dtype=torch.float64)
    buckets, log_y = bucket_logprobs(z, idx, y)
    grad = torch.autograd.grad((buckets * gb).sum() + (log_y * gy).sum(), z)[0]
    ref_b = student_bucket_logprobs(z, idx, 1.0)
    ref_y = torch.log_softmax(z, -1).gather(-1, y[:, None]).squeeze(-1)
    ref_grad = torch.autograd.grad((ref_b * gb).sum() + (ref_y * gy).sum(), z)[0]
    torch.testing.assert_close(buckets, ref_b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(log_y, ref_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda x: bucket_logprobs(x, idx, y), (z,))
