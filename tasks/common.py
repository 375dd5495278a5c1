"""The stage contract's machinery: specs, fingerprints, context, atomic outputs, execution.

``execute_stage`` is the one code path behind both ``kdflow stage <name>`` (DVC's ``cmd``) and the
Prefect task in ``flows/distill.py``, so both produce the same artifacts for the same inputs.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import kdflow
from kdflow.errors import ArtifactError
from kdflow.progress import Reporter
from schemas.manifest import MANIFEST_FILE, FileEntry, Manifest
from schemas.params import PipelineParams

log = logging.getLogger(__name__)

COMMON_CODE = ["tasks/common.py", "schemas/manifest.py", "schemas/frames.py", "kdflow/data/dataset.py", "kdflow/data/graph_features.py"]


@dataclass(frozen=True)
class StageSpec:
    """What a stage reads: upstream stages, params keys (dotted) and code paths."""

    name: str
    upstream: tuple[str, ...]
    params: tuple[str, ...]
    code: tuple[str, ...]


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in [
        StageSpec("prepare", (), ("seed", "data"), ("tasks/prepare.py", "kdflow/data")),
        StageSpec("teachers", ("prepare",), ("seed", "teachers"), ("tasks/teachers.py", "kdflow/models", "kdflow/train")),
        StageSpec(
            "select",
            ("prepare", "teachers"),
            ("seed", "select", "student.arch", "student.args"),
            ("tasks/select.py", "kdflow/select", "kdflow/losses", "kdflow/models", "kdflow/train", "kdflow/metrics/plots.py"),
        ),
        StageSpec("condense", ("prepare", "select", "teachers"), ("seed", "condense"), ("tasks/condense.py", "kdflow/condense", "kdflow/models", "kdflow/train")),
        StageSpec(
            "logits",
            ("condense", "select", "teachers"),
            ("seed", "logits"),
            ("tasks/logits.py", "tasks/fanout.py", "kdflow/cache", "kdflow/models", "kdflow/train", "kdflow/data/augment.py"),
        ),
        StageSpec(
            "student",
            ("prepare", "condense", "logits"),
            ("seed", "student"),
            (
                "tasks/student.py", "kdflow/train", "kdflow/losses", "kdflow/models", "kdflow/cache",
                "kdflow/condense/nrr_dd.py", "kdflow/data/augment.py",
            ),
        ),
        StageSpec(
            "evaluate",
            ("prepare", "teachers", "select", "student"),
            ("evaluate",),
            ("tasks/evaluate.py", "kdflow/metrics", "kdflow/models", "kdflow/train"),
        ),
    ]
}
STAGE_ORDER = list(STAGES)


def _get(tree: dict, dotted: str) -> Any:
    node = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def stage_keys(stage: str, pp: PipelineParams) -> tuple[str, ...]:
    """The params keys a stage reads for these params (select reads the student only to probe)."""
    keys = STAGES[stage].params
    if stage == "select" and pp.select.strategy != "probe":
        keys = tuple(k for k in keys if not k.startswith("student."))
    return keys


def stage_params(stage: str, pp: PipelineParams) -> dict[str, Any]:
    tree = pp.model_dump(mode="json")
    return {k: _get(tree, k) for k in stage_keys(stage, pp)}


def code_root() -> Path:
    """Folder that holds the ``kdflow``, ``tasks`` and ``schemas`` packages (the code's identity)."""
    return Path(kdflow.__file__).resolve().parent.parent


def code_hash(paths: list[str] | tuple[str, ...]) -> str:
    """sha256 over the Python sources under ``paths`` (files or folders), relative to code_root."""
    root, h = code_root(), hashlib.sha256()
    for rel in sorted(paths):
        p = root / rel
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def fingerprint(stage: str, pp: PipelineParams, upstream: dict[str, str]) -> str:
    """sha256 over the stage name, its code, its params (canonical JSON) and upstream fingerprints."""
    spec = STAGES[stage]
    doc = {
        "stage": stage,
        "code": code_hash([*spec.code, *COMMON_CODE]),
        "params": stage_params(stage, pp),
        "upstream": {u: upstream[u] for u in spec.upstream},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(directory: Path) -> list[FileEntry]:
    """Every file under ``directory`` except the manifest, with sha256 and size."""
    out = []
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST_FILE:
            out.append(FileEntry(path=p.relative_to(directory).as_posix(), sha256=sha256_file(p), bytes=p.stat().st_size))
    return out


def check_output(directory: Path, expected_fp: str | None = None) -> str | None:
    """Why ``directory`` is not a valid stage output (None when it is)."""
    if not (directory / MANIFEST_FILE).exists():
        return f"{directory} has no {MANIFEST_FILE}"
    try:
        m = Manifest.load(directory)
    except (ValueError, OSError) as exc:
        return f"{directory / MANIFEST_FILE} is unreadable: {exc}"
    if expected_fp is not None and m.fingerprint != expected_fp:
        return f"{directory} was built from other inputs (fingerprint {m.fingerprint[:12]} != {expected_fp[:12]})"
    for f in m.files:
        p = directory / f.path
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != f.bytes or sha256_file(p) != f.sha256:
            return f"{p} was altered since the stage wrote it"
    return None


@dataclass
class StageContext:
    """What a stage receives besides its params section."""

    stage: str
    root: Path
    pipeline: PipelineParams
    fingerprint: str
    upstream: dict[str, Manifest]
    out: Path
    tracker: Any = None
    resume: bool = False
    progress: Reporter | None = None
    started: float = field(default_factory=time.time)

    @property
    def artifacts(self) -> Path:
        return artifact_root(self.root, self.pipeline.name)

    @property
    def seed(self) -> int:
        return self.pipeline.seed

    def input(self, stage: str) -> Path:
        """Output folder of an upstream stage."""
        return self.artifacts / stage

    @property
    def work(self) -> Path:
        """Scratch folder that survives failures (checkpoints); not a DVC output."""
        p = self.artifacts / ".work" / self.stage
        p.mkdir(parents=True, exist_ok=True)
        return p

    def report(self, label: str, done: int, total: int | None, **info: float) -> None:
        """Progress of long work inside the stage (no-op without a reporter)."""
        if self.progress is not None:
            self.progress(label, done, total, info)

    def manifest(self, metrics: dict[str, float] | None = None, info: dict[str, Any] | None = None) -> Manifest:
        """The manifest of what the stage wrote into ``out``."""
        return Manifest(
            stage=self.stage,
            pipeline=self.pipeline.name,
            fingerprint=self.fingerprint,
            upstream={k: v.fingerprint for k, v in self.upstream.items()},
            params=stage_params(self.stage, self.pipeline),
            files=file_entries(self.out),
            metrics={k: float(v) for k, v in (metrics or {}).items()},
            info=info or {},
            kdflow_version=kdflow.__version__,
            started_at=_iso(self.started),
            finished_at=_iso(time.time()),
            seconds=round(time.time() - self.started, 3),
        )


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="seconds")


def save_history(path: Path, history: list[dict[str, float]]) -> Path:
    """Training curves without wall-clock timings, so reruns give byte-identical artifacts."""
    rows = [{k: v for k, v in row.items() if k != "seconds"} for row in history]
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return path


def artifact_root(root: Path, pipeline: str) -> Path:
    return Path(root) / "artifacts" / pipeline


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success swap it in, on failure delete it.

    A failed or killed stage leaves the previous good output untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_upstream(stage: str, pp: PipelineParams, root: Path) -> dict[str, Manifest]:
    """Verified manifests of the stage's upstream outputs (ArtifactError if missing/altered)."""
    base = artifact_root(root, pp.name)
    out = {}
    for up in STAGES[stage].upstream:
        problem = check_output(base / up)
        if problem:
            raise ArtifactError(f"stage {stage!r} needs {up!r}: {problem}; run `kdflow stage {up}` (or `kdflow run`) first")
        out[up] = Manifest.load(base / up)
    return out


def upstream_fingerprints(stage: str, manifests: dict[str, Manifest]) -> dict[str, str]:
    return {u: manifests[u].fingerprint for u in STAGES[stage].upstream}


SECTIONS = {"prepare": "data", "teachers": "teachers", "select": "select", "condense": "condense",
            "logits": "logits", "student": "student", "evaluate": "evaluate"}


def section(stage: str, pp: PipelineParams) -> Any:
    """The params section passed to ``tasks.<stage>.run``."""
    return getattr(pp, SECTIONS[stage])


def execute_stage(
    stage: str,
    pp: PipelineParams,
    root: Path,
    *,
    tracker: Any = None,
    resume: bool = False,
    force: bool = False,
    progress: Reporter | None = None,
) -> tuple[Manifest, bool]:
    """Run one stage unless its valid output already exists. Returns (manifest, executed)."""
    root = Path(root).resolve()
    upstream = load_upstream(stage, pp, root)
    fp = fingerprint(stage, pp, upstream_fingerprints(stage, upstream))
    final = artifact_root(root, pp.name) / stage
    if not force and check_output(final, fp) is None:
        log.info("%s: up to date (%s)", stage, fp[:12])
        return Manifest.load(final), False
    module = importlib.import_module(f"tasks.{stage}")
    log.info("%s: running (%s)", stage, fp[:12])
    with atomic_dir(final) as tmp:
        ctx = StageContext(stage, root, pp, fp, upstream, tmp, tracker=tracker, resume=resume, progress=progress)
        run_id = tracker.start_stage(stage, stage_params(stage, pp), fp, upstream, artifact_root(root, pp.name)) if tracker else None
        try:
            manifest = module.run(section(stage, pp), ctx)
            manifest.mlflow_run_id = run_id
            manifest.save(tmp)
            if tracker:
                tracker.finish_stage(run_id, manifest, tmp)
        except BaseException:
            if tracker:
                tracker.fail_stage(run_id)
            raise
    return manifest, True
