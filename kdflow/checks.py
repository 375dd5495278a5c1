"""What ``kdflow validate`` checks beyond the schema: everything the run will need, before compute.

The schema (``schemas/params.py``) checks keys, bounds and the methods' compatibility; this
module adds what needs the track's registries or the file system: architecture names and
constructor arguments of teachers and student, and paths that must exist.
"""
from __future__ import annotations

from pathlib import Path

from kdflow.data.sources import resolve_options, resolve_source
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


def path_problems(pp: PipelineParams, root: Path) -> list[str]:
    """Files and folders the run reads that do not exist (relative paths: against ``root``)."""
    problems = []
    kind, _, arg = pp.data.source.partition(":")
    if kind in ("idx", "parquet"):
        path = Path(resolve_source(pp.data.source, root).partition(":")[2])
        if not path.exists():
            problems.append(f"data.source: {kind} path not found: {path}")
    if kind == "tu" and "root" in pp.data.options:
        folder = Path(resolve_options(pp.data.options, root)["root"]).expanduser() / arg / "raw"
        if not folder.is_dir() and not pp.data.options.get("download", False):
            problems.append(f"data.options.root: no TU dataset folder {folder} (and download is off)")
    track = get_track(pp.track)
    for i, t in enumerate(pp.teachers):
        if t.checkpoint is not None:
            problems += track.checkpoint_problems(t.checkpoint, Path(root), f"teachers[{i}].checkpoint")
    return problems


def pipeline_problems(pp: PipelineParams, root: Path) -> list[str]:
    """Every problem ``kdflow validate`` reports for a pipeline that passed the schema."""
    return [*model_problems(pp), *path_problems(pp, root)]
