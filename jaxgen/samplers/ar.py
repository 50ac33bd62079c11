"""Autoregressive decoding with a KV cache: prefill once, then one token per step inside a
single jitted `lax.while_loop` (greedy, temperature, top-k, top-p; stops early when every row
has produced EOS)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxgen import layouts
from jaxgen.cache import init_cache
from jaxgen.errors import JaxgenError
from jaxgen.model import forward, unstack_layers
from jaxgen.samplers.common import SamplerOutput, check_prompt, forbid_mask_token, sample_tokens


def generate(params, cfg, prompt, key, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int | None = None, stop_at_eos: bool = False) -> SamplerOutput:
    """Continue `prompt` [B, P] by `max_new_tokens` tokens.

    With `stop_at_eos`, a row that emits EOS (`eos_id`, default cfg.eos_id) is padded with EOS
    afterwards and the loop ends once all rows have stopped.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if max_new_tokens <= 0:
        raise JaxgenError(f"max_new_tokens={max_new_tokens} must be positive")
    check_prompt(prompt, cfg, prompt.shape[1] + max_new_tokens, diffusion=False)
    eos = cfg.eos_id if eos_id is None else eos_id
    if stop_at_eos and eos is None:
        raise JaxgenError("stop_at_eos=True needs an eos_id (the config has none)")
    return _generate(params, cfg, prompt, key, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                     jnp.int32(-1 if eos is None else eos), max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos,
                     greedy=temperature == 0)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "stop_at_eos", "greedy"))
def _generate(params, cfg, prompt, key, temperature, top_k, top_p, eos, *, max_new_tokens, stop_at_eos, greedy):
    params = unstack_layers(params)  # once per call, not per step
    B, P = prompt.shape
    cache = init_cache(cfg, B, P + max_new_tokens, per_layer=True)
    logits, cache = forward(params, cfg, prompt, layout=layouts.causal(), cache=cache)

    temperature = 0.0 if greedy else temperature  # static greedy: no branch inside the loop

    def propose(logits_BV, step_key):
        tok, _ = sample_tokens(forbid_mask_token(logits_BV, cfg), step_key, temperature, top_k, top_p)
        return tok.astype(jnp.int32)

    first = propose(logits[:, -1], jax.random.fold_in(key, 0))
    out = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = (first == eos) & stop_at_eos

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, out, cache, done, last = carry
        logits, cache = forward(params, cfg, last[:, None], layout=layouts.causal(), cache=cache)
        tok = propose(logits[:, 0], jax.random.fold_in(key, i))
        tok = jnp.where(done, eos, tok)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        return i + 1, out, cache, done | ((tok == eos) & stop_at_eos), tok

    i, out, _, done, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, cache, done, first))
    # rows stopped early: the unwritten tail is EOS padding
    written = jnp.arange(max_new_tokens) < i
    out = jnp.where(written[None, :], out, eos)
    return SamplerOutput(tokens=jnp.concatenate([prompt, out], axis=1), nfe=i)
