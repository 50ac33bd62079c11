"""Autoregressive decoding with a KV cache: prefill once, then one token per step on the decode
skeleton (greedy, temperature, top-k, top-p; stops early when every row has produced EOS).

Ragged batches: with `prompt_lengths`, `prompt` is right-padded and row i's prompt is its first
`prompt_lengths[i]` tokens. Each row continues from its own length (per-row cache lengths), so
row i's output, its first `prompt_lengths[i] + gen_length` tokens, is the one it gets
decoded alone; the columns after that hold padding (cfg.pad_id, else EOS, else 0).

Constrained decoding (`constraint=`, see `jaxgen.constraints`): every token is drawn under an
int32 bitmask [B, ceil(V/32)] that one llguidance matcher per row, held on the host, fills
from the tokens committed so far. One host call per step, between drawing a token and writing
it, gives the matchers the drawn tokens and returns the next masks (so a mask never lags the
tokens), which the next step unpacks on device. The session id is a traced argument: one
compiled program serves every constraint of the same shapes. A row whose grammar is complete
gets the EOS-only mask (then EOS padding, as stop_at_eos). A length budget
(`jaxgen.constraints.budget`) keeps each row completable within gen_length: near the end the
host may replace a drawn token that leaves no completion by the witness's next token. After
generation every row is checked: invalid rows raise a JaxgenError (on_incomplete="error") or
come back flagged in `.valid` ("return").

Why a host callback and not a device-side token automaton ([states, V] transition table,
mask = table[state] >= 0): measured on the `small` preset, random weights, gen 64, temperature
1, on this project's 2-core CPU box shared with other jobs (min of 9-15 interleaved runs; the
box's noise is about +-10%), one decode step costs 0.9-1.0 ms at B=1 and 1.9-2.0 ms at B=8:
- `io_callback` has a fixed cost of 117-140 us per call in a bare loop (~105 us of it copying
  the arguments onto a jax device) and ~210 us in the model's loop; our lean host call
  (`constraints.host_call`, the same XLA custom call without the copy) 10 us and ~30 us.
- llguidance's mask fill (byte vocabulary, JSON schema / regex) is 3.5-16 us per row; the whole
  host step (matchers, fill, budget) replayed with warm caches is 8-23 us at B=1 and 21-165 us
  at B=8 (165: the budget's witness searches with an untrained model's random JSON structure),
  and 35 us (B=1) / 130-155 us (B=8) median inside the decode loop, where the model evicts
  llguidance's caches and XLA's spinning workers compete for the two cores.
- end to end (JSON schema): +15% (B=1) / +20% (B=8) per step without the length budget,
  +23% / +21-32% with it, the io_callback variant +25-28%. The <= 10% goal holds for the
  components at B=1 (~65 us on ~1 ms) but not end to end on this box; on an accelerator the
  host's caches stay warm (the replay numbers) while the device runs the model.
- a device automaton (outlines-core index for `[a-z ]{64}` on the byte vocabulary: 65 states, a
  0.07 MB table, built in ~1 ms) costs a [B, V] gather per step: no measurable overhead. It was
  not chosen: it needs a second back end (outlines-core), covers regexes and JSON schemas but
  not Lark grammars, its table is states x V (a 128k vocabulary times thousands of states of a
  real schema is gigabytes), and the diffusion samplers' prefix verification and speculative
  decoding's draft-tree masks would need their own implementations over the table, where
  llguidance gives them (validate, rollback) for every grammar.
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
    with constraints.open_session(constraint, prompt.shape[0], gen_length, cfg.vocab_size) as session:
        out = jax.block_until_ready(run(jnp.int32(session.id), stop_at_eos=True))
    return constraints.finish(out, constraint, lengths, gen_length, on_incomplete)


def pad_token(cfg, eos):
    """What fills the columns after a ragged row's output."""
    return jnp.int32(cfg.pad_id) if cfg.pad_id is not None else jnp.maximum(eos, 0)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "stop_at_eos", "greedy", "ragged"))
def _generate(params, cfg, prompt, lengths_B, key, temperature, top_k, top_p, eos, session, *, max_new_tokens,
              stop_at_eos, greedy, ragged):
    """`session`: None (unconstrained), or the traced id of an open constraint session; the
    carry is then (last tokens [B], their next-token masks [B, W]) instead of the last tokens."""
    B, P = prompt.shape
    N = max_new_tokens
    temperature = 0.0 if greedy else temperature  # static greedy: no branch inside the loop
    causal = layouts.causal()
    constrained = session is not None
    words = -(-cfg.vocab_size // 32)

    def propose(logits_BV, state):
        if constrained:
            logits_BV = constraints.device.apply_mask(logits_BV, state.carry[1])
        tok, _ = sample_tokens(forbid_mask_token(logits_BV, cfg), loop.step_key(key, state.step), temperature, top_k,
                               top_p)
        return tok.astype(jnp.int32)

    def update(state, tok_B, commit_B, cache):
        """Write each row's token at its next column; a stopped row writes EOS."""
        tok_B = jnp.where(state.done, eos, tok_B)
        carry = tok_B
        if constrained:  # the matchers take the tokens: next masks, never lagging the tokens
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
    first_carry = (None, constraints.device.ar_start(session, B, words)) if constrained else None
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
