"""Logit-cache formats: how teacher logits are stored and handed back to the losses.

- ``dense``: ``values`` ``[n, C]``, the teacher logits in fp16 or bf16.
- ``topk``: ``values`` ``[n, k]`` log-probabilities at the capture temperature (fp16 or bf16),
  ``indices`` ``[n, k]`` in the narrowest unsigned integer holding ``C - 1``, and ``tail`` ``[n]``
  float32, the probability mass outside the top k.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kdflow.errors import DataError
from kdflow.registry import Registry

VALUE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
Encoder = Callable[..., dict[str, torch.Tensor]]
FORMATS: Registry[Encoder] = Registry("cache format")


def value_dtype(name: str) -> torch.dtype:
    """The torch dtype of stored values: ``float16``/``fp16`` or ``bfloat16``/``bf16``."""
    try:
        return VALUE_DTYPES[name]
    except KeyError:
        raise ValueError(
            f"cache dtype must be one of {sorted(VALUE_DTYPES)}, got {name!r}"
        ) from None


def narrowest_uint(num_classes: int) -> torch.dtype:
    """The smallest unsigned dtype (uint8/16/32) that holds class index ``num_classes - 1``."""
    for dtype, bits in ((torch.uint8, 8), (torch.uint16, 16), (torch.uint32, 32)):
        if num_classes - 1 < 2**bits:
            return dtype
    raise ValueError(f"num_classes={num_classes} does not fit in uint32")


def _check_finite(logits: torch.Tensor) -> None:
    bad = ~torch.isfinite(logits).all(dim=-1)
    if bad.any():
        rows = bad.nonzero().flatten()[:5].tolist()
        raise DataError(
            f"teacher logits have NaN/inf in {int(bad.sum())} row(s) of the batch: {rows}"
        )


@FORMATS.register("dense")
def _encode_dense(
    logits: torch.Tensor, *, k: int | None, dtype: torch.dtype, capture_temperature: float
) -> dict[str, torch.Tensor]:
    values = logits.to(dtype)  # [B, C]
    if not torch.isfinite(values).all():
        raise DataError(
            f"teacher logits overflow {dtype} (max |logit| {logits.abs().max():.3g}); "
            "use dtype bf16"
        )
    return {"values": values.contiguous()}


@FORMATS.register("topk")
def _encode_topk(
    logits: torch.Tensor, *, k: int | None, dtype: torch.dtype, capture_temperature: float
) -> dict[str, torch.Tensor]:
    num_classes = logits.shape[-1]
    if k is None or not 1 <= k <= num_classes:
        raise ValueError(f"topk cache needs 1 <= k <= num_classes={num_classes}, got k={k}")
    logprobs = F.log_softmax(logits / capture_temperature, dim=-1)
    values, indices = logprobs.topk(k, dim=-1, sorted=True)  # [B, k]
    tail = (1.0 - values.exp().sum(dim=-1)).clamp_min(0.0)  # [B]
    return {
        "values": values.to(dtype).contiguous(),
        "indices": indices.to(narrowest_uint(num_classes)).contiguous(),
        "tail": tail.float().contiguous(),
    }


def encode(
    logits: torch.Tensor, *, format: str, k: int | None, dtype: str, capture_temperature: float
) -> dict[str, torch.Tensor]:
    """Encode a batch of teacher logits ``[B, C]`` into the stored tensors of ``format``.

    Raises:
        DataError: NaN/inf logits, or logits that overflow the value dtype.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
    if capture_temperature <= 0:
        raise ValueError(f"capture_temperature must be > 0, got {capture_temperature}")
    logits = logits.detach().float()
    _check_finite(logits)
    return FORMATS.get(format)(
        logits, k=k, dtype=value_dtype(dtype), capture_temperature=capture_temperature
    )


def decode_to_batch(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map stored tensors to the loss batch keys, as float32 and int64.

    dense -> ``teacher_logits`` ``[n, C]``; topk -> ``teacher_logprobs`` ``[n, k]``,
    ``teacher_indices`` ``[n, k]``, ``teacher_tail`` ``[n]``.
    """
    if "indices" in tensors:
        return {
            "teacher_logprobs": tensors["values"].float(),
            "teacher_indices": tensors["indices"].long(),
            "teacher_tail": tensors["tail"].float(),
        }
    return {"teacher_logits": tensors["values"].float()}


def _cached_logprobs(cached: dict[str, torch.Tensor], rows: slice, num_classes: int,
                     capture_temperature: float) -> torch.Tensor:
    """Log of the distribution the cache represents, ``[n, C]``."""
    if "teacher_logits" in cached:
        return F.log_softmax(cached["teacher_logits"][rows].float() / capture_temperature, dim=-1)
    logprobs = cached["teacher_logprobs"][rows].float()  # [n, k]
    indices = cached["teacher_indices"][rows].long()  # [n, k]
    tail = cached["teacher_tail"][rows].float()  # [n]
    rest = max(num_classes - indices.shape[1], 1)
    probs = (tail / rest)[:, None].expand(-1, num_classes).clone()
    probs.scatter_(1, indices, logprobs.exp())
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs.clamp_min(1e-30).log()


def fidelity(
    full_logits: torch.Tensor,
    cached: dict[str, torch.Tensor],
    *,
    capture_temperature: float,
    chunk_rows: int = 4096,
) -> dict[str, float]:
    """How well the cache reproduces the teacher distribution at the capture temperature.

    Top-k caches spread the tail mass uniformly over the ``C - k`` classes outside the top k.

    Args:
        full_logits: the teacher logits ``[n, C]``.
        cached: the loss batch keys for the same rows (``CacheReader.load_all()``), or the
            stored keys (``encode`` output).

    Returns:
        ``kl`` (mean KL(full || cached)), ``kl_max`` and ``top1_agreement``.
    """
    if "values" in cached:
        cached = decode_to_batch(cached)
    n, num_classes = full_logits.shape
    kl_sum, kl_max, agree = 0.0, 0.0, 0
    for start in range(0, n, chunk_rows):
        rows = slice(start, start + chunk_rows)
        p_log = F.log_softmax(full_logits[rows].float() / capture_temperature, dim=-1)
        q_log = _cached_logprobs(cached, rows, num_classes, capture_temperature)
        kl = (p_log.exp() * (p_log - q_log)).sum(dim=-1).clamp_min(0.0)  # [n]
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
        agree += int((p_log.argmax(dim=-1) == q_log.argmax(dim=-1)).sum())
    return {"kl": kl_sum / max(n, 1), "kl_max": kl_max, "top1_agreement": agree / max(n, 1)}
