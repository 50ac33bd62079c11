"""Block-diffusion decoding with SDAR semantics (JetAstra/SDAR `generate.py`).

The canvas is rounded up to whole blocks of `block_length`; the block-causal layout applies.
Whole prompt blocks are prefilled into the KV cache; a prompt tail inside the first decode block
stays fixed. Each block is denoised with read-only cache forwards, at most `denoising_steps`
times, committing per step (k = `num_transfer_tokens(block_length, denoising_steps)`):

- `low_confidence_static`: the k[step] most confident masked positions;
- `low_confidence_dynamic`: every masked position with confidence > threshold if there are at
  least k[step] of them, else the top k[step];
- `sequential`: the k[step] leftmost masked positions;
- `first_hitting` (BD3-LM `_ddpm_caching_update`, `first_hitting=True`): exactly one uniformly
  chosen masked position per step (so `block_length` steps per block, whatever
  `denoising_steps` says), its token sampled from the (top-p filtered) prediction; BD3-LM's
  nucleus sampler is `temperature=1.0, top_p=p`. The model has no time input, so the
  first-hitting time itself only orders the steps;
- `ddpm` (BD3-LM without first hitting): with t = 1 - step/steps and s = t - 1/steps, every
  masked position is unmasked independently with probability (t - s)/t; the last step unmasks
  all that remain.

Once clean, the block's K/V is written once (exact cache; the reference also writes the last
block's, which nothing reads). Deviation from the reference, on purpose: commits only ever touch
masked positions, so neither prompt tokens inside a block nor tokens committed at earlier steps
are ever rewritten. SDAR's top-k runs over the whole block with -inf for unmasked positions, so
whenever fewer masks are left than k[step] (static, or dynamic below the threshold) it also
picks committed positions and replaces them with the current prediction.
`experiments/reference_parity.py --sdar` runs SDAR's own `generate.py` against this sampler:
identical tokens and NFE wherever the reference rewrites nothing.
Rows of a batch progress independently; finished rows idle until the block is clean everywhere.

Ragged batches (`prompt_lengths`, `prompt` right-padded): each row keeps its own block grid
(blocks at multiples of `block_length` from its position 0), its own prefill length and its own
current block; the cache has per-row lengths. Under greedy decoding row i's first
`prompt_lengths[i] + gen_length` tokens equal that row decoded alone (sampling draws one key per
step for the whole batch, keyed by row 0's block). NFE is the batch's: rows share each forward.

`fuse_block_write=True` (beyond the reference, same tokens): a clean block's K/V are written by
the next block's first denoising forward, fed [clean block | next block] (the block-causal
layout keeps the clean block's K/V independent of the next block, and the next block's queries
see it as they would see it cached), then the cache is cut back to the next block's start. One
forward per block fewer: NFE = denoising steps (+ the prompt prefill), for the price of a
two-block forward once per block, which costs about the same as one block at small batch on
accelerators (latency-bound). Float rounding of the wider forward can differ in the last bits.
"""
from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import cache as cache_lib
from jaxgen import constraints, layouts
from jaxgen.constraints import diffusion as constraint_steps
from jaxgen.decoding import checks, loop, rules
from jaxgen.decoding.processors import forbid_mask_token
from jaxgen.decoding.propose import sample_tokens
from jaxgen.decoding.schedules import num_transfer_tokens
from jaxgen.errors import JaxgenError
from jaxgen.model import forward, is_decode_form

REMASKING = ("low_confidence_static", "low_confidence_dynamic", "sequential", "first_hitting", "ddpm")


def generate(params, cfg, prompt, key, *, gen_length: int = 128, block_length: int = 4,
             denoising_steps: int = 4, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             remasking: str = "low_confidence_dynamic", threshold: float | None = None,
             mask_id: int | None = None, fuse_block_write: bool = False, prompt_lengths=None, constraint=None,
             on_incomplete: Literal["error", "return"] = "error") -> loop.SamplerOutput:
    """SDAR block-diffusion sampler; returns tokens [B, P + gen_length] and the forward count.
    threshold: the `low_confidence_dynamic` rule's (default 0.9); top_k / top_p filter sampling
    (temperature > 0) only. fuse_block_write: write each clean block's K/V in the next block's
    first forward; prompt_lengths: a ragged batch (see the module docstring).

    constraint, on_incomplete: a `jaxgen.constraints` grammar: each step's commits (the chosen
    rule's) are verified LAVE-style (`jaxgen.constraints.lave`), so a block runs until clean (at
    most block_length forwards); once a row's grammar is complete its remaining positions become
    EOS and the loop ends when every row is complete. Returns a `ConstrainedOutput`; a row that
    did not complete the grammar raises a JaxgenError (on_incomplete="error") or is flagged in
    `.valid` ("return")."""
    cfg = checks.with_mask_id(cfg, mask_id)
    prompt = checks.as_prompt(prompt)
    checks.check_choice("remasking", remasking, REMASKING)
    if remasking != "low_confidence_dynamic":
        checks.check_not_given(f"with remasking={remasking!r} (only 'low_confidence_dynamic' commits above a "
                               "threshold)", threshold=threshold)
    threshold = 0.9 if threshold is None else threshold
    checks.check_threshold(threshold)
    checks.check_positive(gen_length=gen_length, block_length=block_length, denoising_steps=denoising_steps)
    checks.check_temperature(temperature)
    checks.check_top_k(top_k)
    checks.check_top_p(top_p)
    checks.check_filters_need_sampling(temperature, top_k, top_p)
    if block_length > gen_length:
        raise JaxgenError(f"block_length={block_length} exceeds gen_length={gen_length}")
    if denoising_steps > block_length and remasking != "first_hitting":
        raise JaxgenError(f"denoising_steps={denoising_steps} > block_length={block_length} would leave steps "
                          "that commit nothing; use denoising_steps <= block_length")
    B, P = prompt.shape
    total = -(-(P + gen_length) // block_length) * block_length
    lengths = checks.check_prompt_lengths(prompt_lengths, prompt.shape)
    checks.check_prompt(prompt, cfg, total, diffusion=True, prompt_lengths=lengths)
    ragged = lengths is not None
    lengths = np.full((B,), P, np.int32) if lengths is None else lengths
    run = functools.partial(_generate, params, cfg, prompt, jnp.asarray(lengths), key, jnp.float32(temperature),
                            jnp.int32(top_k), jnp.float32(top_p), jnp.float32(threshold), gen_length=gen_length,
                            block_length=block_length, denoising_steps=denoising_steps, remasking=remasking,
                            fuse=bool(fuse_block_write), ragged=ragged)
    if constraint is None:
        constraints.check_no_policy(on_incomplete)
        out = run(None)
        return out.replace(tokens=out.tokens[:, : P + gen_length])
    constraints.check_constraint(constraint, cfg, cfg.eos_id, on_incomplete)
    with constraints.open_session(constraint, B, gen_length, cfg.vocab_size, cfg.mask_id) as session:
        out = jax.block_until_ready(run(jnp.int32(session.id)))
    out = out.replace(tokens=out.tokens[:, : P + gen_length])
    return constraints.finish(out, constraint, lengths, gen_length, on_incomplete)


def commit_rule(remasking, conf_BL, masked_BL, k, threshold, key=None, step=None, steps=None):
    """Which masked positions to commit this step (see module docstring)."""
    if remasking == "first_hitting":
        return rules.first_hitting(masked_BL, key)
    if remasking == "ddpm":
        return rules.ddpm(masked_BL, key, step, steps)
    if remasking == "sequential":
        return rules.sequential(masked_BL, k)
    if remasking == "low_confidence_static":
        return rules.scheduled(conf_BL, masked_BL, k)
    return rules.dynamic(conf_BL, masked_BL, k, threshold)


def initial_canvas(prompt, lengths_B, total: int, mask_id: int):
    """[B, total]: each row's prompt, then MASK (prompt padding becomes MASK too)."""
    B, P = prompt.shape
    col = jnp.arange(total)[None, :]
    padded = jnp.concatenate([prompt, jnp.full((B, total - P), mask_id, jnp.int32)], axis=1)
    return jnp.where(col < lengths_B[:, None], padded, mask_id)


@functools.partial(jax.jit, static_argnames=("cfg", "gen_length", "block_length", "denoising_steps", "remasking",
                                             "fuse", "ragged"))
def _generate(params, cfg, prompt, lengths_B, key, temperature, top_k, top_p, threshold, session, *, gen_length,
              block_length, denoising_steps, remasking, fuse, ragged):
    """`session`: None, or the traced id of an open constraint session (LAVE rules wrap the step)."""
    B, P = prompt.shape
    constrained = session is not None
    bl = block_length
    total = -(-(P + gen_length) // bl) * bl
    layout = layouts.block_causal(bl)
    schedule = jnp.asarray(num_transfer_tokens(bl, denoising_steps))
    # each row's first decode block (after its whole prompt blocks) and one past its last block;
    # Python ints when no row is ragged, so every slice and cache write is one plain slice
    first_B = lengths_B // bl if ragged else P // bl
    end_B = -(-(lengths_B + gen_length) // bl) if ragged else -(-(P + gen_length) // bl)
    row0_first = first_B[0] if ragged else first_B
    bound = bl if remasking == "first_hitting" or constrained else denoising_steps  # >= 1 commit per step

    def positions(start, length):  # [B, length] from a scalar or per-row start
        return jnp.broadcast_to(jnp.reshape(start, (-1, 1)) + jnp.arange(length, dtype=jnp.int32), (B, length))

    def block_start(state):
        return (first_B + state.carry["block"]) * bl

    def current(state):
        return cache_lib.slice_rows(state.tokens, block_start(state), bl)

    def read(state, cache):  # a denoising forward over the cache, which it leaves unchanged
        start_B = block_start(state)
        logits, _ = forward(params, cfg, current(state), positions(start_B, bl), layout, cache_lib.read(cache))
        return logits, cache

    def write_previous_and_read(state, cache):  # [clean previous block | this block], one forward
        prev = block_start(state) - bl
        fed = cache_lib.slice_rows(state.tokens, prev, 2 * bl)
        both, written = forward(params, cfg, fed, positions(prev, 2 * bl), layout,
                                cache_lib.write_at(cache, prev))
        return both[:, bl:], cache_lib.truncate(written, prev + bl)

    def step_forward(state):
        if not fuse:
            logits, cache = read(state, state.cache)
        else:  # step 0 of every block after the first also writes the previous block
            first_step_later_block = (state.carry["step"] == 0) & (state.carry["block"] > 0)
            logits, cache = jax.lax.cond(first_step_later_block, write_previous_and_read, read, state, state.cache)
        return logits, cache, 1

    def propose(logits, state):
        k_tok = loop.step_key(key, row0_first + state.carry["block"], state.carry["step"])
        tok, conf = sample_tokens(forbid_mask_token(logits, cfg), k_tok, temperature, top_k, top_p)
        return tok.astype(jnp.int32), conf

    def candidates(state):
        in_play = jnp.broadcast_to(first_B + state.carry["block"] < end_B, (B,))
        return (current(state) == cfg.mask_id) & in_play[:, None]

    def rule(proposal, state):
        _, conf = proposal
        step = state.carry["step"]
        k_pos = jax.random.fold_in(loop.step_key(key, row0_first + state.carry["block"], step), 1)
        return commit_rule(remasking, conf, candidates(state), schedule[jnp.minimum(step, denoising_steps - 1)],
                           threshold, k_pos, step, denoising_steps)

    def update(state, proposal, commit, cache):
        block = jnp.where(commit, proposal[0], current(state))
        tokens = cache_lib.place_rows(state.tokens, block, block_start(state))
        return state.replace(tokens=tokens, cache=cache, carry=dict(state.carry, step=state.carry["step"] + 1))

    def write_block(state):  # a clean block's K/V, written once
        start_B = block_start(state)
        _, cache = forward(params, cfg, current(state), positions(start_B, bl), layout,
                           cache_lib.write_at(state.cache, start_B))
        return state.replace(cache=cache, nfe=state.nfe + 1)

    def after(state):
        """At a block's end: write its K/V (unless every row is in its last block) and move on."""
        finished = (state.carry["step"] >= bound) | ~jnp.any(candidates(state))

        def next_block(state):
            if not fuse:
                more = jnp.any(first_B + state.carry["block"] < end_B - 1)  # the last block's K/V is never read
                state = jax.lax.cond(more, write_block, lambda s: s, state)
            return state.replace(carry=dict(state.carry, block=state.carry["block"] + 1, step=jnp.int32(0)))

        return jax.lax.cond(finished, next_block, lambda s: s, state)

    active = lambda s: jnp.any(first_B + s.carry["block"] < end_B)  # noqa: E731
    carry = dict(block=jnp.int32(0), step=jnp.int32(0))
    if constrained:  # LAVE verification wraps the step (`jaxgen.constraints.diffusion`)
        propose, rule, update = constraint_steps.lave_rules(
            propose, rule, update, session_id=session, words=-(-cfg.vocab_size // 32),
            gen_start=lambda s: block_start(s) - lengths_B, current_block=current,
            out_start_B=lengths_B, out_end_B=jnp.full((B,), total), mask_id=cfg.mask_id, eos_id=cfg.eos_id)
        active = lambda s, unconstrained=active: unconstrained(s) & ~jnp.all(s.carry["complete"])  # noqa: E731
        carry.update(constraint_steps.initial_fields(session, B, -(-cfg.vocab_size // 32)))
    recipe = loop.Recipe(forward=step_forward, propose=propose, rule=rule, update=update, after=after, active=active)
    x = initial_canvas(prompt, lengths_B, total, cfg.mask_id)
    cache = cache_lib.init_cache(cfg, B, total, per_layer=is_decode_form(params))
    nfe = 0
    prefill = (P // bl) * bl
    if prefill:  # the whole prompt blocks (rows with fewer keep only theirs)
        _, cache = forward(params, cfg, x[:, :prefill], layout=layout, cache=cache)
        nfe = 1
    cache = cache_lib.with_lengths(cache, first_B * bl)
    state = loop.new_state(x, cache, nfe=nfe, carry=carry)
    state = loop.run(recipe, state, (total // bl) * bound)
    col = jnp.arange(total)[None, :]
    pad = cfg.pad_id if cfg.pad_id is not None else cfg.mask_id
    tokens = jnp.where(col < (lengths_B + gen_length)[:, None], state.tokens, pad)
    return loop.SamplerOutput(tokens=tokens, nfe=state.nfe)
