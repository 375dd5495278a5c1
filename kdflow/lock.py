"""One writer per project: the lock every writing command takes, and the cleanup it allows.

``project_lock(root)`` holds a POSIX record lock (``fcntl.lockf``) on ``<root>/.kdflow/lock`` and
writes who holds it (pid, host, command, start time) into the file. The kernel releases the lock
when its process dies, however it dies, and a forked child (a DataLoader or Dask worker) does not
inherit it, so a killed run never leaves a lock that blocks the next one; a holder record left by
a dead process is reported as stale and replaced. A second process gets ``ProjectLockedError``
naming the holder, or waits for it (``wait=True``). The lock is re-entrant within a process.

Under the lock, ``clean_stale_temps`` removes the temporary folders (``.tmp-<stage>-<pid>``,
``.old-<stage>-<pid>``) and files (``.<name>.tmp-<pid>``) that killed runs left in the artifact
root: no other kdflow process can be writing them, and their pid is no longer running.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from kdflow.errors import KdflowError

log = logging.getLogger(__name__)

LOCK_FILE = Path(".kdflow") / "lock"
TEMP_PATTERN = re.compile(r"^\.(?:tmp|old)-.+-(\d+)$|^\..+\.tmp-(\d+)$")

_held: dict[Path, int] = {}  # lock file -> re-entrant depth, in this process


class ProjectLockedError(KdflowError):
    """Another kdflow process is writing in this project."""


@dataclass(frozen=True)
class Holder:
    """Who holds a project lock."""

    pid: int
    host: str
    command: str
    started: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, `{self.command}`, since {self.started}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def read_holder(root: Path) -> Holder | None:
    """The holder recorded in ``root``'s lock file (None when free or unreadable).

    Do not call it from the process that holds the lock: closing any descriptor of the file
    releases a POSIX lock.
    """
    try:
        doc = json.loads((Path(root) / LOCK_FILE).read_text() or "null")
        return Holder(**doc) if isinstance(doc, dict) else None
    except (OSError, ValueError, TypeError):
        return None


def _me(command: str) -> Holder:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return Holder(pid=os.getpid(), host=socket.gethostname(), command=command, started=started)


def _write(fd: int, holder: Holder | None) -> None:
    os.ftruncate(fd, 0)
    if holder is not None:
        os.pwrite(fd, (json.dumps(asdict(holder)) + "\n").encode(), 0)


def _previous(fd: int) -> Holder | None:
    try:
        doc = json.loads(os.pread(fd, 1 << 16, 0).decode() or "null")
        return Holder(**doc) if isinstance(doc, dict) else None
    except (ValueError, TypeError, UnicodeDecodeError):
        return None


def _try_lock(fd: int) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:  # EAGAIN / EACCES: held by another process
        return False


@contextmanager
def project_lock(root: Path, command: str | None = None, *, wait: bool = False, poll: float = 0.5,
                 on_wait: Callable[[Holder | None], None] | None = None) -> Iterator[Path]:
    """Hold ``root``'s project lock for the duration of the block.

    Args:
        command: what the holder runs (recorded for others' messages); default ``sys.argv``.
        wait: block until the lock is free instead of raising ``ProjectLockedError``.
        on_wait: called once with the current holder when ``wait`` has to wait.
    """
    path = (Path(root) / LOCK_FILE).resolve()
    if path in _held:
        _held[path] += 1
        try:
            yield path
        finally:
            _held[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(fd):
            holder = read_holder(root)
            who = holder.describe() if holder else "a process that has not recorded itself yet"
            if not wait:
                raise ProjectLockedError(
                    f"another kdflow process is writing in {Path(root).resolve()}: {who} (lock {path}). "
                    "Wait for it to finish, or pass --wait to queue behind it.")
            if on_wait is not None:
                on_wait(holder)
            log.info("waiting for the project lock held by %s", who)
            while not _try_lock(fd):
                time.sleep(poll)
        stale = _previous(fd)
        if stale is not None:
            state = "no longer running" if stale.host == socket.gethostname() and not pid_alive(stale.pid) else "ended"
            log.warning("took over the project lock left by %s (%s)", stale.describe(), state)
        _write(fd, _me(command or " ".join(["kdflow", *sys.argv[1:]])))
        _held[path] = 1
        try:
            yield path
        finally:
            del _held[path]
            _write(fd, None)
            fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def holds_lock(root: Path) -> bool:
    """Whether this process holds ``root``'s project lock."""
    return (Path(root) / LOCK_FILE).resolve() in _held


def clean_stale_temps(directory: Path) -> list[Path]:
    """Remove the temporary folders and files of dead processes under ``directory`` (recursively
    through its stage folders and ``.work``), returns what was removed. Call it holding the lock."""
    removed: list[Path] = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for path in sorted(directory.rglob(".*")):
        m = TEMP_PATTERN.match(path.name)
        if m is None or not path.exists():
            continue
        pid = int(m.group(1) or m.group(2))
        if pid == os.getpid() or pid_alive(pid):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("removed %d temporary file(s)/folder(s) left by killed runs under %s", len(removed), directory)
    return removed
