"""Masked-diffusion decoding: LLaDA and Fast-dLLM semantics on one jitted loop.

Canvas x = [prompt | MASK * gen_length] in semi-autoregressive blocks, full (bidirectional)
attention. Each step proposes x0 = argmax(logits + T * Gumbel), scores it (softmax confidence
at x0 for `low_confidence`, U(0,1) for `random`) and commits masked positions of the current
block only, by one of three rules:

- schedule (default): the k[step] most confident, k from `num_transfer_tokens(block, steps per
  block)` (ML-GSAI/LLaDA `generate.py`);
- `threshold` (Fast-dLLM `get_transfer_index`): the most confident one plus every one with
  confidence >= threshold;
- `factor` (Fast-dLLM `get_transfer_index_dynamic`): with confidences sorted c_1 >= c_2 >= ...,
  the first n that stay above 1 - factor / (n + 1) (the reference's quirk kept: when only the
  last candidate fails, it is committed too);
- `commit_filter` (Learn2PD, `jaxgen.samplers.learn2pd`): the most confident one plus every one
  a learned filter accepts at `filter_threshold`.

Threshold, factor and filter rules loop until the block is clean (adaptive NFE). `eotp=True`
(Learn2PD's End-of-Text Prediction) fills every MASK after a committed EOS with EOS, ends the
block's loop once it is clean and skips clean blocks without a forward.

Caches (NVlabs/Fast-dLLM `llada/generate.py`), with the reference's stale-cache semantics:

- `cache=None`: every step is a full forward. Schedule rule: a fixed `steps // num_blocks`
  forwards per block (LLaDA, even after the block is clean); threshold/factor: until the block
  is clean (Fast-dLLM `generate`).
- `"prefix"`: at each block start a full forward writes every position's K/V and commits (step
  0); later steps feed [current block + all later MASKs] against the prefix K/V of that forward
  (stale within the block, refreshed at the next block start).
- `"dual"`: the block-start forward's K/V is kept for the whole canvas; later steps feed only
  the current block, overwrite its K/V in place and attend over stale prefix + suffix K/V.
- `"dkv_decode"` (horseee/dKV-Cache `llada_dkv_cache_decode.py`): LLaDA's fixed steps; steps 0
  and 1 and every `cache_reloading_step`-th step are full forwards that store every K/V; other
  steps reuse the stored K/V of the tokens unmasked before the previous step (a token's K/V
  enters the cache one step after it is decoded; MASKs are never reused) and recompute the rest.
- `"dkv_greedy"` (horseee/dKV-Cache `llada_dkv_cache_greedy.py`, `remasking="random"` only): the
  decode order is drawn once per block, so each step knows the next step's positions. Steps with
  `step % cache_reloading_step == 0` are full forwards storing every K/V; other steps recompute
  only the tokens decoded last step, the tokens scheduled for this step and up to `window_size`
  still-masked neighbours of each scheduled token (visited s-1, s+1, s-2, s+2, ...); everything
  else, MASKs included, attends with its stale stored K/V, and recomputed K/V are stored.
Prefix and dual caches loop until the block is clean. NFE counts forwards (CFG's batched pass
counts 1).

Static shapes: the prefix and dKV modes' reduced steps feed [block start, end of canvas), a
window that shrinks block by block. jaxgen feeds one of at most `llada_steps.WINDOW_GROUPS` static windows
[lo, end) with lo <= block start (so compile time is flat in the number of blocks): the columns
before the block start are dead (no keys; dKV keeps their stored K/V, the prefix cache already
holds them) and their outputs are dropped, so every live query sees exactly the reference's keys.
Earlier tokens are all decoded before the previous step and attend only through their K/V (the
prefix forward's, or dKV's stored ones, which dKV keeps for such tokens anyway). Cost: each
reduced step feeds at most gen_length / WINDOW_GROUPS columns more than the reference.
"""
from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from jaxgen import cache as cache_lib
from jaxgen import constraints
from jaxgen.constraints import diffusion as constraint_steps
from jaxgen.decoding import checks, loop
from jaxgen.decoding.checks import check_choice, check_prompt, check_threshold, with_mask_id
from jaxgen.decoding.loop import SamplerOutput
from jaxgen.errors import JaxgenError
from jaxgen.model import is_decode_form
from jaxgen.samplers.llada_steps import (STATIC_WINDOW, Ctx, block_carry, block_unclean, next_block, step_rules,
                                        window_groups)

REMASKING = ("low_confidence", "random")
CACHES = (None, "prefix", "dual", "dkv_decode", "dkv_greedy")


def generate(params, cfg, prompt, key, *, gen_length: int = 128, steps: int = 128, block_length: int = 32,
             temperature: float = 0.0, cfg_scale: float = 0.0, remasking: str | None = None,
             threshold: float | None = None, factor: float | None = None, cache: str | None = None,
             mask_id: int | None = None, eos_logit_inf: bool = False, confidence_eos_inf: bool = False,
             cache_reloading_step: int | None = None, window_size: int | None = None, alg: str | None = None,
             alg_temp: float | None = None, top_p: float | None = None, top_k: int | None = None, commit_filter=None,
             filter_threshold: float | None = None, eotp: bool = False, prompt_lengths=None, constraint=None,
             on_incomplete: Literal["error", "return"] = "error") -> SamplerOutput:
    """LLaDA / Fast-dLLM sampler (see the module docstring). An option that does not apply to the
    chosen mode (None below means its default) is refused, never dropped.

    remasking: "low_confidence" (default) or "random".

    eos_logit_inf: EOS is never proposed (LLaDA `logits_eos_inf`).
    confidence_eos_inf: a proposed EOS gets confidence 0, so it is committed only when nothing
      else is left (LLaDA `confidence_eos_eot_inf`, which masks the logit after the argmax).
    cache_reloading_step: dKV-Cache's full refresh period (`cache="dkv_decode"|"dkv_greedy"` only;
      default 4, 1 = no caching).
    window_size: dKV-Cache-Greedy's recomputed neighbours per scheduled token (`cache="dkv_greedy"`
      only; default 4 as the reference's README example, 0 = none).
    alg, alg_temp, top_p, top_k: Dream decoding (`jaxgen.samplers.dream`): one block, shifted
      logits, Dream's time grid; `steps` forwards. top_p, top_k and alg_temp need alg (LLaDA has
      no token filter).
    commit_filter, filter_threshold: Learn2PD's filter params (`learn2pd.load_filter`) and tau
      (default 0.5).
    eotp: End-of-Text Prediction (needs cfg.eos_id).
    prompt_lengths: [B] ints for a right-padded ragged `prompt` (cache None or "dual"): each row's
      blocks start after its own prompt; under greedy decoding row i's first prompt_lengths[i] +
      gen_length tokens equal that row decoded alone, and the columns after them hold MASK.
    constraint, on_incomplete: a `jaxgen.constraints` grammar (cache None, "prefix" or "dual";
      not with alg): each step's commits are verified LAVE-style (`jaxgen.constraints.lave`), so
      a block loops until it is clean (at most block_length forwards, NFE may exceed `steps`);
      once a row's grammar is complete its remaining positions become EOS. Returns a
      `ConstrainedOutput`; a row that did not complete the grammar raises a JaxgenError
      (on_incomplete="error") or is flagged in `.valid` ("return").
    """
    if constraint is not None and (alg is not None or cache in ("dkv_decode", "dkv_greedy")):
        raise JaxgenError(f"constraint= works with LLaDA / Fast-dLLM decoding and cache None, 'prefix' or 'dual', "
                          f"not with {'alg=' + repr(alg) if alg is not None else 'cache=' + repr(cache)}")
    if alg is not None:
        return _dream_mode(params, cfg, prompt, key, gen_length=gen_length, steps=steps, block_length=block_length,
                           temperature=temperature, mask_id=mask_id, alg=alg, alg_temp=alg_temp, top_p=top_p,
                           top_k=top_k, cfg_scale=cfg_scale or None, remasking=remasking, threshold=threshold,
                           factor=factor, cache=cache, cache_reloading_step=cache_reloading_step,
                           window_size=window_size, commit_filter=commit_filter, filter_threshold=filter_threshold,
                           eotp=eotp, eos_logit_inf=eos_logit_inf, confidence_eos_inf=confidence_eos_inf,
                           prompt_lengths=prompt_lengths)
    checks.check_not_given("without alg= (LLaDA decoding has no token filter or position temperature; set alg to "
                           "one of 'origin', 'maskgit_plus', 'topk_margin', 'entropy' for Dream decoding)",
                           top_k=top_k, top_p=top_p, alg_temp=alg_temp)
    cfg = with_mask_id(cfg, mask_id)
    prompt = checks.as_prompt(prompt)
    remasking = "low_confidence" if remasking is None else remasking
    check_choice("remasking", remasking, REMASKING)
    check_choice("cache", cache, CACHES)
    validate_blocks(gen_length, block_length, steps)
    lengths = checks.check_prompt_lengths(prompt_lengths, prompt.shape)
    check_prompt(prompt, cfg, prompt.shape[1] + gen_length, diffusion=True, prompt_lengths=lengths)
    if lengths is not None and cache not in (None, "dual"):
        raise JaxgenError(f"prompt_lengths (a ragged batch) works with cache=None or 'dual', not cache={cache!r}: "
                          "its reduced steps feed a static window [block start, end of canvas); decode rows of "
                          "one length together instead")
    lengths = jnp.full((prompt.shape[0],), prompt.shape[1], jnp.int32) if lengths is None else jnp.asarray(lengths)
    rule = _check_llada_options(cfg, temperature=temperature, cfg_scale=cfg_scale, remasking=remasking,
                                threshold=threshold, factor=factor, cache=cache, commit_filter=commit_filter,
                                filter_threshold=filter_threshold, cache_reloading_step=cache_reloading_step,
                                window_size=window_size, eotp=eotp, eos_logit_inf=eos_logit_inf,
                                confidence_eos_inf=confidence_eos_inf)
    filter_threshold = 0.5 if filter_threshold is None else filter_threshold
    level = jnp.float32({"threshold": threshold, "factor": factor, "commit_filter": filter_threshold}.get(rule, 0.0))
    reload_every = int(4 if cache_reloading_step is None else cache_reloading_step)
    run = functools.partial(_generate, params, cfg, prompt, lengths, key, jnp.float32(temperature),
                            jnp.float32(cfg_scale), level, commit_filter, gen_length=gen_length, steps=steps,
                            block_length=block_length, remasking=remasking, rule=rule, cache=cache,
                            eos_logit_inf=eos_logit_inf, confidence_eos_inf=confidence_eos_inf, guided=cfg_scale > 0,
                            reload_every=reload_every, window_size=int(4 if window_size is None else window_size),
                            eotp=bool(eotp))
    if constraint is None:
        constraints.check_no_policy(on_incomplete)
        return run(None)
    constraints.check_constraint(constraint, cfg, cfg.eos_id, on_incomplete)
    with constraints.open_session(constraint, prompt.shape[0], gen_length, cfg.vocab_size, cfg.mask_id) as session:
        out = jax.block_until_ready(run(jnp.int32(session.id)))
    return constraints.finish(out, constraint, lengths, gen_length, on_incomplete)


def _dream_mode(params, cfg, prompt, key, *, gen_length, steps, block_length, temperature, mask_id, alg, alg_temp,
                top_p, top_k, **llada_only):
    """`alg=` given: Dream decoding (one block, no cache); LLaDA's options are refused."""
    from jaxgen.samplers import dream
    checks.check_not_given(f"with alg={alg!r}: it selects Dream decoding (one block, no cache, Dream's own reveal "
                           "rule); drop alg for LLaDA / Fast-dLLM decoding", **llada_only)
    if block_length != gen_length:
        raise JaxgenError(f"alg={alg!r} selects Dream decoding: one block, so block_length={block_length} must equal "
                          f"gen_length={gen_length}")
    return dream.generate(params, cfg, prompt, key, gen_length=gen_length, steps=steps, alg=alg, alg_temp=alg_temp,
                          temperature=temperature, top_p=top_p, top_k=top_k, mask_id=mask_id)


def _check_llada_options(cfg, *, temperature, cfg_scale, remasking, threshold, factor, cache, commit_filter,
                         filter_threshold, cache_reloading_step, window_size, eotp, eos_logit_inf, confidence_eos_inf):
    """Refuse bad values and options that do not apply to the chosen rule and cache; the rule's name."""
    checks.check_temperature(temperature)
    checks.check_nonnegative(cfg_scale=cfg_scale)
    check_threshold(threshold)
    chosen = [name for name, v in (("threshold", threshold), ("factor", factor), ("commit_filter", commit_filter))
              if v is not None]
    if len(chosen) > 1:
        raise JaxgenError(f"{' and '.join(chosen)} are separate commit rules; pass one of them")
    if commit_filter is None:
        checks.check_not_given("without commit_filter (it is the Learn2PD filter's tau)",
                               filter_threshold=filter_threshold)
    else:
        check_threshold(filter_threshold, "filter_threshold")
        if remasking != "low_confidence":
            raise JaxgenError(f"commit_filter reads softmax confidences: use remasking='low_confidence', "
                              f"not {remasking!r}")
        if cache in ("dkv_decode", "dkv_greedy"):
            raise JaxgenError(f"commit_filter loops until the block is clean; cache={cache!r} follows fixed "
                              "steps (use None, 'prefix' or 'dual')")
    if eotp and cfg.eos_id is None:
        raise JaxgenError("eotp=True needs cfg.eos_id (the End-of-Text token)")
    if factor is not None and checks.concrete(factor) and not float(factor) > 0:
        raise JaxgenError(f"factor={factor} must be positive (Fast-dLLM uses about 1)")
    if cache is not None and cfg_scale:
        raise JaxgenError(f"cfg_scale={cfg_scale} needs cache=None (Fast-dLLM caches have no guidance pass)")
    if cache not in ("dkv_decode", "dkv_greedy"):
        checks.check_not_given(f"with cache={cache!r} (dKV-Cache's refresh period: cache='dkv_decode' or "
                               "'dkv_greedy')", cache_reloading_step=cache_reloading_step)
    if cache != "dkv_greedy":
        checks.check_not_given(f"with cache={cache!r} (dKV-Cache-Greedy's recompute window: cache='dkv_greedy')",
                               window_size=window_size)
    if cache_reloading_step is not None and int(cache_reloading_step) < 1:
        raise JaxgenError(f"cache_reloading_step={cache_reloading_step} must be >= 1 (dKV-Cache uses 4 to 8)")
    if cache == "dkv_greedy":
        if remasking != "random":
            raise JaxgenError(f"cache='dkv_greedy' needs remasking='random' (its decode order is drawn once per "
                              f"block), got remasking={remasking!r}")
        if threshold is not None or factor is not None:
            raise JaxgenError("cache='dkv_greedy' follows the fixed step schedule; drop threshold/factor")
    if window_size is not None and int(window_size) < 0:
        raise JaxgenError(f"window_size={window_size} must be >= 0")
    if (eos_logit_inf or confidence_eos_inf) and cfg.eos_id is None:
        raise JaxgenError("eos_logit_inf / confidence_eos_inf need cfg.eos_id")
    if eos_logit_inf:
        checks.check_not_given("with eos_logit_inf=True (EOS is never proposed)", confidence_eos_inf=confidence_eos_inf,
                               eotp=eotp)
    if remasking == "random":
        checks.check_not_given("with remasking='random' (confidences are random draws; eos_logit_inf=True keeps EOS "
                               "out instead)", confidence_eos_inf=confidence_eos_inf)
    return chosen[0] if chosen else "schedule"


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


@functools.partial(jax.jit, static_argnames=("cfg", "gen_length", "steps", "block_length", "remasking", "rule",
                                             "cache", "eos_logit_inf", "confidence_eos_inf", "guided",
                                             "reload_every", "window_size", "eotp"))
def _generate(params, cfg, prompt, lengths_B, key, temperature, cfg_scale, level, commit_filter, session, *,
              gen_length, steps, block_length, remasking, rule, cache, eos_logit_inf, confidence_eos_inf, guided,
              reload_every, window_size, eotp):
    """`session`: None, or the traced id of an open constraint session (LAVE rules wrap the step)."""
    B, P = prompt.shape
    num_blocks = gen_length // block_length
    constrained = session is not None
    ctx = Ctx(params, cfg, key, temperature, cfg_scale if guided else None, level, commit_filter,
               lengths_B, P + gen_length, block_length, steps // num_blocks, remasking, rule, cache, eos_logit_inf,
               confidence_eos_inf, reload_every, window_size, eotp)
    fixed_steps = cache in (None, "dkv_decode", "dkv_greedy") and rule == "schedule" and not eotp and not constrained
    bound = ctx.per_block if rule == "schedule" and not constrained else block_length  # >= 1 commit per step
    col = jnp.arange(ctx.total)[None, :]
    x = jnp.where(col < lengths_B[:, None], jnp.pad(prompt, ((0, 0), (0, gen_length))), cfg.mask_id)
    kv0 = None if cache is None else cache_lib.init_cache(cfg, B, ctx.total, per_layer=is_decode_form(params))
    carry = block_carry(ctx, 0, B)
    if constrained:
        carry.update(constraint_steps.initial_fields(session, B, -(-cfg.vocab_size // 32)))
    state = loop.new_state(x, kv0, carry=carry)

    def after(state):
        finished = state.carry["step"] >= bound
        if not fixed_steps:
            finished = finished | ~block_unclean(ctx, state)
        return jax.lax.cond(finished, to_next_block, lambda s: s, state)

    to_next_block = lambda s: next_block(ctx, num_blocks, s)  # noqa: E731
    if constrained:
        to_next_block = constraint_steps.keep_fields(to_next_block)

    groups = window_groups(P, gen_length, block_length) if cache in STATIC_WINDOW else [(None, num_blocks)]
    for lo, end_block in groups:  # one loop over the blocks of each static window
        rules = step_rules(ctx, gen_length, lo)
        active = lambda s, end=end_block: s.carry["block"] < end  # noqa: E731
        if constrained:
            rules, active = _constrained(ctx, rules, active, session, gen_length)
        recipe = loop.Recipe(**rules, after=after, active=active)
        state = loop.run(recipe, state, num_blocks * bound)
    return loop.SamplerOutput(tokens=state.tokens, nfe=state.nfe)


def _constrained(ctx, rules, active, session, gen_length):
    """The step rules with LAVE verification (`jaxgen.constraints.diffusion`); the loop also ends
    once every row's grammar is complete (its later blocks are all EOS)."""
    bl = ctx.block_length
    gen_start = lambda s: jnp.broadcast_to(s.carry["block"] * bl, ctx.lengths_B.shape)  # noqa: E731
    block = lambda s: cache_lib.slice_rows(s.tokens, ctx.lengths_B + s.carry["block"] * bl, bl)  # noqa: E731
    propose, rule, update = constraint_steps.lave_rules(
        rules["propose"], rules["rule"], rules["update"], session_id=session, words=-(-ctx.cfg.vocab_size // 32),
        gen_start=gen_start, current_block=block, out_start_B=ctx.lengths_B, out_end_B=ctx.lengths_B + gen_length,
        mask_id=ctx.cfg.mask_id, eos_id=ctx.cfg.eos_id)
    rules = dict(rules, propose=propose, rule=rule, update=update)
    return rules, lambda s: active(s) & ~jnp.all(s.carry["complete"])


