"""The ``kdflow`` command line: run, stage, validate."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from kdflow.errors import KdflowError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Declarative, cached and traceable knowledge distillation.")
console = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Pipeline file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a key: -s student.loss.temperature=2")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


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
    console.print(f"[bold red]{title}:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _load(config: Path, overrides: list[str] | None):
    from schemas.params import load_params

    return load_params(config, overrides or [])


@app.command()
def validate(config: ConfigOpt = Path("params.yaml"), set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Validate a pipeline file and print every problem."""
    try:
        pp = _load(config, set_)
    except KdflowError as exc:
        _fail(exc, debug)
    out.print(f"[green]ok[/] {config}: pipeline {pp.name!r}, {len(pp.teachers)} teacher candidate(s)")


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="prepare, teachers, select, condense, logits, student or evaluate")],
    config: ConfigOpt = Path("params.yaml"),
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint of a killed run.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Run even if the output is up to date.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Run one stage (what dvc.yaml calls), without Prefect."""
    _setup_logging(debug)
    try:
        from tasks.common import STAGES, execute_stage

        if name not in STAGES:
            raise KdflowError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
        pp = _load(config, set_)
        tracker = _tracker(pp)
        with _reporter(in_flow=False) as report:
            manifest, executed = execute_stage(name, pp, Path.cwd(), tracker=tracker, resume=resume, force=force, progress=report)
    except (KdflowError, OSError) as exc:
        _fail(exc, debug)
    verb = "done" if executed else "up to date"
    out.print(f"{name}: {verb} ({manifest.fingerprint[:12]}, {manifest.seconds:.1f}s)")
    if name == "evaluate":
        _print_summary(json.loads((Path.cwd() / "artifacts" / pp.name / "evaluate" / "metrics.json").read_text()))


@app.command()
def run(
    config: ConfigOpt = Path("params.yaml"),
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Resume a killed student stage from its checkpoint.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Run the whole pipeline as a Prefect flow (ephemeral Prefect when no server is configured)."""
    _setup_logging(debug)
    started = time.perf_counter()
    try:
        pp = _load(config, set_)
        _tracker_precheck(pp)
        from flows.distill import distill

        with _reporter(in_flow=True):
            result = distill(params_file=str(config.resolve()), overrides=set_ or [], root=str(Path.cwd()), resume=resume)
    except (KdflowError, OSError) as exc:
        _fail(exc, debug)
    _print_stages(result["stages"], time.perf_counter() - started)
    _print_summary(json.loads(Path(result["metrics_file"]).read_text()))
    if result.get("tracking_unavailable"):
        console.print(f"[yellow]lineage was not recorded:[/] {result['tracking_unavailable']}")
    elif result.get("mlflow_run"):
        out.print(f"MLflow parent run: {result['mlflow_run']}")


@app.command()
def serve(
    config: ConfigOpt = Path("params.yaml"),
    limit: Annotated[Optional[int], typer.Option(help="Maximum concurrent flow runs.")] = None,
    debug: DebugOpt = False,
) -> None:
    """Register the Prefect deployment 'distill/default' and serve it (needs PREFECT_API_URL)."""
    _setup_logging(debug)
    try:
        _load(config, None)
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
    debug: DebugOpt = False,
) -> None:
    """Print the chain from a model back to its data source, stage by stage, with fingerprints and run ids."""
    try:
        from kdflow.lineage.query import open_store, trace

        uri = tracking_uri or (_load(config, None).tracking.uri if config.exists() else None)
        chain = trace(open_store(uri, Path.cwd()), ref)
    except (KdflowError, OSError) as exc:
        _fail(exc, debug)
    out.print(f"[bold]{chain.target}[/] in {chain.uri}", highlight=False, soft_wrap=True)
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
    debug: DebugOpt = False,
) -> None:
    """Write one self-contained HTML report (tables and pictures) of the last pipeline run."""
    _setup_logging(debug)
    try:
        from kdflow.report import build_report

        pp = _load(config, None)
        artifacts = Path.cwd() / "artifacts" / pp.name
        path = build_report(artifacts, output if output is not None else artifacts / "report.html")
    except (KdflowError, OSError) as exc:
        _fail(exc, debug)
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


def _print_summary(m: dict) -> None:
    table = Table(title="teacher vs. student (test split)")
    for col in ("", "teacher", "student", "ratio"):
        table.add_column(col, justify="right")
    t, s, c = m["teacher"], m["student"], m["compression"]
    table.add_row("accuracy", f"{t['accuracy']:.4f}", f"{s['accuracy']:.4f}", f"gap {m['accuracy_gap'] * 100:+.2f} pts")
    table.add_row("macro-F1", f"{t['macro_f1']:.4f}", f"{s['macro_f1']:.4f}", "")
    table.add_row("ECE", f"{t['ece']:.4f}", f"{s['ece']:.4f}", "")
    table.add_row("params", f"{t['params']:,}", f"{s['params']:,}", f"{c['params_ratio']:.1f}x")
    table.add_row("bytes", f"{t['bytes']:,}", f"{s['bytes']:,}", f"{c['bytes_ratio']:.1f}x")
    table.add_row("latency b1 (ms)", f"{t['latency_ms_b1']:.3f}", f"{s['latency_ms_b1']:.3f}", f"{c['latency_ratio_b1']:.1f}x")
    table.add_row("latency b256 (ms)", f"{t['latency_ms_b256']:.2f}", f"{s['latency_ms_b256']:.2f}", f"{c['latency_ratio_b256']:.1f}x")
    out.print(table)
    out.print(f"agreement {m['agreement']:.4f}   KL(teacher||student) {m['kl_teacher_student']:.4f}   teacher: {t['name']}")


def main() -> None:
    for key, value in {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1"}.items():
        os.environ.setdefault(key, value)
    app()


if __name__ == "__main__":
    main()
