"""`dvc plots show` offline: kdflow.vega_offline's template inlines Vega, so the chart draws without a
network (checked in headless Chromium with the network switched off); DVC's default page does not."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from kdflow import vega_offline
from kdflow.vega_offline import VegaUnavailable, cdn_versions, install, page_template

VEGA_DIR = Path(os.environ.get("KDFLOW_VEGA_DIR", REPO / ".kdflow" / "vega"))
DVC = [sys.executable, "-m", "dvc"]

# how much of the chart is drawn: marks in an SVG, or non-white pixels on a canvas
DRAWN_JS = """(() => {
  const embed = document.querySelector('.vega-embed');
  if (!embed) return JSON.stringify({embed: false, painted: 0, marks: 0});
  const marks = embed.querySelectorAll('svg .mark-line path, svg .mark-symbol path').length;
  let painted = 0;
  for (const c of embed.querySelectorAll('canvas')) {
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && (d[i] < 200 || d[i + 1] < 200 || d[i + 2] < 200)) painted++;
  }
  return JSON.stringify({embed: true, painted, marks});
})()"""


def vega_files() -> dict[str, Path]:
    files = {n: VEGA_DIR / f"{n}-{v}.min.js" for n, v in cdn_versions().items()}
    missing = [f.name for f in files.values() if not f.is_file()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not in {VEGA_DIR}: run `python -m kdflow.vega_offline` (make install does)")
    return files


def test_versions_are_the_ones_dvc_loads_from_the_cdn() -> None:
    import dvc_render.vega

    source = Path(dvc_render.vega.__file__).read_text()
    versions = cdn_versions()
    assert set(versions) == {"vega", "vega-lite", "vega-embed"}
    for name, version in versions.items():
        assert f"cdn.jsdelivr.net/npm/{name}@{version}" in source


def test_template_inlines_the_files_and_keeps_dvcs_placeholders(tmp_path: Path) -> None:
    from dvc_render.html import HTML

    files = {}
    for name in ("vega", "vega-lite", "vega-embed"):
        files[name] = tmp_path / f"{name}-1.0.min.js"
        files[name].write_text(f'window["{name}"] = "</script>";')
    text = page_template(files)
    assert "{plot_divs}" in text and "{refresh_tag}" in text and "{scripts}" not in text
    assert "cdn.jsdelivr" not in text and text.count("<\\/script>") == 3
    assert text.index('window["vega"]') < text.index('window["vega-lite"]') < text.index('window["vega-embed"]')
    page = HTML(text).with_scripts('<script src="https://cdn.jsdelivr.net/npm/vega@5"></script>') \
        .with_element("<div id='plot'></div>").embed()
    assert "<div id='plot'></div>" in page and "cdn.jsdelivr" not in page  # DVC's CDN tags have nowhere to go

    files["vega"].write_text("var a = '{plot_divs}';")
    with pytest.raises(VegaUnavailable, match="placeholder"):
        page_template(files)


def test_without_npm_it_says_so_and_changes_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    subprocess.run([*DVC, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert vega_offline.main(["--root", str(tmp_path)]) == 0
    assert "skipped (npm not found" in capsys.readouterr().err
    assert not (tmp_path / ".dvc" / "config.local").exists()
    assert vega_offline.main(["--root", str(tmp_path), "--strict"]) == 1


def _drawn(devtools, page: Path, timeout: float = 30) -> dict:
    devtools.events.clear()
    devtools.call("Page.navigate", url=page.resolve().as_uri())
    devtools.wait_for("Page.loadEventFired")
    deadline = time.monotonic() + timeout
    while True:
        state = json.loads(devtools.call("Runtime.evaluate", expression=DRAWN_JS, returnByValue=True)["result"]["value"])
        if state["painted"] > 50 or state["marks"] or time.monotonic() > deadline:
            return state
        time.sleep(0.3)


@pytest.mark.integration
def test_dvc_plots_page_draws_offline_in_headless_chromium(tmp_path: Path) -> None:
    from test_report import _chromium, headless_chromium

    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not installed")
    files = vega_files()
    project = tmp_path / "project"
    project.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([*DVC, "init", "--no-scm", "-q"], cwd=project, check=True, env=env)
    (project / "curve.csv").write_text("epoch,loss\n" + "".join(f"{i},{1 / (i + 1):.3f}\n" for i in range(12)))
    show = [*DVC, "plots", "show", "curve.csv", "-o"]
    subprocess.run([*show, "cdn"], cwd=project, check=True, env=env, capture_output=True)  # DVC's default page

    dest = project / ".kdflow" / "vega"
    dest.mkdir(parents=True)
    for f in files.values():
        shutil.copy(f, dest / f.name)  # already fetched: install() needs no npm
    template = install(project)
    assert template == dest / "dvc-plots.html"
    subprocess.run([*show, "offline"], cwd=project, check=True, env=env, capture_output=True)
    page = (project / "offline" / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and "curve.csv" in page

    with headless_chromium(exe, tmp_path / "chrome") as devtools:
        for domain in ("Page", "Runtime", "Log", "Network"):
            devtools.call(f"{domain}.enable")
        devtools.call("Network.emulateNetworkConditions", offline=True, latency=0, downloadThroughput=-1,
                      uploadThroughput=-1)
        offline = _drawn(devtools, project / "offline" / "index.html")
        assert offline["embed"] and (offline["painted"] > 50 or offline["marks"]), offline
        assert not devtools.console_errors()
        cdn = _drawn(devtools, project / "cdn" / "index.html", timeout=3)
        assert not cdn["embed"] and cdn["painted"] == 0, cdn  # blank without the network: what this fixes
