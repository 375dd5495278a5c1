"""Logit-cache formats: how teacher logits are stored and handed back to the losses.

- ``dense``: ``values`` ``[n, C]``, the teacher logits in fp16 or bf16.
- ``topk``: ``values`` ``[n, k]`` log-probabilities at the capture temperature (fp16 or bf16),
  ``indices`` ``[n, k]`` in the narrowest unsigned integer holding ``C - 1``, and ``tail`` ``[n]``
  float32, the probability mass outside the top k.
- ``topk_q8``: ``topk`` with ``values`` quantised to uint8 on a per-row grid,
  ``offset + values * scale`` (``scale`` and ``offset`` ``[n]`` float32). The offset is chosen so
  the decoded top-k mass equals the true one: decoded log-probs plus ``tail`` still sum to 1. The
  grid spans at most ``Q8_MAX_RANGE`` nats below the row's top log-probability (``scale <=
  Q8_MAX_RANGE / 255``): every value within that range decodes within one grid step of the float32
  log-probability; a value further below is clamped to the bottom of the grid, so its error is
  about its distance below it (such classes hold less than ``exp(-Q8_MAX_RANGE)`` of the top one's mass).
- ``topk_packed``: the top-k of every token with ids sorted and delta-coded, 5-bit values, each
  row deflate-compressed (``kdflow.cache.packed``): about half ``topk``'s bytes at equal k.
- ``topk_adaptive``: k entries per token on average (more where the teacher is unsure, up to
  2k), ids as ranks of a per-shard frequency table, values on a 0.25-nat grid, LZMA per row
  (``kdflow.cache.adaptive``): decoded to width ``min(2k, C)`` with the tail spread exactly as
  the uniform-tail reconstruction assumes.

Sequence caches (see ``kdflow.cache.tokens``) store the same keys per token, ``[n, L, ...]``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kdflow.catalog import FORMATS as _FORMATS
from kdflow.errors import DataError
from kdflow.registry import Registry

VALUE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
Q8_LEVELS = 255
Q8_MAX_RANGE = 40.0  # nats below the top-1 log-prob kept on the grid; lower values are clamped
Stored = dict[str, torch.Tensor]
Encoder = Callable[..., Stored]
Decoder = Callable[[Stored], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Format:
    """A storage format.

    Attributes:
        keys: the stored tensors, each with the row dimension first.
        encode: ``(logits [n, C] float32, *, k, dtype, capture_temperature) -> stored``.
        decode: ``stored -> loss batch keys`` (float32 and int64).
        topk: keeps k classes per row (``indices`` + ``tail``).
        provides: the batch keys ``decode`` yields (what a loss's ``needs`` is checked against).
        fixed_dtype: stored value dtype when the ``dtype`` argument does not apply.
        per_row: a sequence row is encoded as a whole (``encode_rows``), not token by token.
        encode_rows: ``(values [n, L, k], indices [n, L, k], tail [n, L], *, num_classes, k)
            -> stored``; its ``values`` etc. hold ``candidates(k, num_classes)`` entries per token.
        candidates: top entries per token handed to ``encode_rows`` (None: k).
        finish: ``stored -> stored``, run on a whole shard just before it is written (formats
            whose encoding needs the shard: ``topk_adaptive``); ``decode`` accepts either.
        shard_keys: stored tensors that belong to the whole shard, not one entry per row (never
            sliced by row or concatenated across shards: ``CacheReader`` decodes shard by shard).
    """

    keys: tuple[str, ...]
    encode: Encoder
    decode: Decoder
    topk: bool
    provides: tuple[str, ...]
    fixed_dtype: torch.dtype | None = None
    per_row: bool = False
    encode_rows: Callable[..., Stored] | None = None
    candidates: Callable[[int, int], int] | None = None
    finish: Callable[[Stored], Stored] | None = None
    shard_keys: tuple[str, ...] = ()


FORMATS: Registry[Format] = _FORMATS  # its names and metadata: kdflow/catalog.py


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


def check_finite(logits: torch.Tensor) -> None:
    """Raise ``DataError`` naming the rows of ``logits`` ``[n, C]`` that hold NaN/inf."""
    bad = ~logits.sum(dim=-1).isfinite()  # [n] a fast screen: NaN/inf propagate into the sum
    if bad.any():
        bad[bad.clone()] = ~logits[bad].isfinite().all(dim=-1)  # exact on the flagged rows
    if bad.any():
        rows = bad.nonzero().flatten()[:5].tolist()
        raise DataError(
            f"teacher logits have NaN/inf in {int(bad.sum())} row(s) of the batch: {rows}"
        )


def _encode_dense(
    logits: torch.Tensor, *, k: int | None, dtype: torch.dtype, capture_temperature: float
) -> Stored:
    values = logits.to(dtype)  # [n, C]
    if not torch.isfinite(values).all():
        raise DataError(
            f"teacher logits overflow {dtype} (max |logit| {logits.abs().max():.3g}); "
            "use dtype bf16"
        )
    return {"values": values.contiguous()}


def _decode_dense(stored: Stored) -> dict[str, torch.Tensor]:
    return {"teacher_logits": stored["values"].float()}


def topk_logprobs(
    logits: torch.Tensor, k: int | None, capture_temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest log-probs at the capture temperature ``[n, k]`` (descending, float32),
    their class indices ``[n, k]`` (narrowest uint) and the mass outside them ``[n]``."""
    num_classes = logits.shape[-1]
    if k is None or not 1 <= k <= num_classes:
        raise ValueError(f"topk cache needs 1 <= k <= num_classes={num_classes}, got k={k}")
    scaled = logits if capture_temperature == 1.0 else logits / capture_temperature
    top, indices = scaled.topk(k, dim=-1, sorted=True)  # [n, k]
    values = top - scaled.logsumexp(dim=-1, keepdim=True)  # log_softmax without the [n, C] copy
    tail = (1.0 - values.exp().sum(dim=-1)).clamp_min(0.0)  # [n]
    if k == num_classes:
        tail.zero_()  # exactly 0, not float32 rounding that re-tempering would inflate
    return values, indices.to(narrowest_uint(num_classes)).contiguous(), tail.float().contiguous()


def _encode_topk(
    logits: torch.Tensor, *, k: int | None, dtype: torch.dtype, capture_temperature: float
) -> Stored:
    values, indices, tail = topk_logprobs(logits, k, capture_temperature)
    return {"values": values.to(dtype).contiguous(), "indices": indices, "tail": tail}


def _decode_topk(stored: Stored) -> dict[str, torch.Tensor]:
    return {
        "teacher_logprobs": stored["values"].float(),
        "teacher_indices": stored["indices"].long(),
        "teacher_tail": stored["tail"].float(),
    }


def _encode_topk_q8(
    logits: torch.Tensor, *, k: int | None, dtype: torch.dtype, capture_temperature: float
) -> Stored:
    values, indices, tail = topk_logprobs(logits, k, capture_temperature)  # [n, k] descending
    hi = values[:, 0]
    lo = torch.maximum(values[:, -1], hi - Q8_MAX_RANGE)  # [n]
    scale = ((hi - lo) / Q8_LEVELS).clamp_min(1e-12)  # [n]
    q = ((values - lo[:, None]) / scale[:, None]).round().clamp(0, Q8_LEVELS)  # [n, k]
    # shift the grid so that the decoded top-k mass equals the true one
    offset = values.logsumexp(dim=-1) - (q * scale[:, None]).logsumexp(dim=-1)  # [n]
    return {
        "values": q.to(torch.uint8).contiguous(),
        "scale": scale.contiguous(),
        "offset": offset.contiguous(),
        "indices": indices,
        "tail": tail,
    }


def _decode_topk_q8(stored: Stored) -> dict[str, torch.Tensor]:
    scale = stored["scale"].float().unsqueeze(-1)  # [..., 1]
    offset = stored["offset"].float().unsqueeze(-1)  # [..., 1]
    return {
        "teacher_logprobs": offset + stored["values"].float() * scale,
        "teacher_indices": stored["indices"].long(),
        "teacher_tail": stored["tail"].float(),
    }


TOPK_PROVIDES = ("teacher_logprobs", "teacher_indices", "teacher_tail")
FORMATS.register("dense")(
    Format(("values",), _encode_dense, _decode_dense, topk=False, provides=("teacher_logits",))
)
FORMATS.register("topk")(
    Format(("values", "indices", "tail"), _encode_topk, _decode_topk, topk=True, provides=TOPK_PROVIDES)
)
FORMATS.register("topk_q8")(
    Format(("values", "scale", "offset", "indices", "tail"), _encode_topk_q8, _decode_topk_q8,
           topk=True, provides=TOPK_PROVIDES, fixed_dtype=torch.uint8)
)


def encode(
    logits: torch.Tensor, *, format: str, k: int | None, dtype: str, capture_temperature: float
) -> Stored:
    """Encode a batch of teacher logits ``[B, C]`` into the stored tensors of ``format``.

    Raises:
        DataError: NaN/inf logits, or logits that overflow the value dtype.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
    if capture_temperature <= 0:
        raise ValueError(f"capture_temperature must be > 0, got {capture_temperature}")
    fmt = FORMATS.get(format)
    logits = logits.detach().float()
    check_finite(logits)
    return fmt.encode(logits, k=k, dtype=value_dtype(dtype),
                      capture_temperature=capture_temperature)


def infer_format(stored: Stored) -> str:
    """The format whose stored keys ``stored`` holds."""
    if "table" in stored or "budget" in stored:
        return "topk_adaptive"
    if "nbytes" in stored:
        return "topk_packed"
    if "scale" in stored:
        return "topk_q8"
    return "topk" if "indices" in stored else "dense"


def decode_to_batch(stored: Stored, format: str | None = None) -> dict[str, torch.Tensor]:
    """Map stored tensors to the loss batch keys, as float32, int64 and bool.

    dense -> ``teacher_logits`` ``[n, C]``; topk and topk_q8 -> ``teacher_logprobs`` ``[n, k]``,
    ``teacher_indices`` ``[n, k]``, ``teacher_tail`` ``[n]``. Sequence caches (stored
    ``lengths``) give the same keys per token, ``[n, L, ...]``, plus ``teacher_mask`` ``[n, L]``.

    Args:
        format: the cache format; inferred from the stored keys when None.
    """
    batch = FORMATS.get(format or infer_format(stored)).decode(stored)
    if "lengths" in stored:
        lengths = stored["lengths"].long()  # [n]
        seq_len = next(iter(batch.values())).shape[1]
        batch["teacher_mask"] = torch.arange(seq_len) < lengths[:, None]  # [n, L]
    return batch


from kdflow.cache import packed as _packed  # noqa: E402  (registers topk_packed)


def _encode_topk_packed(
    logits: torch.Tensor, *, k: int | None, dtype: torch.dtype, capture_temperature: float
) -> Stored:
    values, indices, tail = topk_logprobs(logits, k, capture_temperature)  # [n, k], [n]
    return _packed.pack(values[:, None], indices[:, None], tail[:, None], logits.shape[-1])


FORMATS.register("topk_packed")(
    Format(("values", "nbytes"), _encode_topk_packed, _packed.unpack, topk=True,
           provides=TOPK_PROVIDES, fixed_dtype=torch.uint8, per_row=True, encode_rows=_packed.pack)
)


from kdflow.cache import adaptive as _adaptive  # noqa: E402  (registers topk_adaptive)


def _encode_topk_adaptive(
    logits: torch.Tensor, *, k: int | None, dtype: torch.dtype, capture_temperature: float
) -> Stored:
    num_classes = logits.shape[-1]
    if k is None or not 1 <= k <= num_classes:
        raise ValueError(f"topk cache needs 1 <= k <= num_classes={num_classes}, got k={k}")
    values, indices, _ = topk_logprobs(logits, _adaptive.cap(k, num_classes), capture_temperature)
    return _adaptive.open_rows(values, indices, num_classes=num_classes, k=k)


FORMATS.register("topk_adaptive")(
    Format(("nbytes", "offset", "budget", "blob", "table"), _encode_topk_adaptive, _adaptive.unpack,
           topk=True, provides=TOPK_PROVIDES, fixed_dtype=torch.uint8, per_row=True,
           encode_rows=_adaptive.open_rows, candidates=_adaptive.cap, finish=_adaptive.finish,
           shard_keys=_adaptive.SHARD_KEYS)
)


def cat_stored(parts: list[Stored]) -> Stored:
    """Stored tensors of consecutive row ranges as one (packed byte rows padded to one width).
    Formats with shard-wide keys are concatenated only while open (before ``finish``)."""
    if len(parts) > 1 and "table" in parts[0]:
        raise ValueError("stored rows of several topk_adaptive shards cannot be concatenated: "
                         "decode each shard's rows, then concatenate")
    return {key: (_packed.pad_cat([p[key] for p in parts])
                  if "nbytes" in parts[0] and key == "values" else torch.cat([p[key] for p in parts]))
            for key in parts[0]}
