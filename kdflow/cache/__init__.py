"""The teacher-logit cache: formats, writer, memory-mapped reader and fidelity."""
from __future__ import annotations

from kdflow.cache.formats import FORMATS, decode_to_batch, encode, fidelity, narrowest_uint
from kdflow.cache.reader import CacheReader
from kdflow.cache.writer import INFO_FILE, write_cache

__all__ = [
    "FORMATS",
    "INFO_FILE",
    "CacheReader",
    "decode_to_batch",
    "encode",
    "fidelity",
    "narrowest_uint",
    "write_cache",
]
