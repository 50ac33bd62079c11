"""Chunk-over-cache attention in Pallas: 1 to 128 queries over a long, partly filled cache.

The flash kernel (`pallas_flash`) gives each query head its own program and a query tile of 64
rows: for an AR decode step (1 query) that is 63 wasted rows and every kv head read once per
query head of its group. Here one program serves a kv head and all its query heads: the
chunk's queries of the G heads sharing that kv head are packed into the rows of one tile
(row g * L + l), so each filled K/V tile is read once per kv head. The filled span of key tiles
(`tile_span`: a cache chunk sees its filled slots only) is cut into `n_split` equal parts run
by separate programs (split-K, as in flash-decoding), so a batch of one row still fills the
GPU; the partial results merge by their log-sum-exp outside the kernel.

The kernel body is the flash forward kernel (`pallas_flash.fwd_kernel`: layout rule
in-kernel from each query's two key ranges, empty tiles skipped); only the grid, the packing
and the merge differ. Gradients, rarely needed for a decode chunk, come from the flash kernels.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jaxgen.attention import pallas_flash
from jaxgen.attention.pallas_flash import NEG, pad_to

MAX_QUERIES = 128  # chunks longer than this (or with no keys beyond the chunk) take the flash kernel
MIN_ROWS = 16  # a Triton dot needs at least 16 rows
MAX_ROWS = 64  # packed rows per program
TARGET_PROGRAMS = 256  # about two per SM on an H100/H200-class GPU


def serves(L: int, S: int) -> bool:
    """A short chunk over more keys than itself: a cache read, not a training sequence."""
    return L <= MAX_QUERIES and S > L


def num_splits(batch: int, kv_heads: int, key_tiles: int, interpret: bool) -> int:
    """Split-K parts per (row, kv head): enough programs to fill the device, never more parts
    than key tiles (interpret mode: 2, to exercise the merge without slowing tests)."""
    if interpret:
        return max(1, min(2, key_tiles))
    return max(1, min(key_tiles, -(-TARGET_PROGRAMS // (batch * kv_heads))))


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def pack_heads(q_BLHD, kv_heads: int):
    """[B, L, H, D] -> [B, G * L, K, D]: the G query heads of kv head k stacked as rows g * L + l."""
    B, L, H, D = q_BLHD.shape
    G = H // kv_heads
    return q_BLHD.reshape(B, L, kv_heads, G, D).transpose(0, 3, 1, 2, 4).reshape(B, G * L, kv_heads, D)


def unpack_heads(o_BMKD, L: int, H: int):
    """Inverse of `pack_heads` (extra padded rows dropped)."""
    B, _, K, D = o_BMKD.shape
    G = H // K
    return o_BMKD[:, :G * L].reshape(B, G, L, K, D).transpose(0, 2, 3, 1, 4).reshape(B, L, H, D)


def merge_splits(o_BPMKD, lse_BKPM):
    """Combine split-K partials (each normalised over its keys, lse NEG where it saw none)."""
    lse_max = lse_BKPM.max(2, keepdims=True)
    w_BKPM = jnp.exp(lse_BKPM - lse_max)
    w_BPMK1 = w_BKPM.transpose(0, 2, 3, 1)[..., None]
    return (w_BPMK1 * o_BPMKD.astype(jnp.float32)).sum(1) / w_BPMK1.sum(1)


def _split_spans(visible_BTN, n_split: int):
    """first / last key tile [B, T * n_split] of each split of each row tile's visible span."""
    first, last = pallas_flash.tile_span(visible_BTN, 2)  # [B, T]
    part = -(-(last - first) // n_split)
    s = jnp.arange(n_split)
    start = first[..., None] + s * part[..., None]
    end = jnp.minimum(start + part[..., None], last[..., None])
    B = visible_BTN.shape[0]
    return start.reshape(B, -1).astype(jnp.int32), jnp.maximum(end, start).reshape(B, -1).astype(jnp.int32)


def _forward(q_BLHD, k_BSKD, v_BSKD, ranges, kv_idx_BS, kv_valid_BS, kv_block: int, interpret: bool):
    B, L, H, D = q_BLHD.shape
    S, K = k_BSKD.shape[1:3]
    G = H // K
    rows = G * L
    row_block = min(MAX_ROWS, _pow2_at_least(max(rows, MIN_ROWS)))
    q_BMKD = pad_to(pack_heads(q_BLHD, K), 1, row_block)
    Mp = q_BMKD.shape[1]
    packed = tuple(pad_to(jnp.tile(a, (1, G)), 1, row_block) for pair in ranges for a in pair)  # padded rows: empty
    kv_block = min(kv_block, max(S, 1))
    k_BSKD, v_BSKD = pad_to(k_BSKD, 1, kv_block), pad_to(v_BSKD, 1, kv_block)
    kidx = pad_to(kv_idx_BS.astype(jnp.int32), 1, kv_block)
    kvalid = pad_to(kv_valid_BS.astype(jnp.int32), 1, kv_block)
    Sp = k_BSKD.shape[1]
    visible = pallas_flash.tile_visible((packed[:2], packed[2:]), kidx, kvalid > 0, row_block, kv_block)
    n_tiles, nk = visible.shape[1:]
    n_split = num_splits(B, K, nk, interpret)
    first, last = _split_spans(visible, n_split)

    tile = lambda p: p // n_split  # program p: row tile p // n_split, split p % n_split
    out_tile = lambda p: (p % n_split) * n_tiles + p // n_split
    q_spec = pl.BlockSpec((1, row_block, 1, D), lambda b, h, p: (b, tile(p), h, 0))
    kv_spec = pl.BlockSpec((1, Sp, 1, D), lambda b, h, p: (b, 0, h, 0))
    key_row = pl.BlockSpec((1, Sp), lambda b, h, p: (b, 0))
    query_row = pl.BlockSpec((1, row_block), lambda b, h, p: (b, tile(p)))
    span = pl.BlockSpec((1, 1), lambda b, h, p: (b, p))
    kernel = functools.partial(pallas_flash.fwd_kernel, kv_block=kv_block, scale=1.0 / float(D) ** 0.5)
    o, lse = pallas_flash.call(
        kernel, (B, K, n_tiles * n_split),
        [pl.BlockSpec((1, 1, nk), lambda b, h, p: (b, tile(p), 0)), span, span, q_spec, kv_spec, kv_spec, key_row,
         key_row, query_row, query_row, query_row, query_row],
        [pl.BlockSpec((1, row_block, 1, D), lambda b, h, p: (b, out_tile(p), h, 0)),
         pl.BlockSpec((1, 1, row_block), lambda b, h, p: (b, h, out_tile(p)))],
        [jax.ShapeDtypeStruct((B, n_split * Mp, K, D), jnp.float32),
         jax.ShapeDtypeStruct((B, K, n_split * Mp), jnp.float32)],
        interpret)(visible, first, last, q_BMKD, k_BSKD, v_BSKD, kidx, kvalid, *packed)
    merged = merge_splits(o.reshape(B, n_split, Mp, K, D), lse.reshape(B, K, n_split, Mp))
    return unpack_heads(merged, L, H).astype(q_BLHD.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def chunk_attention(q_BLHD, k_BSKD, v_BSKD, ranges, kv_idx_BS, kv_valid_BS, kv_block: int = 64,
                    interpret: bool = False):
    """Attention of a short chunk of queries over a cache: each query over the keys inside its
    two ranges ((lo1, hi1), (lo2, hi2)) [B, L] int32 among keys with `kv_valid_BS`; equals the
    XLA reference and `pallas_flash.flash_attention`."""
    return _forward(q_BLHD, k_BSKD, v_BSKD, ranges, kv_idx_BS, kv_valid_BS, kv_block, interpret)


def _fwd(q, k, v, ranges, kv_idx, kv_valid, kv_block, interpret):
    return chunk_attention(q, k, v, ranges, kv_idx, kv_valid, kv_block, interpret), (q, k, v, ranges, kv_idx, kv_valid)


def _bwd(kv_block, interpret, saved, d_out):
    q, k, v, ranges, kv_idx, kv_valid = saved
    flash = lambda q, k, v: pallas_flash.flash_attention(q, k, v, ranges, kv_idx, kv_valid, 64, kv_block, interpret)
    dq, dk, dv = jax.vjp(flash, q, k, v)[1](d_out)
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), (ranges, kv_idx, kv_valid))
    return (dq, dk, dv, *zeros)


chunk_attention.defvjp(_fwd, _bwd)

__all__ = ["chunk_attention", "serves", "num_splits", "pack_heads", "unpack_heads", "merge_splits", "NEG"]
