"""Memory-mapped reads of a logit cache written by ``write_cache``."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kdflow.cache.formats import decode_to_batch
from kdflow.cache.writer import INFO_FILE
from kdflow.errors import CacheCorruptError

KEYS = {"dense": ("values",), "topk": ("values", "indices", "tail")}


def _corrupt(path: Path, why: str) -> CacheCorruptError:
    return CacheCorruptError(f"{path}: cache {why}; rerun the logits stage")


class CacheReader:
    """Random access to cached teacher signal by global row index.

    Shards are opened lazily with ``safe_open(..., framework="pt")``: their tensors are views of
    memory-mapped files, so ``get`` only touches the pages of the requested rows.

    Args:
        directory: the cache folder.
        info: the cache info (``write_cache``'s return value); read from ``cache.json`` if None.
    """

    def __init__(self, directory: Path, info: dict | None = None) -> None:
        self.directory = Path(directory)
        if info is None:
            path = self.directory / INFO_FILE
            try:
                info = json.loads(path.read_text())
            except FileNotFoundError:
                raise _corrupt(path, "info is missing") from None
            except (OSError, json.JSONDecodeError) as err:
                raise _corrupt(path, f"info is unreadable ({err})") from None
        self.info = info
        self.format: str = info["format"]
        self.num_classes: int = int(info["num_classes"])
        self._starts = torch.tensor([s["rows"][0] for s in info["shards"]], dtype=torch.long)
        self._open: dict[int, tuple[object, dict[str, torch.Tensor]]] = {}

    def __len__(self) -> int:
        return int(self.info["num_rows"])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}  # file handles do not pickle (DataLoader workers)

    def verify(self) -> None:
        """Check that every shard exists with its recorded size and sha256.

        Raises:
            CacheCorruptError: naming the first missing, truncated or altered shard.
        """
        for shard in self.info["shards"]:
            path = self.directory / shard["file"]
            if not path.is_file():
                raise _corrupt(path, f"shard {shard['file']} is missing")
            size = path.stat().st_size
            if size != shard["bytes"]:
                raise _corrupt(
                    path, f"shard {shard['file']} has {size} bytes, expected {shard['bytes']} "
                    "(truncated or altered)"
                )
            with open(path, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            if digest != shard["sha256"]:
                raise _corrupt(path, f"shard {shard['file']} fails its sha256 (corrupt or altered)")

    def _shard(self, number: int) -> dict[str, torch.Tensor]:
        """The stored tensors of one shard (memory-mapped), opened on first use."""
        if number not in self._open:
            shard = self.info["shards"][number]
            path = self.directory / shard["file"]
            if not path.is_file():
                raise _corrupt(path, f"shard {shard['file']} is missing")
            try:
                handle = safe_open(str(path), framework="pt")
                tensors = {key: handle.get_tensor(key) for key in KEYS[self.format]}
            except (SafetensorError, OSError, KeyError, RuntimeError) as err:
                raise _corrupt(path, f"shard {shard['file']} cannot be read ({err})") from None
            rows = shard["rows"][1] - shard["rows"][0]
            bad = {k: tuple(v.shape) for k, v in tensors.items() if v.shape[0] != rows}
            if bad:
                raise _corrupt(path, f"shard {shard['file']} should hold {rows} rows, has {bad}")
            self._open[number] = (handle, tensors)
        return self._open[number][1]

    def get(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss batch keys (see ``decode_to_batch``) for global row ``indices`` ``[B]``."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if not self.info["shards"]:
            raise IndexError("the cache is empty")
        if idx.numel() and (idx.min() < 0 or idx.max() >= len(self)):
            lo, hi = int(idx.min()), int(idx.max())
            raise IndexError(f"cache row index out of range [0, {len(self)}): {lo}..{hi}")
        shard_of = torch.searchsorted(self._starts, idx, right=True) - 1  # [B]
        positions, pieces = [], []
        for number in shard_of.unique().tolist() or [0]:
            tensors = self._shard(number)
            where = (shard_of == number).nonzero().flatten()
            local = idx[where] - self._starts[number]
            positions.append(where)
            pieces.append({key: value[local] for key, value in tensors.items()})
        order = torch.cat(positions).argsort()  # undo the grouping (uint16 has no index_put)
        return decode_to_batch({k: torch.cat([p[k] for p in pieces])[order] for k in pieces[0]})

    def load_all(self) -> dict[str, torch.Tensor]:
        """Every row, in order, in the loss batch keys."""
        parts = [self._shard(i) for i in range(len(self.info["shards"]))]
        if not parts:
            raise IndexError("the cache is empty")
        return decode_to_batch({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
