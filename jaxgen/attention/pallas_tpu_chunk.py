"""Chunk-over-cache attention in Pallas for TPU (Mosaic): 1 to 128 queries over a long, partly
filled cache; the TPU counterpart of `pallas_chunk` (GPU / Triton).

The standard TPU ragged-attention pattern: one grid step per (row, key tile), grid (B, nk) with
the key axis last ("arbitrary": the online softmax runs along it) and the row axis "parallel".
Each row's first / last visible key tile (the filled span, `pallas_flash.tile_span`) is
scalar-prefetched into SMEM; the K/V BlockSpecs clamp the tile index into that span, so tiles
outside it are never fetched (Pallas skips the DMA when a block index repeats) and steps outside
it only pay the grid-step overhead; compute runs under `pl.when(first <= j < last)`. Online
softmax statistics (m, l, acc) live in float32 VMEM scratch, reset at j == 0 and written out at
the last j.

One step serves every kv head of its row: K/V are read in their cache layout [B, S, K, D] in
blocks (kv_block, K, D) (the last two dims whole, so any K and D pass Mosaic's block rule), one
contiguous DMA per tile and no relayout of the cache outside the kernel; head h is `ref[:, h, :]`
in-kernel. (A [B, S, K * D] view would be a lane slice per head, but on TPU that reshape is a
physical copy of the whole cache per call; MQA, K == 1, is read as [B, S, D], a free reshape
there.) So the grid has B * nk steps, not B * K * nk: on TPU the per-step overhead (~0.35 us),
not FLOPs, bounds a decode step. The G query heads of kv head h are packed as rows g * L + l (as
`pallas_chunk.pack_heads`), padded to the dtype's sublane tile (8 rows float32, 16 bfloat16),
q laid out [B, K, Mp, D].

Mosaic layout rules followed (those jax's splash kernel uses): per-query arrays (the four range
bounds) lane-replicated [Mp, 128] and tiled across the key tile; per-key arrays sublane-
replicated [8, S]. Key validity rides on the key coordinate (invalid and padded keys get
INT32_MIN, and range starts are clamped above it), so the rule in-kernel is one array: the key
is visible iff its coordinate lies in one of the query's two ranges. A last partial key tile
(S not a multiple of kv_block) reads unspecified values past S: their scores are masked and
their V rows zeroed (a NaN times a zero weight would still be NaN).

Gradients (rare for a decode chunk) are the XLA reference's, through a dense [B, L, S] mask.

Checked without a TPU: interpret mode against the reference (tests), Mosaic lowering from CPU,
and, where libtpu is installed, ahead-of-time compilation by the real Mosaic compiler for
v4 / v5e / v5p / v6e topologies, whose refusals `check_supported` mirrors (float16, a head dim
that is not a multiple of 128 or kv heads not 1, 2, 4 or 8k: XLA relayouts the cache; VMEM).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxgen.attention import pallas_chunk, pallas_flash
from jaxgen.attention.pallas_flash import NEG
from jaxgen.attention.reference import attention as reference_attention
from jaxgen.errors import ConfigError

LANES, SUBLANES = 128, 8
NO_KEY = jnp.iinfo(jnp.int32).min  # coordinate of an invalid or padded key: in no range
COMPILED_DTYPES = ("float32", "bfloat16")
VMEM_BUDGET = 12 * 2 ** 20  # bytes `vmem_bytes` may estimate: fits v4's 16 MiB (AOT-compiled on v4/v5e/v5p/v6e)
VMEM_LIMIT = 32 * 2 ** 20  # scoped VMEM asked of Mosaic: v5e / v6e need more than their 16 MiB default
FIX = "use impl='xla'"
KV_BLOCKS = (512, 256, 128)  # key tiles `pick_kv_block` tries, largest first


def serves(L: int, S: int) -> bool:
    """A short chunk over more keys than itself (a cache read), as the GPU chunk kernel."""
    return pallas_chunk.serves(L, S)


def key_block(S: int, kv_block: int) -> int:
    """The key tile: kv_block, or the whole (shorter) cache as one tile (a full-dim block)."""
    return S if S <= kv_block else kv_block


def packed_rows(G: int, L: int, dtype) -> int:
    """G * L packed query rows padded to the dtype's sublane tile (8 float32, 16 bfloat16)."""
    tile = SUBLANES * max(1, 4 // jnp.dtype(dtype).itemsize)
    return -(-G * L // tile) * tile


def vmem_bytes(G: int, L: int, K: int, D: int, kv_block: int, dtype) -> int:
    """VMEM the compiled kernel holds: double-buffered blocks, float32 scratch, one head's scores."""
    Mp, isz = packed_rows(G, L, dtype), jnp.dtype(dtype).itemsize
    blocks = 2 * K * Mp * D * isz + 2 * kv_block * K * D * isz + SUBLANES * kv_block * 4 + 4 * Mp * LANES * 4
    return 2 * blocks + 4 * K * Mp * (2 * LANES + D) + 3 * 4 * Mp * kv_block


def check_supported(q_BLHD, k_BSKD, kv_block: int = 128, interpret: bool = False) -> None:
    """Raise ConfigError (naming the value and the fix) for what the compiled TPU kernel cannot
    take; interpret mode takes any shapes."""
    (B, L, H, D), (S, K) = q_BLHD.shape, k_BSKD.shape[1:3]
    if H % K:
        raise ConfigError(f"{H} query heads are not a multiple of {K} kv heads")
    if interpret:
        return
    dtypes = {jnp.dtype(a.dtype).name for a in (q_BLHD, k_BSKD)}
    if len(dtypes) > 1 or not dtypes <= set(COMPILED_DTYPES):
        raise ConfigError(f"the TPU chunk kernel takes q and k both {' or both '.join(COMPILED_DTYPES)}; got "
                          f"{', '.join(sorted(dtypes))}; {FIX} or cast")
    if D % LANES:
        raise ConfigError(f"the TPU chunk kernel needs a head dim that is a multiple of {LANES}, got {D} (a "
                          f"narrower one makes XLA relayout the whole cache on every call); {FIX}")
    if not (K in (1, 2, 4) or K % SUBLANES == 0):
        raise ConfigError(f"the TPU chunk kernel needs 1, 2, 4 or a multiple of 8 kv heads, got {K} (XLA tiles the "
                          f"cache's (kv heads, head dim) by (1|2|4|8, 128) and would relayout the whole cache on "
                          f"every call); {FIX}")
    if S > kv_block and kv_block % LANES:
        raise ConfigError(f"the TPU chunk kernel's kv_block must be a multiple of {LANES}, got {kv_block}; pass "
                          f"kv_block=128 or 512, or {FIX}")
    need = vmem_bytes(H // K, L, K, D, key_block(S, kv_block), q_BLHD.dtype)
    if need > VMEM_BUDGET:
        raise ConfigError(f"the TPU chunk kernel would hold {need / 2 ** 20:.1f} MiB of VMEM for {L} queries, {H} "
                          f"heads of dim {D} and kv_block={kv_block} (budget {VMEM_BUDGET / 2 ** 20:.0f} MiB); pass a "
                          f"smaller kv_block, a shorter chunk, or {FIX}")


def pick_kv_block(q_BLHD, k_BSKD, blocks=KV_BLOCKS) -> int:
    """The largest key tile in `blocks` whose VMEM fits the budget (fewer grid steps: on TPU the
    per-step overhead dominates a decode step); the smallest when none does (the check says why)."""
    (L, H, D), (S, K) = q_BLHD.shape[1:], k_BSKD.shape[1:3]
    fits = [bk for bk in blocks if vmem_bytes(H // K, L, K, D, key_block(S, bk), q_BLHD.dtype) <= VMEM_BUDGET]
    return fits[0] if fits else blocks[-1]


def _lanes(x_M128, n: int):
    """A lane-replicated [M, 128] column widened (or cut) to [M, n]."""
    if n > LANES:
        x_M128 = jnp.tile(x_M128, (1, -(-n // LANES)))
    return x_M128 if x_M128.shape[1] == n else x_M128[:, :n]


def _head(kv_ref, h: int):
    """Kv head h of a key tile: [bk, D] from a (bk, K, D) block, or the (bk, D) block of MQA."""
    return kv_ref[:, h, :] if len(kv_ref.shape) == 3 else kv_ref[...]


def cache_view(kv_BSKD):
    """The cache as the kernel reads it: [B, S, K, D], or [B, S, D] for one kv head (MQA), whose
    TPU layout tiles (S, D): a free reshape, where a (1, D) block would force a relayout."""
    B, S, K, D = kv_BSKD.shape
    return kv_BSKD.reshape(B, S, D) if K == 1 else kv_BSKD


def _kernel(first_ref, last_ref, q_ref, k_ref, v_ref, kc_ref, rng_ref, o_ref, m_scr, l_scr, acc_scr, *,
            kv_block: int, S: int, scale: float):
    """One (row, key tile) step over all kv heads: online softmax of every packed query row."""
    b, j = pl.program_id(0), pl.program_id(1)
    K, Mp, D = q_ref.shape

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, NEG, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when((first_ref[b] <= j) & (j < last_ref[b]))
    def _attend():
        kc = kc_ref[:1, :]  # [1, bk] key coordinates, NO_KEY where invalid
        lo1, hi1, lo2, hi2 = (_lanes(rng_ref[i], kv_block) for i in range(4))  # [Mp, bk] each
        seen = ((lo1 <= kc) & (kc < hi1)) | ((lo2 <= kc) & (kc < hi2))
        in_cache = None
        if S % kv_block:  # a last partial tile: rows past S hold unspecified values
            in_cache = jax.lax.broadcasted_iota(jnp.int32, (kv_block, D), 0) + j * kv_block < S
        for h in range(K):  # static
            k, v = _head(k_ref, h), _head(v_ref, h)  # [bk, D]
            if in_cache is not None:
                v = jnp.where(in_cache, v, 0).astype(v.dtype)
            s = jax.lax.dot_general(q_ref[h], k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            s = jnp.where(seen, s * scale, NEG)  # [Mp, bk]
            m_prev, l_prev = m_scr[h], l_scr[h]  # [Mp, 128] lane-replicated
            m_next = jnp.maximum(m_prev, jax.lax.broadcast_in_dim(s.max(-1), m_prev.shape, (0,)))
            p = jnp.where(seen, jnp.exp(s - _lanes(m_next, kv_block)), 0.0)
            alpha = jnp.exp(m_prev - m_next)
            l_scr[h] = alpha * l_prev + jax.lax.broadcast_in_dim(p.sum(-1), l_prev.shape, (0,))
            pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            acc_scr[h] = acc_scr[h] * _lanes(alpha, D) + pv
            m_scr[h] = m_next

    @pl.when(j == pl.num_programs(1) - 1)
    def _write():
        for h in range(K):
            l = _lanes(l_scr[h], D)
            o_ref[h] = jnp.where(l > 0, acc_scr[h] / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


def pack_queries(q_BLHD, kv_heads: int, rows: int):
    """[B, L, H, D] -> [B, K, rows, D]: kv head k's G query heads stacked as rows g * L + l, zero-padded."""
    B, L, H, D = q_BLHD.shape
    G = H // kv_heads
    q = q_BLHD.reshape(B, L, kv_heads, G, D).transpose(0, 2, 3, 1, 4).reshape(B, kv_heads, G * L, D)
    return jnp.pad(q, ((0, 0), (0, 0), (0, rows - G * L), (0, 0)))


def unpack_queries(o_BKMD, L: int, H: int):
    """Inverse of `pack_queries` (padded rows dropped)."""
    B, K, _, D = o_BKMD.shape
    G = H // K
    return o_BKMD[:, :, :G * L].reshape(B, K, G, L, D).transpose(0, 3, 1, 2, 4).reshape(B, L, H, D)


def packed_ranges(ranges, G: int, rows: int):
    """int32 [B, 4, rows, 128]: (lo1, hi1, lo2, hi2) per packed row, lane-replicated (the Mosaic
    layout of a per-row column); padded rows see nothing; starts clamped above NO_KEY."""
    (lo1, hi1), (lo2, hi2) = ranges
    floor = NO_KEY + 1
    cols = [jnp.maximum(lo1, floor), hi1, jnp.maximum(lo2, floor), hi2]
    B, L = lo1.shape
    packed = jnp.stack([jnp.tile(c.astype(jnp.int32), (1, G)) for c in cols], 1)  # [B, 4, G * L]
    packed = jnp.pad(packed, ((0, 0), (0, 0), (0, rows - G * L)))
    return jnp.broadcast_to(packed[..., None], (B, 4, rows, LANES))


def key_coords(kv_idx_BS, kv_valid_BS, padded: int):
    """int32 [B, 8, padded]: each key's coordinate (NO_KEY where invalid or past S), sublane-replicated."""
    kc = jnp.where(kv_valid_BS, kv_idx_BS.astype(jnp.int32), NO_KEY)
    kc = pallas_flash.pad_to(kc, 1, padded, NO_KEY)[:, :padded]
    return jnp.broadcast_to(kc[:, None, :], (kc.shape[0], SUBLANES, padded))


def key_span(ranges, kv_idx_BS, kv_valid_BS, kv_block: int, n_tiles: int):
    """(first, last + 1) int32 [B]: each row's span of key tiles some query may see (0, 0: none)."""
    L = ranges[0][0].shape[1]
    kidx = pallas_flash.pad_to(kv_idx_BS.astype(jnp.int32), 1, kv_block)
    valid = pallas_flash.pad_to(kv_valid_BS, 1, kv_block, False)
    visible = pallas_flash.tile_visible(ranges, kidx, valid, L, kv_block)  # [B, 1, nk]
    first, last = pallas_flash.tile_span(visible[..., :n_tiles], 2)
    return first[:, 0], last[:, 0]


def _forward(q_BLHD, k_BSKD, v_BSKD, ranges, kv_idx_BS, kv_valid_BS, kv_block: int, interpret: bool):
    B, L, H, D = q_BLHD.shape
    S, K = k_BSKD.shape[1:3]
    G = H // K
    check_supported(q_BLHD, k_BSKD, kv_block, interpret)
    bk = key_block(S, kv_block)
    nk = -(-S // bk)
    Mp = packed_rows(G, L, q_BLHD.dtype)
    first, last = key_span(ranges, kv_idx_BS, kv_valid_BS, bk, nk)

    def kv_tile(b, j, first_ref, last_ref):  # clamped into the span: no DMA outside it
        return jnp.minimum(jnp.maximum(j, first_ref[b]), jnp.maximum(last_ref[b] - 1, first_ref[b]))

    whole_row = lambda b, j, *_: (b, 0, 0, 0)
    head_dims = (D,) if K == 1 else (K, D)  # see `cache_view`
    kv_spec = pl.BlockSpec((None, bk, *head_dims), lambda b, j, f, l: (b, kv_tile(b, j, f, l), *(0 for _ in head_dims)))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(B, nk),
        in_specs=[pl.BlockSpec((None, K, Mp, D), whole_row),
                  kv_spec, kv_spec,
                  pl.BlockSpec((None, SUBLANES, bk), lambda b, j, f, l: (b, 0, kv_tile(b, j, f, l))),
                  pl.BlockSpec((None, 4, Mp, LANES), whole_row)],
        out_specs=pl.BlockSpec((None, K, Mp, D), whole_row),
        scratch_shapes=[pltpu.VMEM((K, Mp, LANES), jnp.float32), pltpu.VMEM((K, Mp, LANES), jnp.float32),
                        pltpu.VMEM((K, Mp, D), jnp.float32)])
    kernel = functools.partial(_kernel, kv_block=bk, S=S, scale=1.0 / float(D) ** 0.5)
    out = pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((B, K, Mp, D), q_BLHD.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=VMEM_LIMIT),
        interpret=interpret, name="jaxgen_tpu_chunk_attention",
    )(first, last, pack_queries(q_BLHD, K, Mp), cache_view(k_BSKD), cache_view(v_BSKD),
      key_coords(kv_idx_BS, kv_valid_BS, nk * bk), packed_ranges(ranges, G, Mp))
    return unpack_queries(out, L, H)


def dense_mask(ranges, kv_idx_BS, kv_valid_BS):
    """bool [B, L, S]: the layout rule from the two ranges, and key validity (the reference's mask)."""
    (lo1, hi1), (lo2, hi2) = (tuple(a[..., None] for a in pair) for pair in ranges)
    k = kv_idx_BS[:, None, :]
    return (((lo1 <= k) & (k < hi1)) | ((lo2 <= k) & (k < hi2))) & kv_valid_BS[:, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def chunk_attention_tpu(q_BLHD, k_BSKD, v_BSKD, ranges, kv_idx_BS, kv_valid_BS, kv_block: int = 128,
                        interpret: bool = False):
    """Attention of a short chunk of queries over a cache on TPU: each query over the keys inside
    its two ranges ((lo1, hi1), (lo2, hi2)) [B, L] int32 among keys with `kv_valid_BS`; scale
    1/sqrt(D); rows with no visible key give 0. Equals `pallas_chunk.chunk_attention` and the XLA
    reference; gradients are the reference's."""
    return _forward(q_BLHD, k_BSKD, v_BSKD, ranges, kv_idx_BS, kv_valid_BS, kv_block, interpret)


def _fwd(q, k, v, ranges, kv_idx, kv_valid, kv_block, interpret):
    out = chunk_attention_tpu(q, k, v, ranges, kv_idx, kv_valid, kv_block, interpret)
    return out, (q, k, v, ranges, kv_idx, kv_valid)


def _bwd(kv_block, interpret, saved, d_out):
    """The XLA reference's gradient (dense mask recomputed): a decode chunk's mask is small."""
    q, k, v, ranges, kv_idx, kv_valid = saved
    mask_BLS = dense_mask(ranges, kv_idx, kv_valid)
    dq, dk, dv = jax.vjp(lambda q, k, v: reference_attention(q, k, v, mask_BLS), q, k, v)[1](d_out)
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), (ranges, kv_idx, kv_valid))
    return (dq, dk, dv, *zeros)


chunk_attention_tpu.defvjp(_fwd, _bwd)

__all__ = ["chunk_attention_tpu", "check_supported", "serves", "pick_kv_block", "key_block", "vmem_bytes"]
