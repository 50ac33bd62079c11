"""Backbone: the forward against an independent NumPy reference (jit or not), cache paths equal
full recompute, remat, bf16 compute and storage, bad input."""
import contextlib
import dataclasses
import io
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from jaxgen import cache as cache_lib
from jaxgen import layouts, model
from jaxgen.errors import ConfigError, JaxgenError


def np_rms(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def np_rope(x_BLHD, pos_L, theta):
    D = x_BLHD.shape[-1]
    ang = pos_L[:, None] / theta ** (np.arange(0, D, 2) / D)
    ang = np.concatenate([ang, ang], -1)[None, :, None, :]
    return x_BLHD * np.cos(ang) + np.concatenate([-x_BLHD[..., D // 2:], x_BLHD[..., :D // 2]], -1) * np.sin(ang)


def np_qwen_forward(params, cfg, tokens_BL):
    """An independent float64 causal forward of the Qwen-style backbone: q/k/v biases, RMSNorm
    of q and k over head_dim before RoPE (Qwen3), GQA, tied or untied head. (logits, hidden)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    L = tokens_BL.shape[1]
    x = p["embed"][np.asarray(tokens_BL)]
    causal = np.tril(np.ones((L, L), bool))
    for i in range(cfg.num_layers):
        lp = {k: v[i] for k, v in p["layers"].items()}
        h = np_rms(x, lp["attn_norm"], cfg.norm_eps)
        q, k, v = (np.einsum("ble,ehd->blhd", h, lp[w]) for w in ("wq", "wk", "wv"))
        if cfg.qkv_bias:
            q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
        if cfg.qk_norm:
            q, k = np_rms(q, lp["q_norm"], cfg.norm_eps), np_rms(k, lp["k_norm"], cfg.norm_eps)
        q, k = np_rope(q, np.arange(L), cfg.rope_theta), np_rope(k, np.arange(L), cfg.rope_theta)
        k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)
        s = np.where(causal, np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(D), -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        x = x + np.einsum("bhls,bshd,hde->ble", a / a.sum(-1, keepdims=True), v, lp["wo"])
        h = np_rms(x, lp["mlp_norm"], cfg.norm_eps)
        g = h @ lp["w_gate"]
        x = x + (g / (1 + np.exp(-g)) * (h @ lp["w_up"])) @ lp["w_down"]
    x = np_rms(x, p["final_norm"], cfg.norm_eps)
    return x @ (p["embed"].T if cfg.tie_embeddings else p["lm_head"]), x


def test_forward_with_and_without_jit_equals_an_independent_reference():
    """Biases, qk-norm, GQA and a tied head, with random (non-trivial) biases and norm weights:
    the logits and hidden states, jitted and not, equal the float64 NumPy forward above."""
    from jaxgen.config import ModelConfig
    cfg = ModelConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=32, max_seq_len=32, mask_id=49, bos_id=None, eos_id=None, pad_id=None,
                      qkv_bias=True, qk_norm=True, tie_embeddings=True, init_std=0.3)
    params = model.init(cfg, jax.random.key(0))
    assert "lm_head" not in params
    noise = iter(jax.random.split(jax.random.key(9), 8))
    params["layers"] = {name: (w + 0.3 * jax.random.normal(next(noise), w.shape)
                               if name in ("bq", "bk", "bv", "q_norm", "k_norm", "attn_norm") else w)
                        for name, w in params["layers"].items()}
    tokens = jax.random.randint(jax.random.key(2), (3, 7), 0, 50)
    want_logits, want_hidden = np_qwen_forward(params, cfg, tokens)
    run = lambda p, t: model.forward(p, cfg, t)[0]
    for fn in (run, jax.jit(run)):
        logits = fn(params, tokens)
        assert logits.shape == (3, 7, 50) and logits.dtype == jnp.float32
        np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)
    hidden, _ = model.forward(params, cfg, tokens, return_hidden=True)
    np.testing.assert_allclose(hidden, want_hidden, rtol=1e-4, atol=1e-4)


def test_params_have_logical_axes(tiny_cfg, tiny_params):
    axes = model.param_axes(tiny_cfg)
    jax.tree.map(lambda a, p: None if len(a) == p.ndim else pytest.fail(f"{a} vs {p.shape}"), axes, tiny_params,
                 is_leaf=lambda x: isinstance(x, tuple))


def test_decode_form_with_bias_qk_norm_gqa_and_cache_round_trip():
    from jaxgen.config import ModelConfig
    cfg = ModelConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=32, max_seq_len=32, mask_id=49, bos_id=None, eos_id=None, pad_id=None,
                      qkv_bias=True, qk_norm=True, init_std=0.3)
    params = model.init(cfg, jax.random.key(1))
    params["layers"] = dict(params["layers"], bq=jnp.full_like(params["layers"]["bq"], 0.3),
                            bv=jnp.full_like(params["layers"]["bv"], -0.2))
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, 49)
    ref, _ = model.forward(params, cfg, tokens)
    fused = model.unstack_layers(params)
    assert {"wqkv", "bqkv", "w_gate_up"} <= set(fused["layers"][0]) and "wq" not in fused["layers"][0]
    np.testing.assert_allclose(model.forward(fused, cfg, tokens)[0], ref, rtol=1e-5, atol=1e-5)
    c = cache_lib.init_cache(cfg, 2, 9, per_layer=True)
    _, c = model.forward(params, cfg, tokens, cache=c)
    stacked = cache_lib.stack_cache(c)
    chex.assert_shape(stacked.k, (2, 2, 2, 9, 8))  # [N, B, K, S, D]
    chex.assert_trees_all_close(cache_lib.unstack_cache(stacked).k, c.k)
    _, mixed = model.forward(fused, cfg, tokens, cache=cache_lib.init_cache(cfg, 2, 9))
    chex.assert_trees_all_close(mixed.v, stacked.v, rtol=1e-5, atol=1e-5)  # decode-form params, stacked cache


def test_unstacked_forward_agrees(tiny_cfg, tiny_params):
    tokens = jax.random.randint(jax.random.key(4), (2, 10), 0, 256)
    ref, _ = model.forward(tiny_params, tiny_cfg, tokens)
    un, _ = model.forward(model.unstack_layers(tiny_params), tiny_cfg, tokens)
    np.testing.assert_allclose(un, ref, rtol=2e-5, atol=5e-5)  # fused matmuls sum in another order


def saved_per_layer(cfg, params, tokens):
    """Shapes of the per-layer residuals (stacked over the N layers) that reverse mode keeps."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_saved_residuals(lambda p: model.forward(p, cfg, tokens)[0].sum(), params)
    shapes = [tuple(int(d) for d in m.split(",")) for m in re.findall(r"f32\[([\d,]+)\] output of", buf.getvalue())]
    return {s for s in shapes if s[:2] == (cfg.num_layers, tokens.shape[0])}


def test_remat_keeps_gradients_and_saves_what_its_policy_says(tiny_cfg, tiny_params):
    """remat="full" and "dots" give the gradients of remat="none" (recomputing changes no
    value), and really rematerialize: "full" keeps only each layer's input, "dots" also the
    weight matmuls (q projection, MLP) but not the attention scores [.., L, L], which "none"
    keeps."""
    tokens = jax.random.randint(jax.random.key(4), (3, 10), 0, 256)
    weights = jax.random.normal(jax.random.key(5), (3, 10, 260))
    grads = {}
    for mode in ("none", "full", "dots"):
        cfg = dataclasses.replace(tiny_cfg, remat=mode)
        grads[mode] = jax.jit(jax.grad(lambda p: (model.forward(p, cfg, tokens)[0] * weights).sum()))(tiny_params)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["none"]))
    for mode in ("full", "dots"):
        chex.assert_trees_all_close(grads[mode], grads["none"], rtol=1e-5, atol=1e-5 * scale)
    saved = {mode: saved_per_layer(dataclasses.replace(tiny_cfg, remat=mode), tiny_params, tokens)
             for mode in ("none", "full", "dots")}
    N, B, L, E, H, D, F = 2, 3, 10, 32, 4, 8, 64
    scores = lambda shapes: any(s[-2:] == (L, L) for s in shapes)
    assert saved["full"] == {(N, B, L, E)}
    assert {(N, B, L, H, D), (N, B, L, F)} <= saved["dots"] and not scores(saved["dots"])
    assert scores(saved["none"])


def test_bfloat16_compute_is_close_to_float32(tiny_cfg, tiny_params):
    """dtype="bfloat16": the layers compute in bf16 (hidden states bf16) and the logits come
    back float32, within bf16 rounding of the float32 model's (about 2^-8 relative per op)."""
    tokens = jax.random.randint(jax.random.key(8), (2, 10), 0, 256)
    ref = np.asarray(model.forward(tiny_params, tiny_cfg, tokens)[0])
    cfg = dataclasses.replace(tiny_cfg, dtype="bfloat16")
    logits, _ = model.forward(tiny_params, cfg, tokens)
    hidden, _ = model.forward(tiny_params, cfg, tokens, return_hidden=True)
    assert logits.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16
    diff = np.abs(np.asarray(logits) - ref)
    assert 0 < diff.max() / np.abs(ref).max() < 0.08  # bf16 really ran, within a few dozen bf16 ulps (measured 0.03)
    assert diff.mean() / np.abs(ref).mean() < 0.05  # measured 0.02


def test_bfloat16_params_are_storage_only(tiny_cfg):
    """param_dtype="bfloat16": every parameter (and its gradient) is bf16, drawn as the float32
    init rounded to bf16; with float32 compute the forward equals the float32 forward of those
    values exactly, and the logits stay float32."""
    cfg32 = dataclasses.replace(tiny_cfg, init_std=0.5)
    cfg16 = dataclasses.replace(cfg32, param_dtype="bfloat16")
    p32, p16 = model.init(cfg32, jax.random.key(0)), model.init(cfg16, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
    chex.assert_trees_all_equal(p16, jax.tree.map(lambda a: a.astype(jnp.bfloat16), p32))
    tokens = jax.random.randint(jax.random.key(8), (2, 10), 0, 256)
    logits, _ = model.forward(p16, cfg16, tokens)
    upcast = jax.tree.map(lambda a: a.astype(jnp.float32), p16)
    assert logits.dtype == jnp.float32
    np.testing.assert_array_equal(logits, model.forward(upcast, cfg32, tokens)[0])
    grads = jax.eval_shape(jax.grad(lambda p: model.forward(p, cfg16, tokens)[0].sum()), p16)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.bfloat16)}


def test_bad_config_and_tokens(tiny_cfg):
    from jaxgen.config import ModelConfig
    with pytest.raises(ConfigError, match="num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ConfigError, match="mask_id"):
        ModelConfig(vocab_size=100, mask_id=259)
    with pytest.raises(JaxgenError, match="outside the vocabulary"):
        model.check_tokens(np.array([[1, 300]]), tiny_cfg)
    with pytest.raises(JaxgenError, match="max_len"):
        cache_lib.init_cache(tiny_cfg, 1, 10_000)


@pytest.mark.parametrize("with_cache", [False, True], ids=["no_cache", "read_cache"])
def test_out_rows_equal_a_slice_of_all_rows(with_cache, tiny_cfg, tiny_params):
    tokens = jax.random.randint(jax.random.key(6), (2, 12), 0, 256)
    layout = layouts.full()
    kw = {}
    if with_cache:
        _, c = model.forward(tiny_params, tiny_cfg, tokens[:, :4], layout=layout, cache=cache_lib.init_cache(tiny_cfg, 2, 4))
        tokens, kw = tokens[:, 4:], dict(cache=cache_lib.read(c))
    every, _ = model.forward(tiny_params, tiny_cfg, tokens, layout=layout, **kw)
    rows = jax.jit(lambda p, t, s: model.forward(p, tiny_cfg, t, layout=layout, out_rows=(s, 3), **kw)[0])
    for params in (tiny_params, model.unstack_layers(tiny_params)):
        np.testing.assert_allclose(rows(params, tokens, 2), every[:, 2:5], rtol=2e-5, atol=5e-5)


def test_input_vectors_instead_of_tokens(tiny_cfg, tiny_params):
    """`inputs_BLE` (continuous-token models) feeds vectors where token embeddings would go."""
    tokens = jnp.array([[1, 5, 7, 2]])
    want, _ = model.forward(tiny_params, tiny_cfg, tokens)
    got, _ = model.forward(tiny_params, tiny_cfg, None, inputs_BLE=tiny_params["embed"][tokens])
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(JaxgenError, match="either tokens_BL or inputs_BLE"):
        model.forward(tiny_params, tiny_cfg, tokens, inputs_BLE=tiny_params["embed"][tokens])
    with pytest.raises(JaxgenError, match=r"expected \[B, L, 32\]"):
        model.forward(tiny_params, tiny_cfg, None, inputs_BLE=jnp.zeros((1, 4, 3)))
