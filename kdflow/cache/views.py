"""The views table of an augmentation-aware cache: ``views.safetensors`` next to the shards.

A cache of ``K`` views per sample holds ``N * K`` rows, sample-major (row ``sample * K + view``).
``views.safetensors`` stores, per row, the ``sample``, ``view``, RNG ``seed``, crop ``box`` and
``flip`` (see ``kdflow.data.augment``); ``cache.json`` records it under ``views`` with its size
and sha256, so it is verified like a shard and is part of what a resumed build must match.
The student replays one cached view per sample and epoch (``view_choice``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kdflow.cache.store import corrupt, replace_atomically, sha256_file, shard_problem

VIEWS_FILE = "views.safetensors"
VIEW_KEYS = ("sample", "view", "seed", "box", "flip")


def write_views(directory: Path, table: dict[str, torch.Tensor], *, views: int,
                augment: dict) -> dict:
    """Write the views table atomically; returns the ``cache.json`` ``views`` entry."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{VIEWS_FILE}.tmp-{os.getpid()}"
    save_file({k: table[k].contiguous() for k in VIEW_KEYS}, tmp)
    digest, size = sha256_file(tmp), tmp.stat().st_size
    replace_atomically(tmp, directory / VIEWS_FILE)
    return {"k": int(views), "augment": augment, "file": VIEWS_FILE, "sha256": digest,
            "bytes": size}


def views_problem(directory: Path, entry: dict) -> str | None:
    """Why the views file recorded as ``entry`` is unusable; None if intact."""
    return shard_problem(directory, entry, what="views table")


def load_views(directory: Path, entry: dict, verify: bool = True) -> dict[str, torch.Tensor]:
    """The views table of a cache (``entry`` is ``cache.json``'s ``views``), its size and sha256
    checked first unless ``verify`` is False (the caller already checked them).

    Raises:
        CacheCorruptError: naming the file when it is missing, altered or malformed.
    """
    path = Path(directory) / entry["file"]
    problem = views_problem(directory, entry) if verify else None
    if problem is not None:
        raise corrupt(path, problem)
    table = load_file(path)
    if sorted(table) != sorted(VIEW_KEYS):
        raise corrupt(path, f"views table has keys {sorted(table)}, expected {sorted(VIEW_KEYS)}")
    return table


def view_choice(seed: int, epoch: int, num_samples: int, views: int) -> torch.Tensor:
    """The cached view each sample replays in ``epoch``, ``[num_samples]`` int64 in
    ``[0, views)``; a function of ``(seed, epoch)`` only, so resumed runs replay the same."""
    state = np.random.SeedSequence([seed % 2**64, epoch, 0x76696577]).generate_state(1, np.uint64)
    gen = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
    return torch.randint(views, (num_samples,), generator=gen)
