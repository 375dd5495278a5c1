"""`kdflow report`: one self-contained HTML file; rendered in headless Chromium over the DevTools protocol."""
from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import pytest

from conftest import stop_process_group, tiny_params, write_params
from kdflow.errors import KdflowError
from kdflow.report import build_report
from schemas.manifest import Manifest
from schemas.params import parse_params
from tasks.common import STAGE_ORDER, execute_stage


def _png(width: int = 2, height: int = 2) -> bytes:
    """A valid grey RGB PNG, built by hand (no imaging library needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80" * 3 * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _fake_run(root: Path, name: str) -> Path:
    """artifacts/<name>/ with manifests, a ranking, metrics.json and figures, without running anything."""
    art = root / "artifacts" / "fake"
    upstream = {"prepare": {}, "select": {"prepare": "p"}, "evaluate": {"prepare": "p", "select": "s"}}
    for stage, ups in upstream.items():
        (art / stage).mkdir(parents=True)
        Manifest(stage=stage, pipeline=name, fingerprint=f"{stage}-0123456789abcdef", upstream=ups,
                 metrics={"score": 0.5}, kdflow_version="0", started_at="2024-01-01T00:00:00",
                 finished_at="2024-01-01T00:00:01", seconds=1.0).save(art / stage)
    pl.DataFrame({"teacher": ["<b>big</b>", "small"], "score": [0.9, 0.5], "rank": [1, 2]}).write_parquet(art / "select/ranking.parquet")
    (art / "select/chosen.json").write_text(json.dumps({"teachers": ["<b>big</b>"], "weights": [1.0], "strategy": "val_accuracy"}))
    model = {"accuracy": 0.9, "macro_f1": 0.9, "ece": 0.05, "params": 1000, "bytes": 4000, "latency_ms_b1": 0.2, "latency_ms_b256": 2.0}
    metrics = {"teacher": {"name": "<b>big</b>", **model}, "student": {**model, "params": 100, "bytes": 400},
               "agreement": 0.95, "kl_teacher_student": 0.1, "accuracy_gap": 0.0, "n_test": 10,
               "compression": {"params_ratio": 10.0, "bytes_ratio": 10.0, "latency_ratio_b1": 1.0, "latency_ratio_b256": 1.0}}
    (art / "evaluate/metrics.json").write_text(json.dumps(metrics))
    for rel in ("evaluate/figures/curves.png", "evaluate/figures/reliability.png", "select/figures/ranking.png"):
        (art / rel).parent.mkdir(exist_ok=True)
        (art / rel).write_bytes(_png())
    return art


def test_report_is_self_contained_and_escapes_text(tmp_path: Path) -> None:
    art = _fake_run(tmp_path, name='<script>alert("x")</script> & co')
    html = build_report(art, tmp_path / "out" / "report.html").read_text()
    assert "<script" not in html and "<b>big" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in html
    assert "&lt;b&gt;big&lt;/b&gt;" in html
    assert 'src="http' not in html and "<link" not in html and "url(" not in html
    refs = re.findall(r'\b(?:src|href)="([^"]*)"', html)
    assert len(refs) == 3 and all(r.startswith("data:image/png;base64,") for r in refs)
    # figures of every stage, upstream stages first
    assert html.index("select/ranking.png") < html.index("evaluate/curves.png")
    assert [h for h in ("Stages", "Teacher ranking", "Teacher vs. student", "Figures") if f"<h2>{h}" in html] == [
        "Stages", "Teacher ranking", "Teacher vs. student", "Figures"]
    assert "10.00x" in html  # the compression ratio


def test_missing_artifacts_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KdflowError, match="run `kdflow run` first"):
        build_report(tmp_path / "artifacts" / "nothing", tmp_path / "r.html")
    art = _fake_run(tmp_path, name="fake")
    (art / "evaluate/metrics.json").unlink()
    with pytest.raises(KdflowError, match="metrics.json is missing"):
        build_report(art, tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_cli_report_without_a_run_exits_with_the_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from kdflow.cli import app

    write_params(tmp_path, tiny_params())
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["report"])
    assert result.exit_code == 1
    assert "kdflow run" in result.output


# --- headless Chromium over the Chrome DevTools Protocol -------------------------------------------

def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


class DevTools:
    """A minimal CDP client over one page target: commands by id, events kept in order."""

    def __init__(self, ws) -> None:
        self.ws, self.last_id, self.events = ws, 0, []

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        self.last_id += 1
        self.ws.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == self.last_id:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return msg["result"]
            if "method" in msg:
                self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while not any(e["method"] == method for e in self.events):
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if "method" in msg:
                self.events.append(msg)
        return next(e for e in self.events if e["method"] == method)

    def console_errors(self) -> list[str]:
        errors = []
        for e in self.events:
            p = e["params"]
            if e["method"] == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                errors.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
            elif e["method"] == "Runtime.exceptionThrown":
                errors.append(f"exception: {p['exceptionDetails'].get('text')}")
        return errors


@contextmanager
def headless_chromium(exe: str, workdir: Path) -> Iterator[DevTools]:
    """Start Chromium on 127.0.0.1 (port chosen by Chromium), yield a page client, stop the process group."""
    from websockets.sync.client import connect

    profile, log = workdir / "profile", workdir / "chromium.log"
    profile.mkdir(parents=True)
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-extensions", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 90
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, f"chromium exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"chromium did not open its DevTools port:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        targets = json.loads(no_proxy.open(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
        page = next(t for t in targets if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], proxy=None, max_size=None, open_timeout=30) as ws:
            yield DevTools(ws)
    finally:
        stop_process_group(proc, timeout=15)


IMAGES_JS = """JSON.stringify({
  n: document.images.length,
  broken: Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 40)),
  title: document.title})"""


def render(devtools: DevTools, page: Path) -> tuple[dict, list[str]]:
    """Load ``page`` in a fresh state; return the image check and the console errors it caused."""
    devtools.events.clear()
    devtools.call("Page.navigate", url=page.resolve().as_uri())
    devtools.wait_for("Page.loadEventFired")
    result = devtools.call("Runtime.evaluate", expression=IMAGES_JS, returnByValue=True)["result"]
    return json.loads(result["value"]), devtools.console_errors()


@pytest.mark.integration
def test_report_of_a_tiny_run_renders_in_headless_chromium(tmp_path: Path) -> None:
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium binary (Debian: apt-get install chromium; .ci/run installs it)")
    root = tmp_path / "project"
    raw = tiny_params()
    write_params(root, raw)
    pp = parse_params(raw)
    for stage in STAGE_ORDER:
        execute_stage(stage, pp, root)

    proc = subprocess.run([sys.executable, "-m", "kdflow.cli", "report"], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = root / "artifacts" / "tiny" / "report.html"
    assert proc.stdout.strip().splitlines()[-1] == str(report)
    n_png = len(list((root / "artifacts" / "tiny").glob("*/figures/**/*.png")))
    assert n_png >= 5

    # a page with a broken image and a console error proves the checks can fail
    control = tmp_path / "control.html"
    control.write_text('<!DOCTYPE html><title>c</title><img alt="gone" src="missing.png">'
                       '<script>console.error("boom")</script>')
    with headless_chromium(exe, tmp_path / "chromium") as devtools:
        devtools.call("Page.enable")
        devtools.call("Runtime.enable")
        devtools.call("Log.enable")
        images, errors = render(devtools, report)
        bad_images, bad_errors = render(devtools, control)

    assert images == {"n": n_png, "broken": [], "title": "kdflow report: tiny"}
    assert errors == []
    assert bad_images["broken"] == ["gone"]
    assert any("boom" in e for e in bad_errors)
