"""NBDiff decoding (YuchuanTian/NBDiff `generation_utils.py::diffusion_generate`; a Fast-dLLM-v2
style loop for models adapted from AR; shared/specs/diffusion_lm.md §4.3).

- Prefill the prompt causally; the first generated token is sampled AR-style from the last
  prompt logit.
- Blocks of `block_length` start right after the prompt. Each block [AR token, MASK, ...] is
  denoised against the read-only cache with bidirectional attention inside the block; logits are
  shifted right (position i reads the output at i - 1). The block is split into
  `num_small_blocks` sub-blocks, denoised left to right; each step commits the best masked
  position of the sub-block (max prob for `origin` / `confidence_threshold`, negative entropy
  for `entropy`, top-1 minus top-2 for `topk_margin`) and, with `confidence_threshold`, every
  masked position with confidence > threshold, until the sub-block is clean.
- The clean block is stored with a *causal* forward (exact AR K/V), whose last logit gives the
  next block's first token.

Token proposal follows Dream's order (temperature, top-p, top-k); see `dream.score_tokens`.
Decisions: rows already clean never commit (the reference's batched argmax over an all -inf row
rewrites position 0 of a clean sub-block); the last block's store forward is skipped (nothing
reads it: NFE = reference - 1); with `stop_at_eos`, once every row holds EOS the loop stops, as
the reference does, and the undecoded tail is EOS instead of MASK. `topk_margin` scores each
position (Dream's top-1 minus top-2); the reference's version indexes a [batch, positions,
vocab] tensor as Dream's [positions, vocab] one and fails, so it has no reference behaviour.
`experiments/reference_parity.py --nbdiff` runs the reference loop against this sampler:
identical tokens, NFE as stated.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxgen import cache as cache_lib
from jaxgen import layouts
from jaxgen.errors import JaxgenError
from jaxgen.model import forward, is_decode_form
from jaxgen.decoding.checks import check_choice, check_prompt, check_threshold, with_mask_id
from jaxgen.decoding import checks, loop
from jaxgen.decoding.loop import SamplerOutput
from jaxgen.decoding.processors import forbid_mask_token
from jaxgen.decoding import rules
from jaxgen.samplers.dream import score_tokens, traced_filters

ALGS = ("origin", "confidence_threshold", "entropy", "topk_margin")


def generate(params, cfg, prompt, key, *, gen_length: int = 128, block_length: int = 32, num_small_blocks: int = 1,
             alg: str = "origin", threshold: float | None = None, temperature: float = 0.0,
             top_p: float | None = None, top_k: int | None = None, mask_id: int | None = None,
             stop_at_eos: bool = False) -> SamplerOutput:
    """NBDiff decoding (see the module docstring). The reference's demo: alg='entropy', top_p=0.8,
    temperature=1.0, block_length=32, num_small_blocks=8. `threshold` (default 0.9) is the
    `confidence_threshold` alg's."""
    cfg = with_mask_id(cfg, mask_id)
    prompt = checks.as_prompt(prompt)
    check_choice("alg", alg, ALGS)
    if alg != "confidence_threshold":
        checks.check_not_given(f"with alg={alg!r} (only alg='confidence_threshold' commits above a threshold)",
                               threshold=threshold)
    threshold = 0.9 if threshold is None else threshold
    check_threshold(threshold)
    checks.check_positive(gen_length=gen_length, block_length=block_length, num_small_blocks=num_small_blocks)
    if gen_length % block_length:
        raise JaxgenError(f"gen_length={gen_length} is not a multiple of block_length={block_length}")
    if block_length % num_small_blocks:
        raise JaxgenError(f"block_length={block_length} is not divisible by num_small_blocks={num_small_blocks}")
    checks.check_temperature(temperature)
    checks.check_top_p(top_p)
    checks.check_top_k(top_k, off=None)
    if stop_at_eos and cfg.eos_id is None:
        raise JaxgenError("stop_at_eos=True needs cfg.eos_id")
    check_prompt(prompt, cfg, prompt.shape[1] + gen_length, diffusion=True)  # as_prompt refused P = 0
    return _generate(params, cfg, prompt, key, jnp.float32(temperature), jnp.float32(threshold),
                     *traced_filters(top_p, top_k), gen_length=gen_length, block_length=block_length,
                     sub=block_length // num_small_blocks, alg=alg, stop_at_eos=stop_at_eos)


@functools.partial(jax.jit, static_argnames=("cfg", "gen_length", "block_length", "sub", "alg", "stop_at_eos"))
def _generate(params, cfg, prompt, key, temperature, threshold, top_p, top_k, *, gen_length, block_length, sub, alg,
              stop_at_eos):
    B, P = prompt.shape
    total = P + gen_length
    num_blocks = gen_length // block_length
    subs = block_length // sub
    x = jnp.concatenate([prompt, jnp.full((B, gen_length), cfg.mask_id, jnp.int32)], axis=1)
    cache = cache_lib.init_cache(cfg, B, total, per_layer=is_decode_form(params))
    logits, cache = forward(params, cfg, prompt, layout=layouts.causal(), cache=cache)

    def ar_token(logits_BV, k):
        tok, _ = score_tokens(forbid_mask_token(logits_BV, cfg), k, temperature, top_p, top_k, "origin")
        return tok

    x = x.at[:, P].set(ar_token(logits[:, -1], jax.random.fold_in(key, 0)))
    has_eos = lambda x: jnp.all(jnp.any(x[:, P:] == cfg.eos_id, axis=1)) if stop_at_eos else jnp.bool_(False)

    def block_start(state):
        return P + state.carry["block"] * block_length

    def current(state):
        return jax.lax.dynamic_slice_in_dim(state.tokens, block_start(state), block_length, axis=1)

    def sub_block(state, blk=None):
        blk = current(state) if blk is None else blk
        return jax.lax.dynamic_slice_in_dim(blk, state.carry["sub"] * sub, sub, axis=1)

    def step_forward(state):  # the whole block over the exact cache of the clean prefix; shifted logits
        start = block_start(state)
        positions = jnp.broadcast_to(start + jnp.arange(block_length, dtype=jnp.int32), (B, block_length))

        def run(_):
            logits, _ = forward(params, cfg, current(state), positions, layouts.full(), cache_lib.read(state.cache))
            logits = jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)  # right shift
            return forbid_mask_token(jax.lax.dynamic_slice_in_dim(logits, state.carry["sub"] * sub, sub, axis=1), cfg)

        unclean = jnp.any(sub_block(state) == cfg.mask_id)  # a clean sub-block costs no forward
        skip = lambda _: jnp.zeros((B, sub, cfg.vocab_size), jnp.float32)
        return jax.lax.cond(unclean, run, skip, None), state.cache, unclean.astype(jnp.int32)

    def propose(logits, state):
        return score_tokens(logits, jax.random.fold_in(key, state.nfe), temperature, top_p, top_k, alg)

    def rule(proposal, state):
        masked = sub_block(state) == cfg.mask_id
        if alg == "confidence_threshold":
            return rules.best_plus_above(proposal[1], masked, threshold, inclusive=False)
        return rules.best(proposal[1], masked)

    def update(state, proposal, take, _):
        blk = current(state)
        new_sub = jnp.where(take, proposal[0], sub_block(state, blk))
        blk = jax.lax.dynamic_update_slice_in_dim(blk, new_sub, state.carry["sub"] * sub, axis=1)
        return state.replace(tokens=jax.lax.dynamic_update_slice_in_dim(state.tokens, blk, block_start(state), axis=1))

    def store(state):  # exact causal K/V of the clean block; its last logit starts the next block
        logits, cache = forward(params, cfg, current(state), layout=layouts.causal(), cache=state.cache)
        nxt = ar_token(logits[:, -1], jax.random.fold_in(key, state.nfe))
        tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, nxt[:, None], block_start(state) + block_length,
                                                     axis=1)
        return state.replace(tokens=tokens, cache=cache, nfe=state.nfe + 1)

    def advance(s):
        """Past a clean sub-block (which may set the EOS stop); past a block's last one, store it."""
        stopped = s.carry["stopped"] | has_eos(s.tokens)
        s = s.replace(carry=dict(s.carry, sub=s.carry["sub"] + 1, stopped=stopped))

        def end_block(s):
            s = jax.lax.cond((s.carry["block"] < num_blocks - 1) & ~s.carry["stopped"], store, lambda t: t, s)
            return s.replace(carry=dict(s.carry, block=s.carry["block"] + 1, sub=jnp.int32(0)))

        return jax.lax.cond(s.carry["sub"] == subs, end_block, lambda t: t, s)

    def after(state):  # one sub-block at a time; a clean one then costs an iteration without a forward
        return jax.lax.cond(jnp.any(sub_block(state) == cfg.mask_id), lambda t: t, advance, state)

    recipe = loop.Recipe(forward=step_forward, propose=propose, rule=rule, update=update, after=after,
                         active=lambda s: (s.carry["block"] < num_blocks) & ~s.carry["stopped"])
    carry = dict(block=jnp.int32(0), sub=jnp.int32(0), stopped=has_eos(x))
    state = loop.run(recipe, loop.new_state(x, cache, nfe=1, carry=carry), gen_length + num_blocks * subs)
    x = state.tokens
    if stop_at_eos:
        x = jnp.where(x == cfg.mask_id, cfg.eos_id, x)
    return SamplerOutput(tokens=x, nfe=state.nfe)
