"""What ``kdflow validate`` checks beyond the schema: everything the run will need, before compute.

The schema (``schemas/params.py``) checks keys, bounds and the methods' compatibility; this
module adds what needs the registries, the machine or the file system: the data source (known
scheme, its files, folders and packages: each source's ``check`` metadata), architecture names
and constructor arguments, checkpoints, the devices asked for, augmented views of tabular data
and the tracking store's URI scheme.
"""
from __future__ import annotations

import difflib
from pathlib import Path

from kdflow.catalog import SOURCES
from kdflow.errors import KdflowError
from kdflow.tracks import get_track
from schemas.params import PipelineParams


def model_problems(pp: PipelineParams) -> list[str]:
    """Unknown architectures or constructor arguments of the teachers and the student."""
    track = get_track(pp.track)
    problems = []
    for i, t in enumerate(pp.teachers):
        if t.arch is not None:
            problems += track.model_problems(t.arch, t.args, f"teachers[{i}]")
    problems += track.model_problems(pp.student.arch, pp.student.args, "student")
    return problems


def source_problems(pp: PipelineParams, root: Path) -> list[str]:
    """An unknown source scheme, or what the source's own ``check`` finds (missing files, folders,
    packages, unknown dataset names), and augmented views asked of tabular data."""
    scheme, _, arg = pp.data.source.partition(":")
    track = get_track(pp.track)  # importing a track registers its sources
    own = getattr(track, "source_problems", None)  # a track that reads its data itself checks it itself
    if own is not None:
        return list(own(pp.data.source, dict(pp.data.options), Path(root)))
    if scheme not in SOURCES:
        close = difflib.get_close_matches(scheme, SOURCES.names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return [f"data.source: unknown source {scheme!r}{hint} (sources: {', '.join(SOURCES.names())})"]
    meta = SOURCES.meta(scheme)
    problems = list(meta["check"](arg, dict(pp.data.options), Path(root))) if "check" in meta else []
    modality = meta.get("modality")
    modality = modality(arg) if callable(modality) else modality
    if pp.logits.views > 1 and modality == "tabular":
        problems.append(f"logits.views: tabular data ({pp.data.source!r}) has no augmented views; use logits.views 1")
    return problems


def checkpoint_problems(pp: PipelineParams, root: Path) -> list[str]:
    """Teacher checkpoints that do not exist (relative paths: against ``root``)."""
    track = get_track(pp.track)
    problems = [p for i, t in enumerate(pp.teachers) if t.checkpoint is not None
                for p in track.checkpoint_problems(t.checkpoint, Path(root), f"teachers[{i}].checkpoint")]
    if pp.student.tokenizer is not None and hasattr(track, "tokenizer_problems"):  # the student's own (lm)
        problems += track.tokenizer_problems(pp.student.tokenizer, Path(root), "student.tokenizer")
    return problems


def device_problems(pp: PipelineParams) -> list[str]:
    """Devices asked for that this machine does not have (``cuda`` without CUDA, ``cuda:3`` of 1)."""
    asked = {"runtime.device": pp.runtime.device, "student.device": pp.student.device,
             **{f"runtime.stages.{s}.device": r.device for s, r in pp.runtime.stages.items()}}
    problems = []
    for key, name in asked.items():
        if name in (None, "auto", "cpu"):
            continue
        from kdflow.train.device import resolve_device  # torch: only when a device is named

        try:
            resolve_device(name)
        except KdflowError as exc:
            problems.append(f"{key}: {str(exc).removeprefix('device: ')}")
    return problems


def tracking_problems(pp: PipelineParams) -> list[str]:
    """A ``tracking.uri`` whose scheme no MLflow store handles (``foo://``)."""
    if not (pp.tracking.enabled and pp.tracking.uri):
        return []
    from kdflow.lineage.backends import uri_problem

    problem = uri_problem(pp.tracking.uri)
    return [f"tracking.uri: {problem}"] if problem else []


def path_problems(pp: PipelineParams, root: Path) -> list[str]:
    """Files and folders the run reads that do not exist: the data source's and the checkpoints."""
    return [*source_problems(pp, root), *checkpoint_problems(pp, root)]


def pipeline_problems(pp: PipelineParams, root: Path) -> list[str]:
    """Every problem ``kdflow validate`` reports for a pipeline that passed the schema."""
    return [*model_problems(pp), *path_problems(pp, root), *device_problems(pp), *tracking_problems(pp)]
