"""The MLflow UI as a user browses it, in headless Chromium: a real ``mlflow server`` (127.0.0.1,
free port, stopped by the test) over a store kdflow's tracker and registry code wrote."""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, stop_process_group
from test_report import _chromium, headless_chromium

pytestmark = pytest.mark.slow

TEXT_JS = "document.body ? document.body.innerText : ''"


def _wait_health(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"mlflow server exited:\n{log.read_text()[-3000:]}"
        try:
            if opener.open(url + "/health", timeout=5).status == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"mlflow server did not answer:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def _page_text(devtools, url: str, wanted: list[str], timeout: float = 60) -> str:
    """Navigate, then poll the rendered text (the UI is a React app) until every string shows."""
    devtools.call("Page.navigate", url=url)
    deadline, text = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        text = devtools.call("Runtime.evaluate", expression=TEXT_JS, returnByValue=True)["result"].get("value", "")
        if all(w in text for w in wanted):
            return text
        time.sleep(1)
    raise AssertionError(f"{url}: {[w for w in wanted if w not in text]} not shown; page text:\n{text[:3000]}")


def test_run_list_parent_run_and_model_page_show_names_links_and_alias(tmp_path: Path) -> None:
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium on PATH")
    from kdflow.lineage import parent, registry
    from kdflow.lineage.tracker import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "ui", tmp_path, "tiny")
    run_id = tracker.start_pipeline("tiny", {"seed": 0}, overrides=["student.loss.temperature=2"], fingerprint="ab" * 32)
    client = tracker.client
    client.create_registered_model("tiny-student")
    (tmp_path / "model").mkdir()
    version = str(client.create_model_version("tiny-student", source=str(tmp_path / "model"), run_id=run_id).version)
    client.set_model_version_tag("tiny-student", version, "kdflow.eval.accuracy", "0.9000")
    assert registry.promote(client, "tiny-student", version, 0.9)
    rows = [{"stage": "prepare", "cached": True, "fingerprint": "cd" * 32, "run_id": run_id,
             "experiment_id": tracker.experiment_id}]
    client.set_tag(run_id, "mlflow.note.content",
                   parent.markdown("tiny", rows, client.get_model_version("tiny-student", version)))
    tracker.end_pipeline()

    port, log = free_port(), tmp_path / "mlflow.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                   "--backend-store-uri", uri, "--workers", "1"],
                                  stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_health(base, server, log)
        with headless_chromium(exe, tmp_path / "chromium") as devtools:
            devtools.call("Page.enable")
            devtools.call("Runtime.enable")
            name = "tiny student.loss.temperature=2"
            _page_text(devtools, f"{base}/#/experiments/{tracker.experiment_id}/runs", [name])  # the run list
            _page_text(devtools, f"{base}/#/experiments/{tracker.experiment_id}/runs/{run_id}",
                       [name, f"tiny-student v{version}", "cdcdcdcd"])  # the parent run and its description
            hrefs = devtools.call("Runtime.evaluate", returnByValue=True, expression=(
                "[...document.querySelectorAll('a')].map(a => a.getAttribute('href'))"))["result"]["value"]
            for link in (parent.model_link("tiny-student", version), parent.run_link(tracker.experiment_id, run_id)):
                assert link in hrefs, hrefs  # the description's links are links
            _page_text(devtools, f"{base}/#/models/tiny-student", ["champion"])  # the model page
    finally:
        stop_process_group(server, timeout=15)
