"""Hugging Face safetensors <-> jaxgen for Llama, Qwen2, Qwen3, LLaDA, Dream and SDAR checkpoints.

`load(dir)` reads config.json and every *.safetensors shard; `save(dir, cfg, params)` writes a
directory that `transformers.AutoModelForCausalLM.from_pretrained` loads back (for "llada",
"dream" and "sdar", the reference repositories' remote-code model classes load it).
Torch Linear weights are [out, in]; ours are [in, ..., out] with heads split out.
`load(dir, form="decode")` returns the decode form of `jaxgen.model.decode_params` directly,
built one layer at a time (peak device memory ~1x the weights, not the 2x of converting on device).

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

Rooms: config.py (config.json <-> ModelConfig, RoPE scaling), tensors.py (names, shapes, checks,
params <-> tensors), io.py (load / save).
"""
from jaxgen.hf.config import (ARCHITECTURES, FAMILIES, config_from_hf, config_to_hf, family_of,
                              rope_scaling_from_hf, rope_scaling_to_hf)
from jaxgen.hf.io import FORMS, load, save
from jaxgen.hf.tensors import (check_shapes, check_tensors, expected_shapes, params_from_hf,
                               params_to_hf)

__all__ = ["ARCHITECTURES", "FAMILIES", "FORMS", "check_shapes", "check_tensors", "config_from_hf", "config_to_hf",
           "expected_shapes", "family_of", "load", "params_from_hf", "params_to_hf", "rope_scaling_from_hf",
           "rope_scaling_to_hf", "save"]
