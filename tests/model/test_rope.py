"""RoPE scaling: jaxgen.layers.rope_inv_freq equals transformers' modeling_rope_utils for every
supported type (no model compiled here; whole-model parity is in tests/test_hf.py), and the
ModelConfig.rope_scaling field validates, parses and round-trips."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxgen import config as config_lib
from jaxgen.config import ModelConfig, RopeScaling
from jaxgen.errors import ConfigError
from jaxgen.layers import rope_cos_sin, rope_inv_freq


def hf_inv_freq(head_dim, theta, max_pos, rope, seq_len=None):
    """transformers' inverse frequencies and attention factor for a Llama config with `rope`."""
    c = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                 max_position_embeddings=max_pos, rope_theta=theta, rope_scaling=dict(rope))
    if rope["rope_type"] == "default":
        inv, factor = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(c)
    else:
        seq = None if seq_len is None else torch.tensor(seq_len)  # as transformers' forward passes it
        inv, factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](c, None, seq_len=seq)
    return inv.numpy(), factor


def ours(head_dim, theta, max_pos, rope, seq_len=None):
    fields = {k: v for k, v in rope.items() if k != "rope_type"}
    scaling = ModelConfig(head_dim=head_dim, max_seq_len=max_pos, rope_theta=theta,
                          rope_scaling=RopeScaling(rope_type=rope["rope_type"], **fields)).rope_scaling
    inv, factor = rope_inv_freq(head_dim, theta, scaling, seq_len)
    return np.asarray(inv), factor


LLAMA3 = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0)
CASES = {  # name: (head_dim, theta, max_position_embeddings, rope_scaling, seq_len)
    "default": (16, 5000.0, 64, dict(rope_type="default"), None),
    "linear": (16, 5000.0, 64, dict(rope_type="linear", factor=4.0), None),
    "dynamic-short": (16, 5000.0, 16, dict(rope_type="dynamic", factor=4.0), 9),
    "dynamic-long": (16, 5000.0, 16, dict(rope_type="dynamic", factor=4.0), 40),
    "dynamic-qwen": (128, 1e6, 32768, dict(rope_type="dynamic", factor=2.0), 50000),
    "yarn": (16, 5000.0, 64, dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16), None),
    "yarn-options": (16, 5000.0, 64, dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                                          beta_fast=8.0, beta_slow=2.0, truncate=False), None),
    "yarn-attention-factor": (16, 5000.0, 64, dict(rope_type="yarn", factor=3.0, attention_factor=1.25,
                                                   original_max_position_embeddings=16), None),
    "yarn-mscale": (16, 5000.0, 64, dict(rope_type="yarn", factor=8.0, mscale=1.0, mscale_all_dim=0.5,
                                         original_max_position_embeddings=16), None),
    "yarn-qwen2.5": (128, 1e6, 131072, dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768),
                     None),
    "llama3": (16, 5000.0, 64, dict(LLAMA3, factor=8.0, original_max_position_embeddings=16), None),
    "llama3.2-1b": (64, 500000.0, 131072, dict(LLAMA3, factor=32.0, original_max_position_embeddings=8192), None),
    "llama3.1-8b": (128, 500000.0, 131072, dict(LLAMA3, factor=8.0, original_max_position_embeddings=8192), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_inverse_frequencies_equal_transformers(case):
    head_dim, theta, max_pos, rope, seq_len = CASES[case]
    ref_inv, ref_factor = hf_inv_freq(head_dim, theta, max_pos, rope, seq_len)
    inv, factor = ours(head_dim, theta, max_pos, rope, seq_len)
    np.testing.assert_allclose(inv, ref_inv, rtol=2e-6, atol=0)
    assert factor == pytest.approx(float(ref_factor), rel=1e-7)
    if case not in ("default", "dynamic-short"):  # the scaling really changes something
        plain, _ = rope_inv_freq(head_dim, theta)
        assert np.abs(np.asarray(plain) - inv).max() > 1e-6 or factor != 1.0


def test_presets_mirror_llama_3_checkpoints():
    """llama-1b / llama-8b-pod carry Llama 3.2 1B's / Llama 3.1 8B's rope_scaling (config.json)."""
    for name, factor in (("llama-1b", 32.0), ("llama-8b-pod", 8.0)):
        cfg = config_lib.preset(name)[0]
        assert cfg.rope_scaling == RopeScaling(rope_type="llama3", factor=factor, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=8192)
        assert cfg.rope_theta == 500000.0


def test_cos_sin_dynamic_uses_the_calls_length_and_yarn_scales():
    dyn = ModelConfig(head_dim=8, max_seq_len=16, rope_scaling="rope_type=dynamic,factor=4").rope_scaling
    pos = jnp.arange(40)[None]
    cos, sin = jax.jit(rope_cos_sin, static_argnums=(1, 2, 3))(pos, 8, 100.0, dyn)
    inv, _ = rope_inv_freq(8, 100.0, dyn, 40)
    np.testing.assert_allclose(cos[0, :, :4], np.cos(np.arange(40)[:, None] * np.asarray(inv)), atol=1e-5)
    short = rope_cos_sin(pos[:, :10], 8, 100.0, dyn)[0]  # within the trained length: plain RoPE
    np.testing.assert_allclose(short, rope_cos_sin(pos[:, :10], 8, 100.0)[0], atol=1e-6)
    yarn = RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)
    cos, sin = rope_cos_sin(pos, 8, 100.0, yarn)
    np.testing.assert_allclose(cos ** 2 + sin ** 2, (0.1 * np.log(4.0) + 1) ** 2, rtol=1e-5)


def test_rope_scaling_field_parses_validates_and_round_trips():
    linear = RopeScaling(rope_type="linear", factor=2.0)
    assert ModelConfig(rope_scaling="rope_type=linear,factor=2").rope_scaling == linear
    assert ModelConfig(rope_scaling='{"rope_type": "linear", "factor": 2}').rope_scaling == linear
    assert ModelConfig(rope_scaling={"rope_type": "linear", "factor": 2}).rope_scaling == linear
    assert ModelConfig(rope_scaling=None).rope_scaling == RopeScaling() == ModelConfig().rope_scaling
    cfg, _ = config_lib.apply_overrides(*config_lib.preset("tiny"), ["rope_scaling=rope_type=yarn,factor=4"])
    assert cfg.rope_scaling.original_max_position_embeddings == cfg.max_seq_len  # transformers' default
    hash(cfg)  # a static jit argument
    for c in (cfg, config_lib.preset("llama-1b")[0]):  # run_config.json stores asdict(cfg) as JSON
        record = json.loads(json.dumps(dataclasses.asdict(c)))
        assert config_lib.model_config_from_dict(record) == c and record == dataclasses.asdict(c)
    for bad, msg in [("rope_type=longrope", "'longrope' is unknown; supported: default, linear, dynamic, yarn, llama3"),
                     ("rope_type=linear", "needs factor"), ("rope_type=linear,factor=2,beta_fast=3", "not used"),
                     ("rope_type=linear,factor=-1", "positive"), ("rope_type=linear,fctor=2", "unknown rope_scaling"),
                     ({"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1},
                      "high_freq_factor")]:
        with pytest.raises(ConfigError, match=msg):
            ModelConfig(rope_scaling=bad)
