"""Autoregressive decoding with a KV cache: prefill once, then one token per step on the decode
skeleton (greedy, temperature, top-k, top-p; stops early when every row has produced EOS).

Ragged batches: with `prompt_lengths`, `prompt` is right-padded and row i's prompt is its first
`prompt_lengths[i]` tokens. Each row continues from its own length (per-row cache lengths), so
row i's output, its first `prompt_lengths[i] + gen_length` tokens, is the one it gets
decoded alone; the columns after that hold padding (cfg.pad_id, else EOS, else 0).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxgen import cache as cache_lib
from jaxgen import layouts
from jaxgen.decoding import checks, loop
from jaxgen.decoding.processors import forbid_mask_token
from jaxgen.decoding.propose import sample_tokens
from jaxgen.errors import JaxgenError
from jaxgen.model import forward, is_decode_form


KEYWORD_ALIASES = {"max_new_tokens": "gen_length"}  # Hugging Face's name, kept for the README's calls


def generate(params, cfg, prompt, key, gen_length: int | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int | None = None, stop_at_eos: bool = False, prompt_lengths=None, *,
             max_new_tokens: int | None = None) -> loop.SamplerOutput:
    """Continue `prompt` [B, P] by `gen_length` tokens (default 128; `max_new_tokens` is the same
    option under Hugging Face's name: pass one of the two).

    With `stop_at_eos`, a row that emits EOS (`eos_id`, default cfg.eos_id) is padded with EOS
    afterwards and the loop ends once all rows have stopped. `prompt_lengths` ([B] ints): see the
    module docstring. top_k / top_p filter sampling (temperature > 0) only.
    """
    if max_new_tokens is not None:
        if gen_length is not None:
            raise JaxgenError(f"gen_length={gen_length} and max_new_tokens={max_new_tokens} are one option under "
                              "two names; pass only gen_length")
        gen_length = max_new_tokens
    gen_length = 128 if gen_length is None else gen_length
    prompt = checks.as_prompt(prompt)
    checks.check_positive(gen_length=gen_length)
    checks.check_temperature(temperature)
    checks.check_top_k(top_k)
    checks.check_top_p(top_p)
    checks.check_filters_need_sampling(temperature, top_k, top_p)
    if not stop_at_eos and prompt_lengths is None:
        checks.check_not_given("without stop_at_eos=True (or a ragged batch, whose padding it is)", eos_id=eos_id)
    checks.check_prompt(prompt, cfg, prompt.shape[1] + gen_length, diffusion=False)
    lengths = checks.check_prompt_lengths(prompt_lengths, prompt.shape)
    eos = cfg.eos_id if eos_id is None else eos_id
    if stop_at_eos and eos is None:
        raise JaxgenError("stop_at_eos=True needs an eos_id (the config has none)")
    ragged = lengths is not None
    lengths = jnp.full((prompt.shape[0],), prompt.shape[1], jnp.int32) if lengths is None else jnp.asarray(lengths)
    return _generate(params, cfg, prompt, lengths, key, jnp.float32(temperature), jnp.int32(top_k),
                     jnp.float32(top_p), jnp.int32(-1 if eos is None else eos), max_new_tokens=gen_length,
                     stop_at_eos=stop_at_eos, greedy=temperature == 0, ragged=ragged)


def pad_token(cfg, eos):
    """What fills the columns after a ragged row's output."""
    return jnp.int32(cfg.pad_id) if cfg.pad_id is not None else jnp.maximum(eos, 0)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "stop_at_eos", "greedy", "ragged"))
def _generate(params, cfg, prompt, lengths_B, key, temperature, top_k, top_p, eos, *, max_new_tokens, stop_at_eos,
              greedy, ragged):
    B, P = prompt.shape
    N = max_new_tokens
    temperature = 0.0 if greedy else temperature  # static greedy: no branch inside the loop
    causal = layouts.causal()

    def propose(logits_BV, state):
        tok, _ = sample_tokens(forbid_mask_token(logits_BV, cfg), loop.step_key(key, state.step), temperature, top_k,
                               top_p)
        return tok.astype(jnp.int32)

    def update(state, tok_B, commit_B, cache):
        """Write each row's token at its next column; a stopped row writes EOS."""
        tok_B = jnp.where(state.done, eos, tok_B)
        tokens = cache_lib.place_rows(state.tokens, tok_B[:, None], next_column(state))
        done = state.done | ((tok_B == eos) & stop_at_eos)
        return state.replace(tokens=tokens, cache=cache, done=done, carry=tok_B)

    def next_column(state):  # one column for all rows (a plain slice write), or one per ragged row
        return lengths_B + state.step if ragged else P + state.step

    def decode_forward(state):  # the last token of each row, at its own next slot
        cache = cache_lib.write_at(state.cache, next_column(state) - 1)
        logits, cache = forward(params, cfg, state.carry[:, None], layout=causal, cache=cache)
        return logits[:, 0], cache, 1

    recipe = loop.Recipe(forward=decode_forward, propose=propose, rule=lambda tok, state: ~state.done,
                         update=update)
    cache = cache_lib.init_cache(cfg, B, P + N, per_layer=is_decode_form(params))
    logits, cache = forward(params, cfg, prompt, layout=causal, cache=cache)  # padded rows: extra slots, ignored
    cache = cache_lib.with_lengths(cache, lengths_B)
    canvas = jnp.concatenate([prompt, jnp.zeros((B, N), jnp.int32)], axis=1)
    state = loop.new_state(canvas, cache, nfe=1)
    first = propose(loop.take_at(logits, lengths_B - 1), state)
    state = update(state, first, None, cache).replace(step=jnp.int32(1))
    state = loop.run(recipe, state, N)
    # columns a row never wrote: EOS after an early stop inside its output, padding after it
    col = jnp.arange(P + N)[None, :]
    end_B = lengths_B + state.step
    tokens = jnp.where(col < end_B[:, None], state.tokens, eos)
    tokens = jnp.where(col < (lengths_B + N)[:, None], tokens, pad_token(cfg, eos))
    return loop.SamplerOutput(tokens=tokens, nfe=state.nfe)
