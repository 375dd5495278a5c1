"""Tracks: one kind of distillation each (classification, graphs, ...), one folder each.

A track owns what differs between kinds of distillation: its dataset artifact, how batches are
made, what the teacher signal is, which cache formats, losses and condensers it offers, how
models are evaluated and its section of the report. The seven stages call the pipeline's track
(``ctx.track``) and never branch on modality.

Tracks are found by folder: ``kdflow/tracks/<name>/__init__.py`` registers an instance with
``TRACKS.register(name)``. They are imported on first use, so a pipeline's fingerprints depend
on its own track's code only. Adding a track is one folder (plus, optionally, a data source
registered in it with ``SOURCES.register(scheme, track=name)``).
"""
from __future__ import annotations

import difflib
import importlib
import logging
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kdflow.errors import UnknownNameError
from kdflow.registry import Registry

if TYPE_CHECKING:  # a track's module imports torch where it computes: validating needs none
    import torch
    from torch import nn

    from kdflow.data.dataset import Dataset


class Track(Protocol):
    """What the stages ask of a track (see ``kdflow/tracks/classify`` for the reference one)."""

    name: str
    summary: str  # one line for ``kdflow list`` and the README

    # -- the dataset artifact ---------------------------------------------------------------
    def load_source(self, spec: str, *, seed: int, val_fraction: float, test_fraction: float,
                    options: dict[str, Any]) -> Dataset: ...
    def save(self, ds: Dataset, folder: Path) -> None: ...
    def load(self, folder: Path) -> Dataset: ...
    def describe(self, ds: Dataset) -> dict[str, Any]: ...  # prepare's output info (Prepared)

    # -- models and the teacher signal ------------------------------------------------------
    def architectures(self) -> list[str]: ...
    def model_problems(self, arch: str, args: dict[str, Any], where: str) -> list[str]: ...
    def create_model(self, arch: str, ds: Dataset, args: dict[str, Any],
                     teacher: Path | None = None) -> nn.Module: ...  # teacher: the chosen teacher's folder
    def load_checkpoint(self, spec: str, root: Path, out: Path) -> nn.Module: ...  # a declared teacher into ``out``
    def checkpoint_problems(self, spec: str, root: Path, where: str) -> list[str]: ...
    def load_model(self, folder: Path) -> nn.Module: ...
    def save_model(self, model: nn.Module, folder: Path) -> None: ...
    def teacher_outputs(self, model: nn.Module, x: Any, *, batch_size: int,
                        device: torch.device) -> torch.Tensor: ...  # [N, C]
    def output_dim(self, ds: Dataset) -> int: ...
    def cache_layout(self, ds: Dataset) -> dict[str, int]: ...  # {} or {"seq_len": L, "tokens_per_row": n}
    fidelity_rows: int  # cache rows compared with a fresh teacher forward

    # -- training ---------------------------------------------------------------------------
    def teacher_loss(self) -> Any: ...
    def fit_inputs(self, ds: Dataset, loss: Any = None) -> dict[str, Any]: ...
    def val_pair(self, ds: Dataset) -> tuple[Any, torch.Tensor]: ...
    def val_metric(self) -> tuple[str, Any] | None: ...  # fit's (name, score(model, x, y, batch_size, device)); None: accuracy
    def val_score(self, model: nn.Module, ds: Dataset, device: torch.device) -> dict[str, float]: ...
    def views(self, ds: Dataset, k: int, seed: int, augment: Any) -> dict[str, torch.Tensor] | None: ...

    # -- what it offers ---------------------------------------------------------------------
    def offers(self, kind: str) -> list[str]: ...  # kind: loss | condenser | format | strategy

    # -- selection, condensation, evaluation, report ----------------------------------------
    def selection_data(self, ds: Dataset, seed: int, device: torch.device) -> Any: ...
    def condense_figure(self, ds: Dataset, folder: Path, title: str) -> None: ...
    def evaluate(self, models: dict[str, nn.Module], test: Dataset, *, names: dict[str, str],
                 histories: dict[str, list[dict]], latency_repeats: int, latency_threads: int | None,
                 ece_bins: int, folder: Path) -> dict[str, Any]: ...
    def headline(self, metrics: dict[str, Any]) -> dict[str, float]: ...
    def summary_rows(self, metrics: dict[str, Any]) -> list[tuple[str, str, str, str]]: ...
    def summary_line(self, metrics: dict[str, Any]) -> str: ...
    def report_section(self, metrics: dict[str, Any]) -> str: ...  # HTML
    def dvc_plots(self) -> list[dict[str, Any]]: ...


log = logging.getLogger(__name__)

TRACKS: Registry[Track] = Registry("track")
DEFAULT_TRACK = "classify"


def discovered() -> list[str]:
    """Names of the track folders under ``kdflow/tracks/`` and of tracks registered otherwise."""
    here = Path(__file__).parent
    found = {m.name for m in pkgutil.iter_modules([str(here)]) if m.ispkg}
    return sorted(found | set(TRACKS.names()))


def get_track(name: str) -> Track:
    """The track registered as ``name``, importing ``kdflow.tracks.<name>`` on first use."""
    if name not in TRACKS:
        known = discovered()
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(f"unknown track {name!r}{hint} (known: {', '.join(known)})")
        importlib.import_module(f"{__name__}.{name}")
    return TRACKS.get(name)


def infer_track(source: str) -> str:
    """The track of a data source spec (``tu:MUTAG`` -> ``graph``), from the sources registry."""
    from kdflow.catalog import SOURCES

    scheme = source.partition(":")[0]
    for name in [None, *discovered()]:  # a track may register its own sources: import until found
        if name is not None and name not in TRACKS:
            try:
                get_track(name)
            except Exception as exc:  # noqa: BLE001  a broken track must not break inference for others
                log.warning("track %s could not be imported: %s", name, exc)
        if scheme in SOURCES:
            return SOURCES.meta(scheme).get("track", DEFAULT_TRACK)
    return DEFAULT_TRACK


def track_module_file(name: str) -> Path:
    """The ``__init__.py`` of a track folder (the root of its import closure)."""
    return Path(__file__).parent / name / "__init__.py"


def offered(registry: Registry, track: str, default: tuple[str, ...]) -> list[str]:
    """Names in ``registry`` whose ``tracks`` metadata (``default`` when absent) includes ``track``."""
    return [n for n in registry.names() if track in registry.meta(n).get("tracks", default)]
