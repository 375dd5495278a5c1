"""Memory-mapped reads of a logit cache written by ``write_cache`` or ``build_cache``."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kdflow.cache.formats import FORMATS, Stored, cat_stored, decode_to_batch
from kdflow.cache.store import INFO_FILE, corrupt, load_info, shard_problem
from kdflow.cache.views import load_views, views_problem


class CacheReader:
    """Access to cached teacher signal by global row index, or streamed in row order.

    Shards are opened lazily with ``safe_open(..., framework="pt")``: their tensors are views of
    memory-mapped files, so ``get`` and ``iter_batches`` only touch the pages of the rows they
    return. Rows come back as the loss batch keys of ``decode_to_batch``.

    Args:
        directory: the cache folder.
        info: the cache info (``write_cache``'s return value); read from ``cache.json`` if None.

    Raises:
        CacheCorruptError: ``cache.json`` is missing or unreadable, or the build that wrote it
            did not finish.
    """

    def __init__(self, directory: Path, info: dict | None = None) -> None:
        self.directory = Path(directory)
        self.info = load_info(self.directory) if info is None else info
        if self.info.get("complete") is False:
            raise corrupt(self.directory / INFO_FILE, "build did not finish (interrupted)")
        self.format: str = self.info["format"]
        self.num_classes: int = int(self.info["num_classes"])
        self.seq_len: int | None = self.info.get("seq_len")
        fmt = FORMATS.get(self.format)
        self.keys = fmt.keys + (("lengths",) if self.seq_len else ())
        self.shard_keys = fmt.shard_keys  # whole-shard tensors: decoded shard by shard
        self._starts = torch.tensor([s["rows"][0] for s in self.info["shards"]], dtype=torch.long)
        self._open: dict[int, tuple[object, Stored]] = {}
        self._verified = False  # set by verify(): views() then skips re-hashing the views table

    def __len__(self) -> int:
        return int(self.info["num_rows"])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}  # file handles do not pickle (DataLoader workers)

    def verify_shard(self, number: int) -> None:
        """Check one shard's presence, size and sha256 (reads the whole file).

        Raises:
            CacheCorruptError: naming the shard.
        """
        shard = self.info["shards"][number]
        problem = shard_problem(self.directory, shard)
        if problem is not None:
            raise corrupt(self.directory / shard["file"], problem)

    def verify(self) -> None:
        """Check that every shard (and the views table) exists with its recorded size and sha256.

        Raises:
            CacheCorruptError: naming the first missing, truncated or altered file.
        """
        self._verified = False
        for number in range(len(self.info["shards"])):
            self.verify_shard(number)
        entry = self.info.get("views")
        if entry is not None and (problem := views_problem(self.directory, entry)) is not None:
            raise corrupt(self.directory / entry["file"], problem)
        self._verified = True

    @property
    def num_views(self) -> int:
        """Cached views per sample (rows are ``sample * num_views + view``); 1 without views."""
        return int(self.info["views"]["k"]) if self.info.get("views") else 1

    def views(self) -> dict[str, torch.Tensor] | None:
        """The verified views table (``kdflow.cache.views``), or None for a cache without views;
        hashed here unless ``verify()`` already checked it."""
        entry = self.info.get("views")
        return None if entry is None else load_views(self.directory, entry, verify=not self._verified)

    @property
    def nbytes(self) -> int:
        """Bytes of the shards on disk."""
        return int(self.info.get("bytes_total", sum(s["bytes"] for s in self.info["shards"])))

    def _shard(self, number: int) -> Stored:
        """The stored tensors of one shard (memory-mapped), opened on first use."""
        if number not in self._open:
            shard = self.info["shards"][number]
            path = self.directory / shard["file"]
            if not path.is_file():
                raise corrupt(path, f"shard {shard['file']} is missing")
            try:
                handle = safe_open(str(path), framework="pt")
                tensors = {key: handle.get_tensor(key) for key in self.keys}
            except (SafetensorError, OSError, KeyError, RuntimeError) as err:
                raise corrupt(path, f"shard {shard['file']} cannot be read ({err})") from None
            rows = shard["rows"][1] - shard["rows"][0]
            bad = {k: tuple(v.shape) for k, v in tensors.items()
                   if k not in self.shard_keys and v.shape[0] != rows}
            if bad:
                raise corrupt(path, f"shard {shard['file']} should hold {rows} rows, has {bad}")
            self._open[number] = (handle, tensors)
        return self._open[number][1]

    def _decode(self, stored: Stored) -> dict[str, torch.Tensor]:
        return decode_to_batch(stored, self.format)

    def _rows_of(self, tensors: Stored, rows: slice | torch.Tensor) -> Stored:
        """Rows of one shard's stored tensors (shard-wide keys whole)."""
        return {k: (v if k in self.shard_keys else v[rows]) for k, v in tensors.items()}

    def _decode_pieces(self, pieces: list[Stored]) -> dict[str, torch.Tensor]:
        """Decode consecutive pieces of rows: joined first, or one by one when the format has
        shard-wide keys (each piece from one shard), then joined."""
        if not self.shard_keys:
            return self._decode(cat_stored(pieces))
        decoded = [self._decode(p) for p in pieces]
        return {k: torch.cat([d[k] for d in decoded]) for k in decoded[0]}

    def get(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss batch keys for global row ``indices`` ``[B]``."""
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
            pieces.append(self._rows_of(tensors, local))
        order = torch.cat(positions).argsort()  # undo the grouping (uint16 has no index_put)
        if self.shard_keys:
            return {k: v[order] for k, v in self._decode_pieces(pieces).items()}
        return self._decode({k: v[order] for k, v in cat_stored(pieces).items()})

    def load_all(self) -> dict[str, torch.Tensor]:
        """Every row, in order, in the loss batch keys (all in memory: see ``iter_batches``)."""
        parts = [self._shard(i) for i in range(len(self.info["shards"]))]
        if not parts:
            raise IndexError("the cache is empty")
        return self._decode_pieces(parts)

    def iter_batches(self, batch_size: int, *, verify: bool = True
                     ) -> Iterator[dict[str, torch.Tensor]]:
        """Stream every row in order, ``batch_size`` rows at a time (the last may be shorter).

        Holds one shard open at a time and copies only the rows of the current batch, so a
        cache larger than RAM streams through.

        Args:
            verify: check each shard's sha256 just before its first row is used.

        Raises:
            CacheCorruptError: naming a shard that fails ``verify_shard`` or cannot be read.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pending: list[Stored] = []
        pending_rows = 0
        for number in range(len(self.info["shards"])):
            if verify:
                self.verify_shard(number)
            tensors = self._shard(number)
            rows = self.info["shards"][number]["rows"][1] - self.info["shards"][number]["rows"][0]
            start = 0
            while start < rows:
                take = min(batch_size - pending_rows, rows - start)
                pending.append(self._rows_of(tensors, slice(start, start + take)))
                pending_rows += take
                start += take
                if pending_rows == batch_size:
                    yield self._decode_pieces(pending)
                    pending, pending_rows = [], 0
            self._open.pop(number, None)  # the last views keep its mapping alive until used
        if pending:
            yield self._decode_pieces(pending)
