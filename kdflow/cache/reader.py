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
                raise CacheCorruptError(f"{path}: cache info missing; rerun the logits stage") from None
            except (OSError, json.JSONDecodeError) as err:
                raise CacheCorruptError(f"{path}: cache info unreadable ({err}); rerun the logits stage") from None
        self.info = info
        self.format: str = info["format"]
        self.num_classes: int = int(info["num_classes"])
        self._starts = torch.tensor([s["rows"][0] for s in info["shards"]], dtype=torch.long)
        self._open: dict[int, tuple[object, dict[str, torch.Tensor]]] = {}

    def __len__(self) -> int:
        return int(self.info["num_rows"])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}  # file handles do not pickle (DataLoader workers)

    def _path(self, shard: dict) -> Path:
        return self.directory / shard["file"]

    def verify(self) -> None:
        """Check that every shard exists with its recorded size and sha256.

        Raises:
            CacheCorruptError: naming the first missing, truncated or altered shard.
        """
        for shard in self.info["shards"]:
            path = self._path(shard)
            if not path.is_file():
                raise CacheCorruptError(f"{path}: cache shard {shard['file']} is missing; rerun the logits stage")
            size = path.stat().st_size
            if size != shard["bytes"]:
                raise CacheCorruptError(
                    f"{path}: cache shard {shard['file']} has {size} bytes, expected {shard['bytes']} "
                    "(truncated or altered); rerun the logits stage"
                )
            with open(path, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            if digest != shard["sha256"]:
                raise CacheCorruptError(
                    f"{path}: cache shard {shard['file']} fails its sha256 (corrupt or altered); "
                    "rerun the logits stage"
                )

    def _shard(self, number: int) -> dict[str, torch.Tensor]:
        if number not in self._open:
            shard = self.info["shards"][number]
            path = self._path(shard)
            if not path.is_file():
                raise CacheCorruptError(f"{path}: cache shard {shard['file']} is missing; rerun the logits stage")
            try:
                handle = safe_open(str(path), framework="pt")
                tensors = {key: handle.get_tensor(key) for key in KEYS[self.format]}
            except (SafetensorError, OSError, KeyError, RuntimeError) as err:
                raise CacheCorruptError(
                    f"{path}: cache shard {shard['file']} cannot be read ({err}); rerun the logits stage"
                ) from None
            rows = shard["rows"][1] - shard["rows"][0]
            bad = {k: tuple(v.shape) for k, v in tensors.items() if v.shape[0] != rows}
            if bad:
                raise CacheCorruptError(f"{path}: cache shard {shard['file']} expected {rows} rows, got {bad}")
            self._open[number] = (handle, tensors)
        return self._open[number][1]

    def get(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss batch keys (see ``decode_to_batch``) for global row ``indices`` ``[B]``."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"cache row index out of range [0, {len(self)}): {idx.min()}..{idx.max()}")
        if not self.info["shards"]:
            raise IndexError("the cache is empty")
        shard_of = torch.searchsorted(self._starts, idx, right=True) - 1  # [B]
        out: dict[str, torch.Tensor] = {}
        for number in shard_of.unique().tolist() or [0]:
            tensors = self._shard(number)
            if not out:
                out = {k: torch.empty((len(idx), *v.shape[1:]), dtype=v.dtype) for k, v in tensors.items()}
            mask = shard_of == number
            local = idx[mask] - self._starts[number]
            for key, value in tensors.items():
                out[key][mask] = value[local]
        return decode_to_batch(out)

    def load_all(self) -> dict[str, torch.Tensor]:
        """Every row, in order, in the loss batch keys."""
        parts = [self._shard(i) for i in range(len(self.info["shards"]))]
        if not parts:
            raise IndexError("the cache is empty")
        return decode_to_batch({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
