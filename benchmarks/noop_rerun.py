"""Wall time of a no-op ``kdflow run`` (every stage up to date) vs. ``dvc status``, in one run.

Builds a throw-away project in a temporary folder: a copy of the code (``kdflow``, ``tasks``,
``schemas``, ``flows``, so edits elsewhere do not change its fingerprints), ``dvc.yaml``, a DVC repo
(``dvc init --no-scm``) and the default ``params.yaml`` with every training budget cut to
``--epochs`` (the artifacts keep the default demo's shapes and sizes). One ``kdflow run`` builds
it, then ``--repeats`` rounds time, each in a fresh process and in turn:

- ``kdflow run``: the no-op CLI run (fingerprints and sha256 of every output, no Prefect);
- ``flow``: the ``distill`` flow called directly, the path every ``kdflow run`` took before the
  no-op check (Prefect's temporary server, seven ``Cached`` task runs, an MLflow parent run);
- ``dvc status``: the baseline (``cmd`` DVC's own no-op check; the outputs were built by kdflow,
  so it reports them as changed after hashing them).

Prints median, min and max wall seconds per command, the median CPU seconds (user + system, which
a busy machine inflates less than wall time), and the ratios of the medians to ``dvc status``;
``--out`` writes them as JSON. Nothing is asserted. Run from the repository root::

    .venv/bin/python benchmarks/noop_rerun.py --repeats 5 --out noop.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
CODE = ("kdflow", "tasks", "schemas", "flows", "dvc.yaml", ".dvcignore")
ENV = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
       "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
FLOW = "from flows.distill import distill; distill(params_file='params.yaml', root='.')"


def make_project(root: Path, epochs: int) -> None:
    for item in CODE:
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, root / item, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, root / item)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for teacher in raw.get("teachers", []):
        teacher.setdefault("train", {})["epochs"] = epochs
    raw["student"].setdefault("train", {})["epochs"] = epochs
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the process and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 and cmd[-1] != "status":
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2, help="training budget of every teacher and the student")
    ap.add_argument("--no-flow", action="store_true", help="skip the (slow) direct flow call")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    env = {**os.environ, **ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    py = sys.executable
    console = Console()
    with tempfile.TemporaryDirectory(prefix="kdflow-noop-") as tmp:
        root = Path(tmp)
        make_project(root, args.epochs)
        subprocess.run([py, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, env=env, check=True)
        build = timed([py, "-m", "kdflow.cli", "run"], root, env)[0]
        commands = {"kdflow run": [py, "-m", "kdflow.cli", "run"], "dvc status": [py, "-m", "dvc", "status"]}
        if not args.no_flow:
            commands["flow"] = [py, "-c", FLOW]
        times: dict[str, list[float]] = {k: [] for k in commands}
        cpu: dict[str, list[float]] = {k: [] for k in commands}
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                wall, used = timed(cmd, root, env)
                times[name].append(wall)
                cpu[name].append(used)
    base, base_cpu = statistics.median(times["dvc status"]), statistics.median(cpu["dvc status"])
    table = Table(title=f"no-op rerun, {args.repeats} rounds (first build {build:.1f}s, "
                        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    for col in ("command", "median s", "min s", "max s", "/ dvc status", "CPU s (median)", "CPU / dvc status"):
        table.add_column(col, justify="right")
    rows = {}
    for name, ts in times.items():
        med, med_cpu = statistics.median(ts), statistics.median(cpu[name])
        rows[name] = {"median_s": med, "min_s": min(ts), "max_s": max(ts), "ratio_to_dvc_status": med / base,
                      "all_s": ts, "cpu_median_s": med_cpu, "cpu_ratio_to_dvc_status": med_cpu / base_cpu,
                      "cpu_all_s": cpu[name]}
        table.add_row(name, f"{med:.2f}", f"{min(ts):.2f}", f"{max(ts):.2f}", f"{med / base:.2f}",
                      f"{med_cpu:.2f}", f"{med_cpu / base_cpu:.2f}")
    console.print(table)
    if args.out:
        doc = {"build_s": build, "repeats": args.repeats, "epochs": args.epochs, "commands": rows,
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "load_avg": os.getloadavg()}}
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
