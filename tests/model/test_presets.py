"""Every preset builds: init, forward and a training gradient traced abstractly (`jax.eval_shape`:
no memory, no compile, so the 8B shapes run on a laptop), with parameter counts checked against
an independent formula and against the published sizes of the models the presets copy."""
import dataclasses

import jax
import jax.numpy as jnp
import pytest

from jaxgen import config, model, objectives

LLAMA3_VOCAB = 128256  # what a Llama 3 tokenizer.json gives (see the note above config.PRESETS)
PUBLISHED = {  # parameter counts of the Hugging Face checkpoints whose shapes the presets copy
    "llama-1b": 1_235_814_400,  # meta-llama/Llama-3.2-1B (tied embeddings)
    "llama-8b-pod": 8_030_261_248,  # meta-llama/Meta-Llama-3-8B / Llama-3.1-8B
}


def formula_count(cfg) -> int:
    """Llama parameter count from the shapes alone: embeddings (and an untied head), per layer
    q/o projections (E*H*D each), k/v (E*K*D each), the three SwiGLU matrices (E*F each) and two
    norms, plus the final norm (no biases, no qk-norm in the presets)."""
    E, H, K, D, F, V = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim,
                        cfg.vocab_size)
    per_layer = 2 * E * H * D + 2 * E * K * D + 3 * E * F + 2 * E
    return V * E * (1 if cfg.tie_embeddings else 2) + cfg.num_layers * per_layer + E


def abstract_params(cfg):
    return jax.eval_shape(lambda k: model.init(cfg, k), jax.random.key(0))


@pytest.mark.parametrize("name", list(config.PRESETS))
def test_preset_init_forward_and_gradient_shapes(name):
    cfg, tcfg = config.preset(name)
    assert not cfg.qkv_bias and not cfg.qk_norm  # what formula_count assumes
    params = abstract_params(cfg)
    assert sum(x.size for x in jax.tree.leaves(params)) == formula_count(cfg)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(cfg.param_dtype)}
    assert tcfg.seq_len <= cfg.max_seq_len
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    logits, _ = jax.eval_shape(lambda p, t: model.forward(p, cfg, t), params, tokens)
    hidden, _ = jax.eval_shape(lambda p, t: model.forward(p, cfg, t, return_hidden=True), params, tokens)
    assert (logits.shape, logits.dtype) == ((2, 16, cfg.vocab_size), jnp.float32)
    assert (hidden.shape, hidden.dtype) == ((2, 16, cfg.hidden_size), jnp.dtype(cfg.dtype))
    # the preset's training path (its remat policy and compute dtype) traces, and every parameter
    # gets a gradient of its own shape and dtype
    loss = objectives.loss_for(tcfg)
    grads = jax.eval_shape(jax.grad(lambda p, t: loss(p, cfg, {"tokens": t}, jax.random.key(0))[0]), params, tokens)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params)):
        assert (g.shape, g.dtype) == (p.shape, p.dtype)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_llama_presets_have_the_published_sizes(name):
    """With the Llama 3 vocabulary the presets are Llama 3.2 1B and Llama 3 8B, parameter for parameter."""
    cfg = dataclasses.replace(config.preset(name)[0], vocab_size=LLAMA3_VOCAB)
    params = abstract_params(cfg)
    assert sum(x.size for x in jax.tree.leaves(params)) == PUBLISHED[name]
    assert params["embed"].shape == (LLAMA3_VOCAB, cfg.hidden_size)
    assert ("lm_head" in params) == (not cfg.tie_embeddings)
