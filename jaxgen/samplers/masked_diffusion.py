"""Masked-diffusion decoding with LLaDA semantics (ML-GSAI/LLaDA `generate.py`).

Canvas x = [prompt | MASK * gen_length], split into semi-autoregressive blocks; each block gets
a fixed `steps // num_blocks` forwards over the whole canvas with the full layout. Each step
proposes x0 = argmax(logits + T * Gumbel), scores it (softmax confidence at x0 for
`low_confidence`, U(0,1) for `random`), hides positions past the current block, and commits
the k[step] best masked positions per row (k from `num_transfer_tokens`). With `cfg_scale > 0`
an unconditional pass (prompt -> MASK) is batched with the conditional one and
logits = un + (s + 1) (cond - un).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxgen import layouts
from jaxgen.errors import JaxgenError
from jaxgen.model import forward, unstack_layers
from jaxgen.samplers.common import (NEG_INF, SamplerOutput, check_choice, check_prompt, forbid_mask_token,
                                    num_transfer_tokens, top_k_commit, with_mask_id)

REMASKING = ("low_confidence", "random")


def generate(params, cfg, prompt, key, *, gen_length: int = 128, steps: int = 128, block_length: int = 32,
             temperature: float = 0.0, cfg_scale: float = 0.0, remasking: str = "low_confidence",
             mask_id: int | None = None, eos_logit_inf: bool = False) -> SamplerOutput:
    """LLaDA sampler. `eos_logit_inf` forbids EOS as a candidate (LLaDA's `logits_eos_inf`)."""
    cfg = with_mask_id(cfg, mask_id)
    prompt = jnp.asarray(prompt, jnp.int32)
    check_choice("remasking", remasking, REMASKING)
    validate_blocks(gen_length, block_length, steps)
    check_prompt(prompt, cfg, prompt.shape[1] + gen_length, diffusion=True)
    if eos_logit_inf and cfg.eos_id is None:
        raise JaxgenError("eos_logit_inf=True needs cfg.eos_id")
    return _generate(params, cfg, prompt, key, jnp.float32(temperature), jnp.float32(cfg_scale),
                     gen_length=gen_length, steps=steps, block_length=block_length, remasking=remasking,
                     eos_logit_inf=eos_logit_inf)


def validate_blocks(gen_length: int, block_length: int, steps: int):
    if gen_length <= 0 or block_length <= 0 or steps <= 0:
        raise JaxgenError(f"gen_length={gen_length}, block_length={block_length}, steps={steps} must be positive")
    if block_length > gen_length:
        raise JaxgenError(f"block_length={block_length} exceeds gen_length={gen_length}; use block_length <= gen_length")
    if gen_length % block_length:
        raise JaxgenError(f"gen_length={gen_length} is not a multiple of block_length={block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise JaxgenError(f"steps={steps} is not a multiple of the number of blocks ({num_blocks} = "
                          f"gen_length/block_length); use e.g. steps={num_blocks * max(1, steps // num_blocks)}")


def guided_logits(params, cfg, x_BL, prompt_len: int, cfg_scale):
    """Full-layout logits; with cfg_scale > 0, classifier-free guidance against prompt -> MASK."""
    def plain(_):
        return forward(params, cfg, x_BL, layout=layouts.full())[0]

    def guided(_):
        uncond = x_BL.at[:, :prompt_len].set(cfg.mask_id)
        both, _ = forward(params, cfg, jnp.concatenate([x_BL, uncond]), layout=layouts.full())
        cond_l, uncond_l = jnp.split(both, 2)
        return uncond_l + (cfg_scale + 1.0) * (cond_l - uncond_l)

    return jax.lax.cond(cfg_scale > 0, guided, plain, None)


def gumbel_argmax(logits, key, temperature):
    """argmax(logits + T * Gumbel): LLaDA's exp(l) / (-log u)^T in log space (T = 0: argmax)."""
    u = jax.random.uniform(key, logits.shape, jnp.float32, minval=1e-20, maxval=1.0)
    gumbel = -jnp.log(-jnp.log(u))
    return jnp.argmax(jnp.where(temperature > 0, logits + temperature * gumbel, logits), axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "gen_length", "steps", "block_length", "remasking",
                                             "eos_logit_inf"))
def _generate(params, cfg, prompt, key, temperature, cfg_scale, *, gen_length, steps, block_length, remasking,
              eos_logit_inf):
    params = unstack_layers(params)  # once per call, not per step
    B, P = prompt.shape
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    schedule = jnp.asarray(num_transfer_tokens(block_length, steps_per_block))
    x = jnp.concatenate([prompt, jnp.full((B, gen_length), cfg.mask_id, jnp.int32)], axis=1)
    pos = jnp.arange(P + gen_length)

    def step(i, x):
        block, s = i // steps_per_block, i % steps_per_block
        logits = forbid_mask_token(guided_logits(params, cfg, x, P, cfg_scale), cfg)
        if eos_logit_inf:
            logits = logits.at[..., cfg.eos_id].set(NEG_INF)
        k_tok, k_conf = jax.random.split(jax.random.fold_in(key, i))
        x0 = gumbel_argmax(logits, k_tok, temperature).astype(jnp.int32)
        if remasking == "low_confidence":
            p = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), x0[..., None], axis=-1)[..., 0]
        else:
            p = jax.random.uniform(k_conf, x.shape)
        block_end = P + (block + 1) * block_length
        masked = x == cfg.mask_id
        conf = jnp.where(masked & (pos < block_end)[None], p, NEG_INF)
        commit = top_k_commit(conf, schedule[s])
        return jnp.where(commit, x0, x)

    x = jax.lax.fori_loop(0, steps, step, x)
    return SamplerOutput(tokens=x, nfe=jnp.int32(steps))
