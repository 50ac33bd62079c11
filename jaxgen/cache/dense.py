"""Dense KV cache with per-row lengths, and how a forward chunk meets it.

Slot s holds the token at position s (layout coordinates = positions), so a cached key is
masked by the same layout rule as a fresh one. `lengths[b]` is the number of filled slots of
row b: rows of different lengths share a batch (ragged prompts, rows that accept different
numbers of draft tokens). Keys are stored after RoPE, laid out [B, K, S, D] per layer so
attention reads them without a transpose copy.

The cache owns its writes: `model.forward` asks `plan(...)` for the keys and values each layer
attends over and never switches on cache modes itself. Three ways to meet a chunk:

- `cache` (append): write the chunk at slots [lengths[b], lengths[b] + L) and attend over the
  filled slots;
- `write_at(cache, start, keep_BL=None)`: write at `start` (scalar or [B]), overwriting filled
  slots in place (Fast-dLLM's dual cache, WeDLM's window); with `keep_BL`, chunk positions keep
  the K/V already cached there (dKV-Cache's delayed caching);
- `read(cache)`: attend over the filled slots plus the chunk, write nothing (denoising steps).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxgen.errors import JaxgenError


@flax.struct.dataclass
class KVCache:
    k: jax.Array | list  # [N, B, K, S, D] stacked over layers, or a list of N [B, K, S, D] buffers
    v: jax.Array | list
    lengths: jax.Array  # int32 [B]: row b has filled slots [0, lengths[b])

    @property
    def unstacked(self) -> bool:
        return isinstance(self.k, (list, tuple))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2] if self.unstacked else self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0] if self.unstacked else self.k.shape[1]


@flax.struct.dataclass
class CacheAccess:
    """A cache plus how the next forward's chunk meets it (see the module docstring)."""
    cache: KVCache
    start: jax.Array  # int32 [] or [B]: first slot written (write) / filled slots (read)
    keep_BL: jax.Array | None = None
    write: bool = flax.struct.field(pytree_node=False, default=True)


def init_cache(cfg, batch: int, max_len: int | None = None, dtype=None, per_layer: bool = False) -> KVCache:
    """An empty cache for `batch` rows and `max_len` slots (default: the model's maximum);
    `per_layer` gives one buffer per layer (the form decode loops carry, see `unstack_cache`)."""
    max_len = cfg.max_seq_len if max_len is None else max_len
    if max_len > cfg.max_seq_len:
        raise JaxgenError(f"cache max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    if per_layer:
        zeros = lambda: [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)]
    else:
        zeros = lambda: jnp.zeros((cfg.num_layers, *shape), dtype)
    return KVCache(zeros(), zeros(), jnp.zeros((batch,), jnp.int32))


def unstack_cache(cache: KVCache) -> KVCache:
    """One buffer per layer. Decode loops carry this form: a write then updates its own layer's
    buffer in place instead of a slice of the stacked array (measured on XLA CPU: see
    `jaxgen.model.decode_params`, the params form that goes with it)."""
    if cache.unstacked:
        return cache
    return cache.replace(k=list(cache.k), v=list(cache.v))


def stack_cache(cache: KVCache) -> KVCache:
    """The stacked [N, B, K, S, D] form (for scans and checkpoints)."""
    if not cache.unstacked:
        return cache
    return cache.replace(k=jnp.stack(cache.k), v=jnp.stack(cache.v))


def truncate(cache: KVCache, length) -> KVCache:
    """Forget slots >= length (scalar or [B]); they are masked out and overwritten later."""
    return cache.replace(lengths=jnp.minimum(cache.lengths, jnp.asarray(length, jnp.int32)))


def with_lengths(cache: KVCache, lengths) -> KVCache:
    """The cache with row lengths set to `lengths` (scalar or [B]): slots below are trusted."""
    return cache.replace(lengths=jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), cache.lengths.shape))


def gather_slots(cache: KVCache, start, src_BW) -> KVCache:
    """Each row's slots [start, start + W) take the K/V of slots start + src_BW[b, w] (0 <= src <
    W, start scalar or [B]): moves an accepted draft-tree path, scattered over a verify chunk,
    into contiguous slots (speculative decoding). Lengths are unchanged."""
    start = jnp.asarray(start, jnp.int32)
    src_BW = jnp.asarray(src_BW, jnp.int32)
    W = src_BW.shape[1]

    def move(buf_BKSD):
        window = _take(buf_BKSD, start, W)
        moved = jnp.take_along_axis(window, src_BW[:, None, :, None], axis=2)
        return _put(buf_BKSD, moved, start)

    layers = (lambda buf: [move(b) for b in buf]) if cache.unstacked else jax.vmap(move)
    return cache.replace(k=layers(cache.k), v=layers(cache.v))


def read(cache: KVCache) -> CacheAccess:
    return CacheAccess(cache, cache.lengths, None, write=False)


def write_at(cache: KVCache, start, keep_BL=None) -> CacheAccess:
    return CacheAccess(cache, jnp.asarray(start, jnp.int32), keep_BL, write=True)


def access(cache) -> CacheAccess:
    """A bare cache appends at its per-row lengths."""
    return cache if isinstance(cache, CacheAccess) else CacheAccess(cache, cache.lengths, None, write=True)


def _to_cache(x_BLKD, cache_BKSD):
    """A chunk's K or V in the cache's [B, K, S, D] layout and dtype."""
    return x_BLKD.transpose(0, 2, 1, 3).astype(cache_BKSD.dtype)


def _from_cache(cache_BKSD, dtype):
    """The cache in the attention door's [B, S, K, D] view. The cache keeps heads before slots so
    attention's (batch, head) contraction reads it without a copy: XLA folds this transpose into
    the dot (a [B, S, K, D] cache cost one full copy per layer per decode step on CPU)."""
    return cache_BKSD.transpose(0, 2, 1, 3).astype(dtype)


def _put(buf_BKSD, chunk_BKLD, start, layer=None):
    """Write the chunk at slot `start` (scalar: one in-place slice; [B]: per row). With `layer`,
    `buf` is the stacked [N, B, K, S, D] cache and the chunk goes into that layer only."""
    if layer is not None:
        if start.ndim == 0:
            return jax.lax.dynamic_update_slice(buf_BKSD, chunk_BKLD[None], (layer, 0, 0, start, 0))
        put_row = lambda b, c, s: jax.lax.dynamic_update_slice(b, c[None], (layer, 0, s, 0))
        return jax.vmap(put_row, in_axes=(1, 0, 0), out_axes=1)(buf_BKSD, chunk_BKLD, start)
    if start.ndim == 0:
        return jax.lax.dynamic_update_slice(buf_BKSD, chunk_BKLD, (0, 0, start, 0))
    return jax.vmap(lambda b, c, s: jax.lax.dynamic_update_slice(b, c, (0, s, 0)))(buf_BKSD, chunk_BKLD, start)


def _take(buf_BKSD, start, length: int):
    """Slots [start, start + length) (scalar or per-row start)."""
    if start.ndim == 0:
        return jax.lax.dynamic_slice_in_dim(buf_BKSD, start, length, axis=2)
    return jax.vmap(lambda b, s: jax.lax.dynamic_slice_in_dim(b, s, length, axis=1))(buf_BKSD, start)


def slice_rows(x_BT, start, length: int):
    """Columns [start, start + length) of each row (start a scalar: one slice; [B]: per row)."""
    start = jnp.asarray(start, jnp.int32)
    if start.ndim == 0:
        return jax.lax.dynamic_slice_in_dim(x_BT, start, length, axis=1)
    return jax.vmap(lambda r, s: jax.lax.dynamic_slice_in_dim(r, s, length, axis=0))(x_BT, start)


def place_rows(base_BS, chunk_BL, start):
    """`base` with columns [start, start + L) replaced by `chunk` (scalar or per-row start)."""
    start = jnp.asarray(start, jnp.int32)
    if start.ndim == 0:
        return jax.lax.dynamic_update_slice_in_dim(base_BS, chunk_BL, start, axis=1)
    return jax.vmap(lambda b, c, s: jax.lax.dynamic_update_slice_in_dim(b, c, s, axis=0))(base_BS, chunk_BL, start)


@flax.struct.dataclass
class ChunkPlan:
    """What each layer of one forward attends over. `kv_idx_BS` / `kv_valid_BS`: the layout
    coordinates and validity of the keys; `layer(k_buf, v_buf, k, v)` -> (keys [B, S, K, D],
    values, new k_buf, new v_buf)."""
    kv_idx_BS: jax.Array
    kv_valid_BS: jax.Array | None
    access: CacheAccess | None = None
    dtype: str = flax.struct.field(pytree_node=False, default="float32")

    def layer(self, k_buf, v_buf, k_BLKD, v_BLKD, layer=None):
        """One layer's keys and values. `layer` (an index, possibly traced): the buffers are the
        whole stacked cache and only that layer's slots are read and written (the scan over
        stacked layers carries the cache and updates it in place)."""
        if self.access is None:  # no cache: the chunk attends over itself
            return k_BLKD, v_BLKD, None, None
        dtype = jnp.dtype(self.dtype)
        own = (lambda buf: buf) if layer is None else (lambda buf: buf[layer])
        if not self.access.write:
            keys = jnp.concatenate([_from_cache(own(k_buf), dtype), k_BLKD], axis=1)
            values = jnp.concatenate([_from_cache(own(v_buf), dtype), v_BLKD], axis=1)
            return keys, values, k_buf, v_buf
        start = self.access.start
        k_buf = _put(k_buf, self._merge(_to_cache(k_BLKD, k_buf), own(k_buf)), start, layer)
        v_buf = _put(v_buf, self._merge(_to_cache(v_BLKD, v_buf), own(v_buf)), start, layer)
        return _from_cache(own(k_buf), dtype), _from_cache(own(v_buf), dtype), k_buf, v_buf

    def _merge(self, fresh_BKLD, buf_BKSD):
        keep_BL = self.access.keep_BL
        if keep_BL is None:
            return fresh_BKLD
        old = _take(buf_BKSD, self.access.start, fresh_BKLD.shape[2])
        return jnp.where(keep_BL[:, None, :, None], old, fresh_BKLD)


def plan(cache_or_access, idx_BL, chunk_valid_BL=None, dtype="float32") -> ChunkPlan:
    """The keys a chunk at layout coordinates `idx_BL` attends over: the chunk alone (no cache),
    the cache with the chunk written into it (keys at their slots), or the cache followed by the
    chunk (read)."""
    B, L = idx_BL.shape
    if cache_or_access is None:
        return ChunkPlan(idx_BL, chunk_valid_BL, None, dtype)
    acc = access(cache_or_access)
    cache = acc.cache
    S = cache.max_len
    check_rows(cache, B)
    slot_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    start_B = jnp.broadcast_to(acc.start, (B,))
    if not acc.write:
        own_valid = jnp.ones((B, L), bool) if chunk_valid_BL is None else chunk_valid_BL
        kv_valid = jnp.concatenate([slot_BS < cache.lengths[:, None], own_valid], axis=1)
        return ChunkPlan(jnp.concatenate([slot_BS, idx_BL], axis=1), kv_valid, acc, dtype)
    filled = slot_BS < jnp.maximum(cache.lengths, start_B + L)[:, None]
    if chunk_valid_BL is not None:  # padding inside the chunk is no key
        filled = filled & place_rows(jnp.ones((B, S), bool), chunk_valid_BL, acc.start)
    return ChunkPlan(slot_BS, filled, acc, dtype)


def check_rows(cache_or_access, batch: int):
    """A chunk of `batch` rows must meet a cache of as many rows."""
    cache = access(cache_or_access).cache
    if cache.batch != batch:
        raise JaxgenError(f"the cache holds {cache.batch} rows but the chunk has {batch}; init_cache with batch={batch}")


def written(cache_or_access, new_k, new_v, chunk_len: int) -> KVCache:
    """The cache after a forward: new buffers and lengths (unchanged after a read)."""
    acc = access(cache_or_access)
    if not acc.write:
        return acc.cache
    lengths = jnp.maximum(acc.cache.lengths, acc.start + chunk_len)
    return acc.cache.replace(k=new_k, v=new_v, lengths=lengths)
