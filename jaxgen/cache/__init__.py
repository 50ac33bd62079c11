"""KV caches: the protocol a forward chunk meets (`plan` / `written`) and the dense cache with
per-row lengths. A paged cache is a second implementation of the same two functions."""
from jaxgen.cache.dense import (CacheAccess, ChunkPlan, KVCache, access, init_cache, place_rows, plan,  # noqa: F401
                                read, slice_rows, stack_cache, truncate, unstack_cache, with_lengths, write_at, written)
