"""One self-contained HTML report of a pipeline run: tables and pictures, no external resources.

Images are embedded as base64 data URIs and the CSS is inline, so the file can be mailed,
attached to a ticket or opened offline. Every piece of text from the artifacts is escaped.
"""
from __future__ import annotations

import base64
import json
import logging
import subprocess
from html import escape
from pathlib import Path
from typing import Any

from kdflow.errors import ArtifactError
from schemas.manifest import MANIFEST_FILE, Manifest

log = logging.getLogger(__name__)

CAPTIONS = {
    "ranking": "Teacher ranking: selection score per candidate.",
    "curves": "Training curves of the chosen teacher and the student.",
    "confusion_teacher": "Confusion matrix of the teacher on the test split.",
    "confusion_student": "Confusion matrix of the student on the test split.",
    "reliability": "Reliability diagram: confidence vs. accuracy (calibration).",
    "compression": "Accuracy vs. compression: test accuracy against parameter count.",
}
_ORDER = {stem: i for i, stem in enumerate(CAPTIONS)}

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.meta { color: #666; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { padding: .25em .7em; border-bottom: 1px solid #e4e4e4; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: .92em; }
.figures { display: flex; flex-wrap: wrap; gap: 1.2em; }
figure { margin: 0; max-width: 34em; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .92em; }
"""


def build_report(artifacts_dir: Path, out: Path) -> Path:
    """Write the HTML report of the run under ``artifacts_dir`` (``artifacts/<pipeline>``) to ``out``.

    Raises:
        ArtifactError: when there is no finished run (no stage manifests or no evaluate metrics).
    """
    artifacts_dir, out = Path(artifacts_dir), Path(out)
    manifests = _manifests(artifacts_dir)
    metrics_file = artifacts_dir / "evaluate" / "metrics.json"
    if not manifests or not metrics_file.is_file():
        missing = "no stage manifests" if not manifests else "evaluate/metrics.json is missing"
        raise ArtifactError(f"no finished pipeline run under {artifacts_dir} ({missing}): run `kdflow run` first")
    metrics = json.loads(metrics_file.read_text())
    name = manifests[-1].pipeline
    body = [
        f"<h1>kdflow report: {escape(name)}</h1>",
        f'<p class="meta">{_meta(manifests)}</p>',
        "<h2>Run</h2>", _context(artifacts_dir, manifests),
        "<h2>Stages</h2>", _stage_table(manifests),
        "<h2>Teacher ranking</h2>", _ranking(artifacts_dir / "select"),
        "<h2>Teacher vs. student (test split)</h2>", _comparison(artifacts_dir, metrics),
        "<h2>Figures</h2>", _figures(artifacts_dir, [m.stage for m in manifests]),
    ]
    html = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>kdflow report: {escape(name)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body) + "\n</body>\n</html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)
    log.info("report written to %s (%d bytes)", out, len(html))
    return out


def _manifests(artifacts_dir: Path) -> list[Manifest]:
    """Every stage manifest, in the order the stages ran (upstream first)."""
    if not artifacts_dir.is_dir():
        return []
    found = {m.stage: m for m in (Manifest.load(p.parent) for p in artifacts_dir.glob(f"*/{MANIFEST_FILE}"))}
    depth: dict[str, int] = {}

    def level(stage: str) -> int:  # longest upstream chain, so the order is topological
        if stage not in depth:
            depth[stage] = 1 + max((level(u) for u in found[stage].upstream if u in found), default=-1)
        return depth[stage]

    return sorted(found.values(), key=lambda m: (level(m.stage), m.started_at, m.stage))


def _meta(manifests: list[Manifest]) -> str:
    last = manifests[-1]
    return escape(f"kdflow {last.kdflow_version} · last stage finished {last.finished_at}")


def fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.4g}"


def table(headers: list[str], rows: list[list[Any]], numeric: tuple[int, ...] = ()) -> str:
    """An HTML table; numbers and the ``numeric`` columns are right-aligned."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    lines = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{escape(fmt(c))}</td>'
            if i in numeric or isinstance(c, (int, float)) and not isinstance(c, bool)
            else f"<td>{escape(str(c))}</td>"
            for i, c in enumerate(row)
        )
        lines.append(f"<tr>{cells}</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(lines) + "\n</tbody>\n</table>"


def _stage_table(manifests: list[Manifest]) -> str:
    rows = []
    for m in manifests:
        headline = ", ".join(f"{k} {fmt(v)}" for k, v in sorted(m.metrics.items()))
        rows.append([m.stage, m.fingerprint[:12], f"{m.seconds:.1f}", m.mlflow_run_id or "-", headline])
    return table(["stage", "fingerprint", "seconds", "MLflow run", "headline metrics"], rows, numeric=(2,))


RUN_FILE = "run.json"  # artifacts/<pipeline>/run.json: the context of the last flow run (kdflow run)


def git_state(root: Path) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the git work tree at ``root`` (empty outside one or without git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return {}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def write_run_context(artifacts_dir: Path, context: dict[str, Any]) -> Path:
    """Record what the report shows about how the outputs were made (``run.json``, atomically)."""
    path = Path(artifacts_dir) / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(context, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


def _context(artifacts_dir: Path, manifests: list[Manifest]) -> str:
    """How these outputs were made: the flow run's pipeline file, overrides, git commit, MLflow
    and Prefect run ids (``run.json``, when it belongs to these outputs), else what the manifests
    say, with the git state now; then the params every stage used."""
    by_stage = {m.stage: m for m in manifests}
    run_file = Path(artifacts_dir) / RUN_FILE
    ctx: dict[str, Any] = json.loads(run_file.read_text()) if run_file.is_file() else {}
    last = manifests[-1]
    if ctx and ctx.get("fingerprints", {}).get(last.stage) != last.fingerprint:
        ctx = {}  # stages ran outside that flow run since (kdflow stage, dvc repro): not its context
    rows: list[list[Any]] = []
    if ctx:
        rows += [["made by", "kdflow run (Prefect flow)"],
                 ["pipeline file", ctx.get("params_file") or "-"],
                 ["overrides", " ".join(ctx.get("overrides") or []) or "none"],
                 ["git commit", _commit(ctx.get("git") or {})],
                 ["MLflow parent run", ctx.get("mlflow_run") or "not recorded"],
                 ["Prefect flow run", ctx.get("prefect_flow_run_id") or "-"],
                 ["finished", ctx.get("finished_at") or "-"]]
    else:
        rows += [["made by", "stages run one by one (kdflow stage / dvc repro), or no flow context recorded"],
                 ["git commit (now)", _commit(git_state(Path(artifacts_dir).parent.parent))]]
    runs = ", ".join(f"{m.stage} {m.mlflow_run_id}" for m in manifests if m.mlflow_run_id)
    rows.append(["MLflow stage runs", runs or "not recorded"])
    params = {s: m.params for s, m in by_stage.items()}
    html = table(["", ""], rows)
    html += ("\n<details><summary>Params each stage used (the keys its fingerprint covers)</summary>"
             f"<pre>{escape(json.dumps(params, indent=1, sort_keys=True))}</pre></details>")
    return html


def _commit(git: dict[str, Any]) -> str:
    if not git.get("commit"):
        return "not a git work tree"
    return git["commit"] + (" (with uncommitted changes)" if git.get("dirty") else "")


def _ranking(select_dir: Path) -> str:
    path = select_dir / "ranking.parquet"
    if not path.is_file():
        return "<p>No teacher ranking (the select stage has not run).</p>"
    import polars as pl  # ~0.4 s to import: only to read a table

    frame = pl.read_parquet(path)
    if "rank" in frame.columns:
        frame = frame.sort("rank").select(["rank", *[c for c in frame.columns if c != "rank"]])
    html = table(frame.columns, [list(r) for r in frame.iter_rows()])
    chosen_file = select_dir / "chosen.json"
    if not chosen_file.is_file():
        return html
    chosen = json.loads(chosen_file.read_text())
    picked = ", ".join(f"{t} (weight {fmt(w)})" for t, w in zip(chosen.get("teachers", []), chosen.get("weights", [])))
    return f"{html}\n<p>Chosen: {escape(picked)}; strategy <code>{escape(str(chosen.get('strategy', '?')))}</code>.</p>"


def _comparison(artifacts_dir: Path, metrics: dict[str, Any]) -> str:
    """The track's section: teacher vs. student (the track is recorded by ``prepare``), then the
    students of every seed."""
    from kdflow.tracks import DEFAULT_TRACK, get_track

    prepare = artifacts_dir / "prepare" / MANIFEST_FILE
    track = Manifest.load(prepare.parent).info.get("track", DEFAULT_TRACK) if prepare.is_file() else DEFAULT_TRACK
    html = get_track(track).report_section(metrics)
    rows = seed_rows(metrics)
    if rows:
        html += f"\n<p>{escape(seed_title(metrics))}</p>\n" + table(
            ["", "teacher", "student mean ± std", "student min - max"], [list(r) for r in rows], numeric=(1, 2, 3))
    return html


def seed_title(m: dict[str, Any]) -> str:
    """What the rows of ``seed_rows`` cover."""
    seeds = m["student_seeds"]["seeds"]
    return f"students over {len(seeds)} seeds {seeds} (test split; the stage's model: seed {seeds[0]})"


def seed_rows(m: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, teacher, student mean ± std, student min - max) rows of ``metrics["student_seeds"]``
    (none with one seed)."""
    seeds = m.get("student_seeds")
    if not seeds:
        return []
    rows = []
    for key, value in seeds.items():
        if not isinstance(value, dict) or "mean" not in value:
            continue
        teacher = m.get("teacher", {}).get(key)
        points = key.endswith("_gap")  # a difference of accuracies, in points
        f = (lambda v: f"{v * 100:+.2f} pts") if points else (lambda v: f"{v:.4f}")
        std = f"{value['std'] * 100:.2f} pts" if points else f"{value['std']:.4f}"
        rows.append((key,
                     f"{teacher:.4f}" if isinstance(teacher, (int, float)) else "",
                     f"{f(value['mean'])} ± {std}", f"{f(value['min'])} - {f(value['max'])}"))
    return rows


def _figures(artifacts_dir: Path, stages: list[str]) -> str:
    figures = []
    for stage in stages:
        pngs = (artifacts_dir / stage).glob("figures/**/*.png")
        for png in sorted(pngs, key=lambda p: (_ORDER.get(p.stem, len(_ORDER)), str(p))):
            caption = CAPTIONS.get(png.stem, png.stem.replace("_", " "))
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            figures.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{escape(png.stem)}">'
                f"<figcaption><b>{escape(stage)}/{escape(png.name)}</b>: {escape(caption)}</figcaption></figure>"
            )
    if not figures:
        return "<p>No figures found.</p>"
    return '<div class="figures">\n' + "\n".join(figures) + "\n</div>"
