"""Attention layouts: who may attend to whom.

A layout is a small frozen (hashable, jit-static) object. `mask(q_idx, kv_idx, seq_len)` gives
the dense boolean mask for the XLA reference path; `block_map(...)` gives the block-level map
(0 = skip, 1 = partial, 2 = full) that block-sparse kernels iterate over.

Indices are *layout coordinates*: for single-stream layouts they are the token positions (a
dense cache stores position p in slot p, so cached keys use the same coordinates); for the
two-stream training layouts (`dual_stream`, `ar_diffusion`) they index the 2n-long sequence.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxgen.errors import ConfigError

KINDS = ("causal", "full", "block_causal", "dual_stream", "prefix", "ar_diffusion")
TWO_STREAM = ("dual_stream", "ar_diffusion")


@dataclasses.dataclass(frozen=True)
class Layout:
    kind: str
    block: int = 1
    prefix_len: int = 0
    causal_suffix: bool = False
    causal_block: bool = False  # ar_diffusion: causal (not bidirectional) inside a noisy block

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"unknown layout {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.block <= 0:
            raise ConfigError(f"block size {self.block} must be positive")
        if self.prefix_len < 0:
            raise ConfigError(f"prefix length {self.prefix_len} must be >= 0")
        if self.causal_block and self.kind != "ar_diffusion":
            raise ConfigError(f"causal_block applies to the ar_diffusion layout, not {self.kind!r}")

    @property
    def two_stream(self) -> bool:
        """Coordinates index a 2n-long [stream | stream] training sequence, not positions."""
        return self.kind in TWO_STREAM

    def mask(self, q_idx, kv_idx, seq_len: int | None = None):
        """Boolean [..., Lq, Lk]: True where query q_idx may attend to key kv_idx."""
        q = jnp.asarray(q_idx)[..., :, None]
        k = jnp.asarray(kv_idx)[..., None, :]
        if self.kind == "causal":
            return k <= q
        if self.kind == "full":
            return jnp.ones(jnp.broadcast_shapes(q.shape, k.shape), bool)
        if self.kind == "block_causal":
            return k // self.block <= q // self.block
        if self.kind == "prefix":
            in_prefix_q = q < self.prefix_len
            visible_from_suffix = (k <= q) if self.causal_suffix else jnp.ones_like(k <= q)
            return jnp.where(in_prefix_q, k < self.prefix_len, visible_from_suffix | (k < self.prefix_len))
        if seq_len is None or seq_len % 2:
            raise ConfigError(f"{self.kind} needs an even total length (two streams), got {seq_len}")
        n = seq_len // 2
        if self.kind == "ar_diffusion":  # [x | MASK]: causal clean stream, mask blocks see the clean past
            q_mask, k_mask = q >= n, k >= n
            qb, kb = (q % n) // self.block, (k % n) // self.block
            clean_causal = ~q_mask & ~k_mask & (k <= q)
            mask_sees_clean_past = q_mask & ~k_mask & (kb < qb)
            mask_same_block = q_mask & k_mask & (kb == qb)
            if self.causal_block:
                mask_same_block = mask_same_block & (k <= q)
            return clean_causal | mask_sees_clean_past | mask_same_block
        # dual_stream: [x_t | x_0], each of length n, sharing positions 0..n-1.
        q_clean, k_clean = q >= n, k >= n
        qb, kb = (q % n) // self.block, (k % n) // self.block
        same_block_same_stream = (qb == kb) & (q_clean == k_clean)
        noisy_sees_clean_past = ~q_clean & k_clean & (kb < qb)
        clean_block_causal = q_clean & k_clean & (kb <= qb)
        return same_block_same_stream | noisy_sees_clean_past | clean_block_causal

    def block_map(self, q_len: int, kv_len: int, q_block: int, kv_block: int, seq_len: int | None = None):
        """numpy int8 [ceil(q_len/q_block), ceil(kv_len/kv_block)]: 0 skip, 1 partial, 2 full."""
        dense = np.asarray(self.mask(np.arange(q_len), np.arange(kv_len), seq_len or kv_len))
        nq, nk = -(-q_len // q_block), -(-kv_len // kv_block)
        padded = np.zeros((nq * q_block, nk * kv_block), bool)
        padded[:q_len, :kv_len] = dense
        tiles = padded.reshape(nq, q_block, nk, kv_block)
        any_, all_ = tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))
        return np.where(all_, 2, np.where(any_, 1, 0)).astype(np.int8)


def causal() -> Layout:
    return Layout("causal")


def full() -> Layout:
    return Layout("full")


def block_causal(block: int) -> Layout:
    """Bidirectional inside blocks of `block` tokens, causal across blocks (SDAR/BD3 inference)."""
    return Layout("block_causal", block=block)


def dual_stream(block: int) -> Layout:
    """BD3-LM/SDAR vectorized training over [x_t | x_0] with shared positions."""
    return Layout("dual_stream", block=block)


def prefix(prefix_len: int, causal_suffix: bool = False) -> Layout:
    """Prefix-LM: the prefix attends only to itself (its K/V never change, LaViDa); the suffix
    attends to the prefix and to itself (bidirectionally, or causally with `causal_suffix`)."""
    return Layout("prefix", prefix_len=prefix_len, causal_suffix=causal_suffix)


def ar_diffusion(block: int, causal_block: bool = False) -> Layout:
    """TiDAR/NBDiff joint training over [x | x_t] (shared positions): the clean stream is causal
    (AR loss); each noisy block attends to the clean tokens before the block and within itself,
    bidirectionally, or causally in physical order with `causal_block` (WeDLM's dual-stream
    masking, whose noisy blocks are reordered observed-first)."""
    return Layout("ar_diffusion", block=block, causal_block=causal_block)
