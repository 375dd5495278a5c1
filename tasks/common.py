"""The stage contract's machinery: specs, fingerprints, context, atomic outputs, execution.

``execute_stage`` is the one code path behind both ``kdflow stage <name>`` (DVC's ``cmd``) and the
Prefect task in ``flows/distill.py``, so both produce the same artifacts for the same inputs.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kdflow
from kdflow.errors import ArtifactError
from kdflow.progress import Reporter
from kdflow.tracks import Track, get_track
from schemas.manifest import MANIFEST_FILE, FileEntry, Manifest
from schemas.outputs import OUTPUTS, Output
from schemas.params import PipelineParams
from schemas.stages import STAGE_ORDER, STAGES  # noqa: F401  (re-exported: the stage order)
from tasks import kept

if TYPE_CHECKING:  # torch and the training machinery are imported where a stage runs: checking
    import torch  # whether outputs are current (kdflow status, a no-op kdflow run) needs neither

log = logging.getLogger(__name__)

PACKAGES = ("kdflow", "tasks", "schemas")  # the code a stage's identity covers
DISTRIBUTED_STAGES = ("student",)  # the stages that may run under torchrun with several processes


def _module_file(module: str) -> Path | None:
    """The source file of a project module (``a.b`` -> ``a/b.py`` or ``a/b/__init__.py``)."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = code_root().joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(code_root()).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _statements(tree: ast.Module) -> Iterator[ast.AST]:
    """Every statement, at any depth (function and class bodies, branches, handlers, cases): an
    import is a statement, so expressions need no visit (``ast.walk`` is ~10x slower)."""
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        for name in ("body", "orelse", "finalbody", "handlers", "cases"):  # handlers, cases: their body next
            todo.extend(getattr(node, name, None) or ())


@functools.lru_cache(maxsize=None)
def _imports(path: Path) -> frozenset[str]:
    """Every project module ``path`` imports, at any depth of its code (lazy imports too), with
    the packages whose ``__init__`` importing it runs."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in _statements(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # submodules imported by name
    out = set()
    for name in found:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))  # parents' __init__ run too
    return frozenset(m for m in out if _module_file(m) is not None)


@functools.lru_cache(maxsize=None)
def import_closure(module: str) -> tuple[str, ...]:
    """Source files (relative to the code root) that importing ``module`` executes."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is not None:
            todo.extend(_imports(path) - seen)
    files = {_module_file(m) for m in seen} - {None}
    return tuple(sorted(p.relative_to(code_root()).as_posix() for p in files))


def stage_code(stage: str, track: str) -> tuple[str, ...]:
    """The code a stage runs: the import closure of ``tasks/<stage>.py`` and of its track."""
    get_track(track)  # the track's folder must exist (and be importable)
    return tuple(sorted({*import_closure(f"tasks.{stage}"), *import_closure(f"kdflow.tracks.{track}")}))


def stage_keys(stage: str, pp: PipelineParams) -> tuple[str, ...]:
    """The params keys a stage reads for these params (select reads the student only to probe)."""
    spec = STAGES[stage]
    probe = spec.probe_params if stage == "select" and pp.select.strategy == "probe" else ()
    return (*spec.params, *probe)


def _get(tree: dict, dotted: str) -> Any:
    node = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def stage_params(stage: str, pp: PipelineParams) -> dict[str, Any]:
    tree = pp.model_dump(mode="json")
    return {k: _get(tree, k) for k in stage_keys(stage, pp)}


@functools.lru_cache(maxsize=1)
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
        "code": code_hash(stage_code(stage, pp.track)),
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


Runner = Callable[..., None]  # a fan-out engine (e.g. Prefect on Dask), injected by flows/ or the CLI


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
    runners: dict[str, Runner] = field(default_factory=dict)
    clear_work: bool = False  # set by a stage whose work folder (checkpoints) is done with once committed
    started: float = field(default_factory=time.time)

    @property
    def artifacts(self) -> Path:
        return artifact_root(self.root, self.pipeline.name)

    @property
    def seed(self) -> int:
        return self.pipeline.seed

    @property
    def track(self) -> Track:
        """The pipeline's track: everything that differs between kinds of distillation."""
        return get_track(self.pipeline.track)

    @property
    def device(self) -> torch.device:
        """The stage's device: ``runtime.stages.<stage>.device``, else ``runtime.device``."""
        from kdflow.train.device import resolve_device

        return resolve_device(stage_runtime(self.stage, self.pipeline)[0])

    @property
    def deterministic(self) -> bool:
        """Deterministic torch algorithms: ``runtime.deterministic``, else on unless the stage runs on CUDA."""
        return stage_deterministic(self.stage, self.pipeline)

    def input(self, stage: str) -> Path:
        """Output folder of an upstream stage."""
        return self.artifacts / stage

    def output(self, stage: str) -> Output:
        """The typed output (``schemas.outputs``) an upstream stage recorded in its manifest."""
        return OUTPUTS[stage].model_validate(self.upstream[stage].info)

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

    def manifest(self, metrics: dict[str, float] | None = None, info: Output | dict[str, Any] | None = None) -> Manifest:
        """The manifest of what the stage wrote into ``out``."""
        if isinstance(info, Output):
            info = info.model_dump(mode="json")
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


def stage_runtime(stage: str, pp: PipelineParams) -> tuple[str, int | None]:
    """(device, threads) of a stage: its ``runtime.stages`` entry, then the student's own
    ``student.device``, then ``runtime``."""
    rt = pp.runtime
    own = rt.stages.get(stage)
    device = (own.device if own and own.device else None) \
        or (pp.student.device if stage == "student" and pp.student.device else None) or rt.device
    threads = own.threads if own and own.threads else rt.threads
    return device, threads


def stage_deterministic(stage: str, pp: PipelineParams) -> bool:
    """``runtime.deterministic``, else on unless the stage's device is CUDA."""
    from kdflow.train.device import resolve_device

    on = pp.runtime.deterministic
    return on if on is not None else resolve_device(stage_runtime(stage, pp)[0]).type != "cuda"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="seconds")


def save_history(path: Path, history: list[dict[str, float]]) -> Path:
    """Training curves without wall-clock timings, so reruns give byte-identical artifacts."""
    rows = [{k: v for k, v in row.items() if k != "seconds"} for row in history]
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return path


def artifact_root(root: Path, pipeline: str) -> Path:
    return Path(root) / "artifacts" / pipeline


def default_modes(directory: Path) -> None:
    """Give files written private (0600: safetensors and ``save_pretrained`` do) the mode every
    other file gets, 0666 minus the umask, so a stage output is as readable as the user chose."""
    umask = os.umask(0)
    os.umask(umask)
    for p in directory.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.stat().st_mode & 0o777 == 0o600:
            p.chmod(0o666 & ~umask)


@contextmanager
def atomic_dir(final: Path, displace: Callable[[Path], object] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success swap it in, on failure delete it.

    A failed or killed stage leaves the previous good output untouched. ``displace(final)``, if
    given, moves the previous output away when the new one is committed (e.g. into the kept store);
    by default it is deleted.
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
    default_modes(tmp)
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists() and displace is not None:
        displace(final)
    elif final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def rank_dir(final: Path, displace: Callable[[Path], object] | None = None) -> Iterator[Path]:
    """``atomic_dir(final, displace)`` on rank 0; on the other ranks of a process group, a private
    temporary folder, deleted. Every rank leaves only once rank 0 has committed ``final``."""
    from kdflow.train import distributed

    rank = distributed.world()[0]
    if rank == 0:
        with atomic_dir(final, displace) as tmp:
            yield tmp
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".rank{rank}-{final.name}-", dir=final.parent) as tmp:
            yield Path(tmp)
    distributed.barrier()  # no-op in one process; a rank that failed never gets here


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


def restore_kept(stage: str, fp: str, artifacts: Path, limit: int) -> Manifest | None:
    """Swap the kept output of fingerprint ``fp`` in as the stage's current output (``tasks.kept``),
    if one is kept and passes the check a current output passes; the current output is kept in
    turn (``limit``: ``runtime.keep_outputs``). A corrupted kept output is deleted with a warning
    (None: the stage runs). Call it holding the project lock."""
    src = kept.kept_path(artifacts, stage, fp)
    if not src.is_dir() or not kept.inside(src, artifacts):
        return None
    problem = check_output(src, fp)
    if problem is not None:
        log.warning("%s: the kept output %s is corrupted (%s): deleted, the stage runs again", stage, fp[:12], problem)
        kept.remove(src, artifacts)
        return None
    kept.take(src, artifacts / stage, artifacts, stage, limit)
    manifest = Manifest.load(artifacts / stage)
    log.info("%s: restored the kept output %s (built %s, MLflow run %s)", stage, fp[:12], manifest.finished_at,
             manifest.mlflow_run_id or "-")
    return manifest


def reuse_output(stage: str, fp: str, artifacts: Path, limit: int) -> tuple[Manifest | None, bool]:
    """``(manifest, restored)``: the stage's output when it is current for ``fp``, or once the kept
    output of ``fp`` is restored (``restore_kept``); ``(None, False)`` when the stage must run.
    The one reuse rule of the flow, ``kdflow stage`` and ``execute_stage``. Hold the project lock."""
    final = artifacts / stage
    if check_output(final, fp) is None:
        return Manifest.load(final), False
    restored = restore_kept(stage, fp, artifacts, limit)
    return restored, restored is not None


def kept_problem(stage: str, fp: str, artifacts: Path) -> str | None:
    """Why the kept output of ``fp`` cannot be restored (None when it can); reads, never writes."""
    src = kept.kept_path(artifacts, stage, fp)
    if not src.is_dir() or not kept.inside(src, artifacts):
        return "not kept"
    return check_output(src, fp)


def upstream_fingerprints(stage: str, manifests: dict[str, Manifest]) -> dict[str, str]:
    return {u: manifests[u].fingerprint for u in STAGES[stage].upstream}


def section(stage: str, pp: PipelineParams) -> Any:
    """The params section passed to ``tasks.<stage>.run``."""
    return getattr(pp, STAGES[stage].section)


def execute_stage(
    stage: str,
    pp: PipelineParams,
    root: Path,
    *,
    tracker: Any = None,
    resume: bool = False,
    force: bool = False,
    progress: Reporter | None = None,
    runners: dict[str, Runner] | None = None,
) -> tuple[Manifest, bool]:
    """Run one stage unless its valid output already exists. Returns (manifest, executed).

    Under torchrun with several processes (only ``DISTRIBUTED_STAGES``), every rank runs the stage
    and returns the manifest rank 0 committed; only rank 0 writes the output and the MLflow run.
    """
    from kdflow.train import distributed
    from kdflow.train.device import resolve_device

    distributed.check_stage(stage, DISTRIBUTED_STAGES)
    joined = distributed.launched() and distributed.init_from_env(resolve_device(stage_runtime(stage, pp)[0]))
    try:
        return _execute_stage(stage, pp, root, tracker=tracker, resume=resume, force=force, progress=progress,
                              runners=runners)
    finally:
        if joined:
            distributed.shutdown()


def _execute_stage(
    stage: str,
    pp: PipelineParams,
    root: Path,
    *,
    tracker: Any,
    resume: bool,
    force: bool,
    progress: Reporter | None,
    runners: dict[str, Runner] | None,
) -> tuple[Manifest, bool]:
    from kdflow.train import distributed
    from kdflow.train.device import deterministic_algorithms, torch_threads

    root = Path(root).resolve()
    upstream = load_upstream(stage, pp, root)
    fp = fingerprint(stage, pp, upstream_fingerprints(stage, upstream))
    base = artifact_root(root, pp.name)
    final = base / stage
    limit = pp.runtime.keep_outputs
    if not force:  # rank 0 decides (and restores); every rank follows
        current, restored = reuse_output(stage, fp, base, limit) if distributed.is_main() else (None, False)
        if distributed.from_main(current is not None):
            if not restored:
                log.info("%s: up to date (%s)", stage, fp[:12])
            return Manifest.load(final), False
    module = importlib.import_module(f"tasks.{stage}")
    log.info("%s: running (%s)", stage, fp[:12])
    if not distributed.is_main():  # rank 0 records the run and reports progress
        tracker, progress = None, None
    with rank_dir(final, lambda old: kept.displace(old, base, stage, fp, limit)) as tmp:
        ctx = StageContext(stage, root, pp, fp, upstream, tmp, tracker=tracker, resume=resume, progress=progress,
                           runners=dict(runners or {}))
        run_id = tracker.start_stage(stage, stage_params(stage, pp), fp, upstream, artifact_root(root, pp.name)) if tracker else None
        try:
            with torch_threads(stage_runtime(stage, pp)[1]), deterministic_algorithms(stage_deterministic(stage, pp)):
                manifest = module.run(section(stage, pp), ctx)
            manifest.mlflow_run_id = run_id
            manifest.save(tmp)
            if tracker:
                tracker.finish_stage(run_id, manifest, tmp)
        except BaseException:
            if tracker:
                tracker.fail_stage(run_id)
            raise
    if ctx.clear_work and distributed.is_main():  # only now: a kill before the commit keeps the checkpoint
        shutil.rmtree(artifact_root(root, pp.name) / ".work" / stage, ignore_errors=True)
    return (manifest if distributed.is_main() else Manifest.load(final)), True
