"""Dataset-condensation methods, registered by name with their params model.

A method takes the training split (and the chosen teacher) and returns a smaller training set in
the same ``Dataset`` format, optionally with label extras, so the rest of the pipeline does not
change. Each method file defines its params model (a ``Section`` whose ``method`` literal is the
registry name) next to the method and registers both::

    @CONDENSERS.register("rded", params=RdedParams, tracks=("classify",), needs_teacher=True, provides=())
    def rded(train, *, teacher, seed, device, report, ipc, factor, ...): ...

Metadata: ``params`` (the model), ``tracks`` (the tracks that offer it), ``needs_teacher``
(whether it runs the teacher) and ``provides`` (batch keys the condensed data adds for the
student's loss, e.g. ``weight``).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from kdflow.catalog import CONDENSERS as _CONDENSERS
from kdflow.data.dataset import Dataset
from kdflow.registry import Registry
from schemas.base import Section, parse_section
from schemas.methods import ipc_field  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

Report = Callable[[int, int], None]  # report(done, total)


class Condenser(Protocol):
    """``fn(train, *, teacher, seed, device, report, **knobs) -> Dataset``.

    The knobs are exactly the fields of the method's params model (less ``method``), as keyword
    arguments without defaults: the model holds the defaults and bounds, ``condense`` validates.
    ``teacher`` is None for a method registered with ``needs_teacher=False``; ``report`` (or None)
    is called as ``report(classes_done, classes)``.
    """

    def __call__(
        self, train: Dataset, *, teacher: nn.Module | None, seed: int, device: torch.device,
        report: Report | None, **knobs: Any,
    ) -> Dataset: ...


CONDENSERS: Registry[Condenser] = _CONDENSERS  # its names and metadata: kdflow/catalog.py


def condense_params(method: str) -> type[Section]:
    """The params model registered with ``method`` (UnknownNameError if unknown)."""
    return CONDENSERS.meta(method)["params"]


def condense(
    method: str, train: Dataset, *, teacher: nn.Module | None = None, seed: int = 0,
    device: torch.device = torch.device("cpu"), report: Report | None = None, **options: Any,
) -> Dataset:
    """Run a registered method on the training split.

    Args:
        options: the method's knobs; validated by its params model (missing ones take the
            model's defaults).

    Raises:
        ParamsError: an unknown knob or a value out of bounds, one ``condense.<key>: ...`` line each.
    """
    params = parse_section(condense_params(method), {"method": method, **options}, "condense")
    knobs = params.model_dump(exclude={"method"})
    if "ipc" in knobs and (note := ipc_above_class_sizes(train.labels, train.num_classes, knobs["ipc"])):
        log.warning("%s", note)
    return CONDENSERS.get(method)(train, teacher=teacher, seed=seed, device=device, report=report, **knobs)


def ipc_above_class_sizes(labels: torch.Tensor, num_classes: int, ipc: int) -> str | None:
    """A warning when ``ipc`` exceeds the training samples of some classes (None: it does not)."""
    counts = torch.bincount(labels.long(), minlength=num_classes)  # [C]
    short = (counts < ipc).nonzero().flatten().tolist()
    if not short:
        return None
    c = min(short, key=lambda i: (int(counts[i]), i))
    return (f"condense.ipc {ipc} is above the training samples of {len(short)} of {num_classes} classes "
            f"(smallest: class {c} with {int(counts[c])}): those classes have fewer samples than ipc, "
            f"so the condensed set is not balanced; lower condense.ipc to at most {int(counts.min())} to balance it")


def per_class_indices(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Row indices of each class, in row order."""
    return [(labels == c).nonzero().flatten() for c in range(num_classes)]


from kdflow.condense import coreset, mirage, nrr_dd, rded  # noqa: E402,F401  (register)
