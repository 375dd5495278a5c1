"""One needs/provides check of a pipeline's methods, used by ``kdflow validate`` and at run time.

A loss *needs* batch keys (``LOSSES`` entries' ``needs``); the student's batches *provide* the
samples (``x``, ``y``), the keys the logit cache's format decodes to (``FORMATS`` entries'
``provides``) and the label extras the condensation method writes (``CONDENSERS`` metadata
``provides``). Each name must also be one the track offers.
"""
from __future__ import annotations

from typing import Any

from kdflow.catalog import CONDENSERS, FORMATS, LOSSES

SAMPLE_KEYS = ("x", "y")


def _meta_or(registry: Any, name: str, key: str, attr: Any) -> Any:
    """Metadata ``key`` of ``name`` as declared in ``kdflow/catalog.py`` (no import), else ``attr``
    of the registered object (a track's own entry, registered when the track was imported)."""
    meta = registry.meta(name)
    return meta[key] if key in meta else attr(registry.get(name))


def loss_needs(loss: str) -> tuple[str, ...]:
    """The batch keys loss ``loss`` reads (its class's ``needs``)."""
    return tuple(_meta_or(LOSSES, loss, "needs", lambda cls: cls.needs))


def provided(fmt: str, method: str) -> set[str]:
    """Batch keys the student's batches hold with cache format ``fmt`` after ``method``."""
    return {*SAMPLE_KEYS, *_meta_or(FORMATS, fmt, "provides", lambda f: f.provides),
            *CONDENSERS.meta(method).get("provides", ())}


def own_inputs(loss: str) -> bool:
    """Whether the loss trains on inputs of its own (e.g. DBR's stored views), not the samples."""
    def overrides(cls: Any) -> bool:
        from kdflow.losses import LossBase

        return cls.inputs.__func__ is not LossBase.inputs.__func__

    return bool(_meta_or(LOSSES, loss, "own_inputs", overrides))


def compatibility(track: Any, *, loss: str, fmt: str, method: str, views: int) -> list[str]:
    """Every reason these methods cannot work together on ``track`` (empty: they can)."""
    problems = []
    for kind, key, name in (("loss", "student.loss.name", loss), ("condenser", "condense.method", method),
                            ("format", "logits.format", fmt)):
        offers = track.offers(kind)
        if name not in offers:
            problems.append(f"{key}: {name!r} is not offered by track {track.name!r} (offered: {', '.join(offers)})")
    if problems:
        return problems
    missing = [k for k in loss_needs(loss) if k not in provided(fmt, method)]
    if missing:
        formats = [f for f in track.offers("format") if set(missing) <= provided(f, method)]
        methods = [m for m in track.offers("condenser") if set(missing) <= provided(fmt, m)]
        fix = " or ".join([*(f"logits.format {f!r}" for f in formats), *(f"condense.method {m!r}" for m in methods)])
        problems.append(f"student.loss.name: {loss!r} needs {missing}, which logits.format {fmt!r} with condense.method "
                        f"{method!r} does not provide" + (f"; use {fix}" if fix else ""))
    if views > 1 and own_inputs(loss):
        problems.append(f"logits.views: {loss!r} trains on inputs of its own (stored by the condenser), not on "
                        "replayed views; use logits.views 1")
    if views > 1 and not getattr(track, "views_supported", True):
        problems.append(f"logits.views: track {track.name!r} has no augmented views; use logits.views 1")
    return problems
