"""Block-sparse flash attention in Pallas (GPU-style grid; interpret mode on CPU).

One program per (row, query head, query tile) walks the key tiles with an online softmax
(float32 running max / sum / accumulator). The layout rule is evaluated in-kernel from each
query's two visible key ranges (`Layout.kv_ranges`, computed outside: O(L), never a dense
[L, S] mask) against the keys' layout coordinates and validity. Key tiles no query of the tile
can see are skipped: a conservative test on the tile's coordinate bounds against the tile's
range bounds, so any coordinates work (cache slots, reordered windows), not only 0..S-1; each
program loops only over the span from its first to its last visible tile (`tile_span`: a cache
chunk reads its filled tiles, a causal tile stops at the diagonal) and skips empty tiles inside.
GQA reads each kv head once per query head group through the index map (no repeated K/V).
Rows with no visible key return 0, as the reference does.

The backward pass is two more kernels (FlashAttention-2's): per key tile, dK and dV over the
query tiles that see it; per query tile, dQ over its key tiles; both recompute P from the
forward's log-sum-exp and skip the same empty tiles. dK / dV are accumulated per query head and
summed over each kv head's group. The tree layout (an ancestor table, not ranges) is
not served here; the door falls back to XLA for it under `impl="auto"`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


NEG = -1e30  # running-max floor: exp(NEG - m) underflows to 0 for any real score


def pad_to(x, axis: int, multiple: int, value=0):
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


def _seen(lo1, hi1, lo2, hi2, kidx_row, kvalid_row):
    """[bq, bk] the layout rule in-kernel: key coordinate inside one of the query's ranges, and valid."""
    kidx, kvalid = kidx_row[None, :], kvalid_row[None, :] > 0
    return (((lo1 <= kidx) & (kidx < hi1)) | ((lo2 <= kidx) & (kidx < hi2))) & kvalid


def _ranges_of(refs):
    """The query tile's ranges as [bq, 1] columns."""
    return tuple(r[0, :][:, None] for r in refs)


def fwd_kernel(visible_ref, first_ref, last_ref, q_ref, k_ref, v_ref, kidx_ref, kvalid_ref, lo1_ref, hi1_ref, lo2_ref, hi2_ref, o_ref,
                lse_ref, *, kv_block: int, scale: float):
    q = q_ref[0, :, 0, :].astype(jnp.float32) * scale  # [bq, D]
    ranges = _ranges_of((lo1_ref, hi1_ref, lo2_ref, hi2_ref))
    bq, D = q.shape

    def tile(j, carry):
        def attend(carry):
            m, l, acc = carry
            keys = pl.ds(j * kv_block, kv_block)
            k = k_ref[0, keys, 0, :].astype(jnp.float32)  # [bk, D]
            v = v_ref[0, keys, 0, :].astype(jnp.float32)
            seen = _seen(*ranges, kidx_ref[0, keys], kvalid_ref[0, keys])
            s = jnp.where(seen, jnp.dot(q, k.T), NEG)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(seen, jnp.exp(s - m_new[:, None]), 0.0)
            correction = jnp.exp(m - m_new)
            return m_new, l * correction + p.sum(-1), acc * correction[:, None] + jnp.dot(p, v)

        return jax.lax.cond(visible_ref[0, 0, j] > 0, attend, lambda c: c, carry)

    init = (jnp.full((bq,), NEG, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, D), jnp.float32))
    m, l, acc = jax.lax.fori_loop(first_ref[0, 0], last_ref[0, 0], tile, init)  # only the span that sees
    o_ref[0, :, 0, :] = jnp.where(l[:, None] > 0, acc / jnp.where(l > 0, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)
    # rows with no key: NEG, so a split-K combine weighs them 0 (the backward never reads them)
    lse_ref[0, 0, :] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), NEG)


def _dkv_kernel(visible_ref, first_ref, last_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kidx_ref, kvalid_ref, lo1_ref, hi1_ref,
                lo2_ref, hi2_ref, dk_ref, dv_ref, *, q_block: int, scale: float):
    """One key tile of one query head: dV = sum P^T dO, dK = sum dS^T Q * scale over query tiles."""
    k = k_ref[0, :, 0, :].astype(jnp.float32)  # [bk, D]
    v = v_ref[0, :, 0, :].astype(jnp.float32)
    kidx, kvalid = kidx_ref[0, :], kvalid_ref[0, :]

    def tile(i, carry):
        def attend(carry):
            dk, dv = carry
            rows = pl.ds(i * q_block, q_block)
            q = q_ref[0, rows, 0, :].astype(jnp.float32) * scale  # [bq, D]
            do = do_ref[0, rows, 0, :].astype(jnp.float32)
            ranges = tuple(r[0, rows][:, None] for r in (lo1_ref, hi1_ref, lo2_ref, hi2_ref))
            seen = _seen(*ranges, kidx, kvalid)
            p = jnp.where(seen, jnp.exp(jnp.dot(q, k.T) - lse_ref[0, 0, rows][:, None]), 0.0)  # [bq, bk]
            ds = p * (jnp.dot(do, v.T) - delta_ref[0, 0, rows][:, None])
            return dk + jnp.dot(ds.T, q), dv + jnp.dot(p.T, do)

        return jax.lax.cond(visible_ref[0, i, 0] > 0, attend, lambda c: c, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(first_ref[0, 0], last_ref[0, 0], tile, (zeros, zeros))
    dk_ref[0, :, 0, :] = dk.astype(dk_ref.dtype)  # q was pre-scaled: dK = dS^T (Q * scale)
    dv_ref[0, :, 0, :] = dv.astype(dv_ref.dtype)


def _dq_kernel(visible_ref, first_ref, last_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kidx_ref, kvalid_ref, lo1_ref, hi1_ref,
               lo2_ref, hi2_ref, dq_ref, *, kv_block: int, scale: float):
    """One query tile: dQ = sum dS K * scale over key tiles."""
    q = q_ref[0, :, 0, :].astype(jnp.float32) * scale
    do = do_ref[0, :, 0, :].astype(jnp.float32)
    lse, delta = lse_ref[0, 0, :][:, None], delta_ref[0, 0, :][:, None]
    ranges = _ranges_of((lo1_ref, hi1_ref, lo2_ref, hi2_ref))

    def tile(j, dq):
        def attend(dq):
            keys = pl.ds(j * kv_block, kv_block)
            k = k_ref[0, keys, 0, :].astype(jnp.float32)
            v = v_ref[0, keys, 0, :].astype(jnp.float32)
            seen = _seen(*ranges, kidx_ref[0, keys], kvalid_ref[0, keys])
            p = jnp.where(seen, jnp.exp(jnp.dot(q, k.T) - lse), 0.0)
            return dq + jnp.dot(p * (jnp.dot(do, v.T) - delta), k)

        return jax.lax.cond(visible_ref[0, 0, j] > 0, attend, lambda c: c, dq)

    dq = jax.lax.fori_loop(first_ref[0, 0], last_ref[0, 0], tile, jnp.zeros(q.shape, jnp.float32))
    dq_ref[0, :, 0, :] = (dq * scale).astype(dq_ref.dtype)


def tile_span(visible, axis: int):
    """(first, last + 1) int32 of the visible tiles along `axis` of the [B, nq, nk] map, per
    remaining index (0, 0 when none): kernels loop over that span only (a cache chunk reads
    its filled tiles, a causal query tile stops at the diagonal)."""
    n = visible.shape[axis]
    idx = jnp.arange(n).reshape([-1 if a == axis else 1 for a in range(visible.ndim)])
    seen = visible > 0
    first = jnp.where(seen, idx, n).min(axis)
    last = jnp.where(seen, idx + 1, 0).max(axis)
    return jnp.where(last > 0, first, 0).astype(jnp.int32), last.astype(jnp.int32)


class _Padded(NamedTuple):
    """Inputs padded to whole tiles, and the tile map."""
    q: jax.Array
    k: jax.Array
    v: jax.Array
    kidx: jax.Array
    kvalid: jax.Array
    ranges: tuple
    visible: jax.Array  # [B, nq, nk]
    q_block: int
    kv_block: int


def _pad(q_BLHD, k_BSKD, v_BSKD, ranges, kv_idx_BS, kv_valid_BS, q_block, kv_block) -> _Padded:
    L, S = q_BLHD.shape[1], k_BSKD.shape[1]
    q_block, kv_block = min(q_block, max(L, 1)), min(kv_block, max(S, 1))
    ranges = tuple((pad_to(lo, 1, q_block), pad_to(hi, 1, q_block)) for lo, hi in ranges)  # padded rows: empty
    kidx = pad_to(kv_idx_BS.astype(jnp.int32), 1, kv_block)
    kvalid = pad_to(kv_valid_BS.astype(jnp.int32), 1, kv_block)
    return _Padded(pad_to(q_BLHD, 1, q_block), pad_to(k_BSKD, 1, kv_block), pad_to(v_BSKD, 1, kv_block), kidx,
                   kvalid, ranges, tile_visible(ranges, kidx, kvalid > 0, q_block, kv_block), q_block, kv_block)


def _specs(x: _Padded, group: int, by_key_tile: bool):
    """BlockSpecs of (q, k, v, kidx, kvalid, lo1, hi1, lo2, hi2) for a grid (B, H, tiles) over
    query tiles (whole keys per program) or over key tiles (whole queries per program)."""
    B, Lp, H, D = x.q.shape
    Sp = x.k.shape[1]
    if by_key_tile:
        q_spec = pl.BlockSpec((1, Lp, 1, D), lambda b, h, i: (b, 0, h, 0))
        kv_spec = pl.BlockSpec((1, x.kv_block, 1, D), lambda b, h, i: (b, i, h // group, 0))
        key_row = pl.BlockSpec((1, x.kv_block), lambda b, h, i: (b, i))
        query_row = pl.BlockSpec((1, Lp), lambda b, h, i: (b, 0))
    else:
        q_spec = pl.BlockSpec((1, x.q_block, 1, D), lambda b, h, i: (b, i, h, 0))
        kv_spec = pl.BlockSpec((1, Sp, 1, D), lambda b, h, i: (b, 0, h // group, 0))
        key_row = pl.BlockSpec((1, Sp), lambda b, h, i: (b, 0))
        query_row = pl.BlockSpec((1, x.q_block), lambda b, h, i: (b, i))
    return q_spec, kv_spec, key_row, query_row


def call(kernel, grid, in_specs, out_specs, out_shape, interpret):
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          interpret=interpret,
                          compiler_params=plt.CompilerParams(num_warps=4, num_stages=2))  # GPU: Triton


def _forward(x: _Padded, interpret: bool):
    """(out [B, Lp, H, D], lse [B, H, Lp] float32)."""
    B, Lp, H, D = x.q.shape
    nq, nk = x.visible.shape[1:]
    group = H // x.k.shape[2]
    q_spec, kv_spec, key_row, query_row = _specs(x, group, by_key_tile=False)
    kernel = functools.partial(fwd_kernel, kv_block=x.kv_block, scale=1.0 / float(D) ** 0.5)
    (lo1, hi1), (lo2, hi2) = x.ranges
    span = pl.BlockSpec((1, 1), lambda b, h, i: (b, i))
    return call(kernel, (B, H, nq),
                 [pl.BlockSpec((1, 1, nk), lambda b, h, i: (b, i, 0)), span, span, q_spec, kv_spec, kv_spec, key_row, key_row,
                  query_row, query_row, query_row, query_row],
                 [q_spec, pl.BlockSpec((1, 1, x.q_block), lambda b, h, i: (b, h, i))],
                 [jax.ShapeDtypeStruct(x.q.shape, x.q.dtype), jax.ShapeDtypeStruct((B, H, Lp), jnp.float32)],
                 interpret)(x.visible, *tile_span(x.visible, 2), x.q, x.k, x.v, x.kidx, x.kvalid, lo1, hi1, lo2, hi2)


def _backward(x: _Padded, out, lse, d_out, interpret: bool):
    """(dq, dk, dv) of the padded inputs; dk / dv summed over each kv head's query heads."""
    B, Lp, H, D = x.q.shape
    Sp, K = x.k.shape[1], x.k.shape[2]
    group, (nq, nk) = H // K, x.visible.shape[1:]
    scale = 1.0 / float(D) ** 0.5
    delta = jnp.einsum("blhd,blhd->bhl", d_out.astype(jnp.float32), out.astype(jnp.float32))
    (lo1, hi1), (lo2, hi2) = x.ranges
    args = (x.q, x.k, x.v, d_out, lse, delta, x.kidx, x.kvalid, lo1, hi1, lo2, hi2)

    span = pl.BlockSpec((1, 1), lambda b, h, i: (b, i))
    q_spec, kv_spec, key_row, query_row = _specs(x, group, by_key_tile=True)
    stat = pl.BlockSpec((1, 1, Lp), lambda b, h, i: (b, h, 0))
    per_head_kv = pl.BlockSpec((1, x.kv_block, 1, D), lambda b, h, i: (b, i, h, 0))
    dk, dv = call(functools.partial(_dkv_kernel, q_block=x.q_block, scale=scale), (B, H, nk),
                   [pl.BlockSpec((1, nq, 1), lambda b, h, i: (b, 0, i)), span, span, q_spec, kv_spec, kv_spec, q_spec,
                    stat, stat,
                    key_row, key_row, query_row, query_row, query_row, query_row],
                   [per_head_kv, per_head_kv], [jax.ShapeDtypeStruct((B, Sp, H, D), jnp.float32)] * 2,
                   interpret)(x.visible, *tile_span(x.visible, 1), *args)
    q_spec, kv_spec, key_row, query_row = _specs(x, group, by_key_tile=False)
    stat = pl.BlockSpec((1, 1, x.q_block), lambda b, h, i: (b, h, i))
    dq = call(functools.partial(_dq_kernel, kv_block=x.kv_block, scale=scale), (B, H, nq),
               [pl.BlockSpec((1, 1, nk), lambda b, h, i: (b, i, 0)), span, span, q_spec, kv_spec, kv_spec, q_spec,
                stat, stat,
                key_row, key_row, query_row, query_row, query_row, query_row],
               q_spec, jax.ShapeDtypeStruct(x.q.shape, jnp.float32), interpret)(x.visible, *tile_span(x.visible, 2),
                                                                                 *args)
    heads = lambda g: g.reshape(B, Sp, K, group, D).sum(3)  # query heads -> their kv head
    return dq, heads(dk), heads(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def flash_attention(q_BLHD, k_BSKD, v_BSKD, ranges, kv_idx_BS, kv_valid_BS, q_block: int = 64, kv_block: int = 64,
                    interpret: bool = False):
    """Attention of each query over the keys inside its two ranges ((lo1, hi1), (lo2, hi2)), each
    [B, L] int32 in key coordinates, among keys with `kv_valid_BS`; equals the XLA reference."""
    return _fwd(q_BLHD, k_BSKD, v_BSKD, ranges, kv_idx_BS, kv_valid_BS, q_block, kv_block, interpret)[0]


def _fwd(q, k, v, ranges, kv_idx, kv_valid, q_block, kv_block, interpret):
    out, lse = _forward(_pad(q, k, v, ranges, kv_idx, kv_valid, q_block, kv_block), interpret)
    return out[:, :q.shape[1]], (q, k, v, ranges, kv_idx, kv_valid, out, lse)


def _bwd(q_block, kv_block, interpret, saved, d_out):
    q, k, v, ranges, kv_idx, kv_valid, out, lse = saved
    x = _pad(q, k, v, ranges, kv_idx, kv_valid, q_block, kv_block)
    dq, dk, dv = _backward(x, out, lse, pad_to(d_out, 1, x.q_block), interpret)
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), (ranges, kv_idx, kv_valid))
    L, S = q.shape[1], k.shape[1]
    return (dq[:, :L].astype(q.dtype), dk[:, :S].astype(k.dtype), dv[:, :S].astype(v.dtype), *zeros)


flash_attention.defvjp(_fwd, _bwd)
