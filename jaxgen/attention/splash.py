"""Splash attention (jax's TPU Pallas kernel) behind the door: `impl="splash"`.

`jax.experimental.pallas.ops.tpu.splash_attention` takes a *static* mask object and derives its
own block-sparse tables from it at trace time (empty tiles skipped, full tiles unmasked, partial
tiles deduplicated). So this path serves what is known when tracing: numpy coordinates (training
forwards over `0..L-1`, or the two-stream `0..2n-1`) and, for per-row layouts (prefix(None),
verify_draft, tree), a static int `split`: every layout. Traced coordinates or a traced split (cached decode chunks) are refused: use
`impl="pallas"` or `"xla"` there. Dynamic key validity (padding, cache fill) rides on splash's
segment ids: queries are segment 1, keys 1 when valid else 0.

The mask is `LayoutMask`, a lazy splash `Mask` that evaluates the layout's rule per tile with
numpy (`Layout.kv_ranges(..., xp=np)`; the tree's ancestor table on top), never an [L, S]
array; splash walks its tiles once per mask and `_kernel` caches the result. One mask serves every head and
batch row (the kernel is vmapped over the batch); GQA reads each kv head once per query-head
group (splash MHA with fewer kv heads), never a repeated K/V.

Semantics follow the reference: scale 1/sqrt(D), float32 softmax statistics, rows with no
visible key give 0. Splash alone would average V over a fully masked tile (its running max
starts at the mask value); a per-head logit sink of -1e30 starts the running max there instead,
so masked scores underflow to 0, an empty row ends with sum 1 and output 0, and its backward
terms vanish (p = exp(mask - lse) = 0). Lengths are padded to multiples of 128 (the TPU lane
width the kernel asserts even when interpreted); padded keys are masked, padded queries dropped.
Backward: splash's custom VJP (dK/dV kernel, then dQ kernel).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from jaxgen import layouts
from jaxgen.errors import ConfigError

LANES = 128  # splash's tile unit: block sizes (and so padded lengths) are multiples of it
BLOCKS = (512, 256, 128)  # tile sizes tried, largest first, among those dividing the padded length
SINK = -1e30  # initial running max: fully masked rows give 0, not the mean of V
COMPILED_DTYPES = ("float32", "bfloat16")
FIX = "use impl='pallas' or 'xla'"


class LayoutMask(sa.Mask):
    """The layout's rule over static coordinates as a lazy splash mask [Lp, Sp]: tiles are
    evaluated on demand; rows >= L and columns >= S (padding) are never visible."""

    def __init__(self, layout, q_L, kv_S, seq_len, split, shape):
        self.layout, self.seq_len, self.split, self._shape = layout, seq_len, split, shape
        self.q_L, self.kv_S = np.asarray(q_L, np.int64), np.asarray(kv_S, np.int64)

    @property
    def shape(self):
        return self._shape

    def __getitem__(self, idx) -> np.ndarray:
        rows, cols = (slice(*s.indices(n)) for s, n in zip(idx, self._shape))
        block = np.zeros((rows.stop - rows.start, cols.stop - cols.start), bool)
        q, k = self.q_L[rows], self.kv_S[cols]  # numpy slicing clips at L / S: the rest stays False
        block[:len(q), :len(k)] = visible(self.layout, q, k, self.seq_len, self.split)
        return block

    def _key(self):
        return (self.layout, self.q_L.tobytes(), self.kv_S.tobytes(), self.seq_len, self.split, self._shape)

    def __eq__(self, other):
        return isinstance(other, LayoutMask) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())


def visible(layout, q_L, kv_S, seq_len, split) -> np.ndarray:
    """bool [L, S] from numpy coordinates: the rule of `layout.mask`, evaluated with numpy."""
    (lo1, hi1), (lo2, hi2) = layout.kv_ranges(q_L, seq_len, split, xp=np)
    k = kv_S[None, :]
    seen = ((lo1[:, None] <= k) & (k < hi1[:, None])) | ((lo2[:, None] <= k) & (k < hi2[:, None]))
    if layout.kind == "tree":  # ranges are causal; among the nodes split..split+n-1, ancestors only
        n = len(layout.parents)
        r, c = q_L[:, None] - split, k - split
        in_tree = (r >= 0) & (r < n) & (c >= 0) & (c < n)
        seen &= ~in_tree | layouts.ancestors(layout.parents)[np.clip(r, 0, n - 1), np.clip(c, 0, n - 1)]
    return seen


def _static_row(a, name: str) -> np.ndarray:
    """The one row of static coordinates `a` ([L] or [B, L] with identical rows), or ConfigError."""
    if isinstance(a, jax.core.Tracer):
        raise ConfigError(f"impl='splash' builds its mask at trace time and needs static (numpy) coordinates; "
                          f"{name} is traced. Pass numpy coordinates (training forwards); cached chunks: {FIX}")
    a = np.asarray(a)
    if a.ndim not in (1, 2):
        raise ConfigError(f"impl='splash': {name} must be [L] or [B, L], got shape {a.shape}")
    if a.ndim == 2 and not (a == a[:1]).all():
        raise ConfigError(f"impl='splash' builds one mask for the batch, but the rows of {name} differ; "
                          f"give every row the same coordinates, or {FIX}")
    return a.reshape(-1, a.shape[-1])[0]


def _static_split(split, layout=None):
    """split as a Python int (or None), or ConfigError when it is traced or differs across rows."""
    if split is None:
        return None
    kind = f"the {layout.kind!r} layout's" if layout is not None else "the"
    if isinstance(split, jax.core.Tracer):
        raise ConfigError(f"impl='splash' builds its mask at trace time; {kind} per-row split is traced. "
                          f"Pass a static int split, or {FIX}")
    s = np.asarray(split)
    if s.size == 0 or not (s == s.reshape(-1)[0]).all():
        raise ConfigError(f"impl='splash' builds one mask for the batch; split={s.tolist()} differs across rows; "
                          f"pass one static int, or {FIX}")
    return int(s.reshape(-1)[0])


def static_coords(q_idx, kv_idx, split) -> bool:
    """True when the coordinates and split are known at trace time (numpy or concrete arrays,
    every batch row alike): the condition for splash's static mask."""
    try:
        _static_row(q_idx, "q_idx"), _static_row(kv_idx, "kv_idx"), _static_split(split)
    except ConfigError:
        return False
    return True


def check_supported(q_BLHD, k_BSKD, layout, q_idx, kv_idx, split, interpret) -> None:
    """ConfigError naming the value and the fix when splash cannot serve this call: traced or
    row-varying coordinates or split, a coordinate count that is not the token count, head counts;
    compiled for TPU (interpret=False) also head dims that are not a multiple of 128 (the lane
    width; jax issues #26433, #30861; upstream builds and tests 128 and 256) and dtypes other
    than float32 / bfloat16 (the two upstream tests)."""
    for name, idx, n in (("q_idx", q_idx, q_BLHD.shape[1]), ("kv_idx", kv_idx, k_BSKD.shape[1])):
        got = len(_static_row(idx, name))
        if got != n:
            raise ConfigError(f"impl='splash': {name} has {got} coordinates for {n} tokens")
    _static_split(split, layout)
    H, K = q_BLHD.shape[2], k_BSKD.shape[2]
    if H % K:
        raise ConfigError(f"impl='splash': {H} query heads are not a multiple of {K} kv heads")
    if interpret:
        return
    D = q_BLHD.shape[-1]
    if D % LANES:
        raise ConfigError(f"impl='splash' (compiled TPU kernel) needs a head dim that is a multiple of {LANES}, "
                          f"got {D}; use impl='xla' (or pad the head dim)")
    for name, a in (("q", q_BLHD), ("k", k_BSKD)):
        if jnp.dtype(a.dtype).name not in COMPILED_DTYPES:
            raise ConfigError(f"impl='splash' (compiled TPU kernel) takes {' or '.join(COMPILED_DTYPES)}; {name} is "
                              f"{jnp.dtype(a.dtype).name}; cast, or use impl='xla'")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _block(padded: int, max_block: int) -> int:
    """The largest tile size in BLOCKS (<= max_block) dividing a padded length."""
    return next((b for b in BLOCKS if b <= max_block and padded % b == 0), LANES)


def block_sizes(L_pad: int, S_pad: int, max_block: int = BLOCKS[0]) -> sa.BlockSizes:
    """Forward, dK/dV and dQ tiles: the largest of 512 / 256 / 128 that divide the padded lengths."""
    bq, bkv = _block(L_pad, max_block), _block(S_pad, max_block)
    return sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                         block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)


@functools.lru_cache(maxsize=64)
def _kernel(mask: LayoutMask, heads: int, sizes: sa.BlockSizes, interpret: bool):
    """The splash kernel for one static mask shared by `heads` query heads (built once per key;
    its tables are concrete arrays even when first built inside a jit trace)."""
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(sa.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def _pad_axis(x, axis: int, size: int, value=0):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def splash_attention(q_BLHD, k_BSKD, v_BSKD, layout, *, q_idx, kv_idx, kv_valid_BS=None, split=None,
                     seq_len=None, interpret: bool, max_block: int = BLOCKS[0]):
    """Softmax attention of queries over the keys `layout` allows (and `kv_valid_BS`), on splash.

    q_idx / kv_idx: static layout coordinates, [L] / [S] or [B, ...] with identical rows; split: a
    static int for per-row layouts; seq_len: total length for the two-stream layouts; max_block:
    the largest tile tried (tests use 128 for several tiles). Returns [B, L, H, D] in q's dtype.
    """
    check_supported(q_BLHD, k_BSKD, layout, q_idx, kv_idx, split, interpret)
    B, L, H, D = q_BLHD.shape
    S = k_BSKD.shape[1]
    L_pad, S_pad = _round_up(L, LANES), _round_up(S, LANES)
    mask = LayoutMask(layout, _static_row(q_idx, "q_idx"), _static_row(kv_idx, "kv_idx"), seq_len,
                      _static_split(split, layout), (L_pad, S_pad))
    kernel = _kernel(mask, H, block_sizes(L_pad, S_pad, max_block), bool(interpret))
    scaled = (q_BLHD.astype(jnp.float32) / math.sqrt(D)).astype(q_BLHD.dtype)
    q_BHLD = _pad_axis(scaled.transpose(0, 2, 1, 3), 2, L_pad)
    k_BKSD, v_BKSD = (_pad_axis(x.transpose(0, 2, 1, 3), 2, S_pad) for x in (k_BSKD, v_BSKD))
    segments = None
    if kv_valid_BS is not None:
        kv_seg_BS = _pad_axis(jnp.broadcast_to(kv_valid_BS, (B, S)).astype(jnp.int32), 1, S_pad)
        segments = sa.SegmentIds(q=jnp.ones((B, L_pad), jnp.int32), kv=kv_seg_BS)
    sinks_H = jnp.full((H,), SINK, jnp.float32)
    run = lambda q, k, v, seg: kernel(q, k, v, seg, sinks_H)
    out_BHLD = jax.vmap(run, in_axes=(0, 0, 0, None if segments is None else 0))(q_BHLD, k_BKSD, v_BKSD, segments)
    return out_BHLD[:, :, :L].transpose(0, 2, 1, 3)
