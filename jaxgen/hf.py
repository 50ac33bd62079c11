"""Hugging Face safetensors <-> jaxgen for Llama, Qwen2, Qwen3, LLaDA, Dream and SDAR checkpoints.

`load(dir)` reads config.json and every *.safetensors shard; `save(dir, cfg, params)` writes a
directory that `transformers.AutoModelForCausalLM.from_pretrained` loads back (for "llada",
"dream" and "sdar", the reference repositories' remote-code model classes load it).
Torch Linear weights are [out, in]; ours are [in, ..., out] with heads split out.

LLaDA (GSAI-ML/LLaDA-8B-*, `LLaDAModelLM`) is a Llama-architecture encoder under OLMo names
(`model.transformer.blocks.N.ff_proj` ...); Dream (Dream-org/Dream-v0-*, `DreamModel`) is Qwen2
under its own architecture name. Both run with full attention (`layouts.full()`); Dream's
shifted logits are the Dream sampler's business, not the checkpoint's. SDAR (JetLM/SDAR-*,
`SDARForCausalLM`) is Qwen3 under its own architecture name, decoded with the block-causal
layout by `jaxgen.samplers.block_diffusion`.

RoPE scaling (`rope_scaling` / `rope_parameters`): default, linear, dynamic, yarn and llama3 load
into `ModelConfig.rope_scaling` (Llama 3.1/3.2 use llama3, Qwen checkpoints yarn or dynamic);
other types are refused. `load` checks every tensor against the shape config.json implies and
refuses missing or unexpected tensors; `save` writes into a temporary folder beside the target and
renames it into place, so an interrupted save leaves any previous checkpoint there whole.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import tempfile

import numpy as np

from jaxgen.config import ROPE_TYPES, ModelConfig, RopeScaling
from jaxgen.errors import ConfigError, HFFormatError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "LLaDAModelLM": "llada", "DreamModel": "dream", "SDARForCausalLM": "sdar"}
_FAMILY_TO_ARCH = {v: k for k, v in ARCHITECTURES.items()}
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "llada": "llada", "Dream": "dream",
                "sdar": "sdar"}
_FAMILY_TO_MODEL_TYPE = {v: k for k, v in _MODEL_TYPES.items()}
FAMILIES = tuple(_FAMILY_TO_ARCH)

# LLaDA's OLMo-style tensor names -> the Llama names the rest of this module reads.
_LLADA_GLOBAL_NAMES = {"model.transformer.wte.weight": "model.embed_tokens.weight",
                       "model.transformer.ln_f.weight": "model.norm.weight",
                       "model.transformer.ff_out.weight": "lm_head.weight"}
_LLADA_BLOCK_NAMES = {"attn_norm.weight": "input_layernorm.weight",
                      "ff_norm.weight": "post_attention_layernorm.weight",
                      "q_proj.weight": "self_attn.q_proj.weight", "q_proj.bias": "self_attn.q_proj.bias",
                      "k_proj.weight": "self_attn.k_proj.weight", "k_proj.bias": "self_attn.k_proj.bias",
                      "v_proj.weight": "self_attn.v_proj.weight", "v_proj.bias": "self_attn.v_proj.bias",
                      "attn_out.weight": "self_attn.o_proj.weight", "ff_proj.weight": "mlp.gate_proj.weight",
                      "up_proj.weight": "mlp.up_proj.weight", "ff_out.weight": "mlp.down_proj.weight"}
_LLAMA_GLOBAL_NAMES = {v: k for k, v in _LLADA_GLOBAL_NAMES.items()}
_LLAMA_BLOCK_NAMES = {v: k for k, v in _LLADA_BLOCK_NAMES.items()}
# LLaDA config fields whose value must be the one below for the Llama mapping to be exact.
_LLADA_REQUIRED = {"block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu", "rope": True,
                   "alibi": False, "include_bias": False, "input_emb_norm": False, "scale_logits": False,
                   "attention_layer_norm": False, "layer_norm_with_affine": True, "bias_for_layer_norm": False,
                   "block_group_size": 1}


def family_of(hf: dict) -> str:
    """The jaxgen family name of an HF config.json dict (by architecture, else model_type)."""
    arch = (hf.get("architectures") or [None])[0]
    family = ARCHITECTURES.get(arch) or _MODEL_TYPES.get(hf.get("model_type"))
    if family is None:
        raise HFFormatError(f"unsupported architecture {arch or hf.get('model_type')!r}; jaxgen.hf loads "
                            f"{', '.join(ARCHITECTURES)}")
    return family


def _llada_to_llama_keys(hf: dict) -> dict:
    """Rewrite an LLaDA config.json into the Llama keys `config_from_hf` reads, refusing the
    OLMo options that the Llama mapping cannot represent."""
    for key, want in _LLADA_REQUIRED.items():
        got = hf.get(key, want)
        if (got or None) != (want or None):
            raise HFFormatError(f"LLaDA config has {key}={got!r}; jaxgen loads only {key}={want!r} "
                                "(the Llama-block LLaDA architecture)")
    d_model, heads = hf["d_model"], hf["n_heads"]
    kv_heads = hf.get("n_kv_heads") or (1 if hf.get("multi_query_attention") else heads)
    return {"vocab_size": hf.get("embedding_size") or hf["vocab_size"], "hidden_size": d_model,
            "num_hidden_layers": hf["n_layers"], "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "intermediate_size": hf.get("mlp_hidden_size") or hf.get("mlp_ratio", 4) * d_model,
            "max_position_embeddings": hf.get("max_sequence_length", 2048),
            "rope_theta": hf.get("rope_theta", 10000.0), "rms_norm_eps": hf.get("rms_norm_eps", 1e-5),
            "attention_bias": bool(hf.get("include_qkv_bias", False)),
            "tie_word_embeddings": bool(hf.get("weight_tying", False)),
            **{k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id")}}


def _llada_config_from_llama_keys(hf: dict) -> dict:
    """The inverse of `_llada_to_llama_keys`: a complete LLaDA config.json (every field the LLaDA
    model class reads, since its defaults are OLMo's, not LLaDA's)."""
    return {**_LLADA_REQUIRED, "architectures": ["LLaDAModelLM"], "model_type": "llada",
            "d_model": hf["hidden_size"], "n_heads": hf["num_attention_heads"],
            "n_kv_heads": hf["num_key_value_heads"], "n_layers": hf["num_hidden_layers"],
            "mlp_hidden_size": hf["intermediate_size"], "mlp_ratio": 4, "vocab_size": hf["vocab_size"],
            "embedding_size": hf["vocab_size"], "max_sequence_length": hf["max_position_embeddings"],
            "rope_theta": hf["rope_theta"], "rope_full_precision": True, "rms_norm_eps": hf["rms_norm_eps"],
            "include_qkv_bias": hf["attention_bias"], "weight_tying": hf["tie_word_embeddings"],
            "flash_attention": False, "multi_query_attention": None, "use_cache": False,
            "attention_layer_norm_with_affine": True, "attention_dropout": 0.0, "residual_dropout": 0.0,
            "embedding_dropout": 0.0,
            **{k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id")}}


def _rename_tensor(name: str, global_names: dict, block_names: dict, src_block: str, dst_block: str) -> str:
    """Rename one tensor between the Llama and LLaDA naming schemes (unknown names unchanged)."""
    if name in global_names:
        return global_names[name]
    m = re.fullmatch(re.escape(src_block) + r"(\d+)\.(.+)", name)
    if m and m.group(2) in block_names:
        return f"{dst_block}{m.group(1)}.{block_names[m.group(2)]}"
    return name


def _llada_tensor_name(name: str) -> str:
    return _rename_tensor(name, _LLADA_GLOBAL_NAMES, _LLADA_BLOCK_NAMES, "model.transformer.blocks.", "model.layers.")


def _llama_tensor_name_to_llada(name: str) -> str:
    return _rename_tensor(name, _LLAMA_GLOBAL_NAMES, _LLAMA_BLOCK_NAMES, "model.layers.", "model.transformer.blocks.")


# The RoPE fields transformers reads for each rope type (the rest of the dict it ignores, so do we).
_ROPE_HF_FIELDS = {"default": (), "linear": ("factor",), "dynamic": ("factor",),
                   "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
                            "beta_slow", "mscale", "mscale_all_dim", "truncate"),
                   "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")}


def rope_scaling_from_hf(hf: dict) -> RopeScaling:
    """config.json's `rope_scaling` (or transformers 5's `rope_parameters`) as a RopeScaling,
    filling what transformers fills: the original length of yarn/llama3 from a top-level
    original_max_position_embeddings or else max_position_embeddings, and dynamic's (which
    transformers always takes from max_position_embeddings)."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    per_layer = [v for v in rope.values() if isinstance(v, dict)]  # {layer_type: {...}} (transformers 5)
    if per_layer:
        if any(v != per_layer[0] for v in per_layer):
            raise HFFormatError(f"rope_parameters differ between layer types ({rope}); jaxgen applies one RoPE "
                                "to every layer")
        rope = per_layer[0]
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ROPE_TYPES:
        raise HFFormatError(f"rope_scaling type {kind!r} is not supported; jaxgen loads rope types "
                            f"{', '.join(ROPE_TYPES)}")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise HFFormatError(f"partial_rotary_factor={partial} is not supported; jaxgen rotates the whole head")
    fields = {k: rope[k] for k in _ROPE_HF_FIELDS[kind] if rope.get(k) is not None}
    max_pos = hf.get("max_position_embeddings", 2048)
    if kind in ("yarn", "llama3"):
        fields["original_max_position_embeddings"] = (hf.get("original_max_position_embeddings")
                                                      or fields.get("original_max_position_embeddings") or max_pos)
    elif kind == "dynamic":
        fields["original_max_position_embeddings"] = max_pos
    try:
        return RopeScaling(rope_type=kind, **fields)
    except ConfigError as e:
        raise HFFormatError(f"config.json's rope_scaling {rope} cannot load: {e}") from None


def rope_scaling_to_hf(cfg: ModelConfig) -> dict | None:
    """The `rope_scaling` dict transformers reads back to the same frequencies (None: plain RoPE)."""
    rope = cfg.rope_scaling
    if rope.rope_type == "default":
        return None
    out = {k: v for k, v in dataclasses.asdict(rope).items() if v is not None}
    if rope.rope_type == "dynamic":  # transformers takes the trained length from max_position_embeddings
        if rope.original_max_position_embeddings != cfg.max_seq_len:
            raise HFFormatError(f"dynamic RoPE trained at {rope.original_max_position_embeddings} positions but "
                                f"max_seq_len={cfg.max_seq_len}: transformers reads the trained length from "
                                "max_position_embeddings, so save with max_seq_len equal to it")
        del out["original_max_position_embeddings"]
    return out


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """Map an HF config.json dict to a ModelConfig."""
    family = family_of(hf)
    try:
        if family == "llada":
            hf = _llada_to_llama_keys(hf)
        heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        kw = dict(
            vocab_size=hf["vocab_size"], hidden_size=hidden, num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads, mlp_dim=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            qkv_bias=family in ("qwen2", "dream") or bool(hf.get("attention_bias", False)),
            qk_norm=family in ("qwen3", "sdar"), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise HFFormatError(f"config.json lacks {e.args[0]!r}; is this a complete {family} checkpoint?") from None
    if hf.get("use_sliding_window") and hf.get("sliding_window") and hf.get("max_window_layers", 0) < kw["num_layers"]:
        raise HFFormatError(f"use_sliding_window=True (window {hf['sliding_window']} from layer "
                            f"{hf.get('max_window_layers', 0)}) is not supported; jaxgen attends over the whole "
                            "sequence, so only checkpoints without sliding-window layers load exactly")
    kw["rope_scaling"] = rope_scaling_from_hf(hf)
    vocab = kw["vocab_size"]
    ids = {name: hf.get(f"{name}_token_id") for name in ("bos", "eos", "pad")}
    ids = {k: (v[0] if isinstance(v, list) else v) for k, v in ids.items()}
    kw |= {f"{k}_id": (v if v is not None and 0 <= v < vocab else None) for k, v in ids.items()}
    mask_id = hf.get("mask_token_id")
    kw["mask_id"] = mask_id if mask_id is not None and 0 <= mask_id < vocab else None
    kw |= overrides
    return ModelConfig(**kw)


def config_to_hf(cfg: ModelConfig, family: str | None = None) -> dict:
    family = family or ("qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama")
    if family not in FAMILIES:
        raise HFFormatError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if (family in ("qwen2", "dream") and not cfg.qkv_bias or family in ("qwen3", "sdar") and not cfg.qk_norm
            or cfg.qk_norm and family not in ("qwen3", "sdar")):
        raise HFFormatError(f"family {family!r} does not match the config (qkv_bias={cfg.qkv_bias}, "
                            f"qk_norm={cfg.qk_norm})")
    if cfg.qkv_bias and family in ("llama", "qwen3", "sdar"):
        raise HFFormatError(f"family {family!r} cannot hold q/k/v biases alone (its attention_bias adds an o_proj "
                            "bias too); save qkv_bias=True models as 'qwen2', 'dream' or 'llada'")
    hf = {
        "architectures": [_FAMILY_TO_ARCH[family]], "model_type": _FAMILY_TO_MODEL_TYPE[family],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.mlp_dim,
        "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "torch_dtype": "float32",
        "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id,
        "mask_token_id": cfg.mask_id,
    }
    rope = rope_scaling_to_hf(cfg)
    if rope is not None:
        if family == "llada":
            raise HFFormatError(f"LLaDA's model class has no RoPE scaling; rope_scaling type "
                                f"{cfg.rope_scaling.rope_type!r} cannot be saved as family 'llada'")
        hf["rope_scaling"] = rope
    if family in ("llama", "llada"):
        hf |= {"attention_bias": cfg.qkv_bias, "mlp_bias": False}
    if family == "sdar":  # fields SDAR's model class reads at inference (its block_size only trains)
        hf |= {"attention_bias": False, "use_sliding_window": False, "fuse_cross_entropy": False}
    return _llada_config_from_llama_keys(hf) if family == "llada" else hf


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise HFFormatError(f"no *.safetensors files in {path}; convert .bin checkpoints to safetensors first")
    index = path / "model.safetensors.index.json"
    if index.exists():
        needed = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(needed - {f.name for f in files})
        if missing:
            raise HFFormatError(f"{path} is incomplete: shards {missing} named in the index are missing")
    tensors = {}
    for f in files:
        try:
            tensors |= load_file(str(f))
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise HFFormatError(f"cannot read {f}: {e}; the shard is corrupt or partially downloaded") from None
    return tensors


def load(path, dtype: str = "float32") -> tuple[ModelConfig, dict]:
    """Load (cfg, params) from an HF directory with config.json and *.safetensors."""
    import jax
    import jax.numpy as jnp
    path = pathlib.Path(path)
    if not path.is_dir():
        raise HFFormatError(f"{path} is not a directory; pass a Hugging Face checkpoint folder")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise HFFormatError(f"{path} has no config.json; it is not a Hugging Face checkpoint")
    hf = json.loads(cfg_file.read_text())
    cfg = config_from_hf(hf, param_dtype=dtype)
    tensors = _read_safetensors(path)
    source_names = None
    if family_of(hf) == "llada":  # LLaDA's names -> the Llama names params_from_hf reads
        source_names = {_llada_tensor_name(k): k for k in tensors}
        tensors = {_llada_tensor_name(k): v for k, v in tensors.items()}
    params = params_from_hf(tensors, cfg, source_names)
    return cfg, jax.tree.map(lambda a: jnp.asarray(a, dtype=dtype), params)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor (HF Llama/Qwen names) a checkpoint of `cfg` holds: name -> (torch shape, the
    config.json fields that imply it)."""
    V, E, F, H, K, D = cfg.vocab_size, cfg.hidden_size, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    out = {"model.embed_tokens.weight": ((V, E), "vocab_size x hidden_size"),
           "model.norm.weight": ((E,), "hidden_size")}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ((V, E), "vocab_size x hidden_size")
    q, kv = "num_attention_heads*head_dim", "num_key_value_heads*head_dim"
    layer = {"input_layernorm.weight": ((E,), "hidden_size"),
             "post_attention_layernorm.weight": ((E,), "hidden_size"),
             "self_attn.q_proj.weight": ((H * D, E), f"{q} x hidden_size"),
             "self_attn.k_proj.weight": ((K * D, E), f"{kv} x hidden_size"),
             "self_attn.v_proj.weight": ((K * D, E), f"{kv} x hidden_size"),
             "self_attn.o_proj.weight": ((E, H * D), f"hidden_size x {q}"),
             "mlp.gate_proj.weight": ((F, E), "intermediate_size x hidden_size"),
             "mlp.up_proj.weight": ((F, E), "intermediate_size x hidden_size"),
             "mlp.down_proj.weight": ((E, F), "hidden_size x intermediate_size")}
    if cfg.qkv_bias:
        layer |= {"self_attn.q_proj.bias": ((H * D,), q), "self_attn.k_proj.bias": ((K * D,), kv),
                  "self_attn.v_proj.bias": ((K * D,), kv)}
    if cfg.qk_norm:
        layer |= {"self_attn.q_norm.weight": ((D,), "head_dim"), "self_attn.k_norm.weight": ((D,), "head_dim")}
    for i in range(cfg.num_layers):
        out |= {f"model.layers.{i}.{name}": v for name, v in layer.items()}
    return out


def _listed(names, limit: int = 6) -> str:
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_tensors(t: dict, cfg: ModelConfig, source_names: dict | None = None) -> None:
    """Refuse a checkpoint whose tensors are not exactly the ones config.json implies: missing,
    unexpected (rotary inv_freq buffers and a tied lm_head equal to the embedding excepted) or of
    another shape. `source_names` maps names back to the file's own (LLaDA) for the messages."""
    show = (lambda n: repr(source_names.get(n, n))) if source_names else repr
    expected = expected_shapes(cfg)
    missing = [n for n in expected if n not in t]
    if missing:
        raise HFFormatError(f"tensors {_listed(map(show, missing))} are missing from the checkpoint; the shards "
                            "are incomplete or the architecture does not match config.json")
    ignored = {n for n in t if n.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings and "lm_head.weight" in t:
        head, embed = t["lm_head.weight"], t["model.embed_tokens.weight"]
        if head.shape != embed.shape or not np.array_equal(head, embed):
            raise HFFormatError(f"config.json ties the embeddings (tie_word_embeddings) but the checkpoint's "
                                f"{show('lm_head.weight')} differs from {show('model.embed_tokens.weight')}")
        ignored.add("lm_head.weight")
    unexpected = sorted(set(t) - set(expected) - ignored, key=_natural)
    if unexpected:
        raise HFFormatError(f"the checkpoint holds tensors config.json does not describe: "
                            f"{_listed(map(show, unexpected))}; its num_hidden_layers, attention_bias/mlp_bias or "
                            "architecture do not match the shards (jaxgen has no o_proj or MLP biases)")
    wrong = [f"{show(n)} has shape {tuple(t[n].shape)}, config.json implies {shape} ({why})"
             for n, (shape, why) in expected.items() if tuple(t[n].shape) != shape]
    if wrong:
        raise HFFormatError(f"{len(wrong)} tensor(s) disagree with config.json: {_listed(wrong)}")


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def params_from_hf(t: dict[str, np.ndarray], cfg: ModelConfig, source_names: dict | None = None) -> dict:
    """Map HF tensor names to the jaxgen params pytree (numpy), after `check_tensors`."""
    check_tensors(t, cfg, source_names)
    N, E, H, K, D = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def get(name):
        if name not in t:
            raise HFFormatError(f"tensor {name!r} is missing from the checkpoint; the shards are incomplete "
                                "or the architecture does not match config.json")
        return np.asarray(t[name], np.float32)

    def stack(fmt, fn):
        return np.stack([fn(get(fmt.format(i))) for i in range(N)])

    p = "model.layers.{}."
    layers = {
        "attn_norm": stack(p + "input_layernorm.weight", lambda w: w),
        "mlp_norm": stack(p + "post_attention_layernorm.weight", lambda w: w),
        "wq": stack(p + "self_attn.q_proj.weight", lambda w: w.T.reshape(E, H, D)),
        "wk": stack(p + "self_attn.k_proj.weight", lambda w: w.T.reshape(E, K, D)),
        "wv": stack(p + "self_attn.v_proj.weight", lambda w: w.T.reshape(E, K, D)),
        "wo": stack(p + "self_attn.o_proj.weight", lambda w: w.T.reshape(H, D, E)),
        "w_gate": stack(p + "mlp.gate_proj.weight", lambda w: w.T),
        "w_up": stack(p + "mlp.up_proj.weight", lambda w: w.T),
        "w_down": stack(p + "mlp.down_proj.weight", lambda w: w.T),
    }
    if cfg.qkv_bias:
        layers |= {"bq": stack(p + "self_attn.q_proj.bias", lambda b: b.reshape(H, D)),
                   "bk": stack(p + "self_attn.k_proj.bias", lambda b: b.reshape(K, D)),
                   "bv": stack(p + "self_attn.v_proj.bias", lambda b: b.reshape(K, D))}
    if cfg.qk_norm:
        layers |= {"q_norm": stack(p + "self_attn.q_norm.weight", lambda w: w),
                   "k_norm": stack(p + "self_attn.k_norm.weight", lambda w: w)}
    params = {"embed": get("model.embed_tokens.weight"), "layers": layers, "final_norm": get("model.norm.weight")}
    if not cfg.tie_embeddings:
        params["lm_head"] = get("lm_head.weight").T
    return params


def params_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The inverse of `params_from_hf`: HF names, torch layouts, contiguous float32."""
    N, E, H, K, D = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    L = {k: np.asarray(v, np.float32) for k, v in params["layers"].items()}
    out = {"model.embed_tokens.weight": np.asarray(params["embed"], np.float32),
           "model.norm.weight": np.asarray(params["final_norm"], np.float32)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = np.asarray(params["lm_head"], np.float32).T
    for i in range(N):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": L["attn_norm"][i],
            p + "post_attention_layernorm.weight": L["mlp_norm"][i],
            p + "self_attn.q_proj.weight": L["wq"][i].reshape(E, H * D).T,
            p + "self_attn.k_proj.weight": L["wk"][i].reshape(E, K * D).T,
            p + "self_attn.v_proj.weight": L["wv"][i].reshape(E, K * D).T,
            p + "self_attn.o_proj.weight": L["wo"][i].reshape(H * D, E).T,
            p + "mlp.gate_proj.weight": L["w_gate"][i].T,
            p + "mlp.up_proj.weight": L["w_up"][i].T,
            p + "mlp.down_proj.weight": L["w_down"][i].T,
        }
        if cfg.qkv_bias:
            out |= {p + "self_attn.q_proj.bias": L["bq"][i].reshape(-1),
                    p + "self_attn.k_proj.bias": L["bk"][i].reshape(-1),
                    p + "self_attn.v_proj.bias": L["bv"][i].reshape(-1)}
        if cfg.qk_norm:
            out |= {p + "self_attn.q_norm.weight": L["q_norm"][i], p + "self_attn.k_norm.weight": L["k_norm"][i]}
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _is_checkpoint_file(name: str) -> bool:
    """A file `save` replaces (the rest of a folder, e.g. tokenizer files, is carried over)."""
    return (name == "config.json" or name.endswith((".safetensors", ".index.json"))
            or name.startswith("pytorch_model") and name.endswith(".bin"))


def _fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a directory
        pass
    finally:
        os.close(fd)


def save(path, cfg: ModelConfig, params: dict, family: str | None = None) -> None:
    """Write config.json + model.safetensors, atomically: the checkpoint is written into a fresh
    temporary folder beside `path` (with any non-checkpoint files already at `path`, such as a
    tokenizer), synced, and renamed into place; a previous checkpoint is renamed aside first and
    deleted last. A save that fails or is interrupted leaves the old checkpoint at `path` (or, if the
    process dies between the two renames, under `.<name>.old-*` beside it) and only a
    `.<name>.saving-*` folder to delete, never a half-written checkpoint at `path`."""
    from safetensors.numpy import save_file
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise HFFormatError(f"{path} exists and is not a directory; hf.save writes a checkpoint folder")
    hf = config_to_hf(cfg, family)
    tensors = params_to_hf(params, cfg)
    if hf["model_type"] == "llada":
        tensors = {_llama_tensor_name_to_llada(k): v for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.saving-", dir=path.parent))
    try:
        if path.exists():
            for f in path.iterdir():
                if not _is_checkpoint_file(f.name):
                    (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        for f in ("model.safetensors", "config.json"):
            _fsync(tmp / f)
        if path.exists():  # mkdtemp makes the folder private (0700); keep the old folder's mode instead
            shutil.copymode(path, tmp)
        else:
            os.chmod(tmp, 0o755)
        old = None
        if path.exists():
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent)) / path.name
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(path.parent)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)

