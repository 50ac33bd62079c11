"""Hugging Face interop: logits equal transformers (causal and full layouts), save loads back."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxgen import hf, layouts, model
from jaxgen.errors import HFFormatError

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"tie_word_embeddings": True}),
}


def make_hf(family, path):
    config_cls, model_cls, extra = FAMILIES[family]
    c = config_cls(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=96, head_dim=16, max_position_embeddings=64,
                   rope_theta=5000.0, **extra)
    torch.manual_seed(0)
    m = model_cls(c).eval()
    with torch.no_grad():  # non-trivial norms and biases so every tensor matters
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    m.save_pretrained(path)
    return m


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family, tmp_path):
    m = make_hf(family, tmp_path / "ckpt")
    cfg, params = hf.load(tmp_path / "ckpt")
    assert cfg.qkv_bias == (family == "qwen2") and cfg.qk_norm == (family == "qwen3")
    tokens = np.random.RandomState(0).randint(0, 300, (2, 11))
    with torch.no_grad():
        ref_causal = m(torch.tensor(tokens)).logits.numpy()
        ref_full = m(torch.tensor(tokens), attention_mask=torch.zeros(2, 1, 11, 11)).logits.numpy()
    ours_causal, _ = model.forward(params, cfg, jnp.asarray(tokens))
    ours_full, _ = model.forward(params, cfg, jnp.asarray(tokens), layout=layouts.full())
    np.testing.assert_allclose(ours_causal, ref_causal, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ours_full, ref_full, atol=1e-4, rtol=1e-4)
    assert np.abs(ref_full - ref_causal).max() > 1e-2  # the full layout really differs

    hf.save(tmp_path / "back", cfg, params)
    m2 = FAMILIES[family][1].from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        np.testing.assert_allclose(m2(torch.tensor(tokens)).logits.numpy(), ref_causal, atol=1e-5)


def test_bad_directories(tmp_path):
    with pytest.raises(HFFormatError, match="not a directory"):
        hf.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HFFormatError, match="config.json"):
        hf.load(tmp_path / "empty")
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(HFFormatError, match="unsupported architecture"):
        hf.load(bad)
    make_hf("llama", tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").unlink()
    with pytest.raises(HFFormatError, match="no \\*.safetensors"):
        hf.load(tmp_path / "ok")


def test_incomplete_checkpoint(tmp_path):
    m = make_hf("llama", tmp_path / "ckpt")
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(HFFormatError, match="up_proj"):
        hf.load(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(HFFormatError, match="corrupt"):
        hf.load(tmp_path / "ckpt")
