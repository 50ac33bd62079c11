"""The block-sparse Pallas kernel (interpret mode on CPU) against the XLA reference: every
range layout, GQA, uneven tiles, cache-slot coordinates with partial per-row fills, tile
skipping that never drops a visible key, gradients, CUDA lowering and the model's tokens."""
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import layouts
from jaxgen.attention import attention, pallas_chunk, pallas_flash
from jaxgen.errors import ConfigError

B, H, K, D = 2, 4, 2, 8
TILE = 8  # small tiles: several per axis, the last one ragged


def qkv(L, S, seed=0):
    """Standard normal q, k, v (NumPy draws: no random-number compiles per shape)."""
    rng = np.random.RandomState(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in
                 ((B, L, H, D), (B, S, K, D), (B, S, K, D)))


def door(impl, q, k, v, layout, **kw):
    return attention(q, k, v, layout, impl=impl, **kw)


def out_and_grads(impl, q, k, v, layout, **kw):
    """The door's output and d(sum sin(out))/d(q, k, v), in one pass."""
    out, pull = jax.vjp(lambda q, k, v: door(impl, q, k, v, layout, **kw), q, k, v)
    return (out, *pull(jnp.cos(out)))


# the kernels jitted once (8x8 flash tiles): every call of one shape (whatever the layout: the rule
# reaches a kernel as range arrays) reuses one compiled program, forward and backward
_flash_small_tiles = jax.jit(
    lambda q, k, v, r, i, m, interp, call=pallas_flash.flash_attention: call(q, k, v, r, i, m, TILE, TILE, interp),
    static_argnums=6)
_chunk_jitted = jax.jit(pallas_chunk.chunk_attention, static_argnums=(6, 7))


def small_tiles(monkeypatch):
    """The door with 8x8 tiles (its default is 64: one tile at these sizes), for the flash and
    the chunk-over-cache kernels."""
    monkeypatch.setattr(sys.modules["jaxgen.attention"], "CHUNK_KV_BLOCK", TILE)
    monkeypatch.setattr(pallas_flash, "flash_attention",
                        lambda q, k, v, r, i, m, qb, kb, interp: _flash_small_tiles(q, k, v, r, i, m, interp))
    monkeypatch.setattr(pallas_chunk, "chunk_attention", _chunk_jitted)


T = 20  # one length for every layout (even: two streams of 10; 8 + 8 + 4: the last tile ragged), so the
# cases share one compiled kernel
CASES = {  # layout, per-row split
    "causal": (layouts.causal(), None),
    "full": (layouts.full(), None),
    "block_causal": (layouts.block_causal(4), None),
    "prefix": (layouts.prefix(6), None),
    "prefix_per_row": (layouts.prefix(None), jnp.array([3, 17])),
    "prefix_causal": (layouts.prefix(None, causal_prefix=True), jnp.array([5, 9])),
    "dual_stream": (layouts.dual_stream(4), None),
    "ar_diffusion": (layouts.ar_diffusion(4), None),
    "ar_diffusion_causal_block": (layouts.ar_diffusion(4, causal_block=True), None),
    "verify_draft": (layouts.verify_draft(3), jnp.array([0, 8])),  # 12-row chunks at 0..11 / 8..19
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_range_layout_equals_the_reference(name, monkeypatch):
    small_tiles(monkeypatch)
    layout, split = CASES[name]
    q, k, v = qkv(T, T)
    idx = jnp.broadcast_to(jnp.arange(T), (B, T))
    kw = dict(q_idx_BL=idx, kv_idx_BS=idx, split_B=split, seq_len=T if layout.two_stream else None)
    np.testing.assert_allclose(door("pallas", q, k, v, layout, **kw), door("xla", q, k, v, layout, **kw),
                               atol=2e-6)


def test_chunk_over_a_partly_filled_cache_and_empty_rows(monkeypatch):
    """A 5-query chunk at slots [20, 25) of a 40-slot cache filled to per-row lengths, block
    causal over slots (the chunk-over-cache kernel, its gradients from the flash kernels): output
    and gradients equal the reference's; a row whose keys are all invalid returns 0 (as the
    reference), and its queries get 0 gradient. One compiled program serves every fill."""
    small_tiles(monkeypatch)
    q, k, v = qkv(5, 40, seed=1)
    q_idx = jnp.broadcast_to(20 + jnp.arange(5), (B, 5))
    kv_idx = jnp.broadcast_to(jnp.arange(40), (B, 40))
    layout = layouts.block_causal(4)
    for fill in ((25, 23), (25, 0)):  # per-row filled slots; row 1 of the second sees no key
        kw = dict(q_idx_BL=q_idx, kv_idx_BS=kv_idx, kv_valid_BS=kv_idx < jnp.array(fill)[:, None])
        got, want = out_and_grads("pallas", q, k, v, layout, **kw), out_and_grads("xla", q, k, v, layout, **kw)
        for what, g, w, atol in zip(("out", "dq", "dk", "dv"), got, want, (2e-6, 2e-5, 2e-5, 2e-5)):
            np.testing.assert_allclose(g, w, atol=atol, err_msg=what)
    np.testing.assert_array_equal(got[0][1], 0.0)  # row 1 sees no key
    np.testing.assert_array_equal(got[1][1], 0.0)
    none = dict(kw, kv_valid_BS=jnp.zeros((B, 40), bool))
    np.testing.assert_array_equal(out_and_grads("pallas", q, k, v, layout, **none)[0], 0.0)


def test_tile_skipping_is_conservative_and_skips():
    """No tile holding a visible (query, key) pair is skipped; under causal, tiles above the
    diagonal are."""
    T = 32
    idx = jnp.broadcast_to(jnp.arange(T), (B, T))
    for layout in (layouts.causal(), layouts.block_causal(4), layouts.prefix(None)):
        split = jnp.array([3, 20]) if layout.per_row else None
        ranges = layout.kv_ranges(idx, None, split)
        ranges = tuple(tuple(jnp.broadcast_to(a, (B, T)) for a in pair) for pair in ranges)
        valid = jnp.ones((B, T), bool)
        tiles = np.asarray(pallas_flash.tile_visible(ranges, idx, valid, TILE, TILE))
        dense = np.asarray(layout.mask(idx, idx, None, split)).reshape(B, T // TILE, TILE, T // TILE, TILE)
        assert (tiles >= dense.any((2, 4))).all()
    assert tiles.shape == (B, 4, 4)
    causal = layouts.causal().kv_ranges(idx)
    causal = tuple(tuple(jnp.broadcast_to(a, (B, T)) for a in pair) for pair in causal)
    causal_tiles = pallas_flash.tile_visible(causal, idx, valid, TILE, TILE)
    np.testing.assert_array_equal(causal_tiles[0], np.tril(np.ones((4, 4), int)))
    first, last = pallas_flash.tile_span(causal_tiles, 2)  # query tile i walks key tiles [0, i]
    np.testing.assert_array_equal(first[0], 0)
    np.testing.assert_array_equal(last[0], [1, 2, 3, 4])
    first, last = pallas_flash.tile_span(causal_tiles, 1)  # key tile j is seen by query tiles [j, 4)
    np.testing.assert_array_equal(first[0], [0, 1, 2, 3])
    np.testing.assert_array_equal(last[0], 4)
    none = pallas_flash.tile_span(jnp.zeros((1, 2, 3), jnp.int32), 2)
    np.testing.assert_array_equal(np.stack(none), 0)  # nothing visible: an empty span


GRAD_CASES = ("block_causal", "dual_stream", "prefix_per_row", "verify_draft")


@pytest.mark.parametrize("name", GRAD_CASES)
def test_gradients_equal_the_reference(name, monkeypatch):
    """The Pallas backward kernels (dK/dV per key tile, dQ per query tile) against autodiff of
    the reference, GQA and ragged tiles included."""
    small_tiles(monkeypatch)
    layout, split = CASES[name]
    q, k, v = qkv(T, T, seed=2)
    idx = jnp.broadcast_to(jnp.arange(T), (B, T))
    kw = dict(q_idx_BL=idx, kv_idx_BS=idx, split_B=split, seq_len=T if layout.two_stream else None)
    loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(door(impl, q, k, v, layout, **kw)))
    for got, want in zip(jax.grad(loss("pallas"), (0, 1, 2))(q, k, v), jax.grad(loss("xla"), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_compiled_kernel_lowers_for_cuda():
    q = jax.ShapeDtypeStruct((1, 96, 4, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 96, 2, 64), jnp.bfloat16)
    idx = jnp.broadcast_to(jnp.arange(96), (1, 96))
    f = functools.partial(attention, layout=layouts.causal(), q_idx_BL=idx, kv_idx_BS=idx, impl="pallas",
                          interpret=False)
    text = jax.jit(f).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower() or "pallas" in text.lower()
    grad = jax.grad(lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))
    assert jax.jit(grad).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text().lower().count("triton") >= 3


def test_tree_layout_is_refused_by_name():
    q, k, v = qkv(4, 4)
    idx = jnp.broadcast_to(jnp.arange(4), (B, 4))
    with pytest.raises(ConfigError, match="'tree' layout"):
        door("pallas", q, k, v, layouts.tree((-1, 0, 0, 1)), q_idx_BL=idx, kv_idx_BS=idx, split_B=jnp.zeros(B, int))


@pytest.mark.parametrize("head_dim, dtype, found", [(24, jnp.bfloat16, "power-of-two head dim >= 16, got 24"),
                                                    (8, jnp.bfloat16, "got 8"),
                                                    (32, jnp.int8, "q is int8")])
def test_compiled_kernel_refuses_what_it_cannot_serve(head_dim, dtype, found):
    q = jnp.zeros((1, 16, 2, head_dim), dtype)
    idx = jnp.broadcast_to(jnp.arange(16), (1, 16))
    with pytest.raises(ConfigError, match=found):
        attention(q, q, q, layouts.causal(), q_idx_BL=idx, kv_idx_BS=idx, impl="pallas", interpret=False)
