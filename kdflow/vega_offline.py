"""Interactive DVC plots offline: Vega, Vega-Lite and vega-embed from the project, not from a CDN.

``dvc plots show`` writes pages whose default template loads vega, vega-lite and vega-embed from
cdn.jsdelivr.net, so without a network they stay blank. ``python -m kdflow.vega_offline`` (run by
``make install``) fetches the three packages' built files once with ``npm pack`` (the versions
DVC's own template names, read from ``dvc_render``) into ``.kdflow/vega/``, writes a DVC HTML
template there that inlines them (a page that works anywhere, offline too), and points DVC at it
in ``.dvc/config.local`` (``plots.html_template``, not committed). Without npm or a registry it says
so and changes nothing (exit 0; ``--strict``: exit 1): the pages keep loading Vega from the CDN.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from kdflow.errors import KdflowError

FALLBACK = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}  # dvc_render 1.x's CDN versions
TEMPLATE = "dvc-plots.html"
CDN = re.compile(r"cdn\.jsdelivr\.net/npm/(vega(?:-lite|-embed)?)@([0-9][0-9A-Za-z.\-]*)")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- vega, vega-lite and vega-embed inlined by kdflow.vega_offline (no CDN): %(versions)s -->
%(scripts)s
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


class VegaUnavailable(KdflowError):
    """The Vega files cannot be fetched here (no npm, no registry)."""


def cdn_versions() -> dict[str, str]:
    """The versions of vega, vega-lite and vega-embed that DVC's default page loads from the CDN."""
    try:
        import dvc_render.vega as renderer

        found = dict(CDN.findall(Path(renderer.__file__).read_text()))
    except (ImportError, OSError):
        found = {}
    return found if set(found) == set(FALLBACK) else dict(FALLBACK)


def _file(dest: Path, name: str, version: str) -> Path:
    return dest / f"{name}-{version}.min.js"


def fetch(dest: Path, versions: dict[str, str], npm: str = "npm", timeout: float = 180) -> dict[str, Path]:
    """``<dest>/<name>-<version>.min.js`` for each package (``build/<name>.min.js`` of its npm
    tarball, which bundles its own dependencies), fetched with ``npm pack`` unless already there."""
    dest.mkdir(parents=True, exist_ok=True)
    missing = {n: v for n, v in versions.items() if not _file(dest, n, v).is_file()}
    if missing:
        exe = shutil.which(npm)
        if exe is None:
            raise VegaUnavailable(f"{npm} not found (install Node.js, or copy {', '.join(_file(dest, n, v).name for n, v in missing.items())} into {dest})")
        with tempfile.TemporaryDirectory(prefix="kdflow-vega-") as tmp:
            specs = [f"{n}@{v}" for n, v in missing.items()]
            try:
                proc = subprocess.run([exe, "pack", *specs, "--pack-destination", tmp, "--fetch-retries=1",
                                       "--fetch-timeout=30000", "--silent"], check=False, capture_output=True,
                                      text=True, timeout=timeout, cwd=tmp)
            except subprocess.TimeoutExpired as exc:
                raise VegaUnavailable(f"npm pack {' '.join(specs)} took over {timeout:.0f} s") from exc
            if proc.returncode != 0:
                raise VegaUnavailable(f"npm pack {' '.join(specs)} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
            for name, version in missing.items():
                with tarfile.open(Path(tmp) / f"{name}-{version}.tgz") as tar:
                    member = tar.extractfile(f"package/build/{name}.min.js")
                    if member is None:
                        raise VegaUnavailable(f"{name}@{version} has no build/{name}.min.js")
                    part = _file(dest, name, version).with_suffix(".part")
                    part.write_bytes(member.read())
                    os.replace(part, _file(dest, name, version))
    return {n: _file(dest, n, v) for n, v in versions.items()}


def page_template(files: dict[str, Path]) -> str:
    """A DVC HTML template (``{plot_divs}``, ``{refresh_tag}``; no ``{scripts}``, where DVC puts its
    CDN tags) with the files inlined, in dependency order."""
    scripts = []
    for name in ("vega", "vega-lite", "vega-embed"):
        code = files[name].read_text(encoding="utf-8").replace("</script", "<\\/script")
        clash = [p for p in ("{plot_divs}", "{scripts}", "{refresh_tag}") if p in code]  # DVC replaces them anywhere
        if clash:
            raise VegaUnavailable(f"{files[name]} contains DVC's template placeholder {clash[0]}: cannot inline it")
        scripts.append(f'    <script type="text/javascript">/* {files[name].name} */\n{code}\n    </script>')
    versions = ", ".join(f.name.removesuffix(".min.js") for f in files.values())
    return PAGE.replace("%(versions)s", versions).replace("%(scripts)s", "\n".join(scripts))


def install(root: Path, dest: Path | None = None, npm: str = "npm") -> Path:
    """Fetch the files, write the template, point ``root``'s DVC at it; returns the template."""
    root = Path(root).resolve()
    dest = Path(dest) if dest is not None else root / ".kdflow" / "vega"
    versions = cdn_versions()
    files = fetch(dest, versions, npm=npm)
    template = dest / TEMPLATE
    part = template.with_suffix(".part")
    part.write_text(page_template(files), encoding="utf-8")
    os.replace(part, template)
    (dest / "vega.json").write_text(json.dumps({n: {"version": v, "file": files[n].name,
                                                    "sha256": hashlib.sha256(files[n].read_bytes()).hexdigest()}
                                                for n, v in versions.items()}, indent=1) + "\n")
    if (root / ".dvc").is_dir():
        rel = os.path.relpath(template, root / ".dvc")  # DVC resolves it against .dvc/
        subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", rel],
                       cwd=root, check=True, capture_output=True, text=True)
    return template


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path.cwd(), help="the project (default: here)")
    ap.add_argument("--dest", type=Path, help="where the files go (default <root>/.kdflow/vega)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when the files cannot be fetched")
    args = ap.parse_args(argv)
    try:
        template = install(args.root, args.dest)
    except (KdflowError, OSError, subprocess.CalledProcessError) as exc:
        print(f"DVC plots offline: skipped ({exc}); `dvc plots show` pages load Vega from the CDN", file=sys.stderr)
        return 1 if args.strict else 0
    print(f"DVC plots offline: vega, vega-lite and vega-embed inlined by {template} "
          f"(.dvc/config.local plots.html_template)" if (args.root / ".dvc").is_dir() else
          f"DVC plots offline: template {template}; use `dvc plots show --html-template {template}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
