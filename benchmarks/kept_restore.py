"""Wall time of going back to an earlier setting: restored from the kept outputs vs. recomputed.

Builds a throw-away project in a temporary folder (a copy of the code, so edits elsewhere do not
change its fingerprints, and the default ``params.yaml`` with every training budget cut to
``--epochs`` / ``--student-epochs``; MLflow on, in the project's ``mlflow.db``), then times, each a
fresh ``kdflow run`` process:

1. ``A``: the first run (every stage computes);
2. ``B``: ``-s student.loss.temperature=2`` (student and evaluate compute; A's are kept);
3. ``A again``: back to A: restored from ``artifacts/<name>/.kept/`` (the measured path);
4. ``B (keep 0)``: ``-s runtime.keep_outputs=0``: B restored, and nothing is kept any more;
5. ``A again (keep 0)``: the baseline, going back with one slot per stage: student and evaluate
   compute again.

Prints the table (wall and CPU seconds, ratio to the first run and to the baseline), the stage
states of each run, and the registered versions of the student after each run; ``--out`` writes
JSON. Nothing is asserted. Run from the repository root::

    .venv/bin/python benchmarks/kept_restore.py --out kept.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
CODE = ("kdflow", "tasks", "schemas", "flows")
ENV = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
       "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STEPS = (("A", []), ("B", ["-s", "student.loss.temperature=2"]), ("A again", []),
         ("B (keep 0)", ["-s", "student.loss.temperature=2", "-s", "runtime.keep_outputs=0"]),
         ("A again (keep 0)", ["-s", "runtime.keep_outputs=0"]))


def make_project(root: Path, epochs: int, student_epochs: int) -> None:
    for item in CODE:
        shutil.copytree(REPO / item, root / item, ignore=shutil.ignore_patterns("__pycache__"))
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for teacher in raw.get("teachers", []):
        teacher.setdefault("train", {})["epochs"] = epochs
    raw["student"].setdefault("train", {})["epochs"] = student_epochs
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the process and its children, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), proc.stdout


def states(stdout: str) -> dict[str, str]:
    """Stage -> state from the stage table `kdflow run` prints."""
    out = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│") if c.strip()]
        if len(cells) >= 2 and cells[0] in ("prepare", "teachers", "select", "condense", "logits", "student", "evaluate"):
            out[cells[0]] = cells[1]
    return out


def versions(root: Path) -> int:
    db = root / "mlflow.db"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        return con.execute("select count(*) from model_versions").fetchone()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2, help="training budget of every teacher")
    ap.add_argument("--student-epochs", type=int, default=10, help="training budget of each student seed")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    env = {**os.environ, **ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="kdflow-kept-") as tmp:
        root = Path(tmp)
        make_project(root, args.epochs, args.student_epochs)
        for name, extra in STEPS:
            load = os.getloadavg()[0]
            wall, cpu, stdout = timed([sys.executable, "-m", "kdflow.cli", "run", *extra], root, env)
            rows[name] = {"args": extra, "wall_s": wall, "cpu_s": cpu, "load_avg_before": load,
                          "states": states(stdout), "student_versions": versions(root)}
    first, base = rows["A"]["wall_s"], rows["A again (keep 0)"]["wall_s"]
    table = Table(title=f"going back to an earlier setting (teachers {args.epochs} epochs, student {args.student_epochs}; "
                        f"{os.cpu_count()} CPUs)")
    for col in ("run", "wall s", "CPU s", "/ first run", "/ recomputed", "load", "student, evaluate", "model versions"):
        table.add_column(col, justify="right")
    for name, r in rows.items():
        table.add_row(name, f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['wall_s'] / first:.2f}",
                      f"{r['wall_s'] / base:.2f}", f"{r['load_avg_before']:.1f}",
                      f"{r['states'].get('student', '?')}, {r['states'].get('evaluate', '?')}", str(r["student_versions"]))
    Console().print(table)
    if args.out:
        doc = {"epochs": args.epochs, "student_epochs": args.student_epochs, "runs": rows,
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()}}
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
