"""Hugging Face interop: logits equal transformers (causal and full layouts), save loads back."""
import dataclasses
import inspect
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxgen import cache as cache_lib
from jaxgen import hf, layouts, model
from jaxgen.config import RopeScaling, preset
from jaxgen.errors import HFFormatError, JaxgenError

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"tie_word_embeddings": True}),
}


def make_hf(family, path, **config_kw):
    config_cls, model_cls, extra = FAMILIES[family]
    kw = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=96, head_dim=16, max_position_embeddings=64,
              rope_theta=5000.0, **extra)
    c = config_cls(**kw | config_kw)
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


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_decode_form_equals_decode_params(family, tmp_path, monkeypatch):
    """form="decode" builds model.decode_params' form layer by layer (never the stacked copy on the
    device): the same arrays (GQA, q/k/v biases, qk-norm, tied embeddings), in float32 and
    bfloat16; greedy AR tokens equal."""
    from jaxgen.samplers import ar
    make_hf(family, tmp_path)
    cfg, stacked = hf.load(tmp_path)
    live = lambda: sum(a.nbytes for a in jax.live_arrays())  # noqa: E731
    base, peak, fuse = live(), [0], hf.io.fuse_layer
    monkeypatch.setattr(hf.io, "fuse_layer", lambda lp: (peak.append(live() - base), fuse(lp))[1])
    cfg_d, dec = hf.load(tmp_path, form="decode")
    weights = sum(a.nbytes for a in jax.tree.leaves(stacked))
    assert len(peak) == 1 + cfg.num_layers and max(peak) < weights  # never the stacked copy on device
    assert cfg_d == cfg and model.is_decode_form(dec) and len(dec["layers"]) == cfg.num_layers
    assert_trees_equal(dec, model.decode_params(stacked))
    assert_trees_equal(hf.load(tmp_path, "bfloat16", form="decode")[1],
                       model.decode_params(hf.load(tmp_path, "bfloat16")[1]))
    if family == "qwen2":  # one sampler compile per form is enough
        prompt = jnp.asarray(np.random.RandomState(0).randint(0, 300, (2, 5)))
        a = ar.generate(stacked, cfg, prompt, jax.random.key(0), gen_length=4).tokens
        b = ar.generate(dec, cfg, prompt, jax.random.key(0), gen_length=4).tokens
        np.testing.assert_array_equal(a, b)
    with pytest.raises(JaxgenError, match="form='fused'.*'stacked'.*'decode'"):
        hf.load(tmp_path, form="fused")


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


# A scaled-down copy of GSAI-ML/LLaDA-8B-Base's config.json (every field it has that the LLaDA
# model class reads); the tensors are a transformers Llama's under LLaDA's OLMo-style names.
LLADA_CONFIG = {
    "architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu", "alibi": False,
    "attention_layer_norm": False, "attention_layer_norm_with_affine": True, "bias_for_layer_norm": False,
    "block_group_size": 1, "block_type": "llama", "d_model": 64, "embedding_size": 300, "eos_token_id": 290,
    "flash_attention": False, "include_bias": False, "include_qkv_bias": False, "input_emb_norm": False,
    "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": 299, "max_sequence_length": 64,
    "mlp_hidden_size": 96, "mlp_ratio": 4, "multi_query_attention": None, "n_heads": 4, "n_kv_heads": 4,
    "n_layers": 2, "pad_token_id": 290, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
    "rope_theta": 5000.0, "scale_logits": False, "use_cache": False, "vocab_size": 296, "weight_tying": False,
}


def llada_names(tensors):
    """transformers Llama tensor names -> LLaDA's, written out independently of jaxgen.hf."""
    out = {}
    block = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm", "self_attn.q_proj": "q_proj",
             "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out",
             "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out"}
    for name, t in tensors.items():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            module, kind = rest.rsplit(".", 1)
            out[f"model.transformer.blocks.{i}.{block[module]}.{kind}"] = t
        else:
            out[{"model.embed_tokens.weight": "model.transformer.wte.weight", "model.norm.weight":
                 "model.transformer.ln_f.weight", "lm_head.weight": "model.transformer.ff_out.weight"}[name]] = t
    return out


def test_llada_checkpoint_is_llama_with_full_attention(tmp_path):
    from safetensors.numpy import load_file, save_file
    c = transformers.LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=96, max_position_embeddings=64, rope_theta=5000.0,
                                 rms_norm_eps=1e-5)
    torch.manual_seed(1)
    m = transformers.LlamaForCausalLM(c).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    m.save_pretrained(tmp_path / "llama")
    d = tmp_path / "llada"
    d.mkdir()
    save_file(llada_names(load_file(str(tmp_path / "llama" / "model.safetensors"))), str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(LLADA_CONFIG))

    cfg, params = hf.load(d)
    assert (cfg.vocab_size, cfg.mask_id, cfg.eos_id, cfg.norm_eps) == (300, 299, 290, 1e-5)  # embedding_size
    tokens = np.random.RandomState(0).randint(0, 300, (2, 11))
    with torch.no_grad():
        ref = m(torch.tensor(tokens), attention_mask=torch.zeros(2, 1, 11, 11)).logits.numpy()
    ours, _ = model.forward(params, cfg, jnp.asarray(tokens), layout=layouts.full())
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)

    hf.save(tmp_path / "back", cfg, params, family="llada")  # LLaDA names and config fields again
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert {k: back[k] for k in LLADA_CONFIG if k != "vocab_size"} == {
        k: v for k, v in LLADA_CONFIG.items() if k != "vocab_size"}
    assert set(load_file(str(tmp_path / "back" / "model.safetensors"))) == set(load_file(str(d / "model.safetensors")))
    cfg2, params2 = hf.load(tmp_path / "back")
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert_trees_equal(hf.load(d, form="decode")[1], model.decode_params(params))  # via LLaDA's names


@pytest.mark.parametrize("key,value", [("block_type", "sequential"), ("input_emb_norm", True),
                                       ("include_bias", True), ("layer_norm_type", "default")])
def test_llada_options_the_llama_mapping_cannot_represent(tmp_path, key, value):
    (tmp_path / "config.json").write_text(json.dumps(LLADA_CONFIG | {key: value}))
    with pytest.raises(HFFormatError, match=f"{key}={value!r}"):
        hf.load(tmp_path)


@pytest.mark.parametrize("family,base,arch,model_type", [("dream", "qwen2", "DreamModel", "Dream"),
                                                         ("sdar", "qwen3", "SDARForCausalLM", "sdar")])
def test_diffusion_checkpoints_under_their_own_names(tmp_path, family, base, arch, model_type):
    """Dream is Qwen2 and SDAR is Qwen3 under their own architecture names, with a mask token."""
    m = make_hf(base, tmp_path / family)
    c = json.loads((tmp_path / family / "config.json").read_text())
    c |= {"architectures": [arch], "model_type": model_type, "mask_token_id": 299}
    (tmp_path / family / "config.json").write_text(json.dumps(c))
    cfg, params = hf.load(tmp_path / family)
    assert (cfg.qkv_bias, cfg.qk_norm, cfg.mask_id) == (base == "qwen2", base == "qwen3", 299)
    tokens = np.random.RandomState(0).randint(0, 300, (1, 9))
    with torch.no_grad():
        ref = m(torch.tensor(tokens), attention_mask=torch.zeros(1, 1, 9, 9)).logits.numpy()
    ours, _ = model.forward(params, cfg, jnp.asarray(tokens), layout=layouts.full())
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    hf.save(tmp_path / "back", cfg, params, family=family)
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (back["architectures"], back["model_type"], back["mask_token_id"]) == ([arch], model_type, 299)
    with pytest.raises(HFFormatError, match="unknown family 'gpt2'"):
        hf.save(tmp_path / "x", cfg, params, family="gpt2")


def test_sliding_window_layers_are_refused(tmp_path):
    make_hf("qwen2", tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(c | {"use_sliding_window": True, "sliding_window": 8,
                                                            "max_window_layers": 1}))
    with pytest.raises(HFFormatError, match="use_sliding_window=True"):
        hf.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(c | {"use_sliding_window": True, "sliding_window": 8,
                                                            "max_window_layers": 2}))
    hf.load(tmp_path)  # no layer from max_window_layers on: plain attention everywhere


# RoPE scaling with a tiny trained length (16) and 40 positions, so the scaling matters.
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
ROPE_CASES = {
    "llama3": ("llama", {"rope_scaling": LLAMA3}),
    "linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "yarn": ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}),
    "dynamic": ("qwen2", {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}, "max_position_embeddings": 16}),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_scaling_logits_match_transformers(case, tmp_path):
    family, kw = ROPE_CASES[case]
    m = make_hf(family, tmp_path / "ckpt", **kw)
    cfg, params = hf.load(tmp_path / "ckpt")
    assert cfg.rope_scaling.rope_type == case
    tokens = np.random.RandomState(0).randint(0, 300, (1, 40))
    with torch.no_grad():
        ref = m(torch.tensor(tokens)).logits.numpy()
    ours, _ = model.forward(params, cfg, jnp.asarray(tokens))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    plain, _ = model.forward(params, dataclasses.replace(cfg, rope_scaling=RopeScaling()), jnp.asarray(tokens))
    assert np.abs(np.asarray(plain) - ref)[:, 16:].max() > 1e-3  # the scaling changes the logits (10 x atol)

    hf.save(tmp_path / "back", cfg, params)
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["rope_scaling"]["rope_type"] == case
    assert hf.load(tmp_path / "back")[0] == cfg
    m2 = FAMILIES[family][1].from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        np.testing.assert_allclose(m2(torch.tensor(tokens)).logits.numpy(), ref, atol=1e-5)


def test_dynamic_rope_is_per_call_like_transformers_with_a_cache(tmp_path):
    """Dynamic NTK frequencies follow each call's max position + 1: prefill 20 positions, then a
    20-token chunk against the cache, equals transformers doing the same with past_key_values."""
    m = make_hf("qwen2", tmp_path, **ROPE_CASES["dynamic"][1])
    cfg, params = hf.load(tmp_path)
    cfg = dataclasses.replace(cfg, max_seq_len=40)  # run past the trained 16 positions (kept in rope_scaling)
    assert cfg.rope_scaling.original_max_position_embeddings == 16
    tokens = np.random.RandomState(1).randint(0, 300, (1, 40))
    cache_arg = "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"  # 5.x renamed it
    with torch.no_grad():
        first = m(torch.tensor(tokens[:, :20]), use_cache=True)
        past = getattr(first, "cache", None) or first.past_key_values
        ref = m(torch.tensor(tokens[:, 20:]), **{cache_arg: past}).logits.numpy()
        whole = m(torch.tensor(tokens)).logits.numpy()
    c = cache_lib.init_cache(cfg, 1, 40)
    _, c = model.forward(params, cfg, jnp.asarray(tokens[:, :20]), cache=c)
    ours, _ = model.forward(params, cfg, jnp.asarray(tokens[:, 20:]), cache=c)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    assert np.abs(ref - whole[:, 20:]).max() > 1e-3  # the chunked pass really differs from one pass


def test_rope_scaling_config_fields():
    # Llama 3.2 1B's config.json (its rope fields and shape) maps to the llama-1b preset's RoPE
    llama32 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
               "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
               "head_dim": 64, "intermediate_size": 8192, "max_position_embeddings": 131072,
               "rope_theta": 500000.0, "tie_word_embeddings": True,
               "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    cfg = hf.config_from_hf(llama32)
    assert (cfg.rope_scaling, cfg.rope_theta) == (preset("llama-1b")[0].rope_scaling, preset("llama-1b")[0].rope_theta)
    assert hf.config_to_hf(cfg)["rope_scaling"] == llama32["rope_scaling"]
    # older Qwen configs spell it "type"; transformers 5 writes rope_parameters with rope_theta inside
    qwen = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "intermediate_size": 96, "max_position_embeddings": 128}
    old = hf.config_from_hf(qwen | {"rope_scaling": {"type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": 32}})
    new = hf.config_from_hf(qwen | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                        "original_max_position_embeddings": 32}})
    assert old == new and old.rope_scaling == RopeScaling(rope_type="yarn", factor=4.0,
                                                          original_max_position_embeddings=32)
    # yarn/llama3 without original_max_position_embeddings: max_position_embeddings, as transformers
    assert hf.config_from_hf(qwen | {"rope_scaling": {"type": "yarn", "factor": 2.0}}).rope_scaling == RopeScaling(
        rope_type="yarn", factor=2.0, original_max_position_embeddings=128)
    for rope, msg in [({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]},
                       "rope_scaling type 'longrope' is not supported; jaxgen loads rope types default, linear, "
                       "dynamic, yarn, llama3"),
                      ({"rope_type": "linear"}, "needs factor"),
                      ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor")]:
        with pytest.raises(HFFormatError, match=msg):
            hf.config_from_hf(qwen | {"rope_scaling": rope})
    dyn = hf.config_from_hf(qwen | {"rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(HFFormatError, match="max_position_embeddings"):  # transformers' trained length
        hf.config_to_hf(dataclasses.replace(dyn, max_seq_len=256))


def rewrite_config(path, **fields):
    c = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(c | fields))


def test_tensor_shapes_are_checked_against_config(tmp_path):
    make_hf("llama", tmp_path)  # vocab 300, MLP 96, 2 layers, 2 KV heads
    rewrite_config(tmp_path, vocab_size=320, intermediate_size=128)
    with pytest.raises(HFFormatError) as e:
        hf.load(tmp_path)
    msg = str(e.value)
    assert "'model.embed_tokens.weight' has shape (300, 64), config.json implies (320, 64) (vocab_size x " in msg
    assert "'model.layers.0.mlp.gate_proj.weight' has shape (96, 64), config.json implies (128, 64)" in msg
    assert msg.startswith("8 tensor(s) disagree with config.json")  # embed, lm_head, 2 x gate/up/down
    rewrite_config(tmp_path, vocab_size=300, intermediate_size=96, num_key_value_heads=4)
    with pytest.raises(HFFormatError, match=r"k_proj.weight' has shape \(32, 64\), config.json implies \(64, 64\)"):
        hf.load(tmp_path)
    rewrite_config(tmp_path, num_key_value_heads=2, num_hidden_layers=1)
    with pytest.raises(HFFormatError, match="does not describe: 'model.layers.1.input_layernorm.weight'"):
        hf.load(tmp_path)
    rewrite_config(tmp_path, num_hidden_layers=2, tie_word_embeddings=True)  # lm_head is not the embedding
    with pytest.raises(HFFormatError, match="ties the embeddings"):
        hf.load(tmp_path)


def test_save_is_atomic(tmp_path, monkeypatch):
    """A save that fails mid-way leaves the previous checkpoint whole and loadable; one that works
    replaces the old (sharded) checkpoint and keeps the folder's other files."""
    import safetensors.numpy
    m = make_hf("llama", tmp_path / "src")
    m.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")  # sharded, with an index
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
    cfg, params = hf.load(tmp_path / "ckpt")
    before = sorted(os.listdir(tmp_path / "ckpt"))
    real_save_file = safetensors.numpy.save_file

    def crash(tensors, filename, metadata=None):
        real_save_file(dict(list(tensors.items())[:3]), filename, metadata=metadata)  # half written
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", crash)
    doubled = jax.tree.map(lambda a: 2 * a, params)
    with pytest.raises(OSError, match="disk full"):
        hf.save(tmp_path / "ckpt", cfg, doubled)
    assert sorted(os.listdir(tmp_path / "ckpt")) == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "src"]  # no temporary folder left behind
    cfg2, params2 = hf.load(tmp_path / "ckpt")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)

    monkeypatch.setattr(safetensors.numpy, "save_file", real_save_file)
    hf.save(tmp_path / "ckpt", cfg, doubled)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json"]  # old shards and index gone
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "src"]
    jax.tree.map(np.testing.assert_array_equal, hf.load(tmp_path / "ckpt")[1], doubled)
