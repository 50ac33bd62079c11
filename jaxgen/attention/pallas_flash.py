"""Block-sparse flash attention in Pallas (GPU-style grid; interpret mode on CPU).

One program per (row, query head, query tile) walks the key tiles with an online softmax
(float32 running max / sum / accumulator). The layout rule is evaluated in-kernel from each
query's two visible key ranges (`Layout.kv_ranges`, computed outside: O(L), never a dense
[L, S] mask) against the keys' layout coordinates and validity. Key tiles no query of the tile
can see are skipped: a conservative test on the tile's coordinate bounds against the tile's
range bounds, so any coordinates work (cache slots, reordered windows), not only 0..S-1.
GQA reads each kv head once per query head group through the index map (no repeated K/V).
Rows with no visible key return 0, as the reference does.

The backward pass is the XLA reference's (a custom VJP recomputing the dense reference): the
Pallas backward kernel is not written yet. The tree layout (an ancestor table, not ranges) is
not served here; the door falls back to XLA for it under `impl="auto"`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxgen.attention.reference import attention as reference_attention

NEG = -1e30  # running-max floor: exp(NEG - m) underflows to 0 for any real score


def _pad_to(x, axis: int, multiple: int, value=0):
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def tile_visible(ranges, kv_idx_BS, kv_valid_BS, q_block: int, kv_block: int):
    """int32 [B, nq, nk]: 1 where some query of the q tile may see some key of the kv tile
    (conservative: bounds of the tile's ranges against bounds of the tile's valid coordinates)."""
    (lo1, hi1), (lo2, hi2) = ranges  # [B, Lq] each, Lq a multiple of q_block
    B, Lq = lo1.shape
    tiles = lambda a: a.reshape(B, Lq // q_block, q_block)
    big = jnp.iinfo(jnp.int32).max
    k = jnp.where(kv_valid_BS, kv_idx_BS, big).reshape(B, -1, kv_block)
    k_min = k.min(-1)[:, None, :]
    k_max = jnp.where(kv_valid_BS, kv_idx_BS, -1).reshape(B, -1, kv_block).max(-1)[:, None, :]

    def meets(lo, hi):
        nonempty = lo < hi
        lo_min = jnp.where(nonempty, lo, big)
        hi_max = jnp.where(nonempty, hi, -1)
        lo_t, hi_t = tiles(lo_min).min(-1)[:, :, None], tiles(hi_max).max(-1)[:, :, None]
        return (lo_t <= k_max) & (k_min < hi_t)

    return (meets(lo1, hi1) | meets(lo2, hi2)).astype(jnp.int32)


def _kernel(visible_ref, q_ref, k_ref, v_ref, kidx_ref, kvalid_ref, lo1_ref, hi1_ref, lo2_ref, hi2_ref, o_ref, *,
            kv_block: int, num_kv_tiles: int, scale: float):
    q = q_ref[0, :, 0, :].astype(jnp.float32) * scale  # [bq, D]
    lo1, hi1 = lo1_ref[0, :][:, None], hi1_ref[0, :][:, None]  # [bq, 1]
    lo2, hi2 = lo2_ref[0, :][:, None], hi2_ref[0, :][:, None]
    bq, D = q.shape

    def tile(j, carry):
        def attend(carry):
            m, l, acc = carry
            keys = pl.ds(j * kv_block, kv_block)
            k = k_ref[0, keys, 0, :].astype(jnp.float32)  # [bk, D]
            v = v_ref[0, keys, 0, :].astype(jnp.float32)
            kidx = kidx_ref[0, keys][None, :]  # [1, bk]
            seen = (((lo1 <= kidx) & (kidx < hi1)) | ((lo2 <= kidx) & (kidx < hi2))) & (kvalid_ref[0, keys][None, :] > 0)
            s = jnp.where(seen, jnp.dot(q, k.T), NEG)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(seen, jnp.exp(s - m_new[:, None]), 0.0)
            correction = jnp.exp(m - m_new)
            return m_new, l * correction + p.sum(-1), acc * correction[:, None] + jnp.dot(p, v)

        return jax.lax.cond(visible_ref[0, 0, j] > 0, attend, lambda c: c, carry)

    init = (jnp.full((bq,), NEG, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, D), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, num_kv_tiles, tile, init)
    out = jnp.where(l[:, None] > 0, acc / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
    o_ref[0, :, 0, :] = out.astype(o_ref.dtype)


def _forward(q_BLHD, k_BSKD, v_BSKD, ranges, kv_idx_BS, kv_valid_BS, *, q_block: int, kv_block: int,
             interpret: bool):
    B, L, H, D = q_BLHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    group = H // K
    q_block, kv_block = min(q_block, max(L, 1)), min(kv_block, max(S, 1))
    q = _pad_to(q_BLHD, 1, q_block)
    ranges = tuple((_pad_to(lo, 1, q_block), _pad_to(hi, 1, q_block)) for lo, hi in ranges)  # padded rows: empty
    k, v = _pad_to(k_BSKD, 1, kv_block), _pad_to(v_BSKD, 1, kv_block)
    kidx = _pad_to(kv_idx_BS.astype(jnp.int32), 1, kv_block)
    kvalid = _pad_to(kv_valid_BS.astype(jnp.int32), 1, kv_block)
    Lp, Sp = q.shape[1], k.shape[1]
    nq, nk = Lp // q_block, Sp // kv_block
    visible = tile_visible(ranges, kidx, kvalid > 0, q_block, kv_block)
    (lo1, hi1), (lo2, hi2) = ranges
    row_spec = pl.BlockSpec((1, q_block), lambda b, h, i: (b, i))
    kv_row_spec = pl.BlockSpec((1, Sp), lambda b, h, i: (b, 0))
    kernel = functools.partial(_kernel, kv_block=kv_block, num_kv_tiles=nk, scale=1.0 / float(D) ** 0.5)
    out = pl.pallas_call(
        kernel,
        grid=(B, H, nq),
        in_specs=[
            pl.BlockSpec((1, 1, nk), lambda b, h, i: (b, i, 0)),
            pl.BlockSpec((1, q_block, 1, D), lambda b, h, i: (b, i, h, 0)),
            pl.BlockSpec((1, Sp, 1, D), lambda b, h, i: (b, 0, h // group, 0)),
            pl.BlockSpec((1, Sp, 1, D), lambda b, h, i: (b, 0, h // group, 0)),
            kv_row_spec, kv_row_spec, row_spec, row_spec, row_spec, row_spec,
        ],
        out_specs=pl.BlockSpec((1, q_block, 1, D), lambda b, h, i: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct((B, Lp, H, D), q_BLHD.dtype),
        interpret=interpret,
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=2),  # GPU: the Triton backend
    )(visible, q, k, v, kidx, kvalid, lo1, hi1, lo2, hi2)
    return out[:, :L]


def _dense_mask(ranges, kv_idx_BS, kv_valid_BS):
    (lo1, hi1), (lo2, hi2) = ranges
    k = kv_idx_BS[:, None, :]
    inside = lambda lo, hi: (lo[..., None] <= k) & (k < hi[..., None])
    return (inside(lo1, hi1) | inside(lo2, hi2)) & kv_valid_BS[:, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def flash_attention(q_BLHD, k_BSKD, v_BSKD, ranges, kv_idx_BS, kv_valid_BS, q_block: int = 64, kv_block: int = 64,
                    interpret: bool = False):
    """Attention of each query over the keys inside its two ranges ((lo1, hi1), (lo2, hi2)), each
    [B, L] int32 in key coordinates, among keys with `kv_valid_BS`; equals the XLA reference."""
    return _forward(q_BLHD, k_BSKD, v_BSKD, ranges, kv_idx_BS, kv_valid_BS, q_block=q_block, kv_block=kv_block,
                    interpret=interpret)


def _fwd(q, k, v, ranges, kv_idx, kv_valid, q_block, kv_block, interpret):
    out = _forward(q, k, v, ranges, kv_idx, kv_valid, q_block=q_block, kv_block=kv_block, interpret=interpret)
    return out, (q, k, v, ranges, kv_idx, kv_valid)


def _bwd(q_block, kv_block, interpret, saved, d_out):
    q, k, v, ranges, kv_idx, kv_valid = saved
    mask = _dense_mask(ranges, kv_idx, kv_valid)
    _, vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, mask), q, k, v)
    dq, dk, dv = vjp(d_out)
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), (ranges, kv_idx, kv_valid))
    return (dq, dk, dv, *zeros)


flash_attention.defvjp(_fwd, _bwd)
