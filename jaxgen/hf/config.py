"""config.json <-> ModelConfig: the architecture families, LLaDA's OLMo-style config fields and
the RoPE scaling types (`rope_scaling` / `rope_parameters`).

Default, linear, dynamic, yarn and llama3 RoPE load into `ModelConfig.rope_scaling` (Llama
3.1/3.2 use llama3, Qwen checkpoints yarn or dynamic); other types are refused.
"""
from __future__ import annotations

import dataclasses

from jaxgen.config import ROPE_TYPES, ModelConfig, RopeScaling
from jaxgen.errors import ConfigError, HFFormatError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "LLaDAModelLM": "llada", "DreamModel": "dream", "SDARForCausalLM": "sdar"}
_FAMILY_TO_ARCH = {v: k for k, v in ARCHITECTURES.items()}
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "llada": "llada", "Dream": "dream",
                "sdar": "sdar"}
_FAMILY_TO_MODEL_TYPE = {v: k for k, v in _MODEL_TYPES.items()}
FAMILIES = tuple(_FAMILY_TO_ARCH)

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
