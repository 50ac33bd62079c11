"""Autoregressive decoding with a KV cache: prefill once, then one token per step on the decode
skeleton (greedy, temperature, top-k, top-p; stops early when every row has produced EOS).

Ragged batches: with `prompt_lengths`, `prompt` is right-padded and row i's prompt is its first
`prompt_lengths[i]` tokens. Each row continues from its own length (per-row cache lengths), so
row i's output, its first `prompt_lengths[i] + gen_length` tokens, is the one it gets
decoded alone; the columns after that hold padding (cfg.pad_id, else EOS, else 0).

Constrained decoding (`constraint=`, see `jaxgen.constraints`): every token is drawn under the
grammar's mask, by one of two paths that allow the same ids after the same prefix:
- device masks (a regex or a non-recursive JSON schema with a small enough automaton,
  `jaxgen.constraints.automaton`): the carry holds each row's automaton state; the mask is a
  gather of the table's row, the next state a gather of the drawn token's column. No host call.
  The length budget is exact: an id is allowed only if the row can still finish after it
  within gen_length (the table knows every state's shortest completion).
- host masks (Lark grammars, larger automata, `masks="host"`): one llguidance matcher per row,
  held on the host, fills an int32 bitmask [B, ceil(V/32)] from the tokens committed so far.
  One host call per step, between drawing a token and writing it, gives the matchers the drawn
  tokens and returns the next masks (so a mask never lags the tokens), which the next step
  unpacks on device. The session id is a traced argument: one compiled program serves every
  constraint of the same shapes. The length budget (`jaxgen.constraints.budget`) keeps each
  row completable by a greedy witness search: near the end the host may replace a drawn token
  that leaves no completion by the witness's next token.
Either way a row whose grammar is complete gets the EOS-only mask (then EOS padding, as
stop_at_eos), and after generation every row is checked by llguidance: invalid rows raise a
JaxgenError (on_incomplete="error") or come back flagged in `.valid` ("return").

Why both: on this project's 2-core CPU box (`small` preset, B=1, 64 steps), a host call in the
decode loop costs 65-95 us per step even when the host function does nothing: the unconstrained
step is ~0.45 ms, with a no-op host call ~0.52-0.56 ms, with the same loop's masks computed on
device ~0.45 ms (measured by swapping `device.ar_step` for a pure jnp function). The cost is
XLA:CPU's, not Python's: in a bare while loop around a 2048x2048 matvec one no-op host call adds
~195 us per iteration and a second one ~50 us more, and the process context-switches ~3x as
often (`perf stat`), i.e. threads sleep and are woken around the callback. Running the host step
on a worker thread while the next forward runs hides the host work but needs a second host call
per step, and came out slower. So regular constraints get tables (no host call), and
everything else keeps the host path, whose fixed cost is that of one host call per step.
"""
from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from jaxgen import cache as cache_lib
from jaxgen import constraints, layouts
from jaxgen.decoding import checks, loop
from jaxgen.decoding.processors import forbid_mask_token
from jaxgen.decoding.propose import sample_tokens
from jaxgen.errors import JaxgenError
from jaxgen.model import forward, is_decode_form


KEYWORD_ALIASES = {"max_new_tokens": "gen_length"}  # Hugging Face's name, kept for the README's calls


def generate(params, cfg, prompt, key, gen_length: int | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int | None = None, stop_at_eos: bool = False, prompt_lengths=None, *,
             max_new_tokens: int | None = None, constraint=None,
             on_incomplete: Literal["error", "return"] = "error") -> loop.SamplerOutput:
    """Continue `prompt` [B, P] by `gen_length` tokens (default 128; `max_new_tokens` is the same
    option under Hugging Face's name: pass one of the two).

    With `stop_at_eos`, a row that emits EOS (`eos_id`, default cfg.eos_id) is padded with EOS
    afterwards and the loop ends once all rows have stopped. `prompt_lengths` ([B] ints): see the
    module docstring. top_k / top_p filter sampling (temperature > 0) only.

    constraint: a `jaxgen.constraints` Constraint (JSON schema, regex, Lark grammar): every token
      is drawn under the grammar's mask, a row ends with EOS once its grammar is complete (EOS
      padding after it, as stop_at_eos), and the result is a `ConstrainedOutput` with `.valid`.
      on_incomplete: "error" (default) raises a JaxgenError after generation when a row did
      not complete the grammar within gen_length; "return" returns such rows flagged invalid
      (typed Literal, so the sampler registry does not make it a CLI flag: the CLI passes no
      constraint).
    """
    gen_length = checks.gen_length_of(gen_length, max_new_tokens)
    prompt = checks.as_prompt(prompt)
    checks.check_positive(gen_length=gen_length)
    checks.check_temperature(temperature)
    checks.check_top_k(top_k)
    checks.check_top_p(top_p)
    checks.check_filters_need_sampling(temperature, top_k, top_p)
    if not stop_at_eos and prompt_lengths is None and constraint is None:
        checks.check_not_given("without stop_at_eos=True (or a ragged batch, or a constraint, whose padding it is)",
                               eos_id=eos_id)
    checks.check_prompt(prompt, cfg, prompt.shape[1] + gen_length, diffusion=False)
    lengths = checks.check_prompt_lengths(prompt_lengths, prompt.shape)
    eos = cfg.eos_id if eos_id is None else eos_id
    if stop_at_eos and eos is None:
        raise JaxgenError("stop_at_eos=True needs an eos_id (the config has none)")
    ragged = lengths is not None
    lengths = jnp.full((prompt.shape[0],), prompt.shape[1], jnp.int32) if lengths is None else jnp.asarray(lengths)
    run = functools.partial(_generate, params, cfg, prompt, lengths, key, jnp.float32(temperature), jnp.int32(top_k),
                            jnp.float32(top_p), jnp.int32(-1 if eos is None else eos), max_new_tokens=gen_length,
                            greedy=temperature == 0, ragged=ragged)
    if constraint is None:
        constraints.check_no_policy(on_incomplete)
        return run(None, stop_at_eos=stop_at_eos)
    constraints.check_constraint(constraint, cfg, eos, on_incomplete)
    out = constraints.run_constrained(run, constraint, prompt.shape[0], gen_length, cfg.vocab_size)
    return constraints.finish(out, constraint, lengths, gen_length, on_incomplete)


def pad_token(cfg, eos):
    """What fills the columns after a ragged row's output."""
    return jnp.int32(cfg.pad_id) if cfg.pad_id is not None else jnp.maximum(eos, 0)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "stop_at_eos", "greedy", "ragged",
                                             "length_budget"))
def _generate(params, cfg, prompt, lengths_B, key, temperature, top_k, top_p, eos, session, *, max_new_tokens,
              stop_at_eos, greedy, ragged, length_budget=False):
    """`session`: None (unconstrained), the traced id of an open constraint session, or a
    `constraints.automaton.TokenAutomaton` (device masks; `length_budget` static); the carry is
    then (last tokens [B], their next-token masks [B, W] or automaton states [B]) instead of
    the last tokens."""
    B, P = prompt.shape
    N = max_new_tokens
    temperature = 0.0 if greedy else temperature  # static greedy: no branch inside the loop
    causal = layouts.causal()
    constrained = session is not None
    on_device = isinstance(session, constraints.automaton.TokenAutomaton)
    words = -(-cfg.vocab_size // 32)

    def propose(logits_BV, state):
        if on_device:  # tokens left for each row, this one included: N - step
            left_B = jnp.full((B,), N, jnp.int32) - state.step if length_budget else None
            logits_BV = constraints.automaton.mask_logits(
                logits_BV, constraints.automaton.allowed(session, state.carry[1], left_B))
        elif constrained:
            logits_BV = constraints.device.apply_mask(logits_BV, state.carry[1])
        tok, _ = sample_tokens(forbid_mask_token(logits_BV, cfg), loop.step_key(key, state.step), temperature, top_k,
                               top_p)
        return tok.astype(jnp.int32)

    def update(state, tok_B, commit_B, cache):
        """Write each row's token at its next column; a stopped row writes EOS."""
        tok_B = jnp.where(state.done, eos, tok_B)
        carry = tok_B
        if on_device:
            carry = (tok_B, constraints.automaton.advance(session, state.carry[1], tok_B))
        elif constrained:  # the matchers take the tokens: next masks, never lagging the tokens
            tok_B, mask_BW = constraints.device.ar_step(session, tok_B, ~state.done, words)
            carry = (tok_B, mask_BW)
        tokens = cache_lib.place_rows(state.tokens, tok_B[:, None], next_column(state))
        done = state.done | ((tok_B == eos) & stop_at_eos)
        return state.replace(tokens=tokens, cache=cache, done=done, carry=carry)

    def next_column(state):  # one column for all rows (a plain slice write), or one per ragged row
        return lengths_B + state.step if ragged else P + state.step

    def last_tokens(state):
        return state.carry[0] if constrained else state.carry

    def decode_forward(state):  # the last token of each row, at its own next slot
        cache = cache_lib.write_at(state.cache, next_column(state) - 1)
        logits, cache = forward(params, cfg, last_tokens(state)[:, None], layout=causal, cache=cache)
        return logits[:, 0], cache, 1

    recipe = loop.Recipe(forward=decode_forward, propose=propose, rule=lambda tok, state: ~state.done,
                         update=update)
    cache = cache_lib.init_cache(cfg, B, P + N, per_layer=is_decode_form(params))
    logits, cache = forward(params, cfg, prompt, layout=causal, cache=cache)  # padded rows: extra slots, ignored
    cache = cache_lib.with_lengths(cache, lengths_B)
    canvas = jnp.concatenate([prompt, jnp.zeros((B, N), jnp.int32)], axis=1)
    first_carry = None
    if on_device:
        first_carry = (None, jnp.zeros((B,), jnp.int32))
    elif constrained:
        first_carry = (None, constraints.device.ar_start(session, B, words))
    state = loop.new_state(canvas, cache, nfe=1, carry=first_carry)
    first = propose(loop.take_at(logits, lengths_B - 1), state)
    state = update(state, first, None, cache).replace(step=jnp.int32(1))
    state = loop.run(recipe, state, N)
    # columns a row never wrote: EOS after an early stop inside its output, padding after it
    col = jnp.arange(P + N)[None, :]
    end_B = lengths_B + state.step
    tokens = jnp.where(col < end_B[:, None], state.tokens, eos)
    tokens = jnp.where(col < (lengths_B + N)[:, None], tokens, pad_token(cfg, eos))
    return loop.SamplerOutput(tokens=tokens, nfe=state.nfe)
