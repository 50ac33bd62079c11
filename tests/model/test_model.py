"""Backbone: shapes, jit/no-jit agreement, cache paths equal full recompute, remat, bad input."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import cache as cache_lib
from jaxgen import layouts, model
from jaxgen.errors import ConfigError, JaxgenError


class ForwardTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_forward_shapes_and_finite(self):
        from jaxgen.config import ModelConfig
        cfg = ModelConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
                          mlp_dim=32, max_seq_len=32, mask_id=49, bos_id=None, eos_id=None, pad_id=None,
                          qkv_bias=True, qk_norm=True, tie_embeddings=True)
        params = model.init(cfg, jax.random.key(0))
        fwd = self.variant(lambda p, t: model.forward(p, cfg, t)[0])
        logits = fwd(params, jnp.zeros((3, 5), jnp.int32))
        chex.assert_shape(logits, (3, 5, 50))
        chex.assert_tree_all_finite(logits)
        hidden, _ = model.forward(params, cfg, jnp.zeros((3, 5), jnp.int32), return_hidden=True)
        chex.assert_shape(hidden, (3, 5, 16))


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


def test_unstacked_and_remat_agree(tiny_cfg, tiny_params):
    tokens = jax.random.randint(jax.random.key(4), (2, 10), 0, 256)
    ref, _ = model.forward(tiny_params, tiny_cfg, tokens)
    un, _ = model.forward(model.unstack_layers(tiny_params), tiny_cfg, tokens)
    np.testing.assert_allclose(un, ref, rtol=2e-5, atol=5e-5)  # fused matmuls sum in another order
    cfg_r = dataclasses.replace(tiny_cfg, remat="full")
    g1 = jax.grad(lambda p: model.forward(p, tiny_cfg, tokens)[0].sum())(tiny_params)
    g2 = jax.grad(lambda p: model.forward(p, cfg_r, tokens)[0].sum())(tiny_params)
    chex.assert_trees_all_close(g1, g2, atol=1e-3, rtol=2e-3)


def test_bfloat16_compute_runs(tiny_cfg, tiny_params):
    cfg = dataclasses.replace(tiny_cfg, dtype="bfloat16")
    logits, _ = model.forward(tiny_params, cfg, jnp.zeros((1, 4), jnp.int32))
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


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
