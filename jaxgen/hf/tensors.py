"""Tensor names and layouts: LLaDA's names <-> Llama's, the shapes config.json implies, the checks
`load` runs, and params <-> HF tensors (stacked over layers, or one layer at a time in the decode
form of `jaxgen.model.decode_params`).

Torch Linear weights are [out, in]; ours are [in, ..., out] with heads split out.
"""
from __future__ import annotations

import re
from typing import Callable

import numpy as np

from jaxgen.config import ModelConfig
from jaxgen.errors import HFFormatError

# LLaDA's OLMo-style tensor names -> the Llama names the rest of jaxgen.hf reads.
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
    check_shapes({n: tuple(a.shape) for n, a in t.items()}, cfg, t.__getitem__, source_names)


def check_shapes(shapes: dict[str, tuple], cfg: ModelConfig, get: Callable[[str], np.ndarray],
                 source_names: dict | None = None) -> None:
    """`check_tensors` over the tensors' shapes alone; `get(name)` reads a tensor's values (only
    lm_head and the embedding, to compare them when config.json ties the two)."""
    show = (lambda n: repr(source_names.get(n, n))) if source_names else repr
    expected = expected_shapes(cfg)
    missing = [n for n in expected if n not in shapes]
    if missing:
        raise HFFormatError(f"tensors {_listed(map(show, missing))} are missing from the checkpoint; the shards "
                            "are incomplete or the architecture does not match config.json")
    ignored = {n for n in shapes if n.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings and "lm_head.weight" in shapes:
        if (shapes["lm_head.weight"] != shapes["model.embed_tokens.weight"]
                or not np.array_equal(get("lm_head.weight"), get("model.embed_tokens.weight"))):
            raise HFFormatError(f"config.json ties the embeddings (tie_word_embeddings) but the checkpoint's "
                                f"{show('lm_head.weight')} differs from {show('model.embed_tokens.weight')}")
        ignored.add("lm_head.weight")
    unexpected = sorted(set(shapes) - set(expected) - ignored, key=_natural)
    if unexpected:
        raise HFFormatError(f"the checkpoint holds tensors config.json does not describe: "
                            f"{_listed(map(show, unexpected))}; its num_hidden_layers, attention_bias/mlp_bias or "
                            "architecture do not match the shards (jaxgen has no o_proj or MLP biases)")
    wrong = [f"{show(n)} has shape {shapes[n]}, config.json implies {shape} ({why})"
             for n, (shape, why) in expected.items() if shapes[n] != shape]
    if wrong:
        raise HFFormatError(f"{len(wrong)} tensor(s) disagree with config.json: {_listed(wrong)}")


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# Per-layer params: key -> (HF name inside "model.layers.N.", torch layout -> ours), given E, H, K, D.
_LAYER_TENSORS = {
    "attn_norm": ("input_layernorm.weight", lambda w, E, H, K, D: w),
    "mlp_norm": ("post_attention_layernorm.weight", lambda w, E, H, K, D: w),
    "wq": ("self_attn.q_proj.weight", lambda w, E, H, K, D: w.T.reshape(E, H, D)),
    "wk": ("self_attn.k_proj.weight", lambda w, E, H, K, D: w.T.reshape(E, K, D)),
    "wv": ("self_attn.v_proj.weight", lambda w, E, H, K, D: w.T.reshape(E, K, D)),
    "wo": ("self_attn.o_proj.weight", lambda w, E, H, K, D: w.T.reshape(H, D, E)),
    "w_gate": ("mlp.gate_proj.weight", lambda w, E, H, K, D: w.T),
    "w_up": ("mlp.up_proj.weight", lambda w, E, H, K, D: w.T),
    "w_down": ("mlp.down_proj.weight", lambda w, E, H, K, D: w.T),
}
_BIAS_TENSORS = {"bq": ("self_attn.q_proj.bias", lambda b, E, H, K, D: b.reshape(H, D)),
                 "bk": ("self_attn.k_proj.bias", lambda b, E, H, K, D: b.reshape(K, D)),
                 "bv": ("self_attn.v_proj.bias", lambda b, E, H, K, D: b.reshape(K, D))}
_QK_NORM_TENSORS = {"q_norm": ("self_attn.q_norm.weight", lambda w, E, H, K, D: w),
                    "k_norm": ("self_attn.k_norm.weight", lambda w, E, H, K, D: w)}


def _layer_tensors(cfg: ModelConfig) -> dict:
    return _LAYER_TENSORS | (_BIAS_TENSORS if cfg.qkv_bias else {}) | (_QK_NORM_TENSORS if cfg.qk_norm else {})


def _dims(cfg: ModelConfig) -> tuple[int, ...]:
    return cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim


def layer_from_hf(get: Callable[[str], np.ndarray], cfg: ModelConfig, i: int) -> dict:
    """Layer `i`'s params (the stacked form's keys, no layer axis) from `get(HF name)` (float32)."""
    return {k: fn(get(f"model.layers.{i}.{name}"), *_dims(cfg)) for k, (name, fn) in _layer_tensors(cfg).items()}


def globals_from_hf(get: Callable[[str], np.ndarray], cfg: ModelConfig) -> dict:
    """The params outside the layers: embedding, final norm and (untied) lm_head."""
    params = {"embed": get("model.embed_tokens.weight"), "final_norm": get("model.norm.weight")}
    if not cfg.tie_embeddings:
        params["lm_head"] = get("lm_head.weight").T
    return params


def fuse_layer(lp: dict) -> dict:
    """One layer in the decode form, on the host: numpy's copy of `jaxgen.model._fuse_layer`
    (q/k/v into "wqkv" [E, (H + 2K) * D] and "bqkv", gate/up into "w_gate_up" [E, 2F])."""
    flat = lambda w: w.reshape(w.shape[0], -1)
    fused = {k: v for k, v in lp.items() if k not in ("wq", "wk", "wv", "bq", "bk", "bv", "w_gate", "w_up")}
    fused["wqkv"] = np.concatenate([flat(lp["wq"]), flat(lp["wk"]), flat(lp["wv"])], axis=1)
    if "bq" in lp:
        fused["bqkv"] = np.concatenate([lp["bq"].ravel(), lp["bk"].ravel(), lp["bv"].ravel()])
    fused["w_gate_up"] = np.concatenate([lp["w_gate"], lp["w_up"]], axis=1)
    return fused


def params_from_hf(t: dict[str, np.ndarray], cfg: ModelConfig, source_names: dict | None = None) -> dict:
    """Map HF tensor names to the jaxgen params pytree (numpy), after `check_tensors`."""
    check_tensors(t, cfg, source_names)
    return stacked_from_hf(lambda name: np.asarray(t[name], np.float32), cfg)


def stacked_from_hf(get: Callable[[str], np.ndarray], cfg: ModelConfig) -> dict:
    """The stacked params (numpy) from `get(HF name)` (float32), one stacked array at a time."""
    layers = {k: np.stack([fn(get(f"model.layers.{i}.{name}"), *_dims(cfg)) for i in range(cfg.num_layers)])
              for k, (name, fn) in _layer_tensors(cfg).items()}
    params = globals_from_hf(get, cfg)
    return {"embed": params.pop("embed"), "layers": layers, **params}


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
