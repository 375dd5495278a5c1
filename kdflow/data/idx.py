"""Reader and writer for the IDX format of the MNIST files (optionally gzipped).

Layout (big-endian): two zero bytes, a dtype code, the number of dims, one ``uint32`` per dim,
then the data in C order.
"""
from __future__ import annotations

import gzip
import io
import math
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from kdflow.errors import DataError

DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
CODES = {dt.newbyteorder("=").kind + str(dt.itemsize): code for code, dt in DTYPES.items()}
GZIP_MAGIC = b"\x1f\x8b"


def _open(path: Path) -> BinaryIO:
    with open(path, "rb") as fh:
        head = fh.read(2)
    return gzip.open(path, "rb") if head == GZIP_MAGIC else open(path, "rb")


CHUNK = 64 * 2**20  # bytes read at a time: a header's claimed size is never allocated up front


def _open_size(path: Path) -> int | None:
    """The size of an uncompressed file (None for gzip: only reading tells)."""
    with open(path, "rb") as fh:
        return None if fh.read(2) == GZIP_MAGIC else path.stat().st_size


def _read_exact(fh: BinaryIO, nbytes: int, path: Path, what: str) -> bytes:
    """``nbytes`` bytes, read in chunks so that a header claiming more than the file holds
    (dims of 4e9) is a truncation error, not an OverflowError or MemoryError."""
    parts, got = [], 0
    while got < nbytes:
        part = fh.read(min(CHUNK, nbytes - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
    data = b"".join(parts)
    if len(data) != nbytes:
        raise DataError(
            f"{path}: truncated IDX file: expected {nbytes} bytes of {what}, got {len(data)}; "
            "re-download or re-extract the file"
        )
    return data


def read_idx(path: Path, limit: int | None = None) -> np.ndarray:
    """Read an IDX file (raw or gzipped) into a native-endian array.

    Args:
        path: the file.
        limit: read only the first ``limit`` entries along the first axis.

    Raises:
        DataError: missing file, bad magic number, unknown dtype code or truncated data.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: IDX file not found")
    try:
        with _open(path) as fh:
            magic = _read_exact(fh, 4, path, "magic number")
            if magic[:2] != b"\x00\x00" or magic[2] not in DTYPES or magic[3] == 0:
                raise DataError(
                    f"{path}: not an IDX file (magic number {magic.hex()}; expected "
                    f"0000<dtype><ndim> with dtype code in {[hex(c) for c in DTYPES]})"
                )
            dtype, ndim = DTYPES[magic[2]], magic[3]
            dims = [int(d) for d in np.frombuffer(_read_exact(fh, 4 * ndim, path, "dims"), ">u4")]
            rows = dims[0] if limit is None else min(dims[0], limit)
            count = rows * math.prod(dims[1:])  # Python ints: no overflow
            nbytes = count * dtype.itemsize
            if _open_size(path) is not None and 4 + 4 * ndim + nbytes > _open_size(path):
                raise DataError(f"{path}: truncated or corrupt IDX file: its header claims shape {dims} "
                                f"({nbytes:,} bytes of data) but the file has {_open_size(path):,} bytes")
            data = _read_exact(fh, nbytes, path, f"data for shape {dims}")
            if limit is None and fh.read(1):
                raise DataError(f"{path}: IDX file has trailing bytes after shape {dims}")
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"{path}: cannot read IDX file ({err}); is the gzip file complete?"
        ) from None
    arr = np.frombuffer(data, dtype=dtype).reshape([rows, *dims[1:]])
    return arr.astype(dtype.newbyteorder("="))


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file, gzipped when ``path`` ends with ``.gz``."""
    path = Path(path)
    array = np.asarray(array)
    key = array.dtype.kind + str(array.dtype.itemsize)
    if key not in CODES:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    code = CODES[key]
    buf = io.BytesIO()
    buf.write(bytes([0, 0, code, array.ndim]))
    buf.write(np.asarray(array.shape, dtype=">u4").tobytes())
    buf.write(np.ascontiguousarray(array, dtype=DTYPES[code]).tobytes())
    raw = buf.getvalue()
    path.write_bytes(gzip.compress(raw, mtime=0) if path.suffix == ".gz" else raw)
    return path
