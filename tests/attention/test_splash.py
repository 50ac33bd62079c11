"""Splash attention (jax's TPU kernel, interpret mode on CPU) against the XLA reference: every
layout with static coordinates, forward and gradients, GQA, lengths that are not multiples of
128, several tiles, key padding with a fully invisible row, bfloat16; what it refuses; and the
compiled kernel's lowering for TPU from this CPU machine."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import layouts
from jaxgen.attention import reference
from jaxgen.attention.splash import LayoutMask, check_supported, splash_attention, static_coords
from jaxgen.errors import ConfigError

B, H, K, D = 2, 4, 2, 8  # GQA: two query heads per kv head


def qkv(L, S, seed=0):
    """Standard normal q, k, v (NumPy draws: no random-number compiles per shape)."""
    rng = np.random.RandomState(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in
                 ((B, L, H, D), (B, S, K, D), (B, S, K, D)))


def xla(q, k, v, layout, *, q_idx, kv_idx, kv_valid_BS=None, split=None, seq_len=None):
    """The reference: the layout's dense mask (and key validity) through `reference.attention`."""
    mask = jnp.broadcast_to(layout.mask(q_idx, kv_idx, seq_len, split), (B, q.shape[1], k.shape[1]))
    if kv_valid_BS is not None:
        mask = mask & kv_valid_BS[:, None, :]
    return reference.attention(q, k, v, mask)


def out_and_grads(fn, q, k, v, **kw):
    """Output and d(sum sin(out))/d(q, k, v) in one pass."""
    out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
    return (out, *pull(jnp.cos(out)))


T = 20  # one length for every layout (even: two streams of 10), so cases share compiled kernels
CASES = {  # layout, static split
    "causal": (layouts.causal(), None),
    "full": (layouts.full(), None),
    "block_causal": (layouts.block_causal(4), None),
    "dual_stream": (layouts.dual_stream(4), None),
    "ar_diffusion": (layouts.ar_diffusion(4), None),
    "ar_diffusion_causal_block": (layouts.ar_diffusion(4, causal_block=True), None),
    "prefix": (layouts.prefix(6), None),
    "prefix_per_row_static_split": (layouts.prefix(None), 5),
    "prefix_causal_numpy_split": (layouts.prefix(None, causal_prefix=True), np.array([9, 9])),
    "verify_draft": (layouts.verify_draft(3), 4),  # 4 cached rows, the 3 + 9-row chunk, 4 rows after
    "tree": (layouts.tree((-1, 0, 0, 1, 1)), 3),  # 5 nodes at 3..7
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_layout_forward_and_gradients_equal_the_reference(name):
    layout, split = CASES[name]
    q, k, v = qkv(T, T)
    idx = np.broadcast_to(np.arange(T), (B, T))  # numpy [B, T]: static, identical rows
    kw = dict(q_idx=idx, kv_idx=idx, split=split, seq_len=T if layout.two_stream else None)
    got = out_and_grads(functools.partial(splash_attention, layout=layout, interpret=True), q, k, v, **kw)
    want = out_and_grads(functools.partial(xla, layout=layout), q, k, v, **kw)
    for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, atol=2e-5, err_msg=what)


def test_chunk_over_padded_keys_several_tiles_and_an_invisible_row():
    """40 queries at coordinates 160..199 over 200 keys (1 x 2 tiles of 128, both ragged),
    causal, per-row key validity from a traced array; row 1 sees no key and returns 0 (so do its
    gradients)."""
    L, S = 40, 200
    q, k, v = qkv(L, S, seed=1)
    valid = jnp.arange(S)[None, :] < jnp.array([[170], [0]])
    kw = dict(q_idx=np.arange(160, 200), kv_idx=np.arange(S), kv_valid_BS=valid)
    splash = jax.jit(functools.partial(splash_attention, layout=layouts.causal(), interpret=True, max_block=128,
                                       **kw))
    got = out_and_grads(lambda q, k, v: splash(q, k, v), q, k, v)
    want = out_and_grads(functools.partial(xla, layout=layouts.causal()), q, k, v, **kw)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5)
    for g in got:
        np.testing.assert_array_equal(g[1], 0.0)


@pytest.mark.parametrize("layout, split", [(layouts.dual_stream(4), None), (layouts.tree((-1, 0, 0, 1, 1)), 3)])
def test_layout_mask_tiles_are_the_layout_rule_with_padding_invisible(layout, split):
    """Splash's lazy mask, tile by tile, is `Layout.mask` (the tree's ancestor table too: the
    kernel itself is layout-blind, so the tests above cover it)."""
    idx = np.arange(T)
    mask = LayoutMask(layout, idx, idx, T, split, (128, 128))
    dense = mask[0:128, 0:128]
    np.testing.assert_array_equal(dense[:T, :T], np.asarray(layout.mask(idx, idx, T, split)))
    assert not dense[T:].any() and not dense[:, T:].any()
    np.testing.assert_array_equal(mask[4:12, 8:20], dense[4:12, 8:20])
    assert mask == LayoutMask(layout, idx, idx, T, split, (128, 128)) and len({mask, mask}) == 1


def test_bfloat16_forward():
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(T, T, seed=2))
    idx = np.arange(T)
    got = splash_attention(q, k, v, layouts.block_causal(4), q_idx=idx, kv_idx=idx, interpret=True)
    assert got.dtype == jnp.bfloat16
    want = xla(*(x.astype(jnp.float32) for x in (q, k, v)), layouts.block_causal(4), q_idx=idx, kv_idx=idx)
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2)


def test_static_coords():
    idx = np.arange(6)
    assert static_coords(idx, idx, None) and static_coords(np.stack([idx, idx]), jnp.arange(6), 3)
    assert static_coords(idx, idx, np.array([2, 2]))
    assert not static_coords(np.stack([idx, idx + 1]), idx, None)  # rows differ
    assert not static_coords(idx, idx, np.array([2, 3]))
    seen = []
    jax.jit(lambda i, s: seen.append((static_coords(i, idx, None), static_coords(idx, idx, s))))(idx, 2)
    assert seen == [(False, False)]


def test_refuses_traced_coordinates_and_traced_or_distinct_splits():
    q, kv = jnp.zeros((B, 6, H, D)), jnp.zeros((B, 6, K, D))
    idx = np.arange(6)
    call = functools.partial(splash_attention, q, kv, kv, interpret=True)
    with pytest.raises(ConfigError, match="static .*coordinates; q_idx is traced.*impl='pallas' or 'xla'"):
        jax.jit(lambda i: call(layouts.causal(), q_idx=i, kv_idx=idx))(idx)
    with pytest.raises(ConfigError, match="'verify_draft' layout's per-row split is traced.*static int"):
        jax.jit(lambda s: call(layouts.verify_draft(1), q_idx=idx, kv_idx=idx, split=s))(np.array([0, 0]))
    with pytest.raises(ConfigError, match=r"split=\[1, 2\] differs across rows"):
        call(layouts.prefix(None), q_idx=idx, kv_idx=idx, split=np.array([1, 2]))
    with pytest.raises(ConfigError, match="q_idx has 5 coordinates for 6 tokens"):
        call(layouts.causal(), q_idx=idx[:5], kv_idx=idx)
    with pytest.raises(ConfigError, match="rows of kv_idx differ"):
        call(layouts.causal(), q_idx=idx, kv_idx=np.stack([idx, idx[::-1]]))


@pytest.mark.parametrize("head_dim, dtype, found", [(8, jnp.bfloat16, "multiple of 128, got 8"),
                                                    (192, jnp.float32, "got 192"),
                                                    (128, jnp.float16, "q is float16")])
def test_compiled_kernel_refuses_what_it_cannot_serve(head_dim, dtype, found):
    q = jnp.zeros((1, 16, 2, head_dim), dtype)
    idx = np.arange(16)
    with pytest.raises(ConfigError, match=found):
        check_supported(q, q, layouts.causal(), idx, idx, None, interpret=False)
    check_supported(q, q, layouts.causal(), idx, idx, None, interpret=True)  # interpreted: any


def test_compiled_kernel_lowers_for_tpu():
    """The Mosaic kernels (forward; forward with residuals, dK/dV and dQ under grad) lower for
    TPU on a CPU-only jaxlib."""
    q = jax.ShapeDtypeStruct((2, 256, 4, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 256, 2, 128), jnp.bfloat16)
    idx = np.arange(256)
    f = functools.partial(splash_attention, layout=layouts.block_causal(64), q_idx=idx, kv_idx=idx,
                          kv_valid_BS=jnp.arange(256)[None, :] < jnp.array([[256], [100]]), interpret=False)
    lower = lambda fn: jax.jit(fn).trace(q, k, k).lower(lowering_platforms=("tpu",)).as_text()
    assert lower(f).count("tpu_custom_call") == 1
    grad = jax.grad(lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))
    assert lower(grad).count("tpu_custom_call") == 3


def test_model_training_forward_runs_splash_through_the_door(tiny_cfg, tiny_params):
    """The model passes static (numpy) coordinates for a training forward, so
    `attention_impl="splash"` serves it: a block-causal forward's gradients equal the XLA ones
    (each layout is covered kernel-level above)."""
    import dataclasses

    from jaxgen import model
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, tiny_cfg.vocab_size, (2, 12)), jnp.int32)
    for layout in (layouts.block_causal(4),):
        def loss(params, impl):
            cfg = dataclasses.replace(tiny_cfg, attention_impl=impl)
            return jnp.sum(jnp.sin(model.forward(params, cfg, tokens, layout=layout)[0]))
        got, want = jax.grad(loss)(tiny_params, "splash"), jax.grad(loss)(tiny_params, "xla")
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, w, atol=5e-3, rtol=1e-3)  # init_std 0.5: large logits
