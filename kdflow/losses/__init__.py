"""Registry of distillation losses, one method per file (like mdistiller's ``KD.py``).

A loss is built by name, ``create_loss("kd", temperature=4.0)``, or from its params model,
``build_loss(KDParams(), cache_info, data_meta)``, and called as ``loss(student_logits, batch)``.
It returns a dict of named scalar terms whose ``"loss"`` entry is the total to backpropagate.
Each loss subclasses ``LossBase`` and registers with its params model (a ``Section`` whose
``name`` literal is the registry name) and the tracks that offer it::

    @LOSSES.register("kd", params=KDParams, tracks=("classify", "graph"))
    class KD(LossBase): ...

``needs`` (a class attribute, see ``loss_needs``) names the batch keys it reads:

- ``"y"``: int64 labels ``[B]``;
- ``"teacher_logits"``: dense teacher logits ``[B, C]`` (any float dtype);
- ``"teacher_logprobs"``, ``"teacher_indices"``, ``"teacher_tail"``: a top-k cache
  (``[B, k]`` log-probabilities at the capture temperature, ``[B, k]`` class indices,
  ``[B]`` probability mass outside the top-k);
- ``"weight"`` (optional): per-sample weights ``[B]``; terms become weighted means.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from kdflow.catalog import LOSSES as _LOSSES
from kdflow.errors import DataError, ParamsError
from kdflow.registry import Registry
from schemas.base import Section
from schemas.methods import alpha_field, temperature_field

if TYPE_CHECKING:
    from kdflow.data.dataset import Dataset


class Loss(Protocol):
    """What every registered loss looks like once built."""

    needs: tuple[str, ...]

    def __call__(
        self, student_logits: Tensor, batch: Mapping[str, Tensor]
    ) -> dict[str, Tensor]: ...


class LossBase:
    """The base of every registered loss: ``needs`` and two hooks with defaults.

    ``context`` reads constructor arguments from upstream artifacts (a cache's capture
    temperature, the temperature a condenser stored distances at); ``inputs`` lets a loss train
    on tensors of its own instead of the track's samples.
    """

    needs: tuple[str, ...] = ()

    @classmethod
    def context(cls, cache_info: dict[str, Any], data_meta: dict[str, Any]) -> dict[str, Any]:
        """Extra constructor arguments from the logit cache's info and the training data's meta.

        Default: none.
        """
        return {}

    @classmethod
    def inputs(cls, ds: Dataset) -> dict[str, Tensor] | None:
        """The per-sample training tensors (``x``, ``y`` and what ``needs`` reads from the data),
        or None for the track's default ``{"x": features, "y": labels}``."""
        return None

    @classmethod
    def batches(cls, ds: Dataset) -> Callable[[Tensor, int], dict[str, Tensor]] | None:
        """``batch(indices, epoch)`` for a loss whose inputs change with the epoch (DBR's stored
        views: a different view each epoch), overriding those keys of the ``inputs`` slices; None
        (default): every epoch trains on slices of ``inputs``."""
        return None

    def __call__(self, student_logits: Tensor, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError


LOSSES: Registry[type[LossBase]] = _LOSSES  # its names and metadata: kdflow/catalog.py


def create_loss(name: str, **kwargs: float) -> Loss:
    """Builds the loss registered under ``name`` with its keyword arguments."""
    cls = LOSSES.get(name)
    try:
        return cls(**kwargs)
    except TypeError as err:  # unknown or missing keyword
        raise ParamsError([f"loss {name!r}: {err}"], source="loss") from None


def loss_params(name: str) -> type[Section]:
    """The params model registered with loss ``name`` (UnknownNameError if unknown)."""
    return LOSSES.meta(name)["params"]


def loss_needs(name: str) -> tuple[str, ...]:
    """The batch keys loss ``name`` reads (its class's ``needs``)."""
    return LOSSES.get(name).needs


def build_loss(params: Section, cache_info: dict[str, Any], data_meta: dict[str, Any]) -> Loss:
    """Build the loss ``params.name`` from its params model plus what its ``context`` reads.

    Args:
        params: an instance of the loss's registered params model.
        cache_info: the logit cache's info (``cache.json``), e.g. ``capture_temperature``.
        data_meta: the condensed training data's ``meta``, e.g. ``dbr_temperature``.
    """
    cls = LOSSES.get(params.name)
    expected = loss_params(params.name)
    if not isinstance(params, expected):
        raise TypeError(f"loss {params.name!r} is built from {expected.__name__}, got {type(params).__name__}")
    return cls(**params.model_dump(exclude={"name"}), **cls.context(cache_info, data_meta))


def check_args(name: str, temperature: float | None = None, alpha: float | None = None) -> None:
    """Raises ``ParamsError`` for a non-positive temperature or an alpha outside [0, 1]."""
    problems = []
    if temperature is not None and not temperature > 0:
        problems.append(f"{name}.temperature: must be > 0 (got {temperature})")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        problems.append(f"{name}.alpha: must be in [0, 1] (got {alpha})")
    if problems:
        raise ParamsError(problems, source="loss")


def require_keys(name: str, needs: tuple[str, ...], batch: Mapping[str, Tensor]) -> None:
    """Raises ``DataError`` naming the keys the loss needs that the batch lacks."""
    missing = [k for k in needs if k not in batch]
    if missing:
        raise DataError(
            f"loss {name!r} needs batch keys {list(needs)}; missing {missing} "
            f"(got {sorted(batch)}). Check that the logit cache matches the loss."
        )


def check_batch(
    name: str, needs: tuple[str, ...], student_logits: Tensor, batch: Mapping[str, Tensor]
) -> None:
    """Raises ``DataError`` when the batch lacks a key the loss needs or sizes disagree."""
    require_keys(name, needs, batch)
    if student_logits.dim() != 2:
        shape = tuple(student_logits.shape)
        raise DataError(f"loss {name!r}: student logits must be [B, C], got {shape}")
    rows = student_logits.shape[0]
    for key in (*needs, "weight"):
        if key in batch and batch[key].shape[0] != rows:
            raise DataError(
                f"loss {name!r}: batch[{key!r}] has {batch[key].shape[0]} rows, "
                f"student logits have {rows}"
            )


def weighted_mean(values: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """Mean of per-sample ``values`` [B], weighted by ``batch["weight"]`` when present."""
    weight = batch.get("weight")
    if weight is None:
        return values.mean()
    weight = weight.to(device=values.device, dtype=values.dtype)  # [B]
    return (values * weight).sum() / weight.sum()


def kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row KL(p || q) = sum_i p_i (log p_i - log q_i), with 0 log 0 = 0.

    Args:
        log_p: target log-probabilities ``[B, K]`` (may hold ``-inf``).
        log_q: model log-probabilities ``[B, K]``.

    Returns:
        ``[B]`` KL divergences.
    """
    p = log_p.exp()  # [B, K]
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))  # [B, K]
    return terms.sum(-1)


# Importing the method modules registers them.
from kdflow.losses import ce, dbr, kd, topk_kd  # noqa: E402, F401
from kdflow.losses import lm_ce, lm_jsd, lm_kd, lm_rkl, lm_uld  # noqa: E402, F401

__all__ = [
    "LOSSES", "Loss", "LossBase", "alpha_field", "build_loss", "check_args", "check_batch", "create_loss",
    "kl_rows", "loss_needs", "loss_params", "require_keys", "temperature_field", "weighted_mean",
]
