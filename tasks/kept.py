"""Earlier stage outputs kept by fingerprint, so going back to a setting is a restore, not a recompute.

The current output of a stage stays a real folder, ``artifacts/<name>/<stage>/`` (what DVC tracks
and every reader opens). When a stage commits an output with another fingerprint, the output it
replaces is moved (one rename on the same filesystem) to ``artifacts/<name>/.kept/<stage>/<fingerprint>/``
instead of being deleted; a stage whose wanted fingerprint is kept moves it back
(``tasks.common.restore_kept``, after the same sha256 check as a current output). A kept folder
is a complete stage output, manifest included (its MLflow run id too), byte for byte what the
stage wrote. ``runtime.keep_outputs`` bounds each stage's store as outputs are kept; ``kdflow gc``
(``tasks/gc.py``) lists it and bounds it by count or bytes. Every writer holds the project lock.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from schemas.manifest import MANIFEST_FILE, Manifest

log = logging.getLogger(__name__)

KEPT_DIR = ".kept"
FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


def store(artifacts: Path) -> Path:
    """The kept store of one pipeline's artifact folder."""
    return Path(artifacts) / KEPT_DIR


def kept_path(artifacts: Path, stage: str, fp: str) -> Path:
    return store(artifacts) / stage / fp


@dataclass(frozen=True)
class Entry:
    """One kept output."""

    path: Path
    stage: str
    fingerprint: str
    kept_at: float  # when it was moved into the store (the folder's mtime, set then)

    @functools.cached_property
    def bytes(self) -> int:
        """Size on disk, walked on first use (``kdflow gc``), not when ``prune`` only needs the age order."""
        return folder_bytes(self.path)

    def manifest(self) -> Manifest | None:
        try:
            return Manifest.load(self.path)
        except (ValueError, OSError):
            return None


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under ``folder`` (symbolic links are not followed)."""
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            p = Path(dirpath) / name
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def entries(artifacts: Path, stage: str | None = None) -> list[Entry]:
    """Kept outputs of one pipeline (one stage's, if given), oldest first. Anything in the store
    that is not a real ``<stage>/<64 hex digits>`` folder is not an entry (and never deleted)."""
    root = store(artifacts)
    if not root.is_dir() or root.is_symlink():
        return []
    out = []
    for stage_dir in sorted(root.iterdir()):
        if stage_dir.is_symlink() or not stage_dir.is_dir() or (stage is not None and stage_dir.name != stage):
            continue
        for folder in stage_dir.iterdir():
            if folder.is_symlink() or not folder.is_dir() or not FINGERPRINT.match(folder.name):
                continue
            out.append(Entry(folder, stage_dir.name, folder.name, folder.stat().st_mtime))
    return sorted(out, key=lambda e: (e.kept_at, e.stage, e.fingerprint))


def inside(path: Path, artifacts: Path) -> bool:
    """Whether ``path`` is a kept entry of ``artifacts``' store: ``<store>/<stage>/<fingerprint>``,
    not a link, and inside the store once every link on the way is resolved."""
    root = store(artifacts)
    path = Path(path)
    return (path.parent.parent == root and FINGERPRINT.match(path.name) is not None and not path.is_symlink()
            and not root.is_symlink() and path.resolve().is_relative_to(Path(artifacts).resolve() / KEPT_DIR))


def remove(path: Path, artifacts: Path) -> None:
    """Delete one kept entry; refuses (ValueError) anything that is not one."""
    if not inside(path, artifacts):
        raise ValueError(f"{path} is not a kept output under {store(artifacts)}: refusing to delete it")
    shutil.rmtree(path)


def _intact(folder: Path, stage: str) -> str | None:
    """The fingerprint of a stage output worth keeping (readable manifest of this stage, every file
    there with its recorded size), else None. The full sha256 check happens when it is restored."""
    if folder.is_symlink() or not (folder / MANIFEST_FILE).is_file():
        return None
    try:
        m = Manifest.load(folder)
    except (ValueError, OSError):
        return None
    if m.stage != stage or not FINGERPRINT.match(m.fingerprint):
        return None
    for f in m.files:
        p = folder / f.path
        if not p.is_file() or p.stat().st_size != f.bytes:
            return None
    return m.fingerprint


def displace(final: Path, artifacts: Path, stage: str, new_fp: str | None, limit: int) -> Path | None:
    """Move the output at ``final`` out of the way: into the store when it is an intact output of
    another fingerprint and ``limit`` > 0 (returns where it went), else to a temporary sibling that
    is deleted (returns None). ``final`` no longer exists afterwards."""
    if not final.exists() and not final.is_symlink():
        return None
    fp = _intact(final, stage) if limit > 0 else None
    links = [p for p in (store(artifacts), store(artifacts) / stage) if p.is_symlink()]
    if fp is not None and fp != new_fp and links:
        log.warning("%s: the previous output is not kept: %s is a link (kept outputs stay inside the artifact root)",
                    stage, links[0])
    elif fp is not None and fp != new_fp:
        dest = kept_path(artifacts, stage, fp)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_symlink():
                dest.unlink()
            elif dest.exists():
                shutil.rmtree(dest)
            os.replace(final, dest)
        except OSError as exc:  # e.g. another filesystem (a mounted stage folder): not kept
            log.warning("%s: could not keep the previous output (%s); it is replaced", stage, exc)
        else:
            now = time.time()
            os.utime(dest, (now, now))  # kept_at: the store's age order
            log.info("%s: kept the previous output %s in %s", stage, fp[:12], dest.parent)
            prune(artifacts, stage, limit)
            return dest
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    os.replace(final, old)
    shutil.rmtree(old, ignore_errors=True)
    prune(artifacts, stage, limit)  # e.g. after runtime.keep_outputs was lowered to 0
    return None


def prune(artifacts: Path, stage: str, keep_last: int) -> list[Entry]:
    """Delete all but the ``keep_last`` most recently kept outputs of ``stage``; returns the deleted."""
    found = entries(artifacts, stage)
    gone = found[: max(0, len(found) - keep_last)]
    for e in gone:
        remove(e.path, artifacts)
        log.info("%s: deleted the kept output %s (runtime.keep_outputs: %d)", stage, e.fingerprint[:12], keep_last)
    return gone


def take(src: Path, final: Path, artifacts: Path, stage: str, limit: int) -> None:
    """Swap the kept output ``src`` in as the current output ``final`` (the current one is kept)."""
    fp = src.name
    staged = final.parent / f".tmp-{final.name}-{os.getpid()}"  # out of the store: pruning cannot take it
    if staged.exists():
        shutil.rmtree(staged)
    os.replace(src, staged)
    displace(final, artifacts, stage, fp, limit)
    os.replace(staged, final)
    try:
        src.parent.rmdir()  # the stage's store, when now empty
    except OSError:
        pass
