"""Dense KV cache as a pytree, and the pure operations samplers use on it.

Slot s holds the token at position s (layout coordinates = positions), so a cached key is
masked by the same layout rule as a fresh one. `length` is the number of filled slots, shared
by the batch: writes append at `length` unless `model.forward(write_at=)` overwrites a filled
range in place. Keys are stored after RoPE, laid out [B, K, S, D] per layer so attention reads
them without a transpose copy.
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
    length: jax.Array  # int32 scalar: filled slots [0, length)

    @property
    def unstacked(self) -> bool:
        return isinstance(self.k, (list, tuple))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2] if self.unstacked else self.k.shape[3]


def unstack_cache(cache: KVCache) -> KVCache:
    """One buffer per layer. Decode loops carry this form: a write then updates its own layer's
    buffer in place instead of a slice of the stacked array (measured on XLA CPU: see
    `jaxgen.model.unstack_layers`, which the model then applies to the params too)."""
    if cache.unstacked:
        return cache
    return cache.replace(k=list(cache.k), v=list(cache.v))


def stack_cache(cache: KVCache) -> KVCache:
    """The stacked [N, B, K, S, D] form (for scans and checkpoints)."""
    if not cache.unstacked:
        return cache
    return cache.replace(k=jnp.stack(cache.k), v=jnp.stack(cache.v))


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
    return KVCache(zeros(), zeros(), jnp.zeros((), jnp.int32))


def truncate(cache: KVCache, length) -> KVCache:
    """Forget slots >= length (they are masked out, and overwritten by later writes)."""
    return cache.replace(length=jnp.minimum(cache.length, jnp.asarray(length, jnp.int32)))


def prefill(params, cfg, cache: KVCache, tokens_BL, layout):
    """Write the K/V of `tokens` at the next slots; return (logits of those tokens, cache)."""
    from jaxgen import model  # model imports cache: late import keeps one direction at import time
    return model.forward(params, cfg, tokens_BL, layout=layout, cache=cache, cache_mode="write")


append = prefill  # one decode step is a prefill of length 1
commit_block = prefill  # a clean block's K/V written once (SDAR/BD3)


def read_only(params, cfg, cache: KVCache, tokens_BL, positions_BL, layout):
    """Attend over the cache plus `tokens` without writing anything (a denoising step)."""
    from jaxgen import model
    logits, _ = model.forward(params, cfg, tokens_BL, positions=positions_BL, layout=layout, cache=cache,
                              cache_mode="read")
    return logits
