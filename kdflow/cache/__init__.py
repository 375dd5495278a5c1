"""The teacher-logit cache: formats, writer, memory-mapped reader, fidelity, views and replay."""
from __future__ import annotations

from kdflow.cache.fidelity import fidelity, size_metrics
from kdflow.cache.formats import FORMATS, decode_to_batch, encode, narrowest_uint
from kdflow.cache.reader import CacheReader
from kdflow.cache.store import CACHE_VERSION, INFO_FILE, cache_key, link_cache
from kdflow.cache.tokens import encode_sequences, flatten_tokens, mask_from_lengths
from kdflow.cache.writer import CacheBuild, CacheSpec, build_cache, write_cache, write_shard
from kdflow.cache.combine import COMBINES, combine
from kdflow.cache.views import VIEWS_FILE, load_views, view_choice, write_views
from kdflow.cache.replay import CachedBatches

__all__ = [
    "CACHE_VERSION",
    "COMBINES",
    "VIEWS_FILE",
    "CacheBuild",
    "CachedBatches",
    "combine",
    "load_views",
    "view_choice",
    "write_shard",
    "write_views",
    "FORMATS",
    "INFO_FILE",
    "CacheReader",
    "CacheSpec",
    "build_cache",
    "cache_key",
    "decode_to_batch",
    "encode",
    "encode_sequences",
    "fidelity",
    "link_cache",
    "flatten_tokens",
    "mask_from_lengths",
    "narrowest_uint",
    "size_metrics",
    "write_cache",
]
