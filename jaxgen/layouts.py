"""Attention layouts: who may attend to whom.

A layout is a small frozen (hashable, jit-static) object. Its rule is written once, per query,
as at most two visible key ranges [lo, hi) in layout coordinates (`kv_ranges`): a function of
the query coordinate, the layout's static fields and at most one per-row integer (`split`).
From it come

- `mask(q_idx, kv_idx, seq_len, split)`: the dense boolean mask for the XLA reference;
- `block_map(q_len, kv_len, q_block, kv_block, seq_len, split)`: the tile map (0 skip,
  1 partial, 2 full) that block-sparse kernels iterate, by range arithmetic per tile (never from
  the dense mask), so a kernel can build it, or evaluate the rule in-kernel, from q, the static
  fields and the per-row scalar alone. (`tree` is the exception: a static ancestor table.)

Coordinates are not RoPE positions. For single-stream layouts they are the token positions by
default, and the slots of a dense cache (slot p holds position p). A chunk fed in another order
passes its own coordinates: WeDLM's reordered window is `causal()` over the physical slots while
RoPE keeps the logical positions; TiDAR's step chunk is `verify_draft(k)` over its slots. For
the two-stream training layouts (`dual_stream`, `ar_diffusion`) they index the 2n-long sequence.

Per-row data: `split` (scalar or [B] int32, traced) is the row's boundary coordinate: the
prefix end for `prefix(None)` (LaViDa: one prompt length per row), the chunk start for
`verify_draft` and `tree`. Layouts with `per_row` need it; the others refuse it.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxgen.errors import ConfigError

KINDS = ("causal", "full", "block_causal", "dual_stream", "prefix", "ar_diffusion", "verify_draft", "tree")
TWO_STREAM = ("dual_stream", "ar_diffusion")
TWO_RANGES = ("dual_stream", "ar_diffusion", "verify_draft")
UNBOUNDED = 2 ** 30  # hi of a range that reaches every key


@dataclasses.dataclass(frozen=True)
class Layout:
    kind: str
    block: int = 1
    prefix_len: int | None = 0  # prefix: static prefix length, or None for one per row (split)
    causal_prefix: bool = False  # prefix: causal (not bidirectional) inside the prefix
    causal_suffix: bool = False
    causal_block: bool = False  # ar_diffusion: causal (not bidirectional) inside a noisy block
    parents: tuple = ()  # tree: parents[i] in [-1, i) (-1: a root, attached to what precedes)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"unknown layout {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.block <= 0:
            raise ConfigError(f"block size {self.block} must be positive")
        if self.prefix_len is None and self.kind != "prefix":
            raise ConfigError(f"prefix_len=None (one per row) applies to the prefix layout, not {self.kind!r}")
        if self.prefix_len is not None and self.prefix_len < 0:
            raise ConfigError(f"prefix length {self.prefix_len} must be >= 0")
        if self.causal_block and self.kind != "ar_diffusion":
            raise ConfigError(f"causal_block applies to the ar_diffusion layout, not {self.kind!r}")
        if (self.causal_prefix or self.causal_suffix) and self.kind != "prefix":
            raise ConfigError(f"causal_prefix / causal_suffix apply to the prefix layout, not {self.kind!r}")
        _check_parents(self.kind, self.parents)

    @property
    def two_stream(self) -> bool:
        """Coordinates index a 2n-long [stream | stream] training sequence, not positions."""
        return self.kind in TWO_STREAM

    @property
    def per_row(self) -> bool:
        """The rule reads a per-row `split` (prefix end or chunk start)."""
        return self.kind in ("verify_draft", "tree") or (self.kind == "prefix" and self.prefix_len is None)

    def kv_ranges(self, q_idx, seq_len: int | None = None, split=None, xp=jnp):
        """((lo1, hi1), (lo2, hi2)), each shaped like q_idx (and split's batch): query q sees key k
        iff lo1 <= k < hi1 or lo2 <= k < hi2. `xp` = numpy gives static ranges (block maps at
        trace time)."""
        q = xp.asarray(q_idx)
        s = self._split(split, q, xp)
        q = q + xp.zeros_like(s)  # broadcast over split's rows
        zero, b = xp.zeros_like(q), self.block
        none = (zero, zero)
        if self.kind == "causal":
            return (zero, q + 1), none
        if self.kind == "full":
            return (zero, zero + UNBOUNDED), none
        if self.kind == "block_causal":
            return (zero, (q // b + 1) * b), none
        if self.kind == "prefix":
            hi_prefix = q + 1 if self.causal_prefix else zero + s
            hi_suffix = q + 1 if self.causal_suffix else zero + UNBOUNDED
            return (zero, xp.where(q < s, hi_prefix, hi_suffix)), none
        if self.kind == "verify_draft":
            return _verify_draft_ranges(q, s, b, xp)
        if self.kind == "tree":  # a superset (causal); `mask` refines it with the ancestor table
            return (zero, q + 1), none
        n = _half(self.kind, seq_len)
        qb = (q % n) // b
        block_end = xp.minimum(n + (qb + 1) * b, 2 * n)
        if self.kind == "ar_diffusion":  # [x | MASK]: causal clean stream; a mask block sees the clean past
            clean, own_hi = q < n, (q + 1 if self.causal_block else block_end)
            return ((zero, xp.where(clean, q + 1, qb * b)),
                    (xp.where(clean, 0, n + qb * b), xp.where(clean, 0, own_hi)))
        # dual_stream [x_t | x_0]: a noisy block sees itself and the clean blocks before it
        noisy = q < n
        return ((xp.where(noisy, qb * b, n), xp.where(noisy, xp.minimum((qb + 1) * b, n), block_end)),
                (xp.where(noisy, n, 0), xp.where(noisy, n + qb * b, 0)))

    def mask(self, q_idx, kv_idx, seq_len: int | None = None, split=None):
        """Boolean [..., Lq, Lk]: True where query q_idx may attend to key kv_idx."""
        k = jnp.asarray(kv_idx)[..., None, :]
        (lo1, hi1), (lo2, hi2) = self.kv_ranges(q_idx, seq_len, split)
        inside = lambda lo, hi: (lo[..., None] <= k) & (k < hi[..., None])
        visible = inside(lo1, hi1)
        if self.kind in TWO_RANGES:  # the others' second range is always empty
            visible = visible | inside(lo2, hi2)
        if self.kind == "tree":
            visible = visible & _tree_refine(self.parents, jnp.asarray(q_idx), k, self._split(split, q_idx, jnp))
        return visible

    def block_map(self, q_len: int, kv_len: int, q_block: int, kv_block: int, seq_len: int | None = None,
                  split=None):
        """int8 [(B,) ceil(q_len/q_block), ceil(kv_len/kv_block)]: 0 skip, 1 partial, 2 full, for
        coordinates 0..q_len-1 / 0..kv_len-1 (padding is never visible). numpy when the rule is
        static; with a per-row `split` one map per row (jnp when split is traced)."""
        nq, nk = -(-q_len // q_block), -(-kv_len // kv_block)
        if self.kind == "tree":
            return _tiled(self.mask(jnp.arange(q_len), jnp.arange(kv_len), seq_len, split), q_block, kv_block)
        xp = np if split is None or isinstance(split, (int, np.integer, np.ndarray)) else jnp
        q = xp.arange(nq * q_block)
        ranges = self.kv_ranges(q, seq_len or kv_len, split, xp)
        tile = lambda a: a.reshape(a.shape[:-1] + (nq, q_block))[..., None]  # [..., nq, q_block, 1]
        (lo1, hi1), (lo2, hi2) = [(tile(lo), tile(hi)) for lo, hi in ranges]
        k0 = xp.arange(nk) * kv_block
        k1 = xp.minimum(k0 + kv_block, kv_len)
        meets = lambda lo, hi: xp.maximum(lo, k0) < xp.minimum(hi, k1)
        covers = lambda lo, hi: (lo <= k0) & (hi >= k1)
        joint = ((lo1 <= k0) & (hi1 >= lo2) & (hi2 >= k1)) | ((lo2 <= k0) & (hi2 >= lo1) & (hi1 >= k1))
        real_q = (q < q_len).reshape(nq, q_block)[..., None]
        any_ = ((meets(lo1, hi1) | meets(lo2, hi2)) & real_q).any(axis=-2)
        all_ = (covers(lo1, hi1) | covers(lo2, hi2) | joint).all(axis=-2)
        all_ = all_ & real_q.all(axis=-2) & (k0 + kv_block <= kv_len)
        return xp.where(all_, 2, xp.where(any_, 1, 0)).astype(xp.int8)

    def _split(self, split, q, xp):
        """The boundary the rule reads, broadcastable against q [..., Lq]."""
        if not self.per_row:
            if split is not None:
                raise ConfigError(f"the {self.kind} layout takes no per-row split (got one); drop split")
            return xp.asarray(self.prefix_len or 0, dtype=xp.asarray(q).dtype)
        if split is None:
            raise ConfigError(f"the {self.kind} layout needs split (its per-row {self._split_name()}), got None")
        s = xp.asarray(split).astype(xp.asarray(q).dtype)
        return s if s.ndim == 0 else s[..., None]

    def _split_name(self) -> str:
        return "prefix length" if self.kind == "prefix" else "chunk start"


def _half(kind: str, seq_len):
    if seq_len is None or seq_len % 2:
        raise ConfigError(f"{kind} needs an even total length (two streams), got {seq_len}")
    return seq_len // 2


def _verify_draft_ranges(q, s, k, xp):
    """TiDAR's step chunk at coordinates s..s+k+k*k-1 after a cache [0, s): k causal rows, then
    block a (k rows) sees the cache, causal rows 0..a and itself. Rows outside the chunk are
    causal (so visibility stays transitive, as stacked layers need)."""
    r = q - s
    a = (r - k) // k
    causal = (r < k) | (r >= k + k * k)
    first = (xp.zeros_like(q), xp.where(causal, q + 1, s + a + 1))
    own = s + k + a * k
    second = (xp.where(causal, 0, own), xp.where(causal, 0, own + k))
    return first, second


def _check_parents(kind: str, parents):
    if not parents:
        if kind == "tree":
            raise ConfigError("the tree layout needs parents (one per node), got none")
        return
    if kind != "tree":
        raise ConfigError(f"parents apply to the tree layout, not {kind!r}")
    if not isinstance(parents, tuple):
        raise ConfigError(f"tree parents must be a tuple (hashable), got {type(parents).__name__}")
    for i, p in enumerate(parents):
        if not (isinstance(p, (int, np.integer)) and -1 <= p < i):
            raise ConfigError(f"tree parents[{i}]={p!r} must be -1 (a root) or an earlier node in [0, {i})")


def ancestors(parents: tuple) -> np.ndarray:
    """bool [n, n]: [i, j] when node j is node i or one of its ancestors."""
    n = len(parents)
    table = np.eye(n, dtype=bool)
    for i, p in enumerate(parents):
        if p >= 0:
            table[i] |= table[p]
    return table


def _tree_refine(parents, q_idx, k, s):
    """Among the tree's nodes (coordinates s..s+n-1), only ancestors-or-self stay visible."""
    n = len(parents)
    r, c = q_idx[..., :, None] - s[..., None], k - s[..., None]
    in_tree = (r >= 0) & (r < n) & (c >= 0) & (c < n)
    table = jnp.asarray(ancestors(parents))[jnp.clip(r, 0, n - 1), jnp.clip(c, 0, n - 1)]
    return ~in_tree | table


def _tiled(dense, q_block: int, kv_block: int):
    """The tile map of a dense mask (the tree layout's static table)."""
    q_len, kv_len = dense.shape[-2:]
    nq, nk = -(-q_len // q_block), -(-kv_len // kv_block)
    pad = [(0, 0)] * (dense.ndim - 2) + [(0, nq * q_block - q_len), (0, nk * kv_block - kv_len)]
    tiles = jnp.pad(dense, pad).reshape(dense.shape[:-2] + (nq, q_block, nk, kv_block))
    any_, all_ = tiles.any(axis=(-3, -1)), tiles.all(axis=(-3, -1))
    return jnp.where(all_, 2, jnp.where(any_, 1, 0)).astype(jnp.int8)


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


def prefix(prefix_len: int | None, causal_suffix: bool = False, causal_prefix: bool = False) -> Layout:
    """Prefix-LM: prefix queries see only the prefix (bidirectionally, or causally with
    `causal_prefix`), so its K/V never depend on the rest; suffix queries see everything (or,
    with `causal_suffix`, the prefix and the suffix up to themselves). prefix_len=None takes one
    length per row as `split` (LaViDa's training: each row's prompt). `prefix(P,
    causal_prefix=True)` is TiDAR's prefill chunk: a causal prompt, then a block seeing all."""
    return Layout("prefix", prefix_len=prefix_len, causal_suffix=causal_suffix, causal_prefix=causal_prefix)


def ar_diffusion(block: int, causal_block: bool = False) -> Layout:
    """TiDAR/NBDiff joint training over [x | x_t] (shared positions): the clean stream is causal
    (AR loss); each noisy block attends to the clean tokens before the block and within itself,
    bidirectionally, or causally in physical order with `causal_block` (WeDLM's dual-stream
    masking, whose noisy blocks are reordered observed-first)."""
    return Layout("ar_diffusion", block=block, causal_block=causal_block)


def verify_draft(draft_length: int) -> Layout:
    """TiDAR's decode step over [last, g_1..g_{k-1} | M_0 | ... | M_{k-1}] (k = draft_length,
    k + k*k rows from coordinate `split`, after a cache [0, split)): the first k rows are causal
    (they verify the drafts), block M_a sees the cache, rows 0..a and itself bidirectionally.
    Rows outside the chunk are causal."""
    return Layout("verify_draft", block=draft_length)


def tree(parents) -> Layout:
    """Draft-tree verification (the hook for tree speculative decoding): causal, except that
    among the n = len(parents) nodes at coordinates split..split+n-1 (parents before children)
    a node sees only itself and its ancestors. The tree is static (part of the jit key)."""
    return Layout("tree", parents=tuple(int(p) for p in parents))
