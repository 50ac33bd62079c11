"""Layouts: masks and block maps against an independent, scalar Python statement of every rule
(`visible` below: written from the layout docstrings, sharing no code with jaxgen.layouts)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import layouts
from jaxgen.errors import ConfigError

L = 8
TREE = (-1, 0, 0, 1, 1, 2, -1)  # two roots; node 6 is a second root after the first subtree


def visible(layout, q, k, seq_len=None, s=None):
    """May query q see key k? One coordinate pair at a time, straight from the definitions."""
    kind, b = layout.kind, layout.block
    if kind == "causal":
        return k <= q
    if kind == "full":
        return True
    if kind == "block_causal":
        return k // b <= q // b
    if kind == "prefix":
        p = layout.prefix_len if layout.prefix_len is not None else s
        if q < p:
            return k <= q if layout.causal_prefix else k < p
        return k <= q if layout.causal_suffix else True
    if kind == "verify_draft":
        r, c = q - s, k - s
        if r < b or r >= b + b * b:  # rows outside the chunk, and the verify rows: causal
            return k <= q
        a = (r - b) // b
        return c < 0 or c <= a or b + a * b <= c < b + (a + 1) * b
    if kind == "tree":
        r, c = q - s, k - s
        if 0 <= r < len(layout.parents) and 0 <= c < len(layout.parents):
            while r >= 0 and r != c:  # walk up from the query to a root
                r = layout.parents[r]
            return r == c
        return k <= q
    n = seq_len // 2
    qb, kb = (q % n) // b, (k % n) // b
    if kind == "ar_diffusion":  # [x | MASK]
        if q < n:
            return k <= q
        return (k < n and kb < qb) or (k >= n and kb == qb and (k <= q or not layout.causal_block))
    if q < n:  # dual_stream [x_t | x_0], q noisy
        return (k < n and kb == qb) or (k >= n and kb < qb)
    return k >= n and kb <= qb


CASES = [  # (layout, seq_len, split)
    (layouts.causal(), None, None), (layouts.full(), None, None), (layouts.block_causal(3), None, None),
    (layouts.prefix(5), None, None), (layouts.prefix(5, causal_suffix=True), None, None),
    (layouts.prefix(4, causal_prefix=True), None, None), (layouts.prefix(None), None, 6),
    (layouts.dual_stream(2), 12, None), (layouts.dual_stream(4), 10, None),
    (layouts.ar_diffusion(3), 12, None), (layouts.ar_diffusion(4, causal_block=True), 14, None),
    (layouts.verify_draft(2), None, 3), (layouts.verify_draft(3), None, 1), (layouts.tree(TREE), None, 2),
]
IDS = [f"{c[0].kind}-{i}" for i, c in enumerate(CASES)]


def expected_mask(layout, q_len, kv_len, seq_len, s):
    return np.array([[visible(layout, q, k, seq_len, s) for k in range(kv_len)] for q in range(q_len)])


@pytest.mark.parametrize("layout,seq_len,split", CASES, ids=IDS)
def test_mask_matches_the_definition(layout, seq_len, split):
    n = seq_len or 14
    got = np.asarray(layout.mask(np.arange(n), np.arange(n), seq_len, split))
    np.testing.assert_array_equal(got, expected_mask(layout, n, n, seq_len, split))


def expected_block_map(layout, q_len, kv_len, qb, kb, seq_len, s):
    """Brute force over tiles of the definition; padding (beyond q_len / kv_len) is never visible."""
    m = expected_mask(layout, q_len, kv_len, seq_len, s)
    out = np.zeros((-(-q_len // qb), -(-kv_len // kb)), np.int8)
    for i, j in itertools.product(range(out.shape[0]), range(out.shape[1])):
        tile = m[i * qb:(i + 1) * qb, j * kb:(j + 1) * kb]
        whole = tile.shape == (qb, kb)
        out[i, j] = 2 if whole and tile.all() else 1 if tile.any() else 0
    return out


@pytest.mark.parametrize("layout,seq_len,split", CASES, ids=IDS)
@pytest.mark.parametrize("q_len,kv_len,qb,kb", [(12, 12, 4, 4), (14, 14, 3, 2), (10, 14, 4, 5), (14, 14, 1, 7)])
def test_block_map_matches_brute_force(layout, seq_len, split, q_len, kv_len, qb, kb):
    if seq_len is not None:
        q_len = kv_len = seq_len
    got = np.asarray(layout.block_map(q_len, kv_len, qb, kb, seq_len, split))
    np.testing.assert_array_equal(got, expected_block_map(layout, q_len, kv_len, qb, kb, seq_len, split))


@pytest.mark.parametrize("layout", [layouts.prefix(None), layouts.verify_draft(2), layouts.tree(TREE)],
                         ids=lambda l: l.kind)
def test_per_row_split_gives_one_map_per_row_and_traces(layout):
    split = np.array([0, 3, 5], np.int32)
    m = np.asarray(layout.mask(np.arange(14), np.arange(14), None, split))
    bm = np.asarray(jax.jit(lambda s: layout.block_map(14, 14, 4, 3, split=s))(jnp.asarray(split)))
    assert m.shape == (3, 14, 14) and bm.shape == (3, 4, 5)
    for row, s in enumerate(split):
        np.testing.assert_array_equal(m[row], expected_mask(layout, 14, 14, None, int(s)))
        np.testing.assert_array_equal(bm[row], expected_block_map(layout, 14, 14, 4, 3, None, int(s)))


def test_static_block_maps_are_numpy_even_under_jit():
    """A kernel builder gets a concrete map for static rules, also while tracing."""
    seen = []
    jax.jit(lambda x: seen.append(layouts.block_causal(4).block_map(8, 8, 4, 4)) or x)(1)
    assert isinstance(seen[0], np.ndarray)
    np.testing.assert_array_equal(seen[0], [[2, 0], [2, 2]])


def test_known_maps_by_hand():
    np.testing.assert_array_equal(layouts.causal().block_map(8, 8, 4, 4), [[1, 0], [2, 1]])
    np.testing.assert_array_equal(layouts.full().block_map(6, 6, 4, 4), [[2, 1], [1, 1]])  # ragged tiles
    np.testing.assert_array_equal(layouts.prefix(4).block_map(8, 8, 4, 4), [[2, 0], [2, 2]])
    # 6 queries in tiles of 4: the second tile holds 2 real rows and 2 of padding, so it is never full
    np.testing.assert_array_equal(layouts.block_causal(2).block_map(6, 6, 4, 2), [[2, 1, 0], [1, 1, 1]])
    # two streams of n = 4 in blocks of 2, tiles of 2 (one block each): rows and columns are
    # [noisy/MASK block 0, block 1 | clean block 0, block 1] for dual_stream, [clean | MASK] for ar_diffusion
    np.testing.assert_array_equal(layouts.dual_stream(2).block_map(8, 8, 2, 2, 8), [
        [2, 0, 0, 0],  # x_t block 0: itself
        [0, 2, 2, 0],  # x_t block 1: itself and clean block 0
        [0, 0, 2, 0],  # x_0 block 0: itself
        [0, 0, 2, 2]])  # x_0 block 1: clean blocks 0 and 1
    np.testing.assert_array_equal(layouts.ar_diffusion(2).block_map(8, 8, 2, 2, 8), [
        [1, 0, 0, 0],  # clean tokens 0, 1: causal (a lower triangle)
        [2, 1, 0, 0],  # clean tokens 2, 3
        [0, 0, 2, 0],  # MASK block 0: nothing clean before it, itself
        [2, 0, 0, 2]])  # MASK block 1: clean block 0, itself


def test_dual_stream_union_of_two_ranges_covers_a_tile():
    """The last noisy block sees [n - b, n) and [n, n + qb*b): one tile straddling n is full."""
    n, b = 8, 4
    bm = layouts.dual_stream(b).block_map(2 * n, 2 * n, 1, 4, 2 * n)
    # query 5 (last noisy block): keys [4, 8) (itself) and [8, 12) (the clean block before it)
    np.testing.assert_array_equal(bm[5], [0, 2, 2, 0])
    straddle = layouts.dual_stream(b).block_map(2 * n, 2 * n, 1, 8, 2 * n)
    assert straddle[5].tolist() == [1, 1]  # [0, 8) half visible; [8, 16) half visible


def test_layouts_are_hashable_and_static():
    assert hash(layouts.tree(TREE)) == hash(layouts.tree(list(TREE)))
    assert layouts.prefix(None) == layouts.prefix(None) and layouts.prefix(None).per_row
    assert layouts.verify_draft(3).per_row and not layouts.prefix(3).per_row


def test_tree_ancestor_table():
    table = layouts.ancestors(TREE)
    assert table[4].tolist() == [True, True, False, False, True, False, False]
    assert table[6].tolist() == [False] * 6 + [True]


def test_bad_layouts():
    with pytest.raises(ConfigError, match="block size"):
        layouts.block_causal(0)
    with pytest.raises(ConfigError, match="unknown layout"):
        layouts.Layout("sliding")
    with pytest.raises(ConfigError, match="causal_block"):
        layouts.Layout("dual_stream", block=4, causal_block=True)
    with pytest.raises(ConfigError, match=r"parents\[2\]=2"):
        layouts.tree((-1, 0, 2))
    with pytest.raises(ConfigError, match="needs parents"):
        layouts.tree(())
    with pytest.raises(ConfigError, match="prefix_len=None"):
        layouts.Layout("causal", prefix_len=None)
    with pytest.raises(ConfigError, match="needs split"):
        layouts.prefix(None).mask(np.arange(4), np.arange(4))
    with pytest.raises(ConfigError, match="takes no per-row split"):
        layouts.causal().mask(np.arange(4), np.arange(4), split=np.array([1]))
    with pytest.raises(ConfigError, match="even total length"):
        layouts.dual_stream(2).mask(np.arange(5), np.arange(5), 5)
