"""The on-disk layout of a cache: ``cache.json`` plus safetensors shards, and their checks."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from kdflow.errors import CacheCorruptError

INFO_FILE = "cache.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
CACHE_VERSION = 2  # bump when the bytes an encoder writes change; part of the cache key


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def replace_atomically(tmp: Path, final: Path) -> None:
    """fsync ``tmp`` then rename it over ``final`` (with the umask's default mode: safetensors
    writes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
        os.fchmod(fh.fileno(), 0o666 & ~umask)
    os.replace(tmp, final)


def save_info(directory: Path, info: dict) -> None:
    """Write ``cache.json`` atomically."""
    tmp = directory / f".{INFO_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    replace_atomically(tmp, directory / INFO_FILE)


def corrupt(path: Path, why: str) -> CacheCorruptError:
    return CacheCorruptError(f"{path}: cache {why}; rerun the logits stage")


def load_info(directory: Path) -> dict:
    """The parsed ``cache.json`` of ``directory``.

    Raises:
        CacheCorruptError: missing or unreadable.
    """
    path = Path(directory) / INFO_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise corrupt(path, "info is missing") from None
    except (OSError, json.JSONDecodeError) as err:
        raise corrupt(path, f"info is unreadable ({err})") from None


def shard_problem(directory: Path, shard: dict, what: str = "shard") -> str | None:
    """Why the file recorded as ``shard`` (a ``cache.json`` entry with ``file``, ``bytes`` and
    ``sha256``: a shard, or the views table) is unusable; None if intact."""
    path = Path(directory) / shard["file"]
    if not path.is_file():
        return f"{what} {shard['file']} is missing"
    size = path.stat().st_size
    if size != shard["bytes"]:
        return (f"{what} {shard['file']} has {size} bytes, expected {shard['bytes']} "
                "(truncated or altered)")
    if sha256_file(path) != shard["sha256"]:
        return f"{what} {shard['file']} fails its sha256 (corrupt or altered)"
    return None


def cache_key(teacher: str, data: str, transform: dict, spec: dict) -> str:
    """sha256 naming a cache's contents: teacher and dataset fingerprints, the input transform
    and the format parameters (plus ``CACHE_VERSION``); changing any of them makes a new cache."""
    doc = {"version": CACHE_VERSION, "teacher": teacher, "data": data, "transform": transform,
           "spec": spec}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def link_cache(source: Path, target: Path, info: dict) -> None:
    """Place the shards (and views table) of ``info`` and ``cache.json`` from ``source`` into
    ``target``.

    Shards are hard-linked (no extra disk) where the file system allows, else copied. Writers
    never modify a shard in place (they rename a new file over it); an in-place change made by
    anyone else shows up in both folders and fails the shard's sha256. ``cache.json`` is copied.
    """
    target.mkdir(parents=True, exist_ok=True)
    for shard in info["shards"] + ([info["views"]] if info.get("views") else []):
        src, dst = Path(source) / shard["file"], Path(target) / shard["file"]
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    shutil.copy2(Path(source) / INFO_FILE, Path(target) / INFO_FILE)
