"""The ``kdflow`` command line: run, stage, validate, list, dvc-yaml, report, lineage, serve, gc.

The one module of ``kdflow/`` that imports ``tasks/`` and ``flows/``: the entry point wires the
library, the stages and the orchestration together (always lazily, inside a command).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from kdflow.errors import KdflowError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Declarative, cached and traceable knowledge distillation.")
console = Console(stderr=True)
# Piped (`kdflow lineage | less`), Rich would assume 80 columns and squeeze tables to slivers:
# use $COLUMNS when set, else a wide page; --json gives a machine-readable document instead.
out = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Pipeline file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a key: -s student.loss.temperature=2")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="If another kdflow process holds the project lock, wait for it "
                                                      "(default: exit 1 naming it).")]


def _setup_logging(debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(console=console, show_path=False, rich_tracebacks=debug)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    for name in ("kdflow", "tasks", "flows"):
        logging.getLogger(name).setLevel(level)
    if not debug:  # progress reporters show training progress
        logging.getLogger("kdflow.train.loop").setLevel(logging.WARNING)


def _fail(exc: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exception(exc)
    code = exc.exit_code if isinstance(exc, KdflowError) else 1
    title = "invalid pipeline" if code == 2 else "kdflow failed"
    console.print(f"[bold red]{title}:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)  # a value may hold [/]
    raise typer.Exit(code)


def _load(config: Path, overrides: list[str] | None, *, check: bool = True):
    """Read and validate a pipeline file, then check what the run will need (architectures,
    constructor arguments, paths): every problem at once, exit 2, before any compute."""
    from kdflow.errors import ParamsError
    from schemas.params import load_params

    pp = load_params(config, overrides or [])
    if check:
        from kdflow.checks import pipeline_problems

        problems = pipeline_problems(pp, Path.cwd())
        if problems:
            raise ParamsError(problems, str(config))
    return pp


@app.command()
def validate(config: ConfigOpt = Path("params.yaml"), set_: SetOpt = None, as_json: JsonOpt = False,
             debug: DebugOpt = False) -> None:
    """Validate a pipeline file and print every problem (schema, methods, architectures, paths)."""
    try:
        pp = _load(config, set_)
    except KdflowError as exc:
        if as_json:
            problems = getattr(exc, "problems", None) or [str(exc)]
            sys.stdout.write(json.dumps({"ok": False, "config": str(config), "problems": problems}, indent=1) + "\n")
            raise typer.Exit(exc.exit_code) from None
        _fail(exc, debug)
    if as_json:
        sys.stdout.write(json.dumps({"ok": True, "config": str(config), "pipeline": pp.name, "track": pp.track,
                                     "teachers": [t.name for t in pp.teachers]}, indent=1) + "\n")
        return
    out.print(f"[green]ok[/] {escape(str(config))}: pipeline {pp.name!r}, track {pp.track!r}, "
              f"{len(pp.teachers)} teacher candidate(s)")


@app.command("list")
def list_(as_json: JsonOpt = False, debug: DebugOpt = False) -> None:
    """List the tracks and what each offers (sources, architectures, losses, condensers, cache formats, ...)."""
    try:
        from kdflow.data.sources import SOURCES
        from kdflow.tracks import DEFAULT_TRACK, discovered, get_track

        doc = {}
        for name in discovered():
            track = get_track(name)
            sources = [s for s in SOURCES.names() if SOURCES.meta(s).get("track", DEFAULT_TRACK) == name]
            doc[name] = {"summary": track.summary, "sources": sources, "architectures": track.architectures(),
                         **{plural: track.offers(k) for k, plural in (("loss", "losses"), ("condenser", "condensers"),
                                                                      ("format", "formats"), ("strategy", "strategies"))}}
    except KdflowError as exc:
        _fail(exc, debug)
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")
        return
    for name, rows in doc.items():
        out.print(f"[bold]{name}[/]: {escape(rows['summary'])}", highlight=False)
        for key, names in rows.items():
            if key != "summary":
                out.print(f"  {key}: {', '.join(names) or '-'}", highlight=False, markup=False, soft_wrap=True)
    out.print("architectures also by import path (arch: package.module:Class); `kdflow params` lists every key",
              highlight=False, markup=False)


@app.command("dvc-yaml")
def dvc_yaml(
    config: ConfigOpt = Path("params.yaml"),
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write here (default: print).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Print (or write) dvc.yaml, generated from the stage specs and each stage's imports.

    With ``-c configs/x.yaml`` (any file but the project's params.yaml): a DVC pipeline for that
    file in its own folder (default ``pipelines/x/dvc.yaml``), run with ``dvc repro pipelines/x/dvc.yaml``.
    """
    try:
        from tasks.dvcgen import config_dvc_yaml
        from tasks.dvcgen import dvc_yaml as generate

        if config.resolve() != (Path.cwd() / "params.yaml").resolve():
            output = output if output is not None else Path("pipelines") / config.stem / "dvc.yaml"
            text = config_dvc_yaml(config, output, Path.cwd())
            output.parent.mkdir(parents=True, exist_ok=True)
        else:
            track = _load(config, None, check=False).track if config.exists() else "classify"
            text = generate(track)
    except KdflowError as exc:
        _fail(exc, debug)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        out.print(f"wrote {output}", highlight=False, markup=False)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="prepare, teachers, select, condense, logits, student or evaluate")],
    config: ConfigOpt = Path("params.yaml"),
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint of a killed run.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Run even if the output is up to date.")] = False,
    wait: WaitOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run one stage (what dvc.yaml calls), without Prefect."""
    _setup_logging(debug)
    try:
        from kdflow.train.distributed import is_main, launched
        from schemas.stages import STAGES
        from tasks.common import execute_stage

        if name not in STAGES:
            raise KdflowError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
        pp = _load(config, set_)
        with _project_lock(pp, wait, locking=is_main()):  # under torchrun, rank 0 holds it for every rank
            # an output that is current (e.g. `dvc repro` after `kdflow run`) needs neither Prefect nor MLflow
            manifest, restored = (None, False) if force or launched() else _current_output(name, pp)
            executed = False
            if manifest is None:
                from flows.distill import RUNNERS

                tracker = _tracker(pp) if is_main() else None  # under torchrun, rank 0 records the run
                with _reporter(in_flow=False) as report:
                    manifest, executed = execute_stage(name, pp, Path.cwd(), tracker=tracker, resume=resume,
                                                       force=force, progress=report, runners=RUNNERS)
    except (KdflowError, OSError) as exc:
        _fail(exc, debug)
    verb = "done" if executed else "restored kept output" if restored else "up to date"
    out.print(f"{name}: {verb} ({manifest.fingerprint[:12]}, {manifest.seconds:.1f}s)")
    if name == "evaluate":
        _print_summary(json.loads((Path.cwd() / "artifacts" / pp.name / "evaluate" / "metrics.json").read_text()), pp.track)


@app.command()
def run(
    config: ConfigOpt = Path("params.yaml"),
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Resume a killed student stage from its checkpoint.")] = False,
    wait: WaitOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run the whole pipeline as a Prefect flow (ephemeral Prefect when no server is configured).

    When every stage's output is already up to date (fingerprints and sha256 of every file, as the
    flow's cache checks them), nothing runs: the tables are printed without starting Prefect.
    """
    _setup_logging(debug)
    _prefect_settings()
    started = time.perf_counter()
    try:
        pp = _load(config, set_)
        with _project_lock(pp, wait):
            from tasks.status import pipeline_status

            plan = pipeline_status(pp, Path.cwd())  # the flow's cache check, without Prefect
            if not any(s.runs or s.restores for s in plan) and _lineage_recorded(pp):
                metrics = Path.cwd() / "artifacts" / pp.name / "evaluate" / "metrics.json"
                stages = {s.stage: {"state": "Cached", "cached": True, "seconds": 0.0} for s in plan}
                result = {"stages": stages, "metrics_file": str(metrics), "track": pp.track, "noop": True}
            else:
                _tracker_precheck(pp)
                result = _run_flow(config, set_, resume, debug)
    except (KdflowError, OSError) as exc:
        _fail(exc, debug)
    _print_stages(result["stages"], time.perf_counter() - started)
    _print_summary(json.loads(Path(result["metrics_file"]).read_text()), result["track"])
    if result.get("noop"):
        out.print("every stage is up to date: nothing ran (no Prefect flow run, no new MLflow run)")
    elif result.get("tracking_unavailable"):
        console.print(f"[yellow]lineage was not recorded:[/] {escape(str(result['tracking_unavailable']))}")
    elif result.get("mlflow_run"):
        out.print(f"MLflow parent run: {result['mlflow_run']}")


def _lineage_recorded(pp: Any) -> bool:
    """Whether every stage output already has its MLflow run (or tracking is off). Outputs built
    while the tracking store was unavailable go through the flow, which links them to a new parent
    run when the store is back, or says again that lineage was not recorded."""
    if not pp.tracking.enabled:
        return True
    from schemas.manifest import Manifest
    from schemas.stages import STAGE_ORDER
    from tasks.common import artifact_root

    root = artifact_root(Path.cwd(), pp.name)
    try:
        return all(Manifest.load(root / stage).mlflow_run_id for stage in STAGE_ORDER)
    except (ValueError, OSError):
        return False


EPHEMERAL_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"


def _prefect_settings() -> None:
    """kdflow's defaults for Prefect settings the user has not set (``flows.PREFECT_DEFAULTS``:
    importing the package applies them), before Prefect is imported."""
    import flows  # noqa: F401


def _run_flow(config: Path, overrides: list[str] | None, resume: bool, debug: bool) -> dict:
    """The ``distill`` flow in this process; Prefect's failure logs carry no traceback of a
    kdflow error unless ``debug``."""
    from flows.distill import distill
    from flows.logs import hide_error_tracebacks

    hide_error_tracebacks(not debug)
    try:
        with _reporter(in_flow=True):
            return distill(params_file=str(config.resolve()), overrides=overrides or [], root=str(Path.cwd()),
                           resume=resume)
    except RuntimeError as exc:
        if EPHEMERAL_TIMEOUT not in str(exc):
            raise
        raise KdflowError(
            f"Prefect's temporary server did not start within "
            f"{os.environ.get('PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS')} s (the machine is very busy): "
            "run again, raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start a server "
            "(`prefect server start`, then export PREFECT_API_URL)") from exc


@contextmanager
def _project_lock(pp, wait: bool, *, locking: bool = True):
    """The project lock (``kdflow.lock``) around a command that writes; stale temporary folders of
    killed runs are removed once it is held."""
    from kdflow.lock import clean_stale_temps, project_lock

    if not locking:
        yield
        return

    def waiting(holder) -> None:
        who = holder.describe() if holder else "another kdflow process"
        console.print(f"waiting for {who} to release the project lock", highlight=False, markup=False)

    with project_lock(Path.cwd(), wait=wait, on_wait=waiting):
        clean_stale_temps(Path.cwd() / "artifacts" / pp.name)
        yield


@app.command()
def serve(
    config: ConfigOpt = Path("params.yaml"),
    limit: Annotated[Optional[int], typer.Option(help="Maximum concurrent flow runs.")] = None,
    debug: DebugOpt = False,
) -> None:
    """Register the Prefect deployment 'distill/default' and serve it (needs PREFECT_API_URL)."""
    _setup_logging(debug)
    try:
        _load(config, None, check=False)
        from flows.deployments import serve as serve_deployment

        serve_deployment(Path.cwd(), params_file=str(config), limit=limit)
    except (KdflowError, OSError) as exc:
        _fail(exc, debug)


@app.command()
def lineage(
    ref: Annotated[str, typer.Argument(help="model-name[@alias] (e.g. digits-student@latest), model-name/version, "
                                            "a logged model id (m-...) or a run id.")],
    config: ConfigOpt = Path("params.yaml"),
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow store; default tracking.uri, "
                                                        "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here.")] = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Print the chain from a model back to its data source, stage by stage, with fingerprints and run ids."""
    try:
        from kdflow.lineage.query import open_store, trace

        uri = tracking_uri or (_load(config, None, check=False).tracking.uri if config.exists() else None)
        chain = trace(open_store(uri, Path.cwd()), ref)
    except (KdflowError, OSError) as exc:
        _fail(exc, debug)
    if as_json:
        steps = [{"stage": s.stage, "run_id": s.run_id, "fingerprint": s.fingerprint, "reads": s.reads,
                  "details": s.details, "status": s.status} for s in chain.steps]
        sys.stdout.write(json.dumps({"ref": chain.ref, "target": chain.target, "uri": chain.uri, "facts": chain.facts(),
                                     "steps": steps}, indent=1, default=str) + "\n")
        return
    out.print(f"[bold]{escape(chain.target)}[/] in {escape(str(chain.uri))}", highlight=False, soft_wrap=True)
    for key, value in chain.facts().items():
        out.print(f"  {key}: {value}", highlight=False, markup=False, soft_wrap=True)
    table = Table(title="lineage, downstream first")
    for col, wrap in (("stage", False), ("run id", False), ("fingerprint", False), ("reads", True), ("details", True)):
        table.add_column(col, no_wrap=not wrap, overflow="fold")
    for i, step in enumerate(chain.steps):
        details = "; ".join(f"{k} {v}" for k, v in step.details.items())
        status = "" if step.status in ("FINISHED", "data") else f" ({step.status})"
        table.add_row(("" if i == 0 else "<- ") + step.stage, step.run_id or "-", (step.fingerprint or "-")[:16],
                      ", ".join(step.reads), escape(details + status))
    out.print(table)


@app.command()
def report(
    config: ConfigOpt = Path("params.yaml"),
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="HTML file (default artifacts/<name>/report.html).")] = None,
    as_json: JsonOpt = False,
    wait: WaitOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write one self-contained HTML report (tables and pictures) of the last pipeline run."""
    _setup_logging(debug)
    try:
        from kdflow.report import build_report

        pp = _load(config, None, check=False)
        artifacts = Path.cwd() / "artifacts" / pp.name
        with _project_lock(pp, wait):  # never a report of outputs a run is replacing
            path = build_report(artifacts, output if output is not None else artifacts / "report.html")
    except (KdflowError, OSError) as exc:
        _fail(exc, debug)
    if as_json:
        sys.stdout.write(json.dumps({"report": str(path), "pipeline": pp.name}) + "\n")
        return
    out.print(str(path), soft_wrap=True, highlight=False, markup=False)


@contextmanager
def _reporter(in_flow: bool):
    """Rich progress bars on a terminal; plain lines otherwise (the flow logs its own lines)."""
    from kdflow import progress

    if console.is_terminal:
        with progress.RichProgress(console) as bars, progress.use(bars):
            yield bars
    elif in_flow:
        yield None
    else:
        reporter = progress.LogProgress(logging.getLogger("kdflow.progress"))
        with progress.use(reporter):
            yield reporter


def _current_output(name: str, pp):
    """(manifest, restored): the stage's manifest when its output is current (its upstream outputs
    valid, its fingerprint matched, every file as recorded) or was restored from the kept store;
    (None, False) when the stage must run (and says why)."""
    from kdflow.errors import ArtifactError
    from tasks.common import artifact_root, fingerprint, load_upstream, reuse_output, upstream_fingerprints

    try:
        upstream = load_upstream(name, pp, Path.cwd())
    except ArtifactError:
        return None, False
    fp = fingerprint(name, pp, upstream_fingerprints(name, upstream))
    return reuse_output(name, fp, artifact_root(Path.cwd().resolve(), pp.name), pp.runtime.keep_outputs)


def _tracker(pp):
    from kdflow.lineage import open_tracker

    t = pp.tracking
    return open_tracker(enabled=t.enabled, uri=t.uri, experiment=t.experiment, required=t.required, root=Path.cwd(), pipeline=pp.name)


def _tracker_precheck(pp) -> None:
    """Fail before any compute when a required tracking server is unreachable."""
    from kdflow.lineage.tracker import check_reachable, resolve_tracking_uri

    if pp.tracking.enabled and pp.tracking.required:
        check_reachable(resolve_tracking_uri(pp.tracking.uri, Path.cwd()))


def _print_stages(stages: dict[str, dict], wall: float) -> None:
    table = Table(title=f"stages (wall time {wall:.1f}s)")
    for col in ("stage", "state", "stage time (s)"):
        table.add_column(col)
    for name, s in stages.items():
        table.add_row(name, s["state"], f"{s['seconds']:.1f}" if not s["cached"] else "-")
    out.print(table)


def _print_summary(m: dict, track: str) -> None:
    from kdflow.tracks import get_track

    t = get_track(track)
    table = Table(title="teacher vs. student (test split)")
    for col in ("", "teacher", "student", "ratio"):
        table.add_column(col, justify="right")
    for row in t.summary_rows(m):
        table.add_row(*row)
    out.print(table)
    from kdflow.report import seed_rows, seed_title

    rows = seed_rows(m)
    if rows:
        seeds = Table(title=escape(seed_title(m)))
        for col in ("", "teacher", "student mean ± std", "student min - max"):
            seeds.add_column(col, justify="right")
        for row in rows:
            seeds.add_row(*(escape(c) for c in row))
        out.print(seeds)
    out.print(t.summary_line(m))


@app.command()
def status(
    config: ConfigOpt = Path("params.yaml"),
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Which stages `kdflow run` would execute and why (params, upstream or code changed): runs nothing."""
    try:
        from kdflow.cli_info import show_status
        from tasks.status import pipeline_status

        pp = _load(config, set_)
        stages = pipeline_status(pp, Path.cwd())
    except (KdflowError, OSError) as exc:
        _fail(exc, debug)
    show_status(pp, config, set_ or [], stages, as_json)


@app.command()
def gc(
    keep_last: Annotated[Optional[int], typer.Option("--keep-last", min=0, help="Keep the N most recently kept "
                                                     "outputs of each stage; delete the older ones.")] = None,
    max_bytes: Annotated[Optional[str], typer.Option("--max-bytes", help="Delete the oldest kept outputs until all "
                                                     "of them take at most this much (500M, 2G, 1.5GiB, 800MB).")] = None,
    keep: Annotated[Optional[list[str]], typer.Option("--keep", "-k", help="Never delete what this names: a pipeline "
                                                      "file (its stages' fingerprints) or a fingerprint prefix.")] = None,
    config: Annotated[Path, typer.Option("--config", "-c", help="Pipeline file whose outputs are never deleted.")]
    = Path("params.yaml"),
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Say what would be deleted; delete nothing.")] = False,
    as_json: JsonOpt = False,
    wait: WaitOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List the earlier outputs kept by fingerprint (artifacts/<name>/.kept/) and bound them.

    Without --keep-last/--max-bytes it only lists. Current outputs, what --config and --keep name,
    and anything outside the artifact root are never deleted.
    """
    _setup_logging(debug)
    root = Path.cwd() / "artifacts"
    try:
        from kdflow.lock import project_lock
        from tasks import gc as policy

        limit = policy.parse_size(max_bytes) if max_bytes is not None else None
        if config != Path("params.yaml") and not config.is_file():
            raise policy.GcError(f"--config {config}: no such pipeline file")
        fps, prefixes = policy.named(list(keep or []), config)
        with project_lock(Path.cwd(), wait=wait):  # no run moves outputs while they are counted and deleted
            items, refused = policy.inventory(root, fps, prefixes)
            policy.plan(items, keep_last, limit)
            freed = 0 if dry_run else policy.apply(items, root)
    except (KdflowError, OSError, ValueError) as exc:
        _fail(exc, debug)
    from kdflow.cli_gc import show_gc

    show_gc(root, items, refused, dry_run, freed, as_json)


def _register_info_commands() -> None:
    from kdflow.cli_info import register  # `kdflow params`

    register(app)


_register_info_commands()


def main() -> None:
    for key, value in {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1"}.items():
        os.environ.setdefault(key, value)
    _prefect_settings()
    app()


if __name__ == "__main__":
    main()
