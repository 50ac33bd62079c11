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

Static shapes: the prefix and dKV modes unroll the blocks (num_blocks step programs in one
compiled function), so each block's reduced steps feed exactly [block start, end of canvas):
earlier tokens are all decoded before the previous step and attend only through their K/V
(the prefix forward's, or dKV's stored ones, which dKV keeps for such tokens anyway).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxgen import layouts
from jaxgen.cache import init_cache, read, truncate, write_at
from jaxgen.errors import JaxgenError
from jaxgen.model import forward, unstack_layers
from jaxgen.samplers import learn2pd
from jaxgen.decoding.checks import check_choice, check_prompt, check_threshold, with_mask_id
from jaxgen.decoding.loop import SamplerOutput
from jaxgen.decoding.processors import classifier_free_guidance, forbid_mask_token
from jaxgen.decoding import rules
from jaxgen.decoding.propose import NEG_INF, gumbel_argmax
from jaxgen.decoding.rules import top_k_commit
from jaxgen.decoding.schedules import num_transfer_tokens

REMASKING = ("low_confidence", "random")
CACHES = (None, "prefix", "dual", "dkv_decode", "dkv_greedy")


def generate(params, cfg, prompt, key, *, gen_length: int = 128, steps: int = 128, block_length: int = 32,
             temperature: float = 0.0, cfg_scale: float = 0.0, remasking: str = "low_confidence",
             threshold: float | None = None, factor: float | None = None, cache: str | None = None,
             mask_id: int | None = None, eos_logit_inf: bool = False, confidence_eos_inf: bool = False,
             cache_reloading_step: int = 4, window_size: int = 4, alg: str | None = None, alg_temp: float | None = None,
             top_p: float | None = None, top_k: int | None = None, commit_filter=None,
             filter_threshold: float = 0.5, eotp: bool = False) -> SamplerOutput:
    """LLaDA / Fast-dLLM sampler (see the module docstring).

    eos_logit_inf: EOS is never proposed (LLaDA `logits_eos_inf`).
    confidence_eos_inf: a proposed EOS gets confidence 0, so it is committed only when nothing
      else is left (LLaDA `confidence_eos_eot_inf`, which masks the logit after the argmax).
    cache_reloading_step: dKV-Cache's full refresh period (`cache="dkv_decode"|"dkv_greedy"`; 1 = no
      caching).
    window_size: dKV-Cache-Greedy's recomputed neighbours per scheduled token (the reference's
      README example uses 4; 0 = none).
    alg, alg_temp, top_p, top_k: Dream decoding (`jaxgen.samplers.dream`): one block, shifted
      logits, Dream's time grid; `steps` forwards.
    commit_filter, filter_threshold: Learn2PD's filter params (`learn2pd.load_filter`) and tau.
    eotp: End-of-Text Prediction (needs cfg.eos_id).
    """
    if alg is not None:
        from jaxgen.samplers import dream
        if block_length != gen_length or cache is not None or threshold is not None or factor is not None or cfg_scale:
            raise JaxgenError(f"alg={alg!r} selects Dream decoding: one block (block_length=gen_length), no cache, "
                              "threshold, factor or cfg_scale")
        return dream.generate(params, cfg, prompt, key, gen_length=gen_length, steps=steps, alg=alg,
                              alg_temp=alg_temp, temperature=temperature, top_p=top_p, top_k=top_k, mask_id=mask_id)
    cfg = with_mask_id(cfg, mask_id)
    prompt = jnp.asarray(prompt, jnp.int32)
    check_choice("remasking", remasking, REMASKING)
    check_choice("cache", cache, CACHES)
    validate_blocks(gen_length, block_length, steps)
    check_prompt(prompt, cfg, prompt.shape[1] + gen_length, diffusion=True)
    check_threshold(threshold)
    rules = [name for name, v in (("threshold", threshold), ("factor", factor), ("commit_filter", commit_filter))
             if v is not None]
    if len(rules) > 1:
        raise JaxgenError(f"{' and '.join(rules)} are separate commit rules; pass one of them")
    if commit_filter is not None:
        check_threshold(filter_threshold, "filter_threshold")
        if remasking != "low_confidence":
            raise JaxgenError(f"commit_filter reads softmax confidences: use remasking='low_confidence', "
                              f"not {remasking!r}")
        if cache in ("dkv_decode", "dkv_greedy"):
            raise JaxgenError(f"commit_filter loops until the block is clean; cache={cache!r} follows fixed "
                              "steps (use None, 'prefix' or 'dual')")
    if eotp and cfg.eos_id is None:
        raise JaxgenError("eotp=True needs cfg.eos_id (the End-of-Text token)")
    if factor is not None and not float(factor) > 0:
        raise JaxgenError(f"factor={factor} must be positive (Fast-dLLM uses about 1)")
    if cache is not None and cfg_scale:
        raise JaxgenError(f"cfg_scale={cfg_scale} needs cache=None (Fast-dLLM caches have no guidance pass)")
    if int(cache_reloading_step) < 1:
        raise JaxgenError(f"cache_reloading_step={cache_reloading_step} must be >= 1 (dKV-Cache uses 4 to 8)")
    if cache == "dkv_greedy":
        if remasking != "random":
            raise JaxgenError(f"cache='dkv_greedy' needs remasking='random' (its decode order is drawn once per "
                              f"block), got remasking={remasking!r}")
        if threshold is not None or factor is not None:
            raise JaxgenError("cache='dkv_greedy' follows the fixed step schedule; drop threshold/factor")
    if int(window_size) < 0:
        raise JaxgenError(f"window_size={window_size} must be >= 0")
    if (eos_logit_inf or confidence_eos_inf) and cfg.eos_id is None:
        raise JaxgenError("eos_logit_inf / confidence_eos_inf need cfg.eos_id")
    rule = rules[0] if rules else "schedule"
    level = jnp.float32({"threshold": threshold, "factor": factor, "commit_filter": filter_threshold}.get(rule, 0.0))
    return _generate(params, cfg, prompt, key, jnp.float32(temperature), jnp.float32(cfg_scale), level, commit_filter,
                     gen_length=gen_length, steps=steps, block_length=block_length, remasking=remasking,
                     rule=rule, cache=cache, eos_logit_inf=eos_logit_inf, confidence_eos_inf=confidence_eos_inf,
                     guided=cfg_scale > 0, reload_every=int(cache_reloading_step),
                     window_size=int(window_size), eotp=bool(eotp))


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


def guided_logits(params, cfg, x_BL, prompt_len: int, cfg_scale, out_rows=None):
    """Full-layout logits (of `out_rows` only, see `model.forward`); with a guidance scale,
    classifier-free guidance against prompt -> MASK. cfg_scale=None skips guidance at trace time."""
    if cfg_scale is None:
        return forward(params, cfg, x_BL, layout=layouts.full(), out_rows=out_rows)[0]
    uncond = x_BL.at[:, :prompt_len].set(cfg.mask_id)
    both, _ = forward(params, cfg, jnp.concatenate([x_BL, uncond]), layout=layouts.full(), out_rows=out_rows)
    return classifier_free_guidance(*jnp.split(both, 2), cfg_scale)


@functools.partial(jax.jit, static_argnames=("cfg", "gen_length", "steps", "block_length", "remasking", "rule",
                                             "cache", "eos_logit_inf", "confidence_eos_inf", "guided",
                                             "reload_every", "window_size", "eotp"))
def _generate(params, cfg, prompt, key, temperature, cfg_scale, level, commit_filter, *, gen_length, steps,
              block_length, remasking, rule, cache, eos_logit_inf, confidence_eos_inf, guided, reload_every,
              window_size, eotp):
    params = unstack_layers(params)  # once per call, not per step
    cfg_scale = cfg_scale if guided else None
    B, P = prompt.shape
    total = P + gen_length
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    schedule = jnp.asarray(num_transfer_tokens(block_length, steps_per_block))
    max_k = int(num_transfer_tokens(block_length, steps_per_block).max())
    full = layouts.full()
    x = jnp.concatenate([prompt, jnp.full((B, gen_length), cfg.mask_id, jnp.int32)], axis=1)

    def propose(logits_BLV, step_key, order_BK):
        logits = forbid_mask_token(logits_BLV, cfg)
        if eos_logit_inf:
            logits = logits.at[..., cfg.eos_id].set(NEG_INF)
        k_tok, k_conf = jax.random.split(step_key)
        x0 = gumbel_argmax(logits, k_tok, temperature).astype(jnp.int32)
        if order_BK is not None:  # dKV-Cache-Greedy: one random order per block
            return x0, order_BK
        if remasking == "random":
            return x0, jax.random.uniform(k_conf, x0.shape)
        if confidence_eos_inf:
            logits = logits.at[..., cfg.eos_id].set(NEG_INF)
        return x0, jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), x0[..., None], axis=-1)[..., 0]

    def commit(block_BK, logits_BKV, step, nfe, order_BK=None):
        """(new block, committed positions) from the block's logits; `nfe` keys the step's randomness."""
        x0, conf = propose(logits_BKV, jax.random.fold_in(key, nfe), order_BK)
        masked = block_BK == cfg.mask_id
        if rule == "threshold":
            take = rules.best_plus_above(conf, masked, level)
        elif rule == "factor":
            take = rules.factor(conf, masked, level)
        elif rule == "commit_filter":
            take = learn2pd.filter_commit(commit_filter, conf, masked, level)
        else:
            take = rules.scheduled(conf, masked, schedule[jnp.minimum(step, steps_per_block - 1)])
        return jnp.where(take, x0, block_BK), take

    block_of = lambda x, start: jax.lax.dynamic_slice_in_dim(x, start, block_length, axis=1)

    def place(x, new_block, start):
        x = jax.lax.dynamic_update_slice_in_dim(x, new_block, start, axis=1)
        return end_of_text_fill(x, P, cfg.eos_id, cfg.mask_id) if eotp else x

    def refresh(x, start):
        """Step 0 of a block: a full forward (writing every K/V in cached modes); block logits."""
        rows = (start, block_length)
        if cache is None:
            return guided_logits(params, cfg, x, P, cfg_scale, rows), None
        logits, kv = forward(params, cfg, x, layout=full, cache=init_cache(cfg, B, total, per_layer=True),
                             out_rows=rows)
        return logits, truncate(kv, start) if cache == "prefix" else kv

    def cached_step(x, kv, start, step, prv):
        """(logits of the current block, cache) of one step after step 0; `prv` = positions whose
        stored K/V this step keeps (dKV decode: unmasked before the previous step; dKV greedy: not
        scheduled for recomputation)."""
        if cache is None:
            return guided_logits(params, cfg, x, P, cfg_scale, (start, block_length)), kv
        if cache == "prefix":  # `start` is static here (blocks unrolled): the window is exactly [start, total)
            logits, _ = forward(params, cfg, x[:, start:], layout=full, cache=read(kv),
                                out_rows=(0, block_length))
            return logits, kv
        if cache == "dual":
            return forward(params, cfg, block_of(x, start), layout=full, cache=write_at(kv, start))

        def reload(_):  # every K/V fresh and stored
            return forward(params, cfg, x, layout=full, cache=write_at(kv, 0), out_rows=(start, block_length))

        def delayed(_):  # tokens unmasked before the previous step attend with their stored K/V; every
            # earlier block is such, so the fed window starts at the block (`start` static: blocks unrolled)
            return forward(params, cfg, x[:, start:], layout=full, cache=write_at(kv, start, prv[:, start:]),
                           out_rows=(0, block_length))

        is_reload = step % reload_every == 0
        if cache == "dkv_decode":
            is_reload = is_reload | (step == 1)
        return jax.lax.cond(is_reload, reload, delayed, None)

    def kept_after(x_before, x_after, take_BK, order_BK, start, step):
        """Positions whose stored K/V the next step keeps (dKV modes)."""
        if cache != "dkv_greedy":
            return x_before != cfg.mask_id
        next_k = schedule[jnp.minimum(step + 1, steps_per_block - 1)] * (step + 1 < steps_per_block)
        recompute = greedy_recompute(x_before == cfg.mask_id, take_BK, block_of(x_after, start) == cfg.mask_id,
                                     order_BK, next_k, start, max_k, window_size)
        return ~recompute

    def denoise_block(b, carry):
        x, nfe = carry
        start = P + b * block_length
        order = greedy_order_scores(key, b, B, block_length) if cache == "dkv_greedy" else None
        logits, kv = refresh(x, start)
        new_block, take = commit(block_of(x, start), logits, 0, nfe, order)
        x_new = place(x, new_block, start)
        kept = kept_after(x, x_new, take, order, start, 0)
        x = x_new
        nfe = nfe + 1
        bound = steps_per_block if rule == "schedule" else block_length  # >= 1 commit per step

        def cond(c):
            step, x = c[:2]
            if cache in (None, "dkv_decode", "dkv_greedy") and rule == "schedule" and not eotp:
                return step < bound  # LLaDA (and dKV-Cache): fixed steps per block
            return (step < bound) & jnp.any(block_of(x, start) == cfg.mask_id)

        def body(c):
            step, x, kv, nfe, kept = c
            logits, kv = cached_step(x, kv, start, step, kept)
            new_block, take = commit(block_of(x, start), logits, step, nfe, order)
            x_new = place(x, new_block, start)
            return step + 1, x_new, kv, nfe + 1, kept_after(x, x_new, take, order, start, step)

        _, x, _, nfe, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), x, kv, nfe, kept))
        return x, nfe

    if eotp:  # blocks left clean by an earlier EOS cost no forward
        run_block = denoise_block
        denoise_block = lambda b, c: jax.lax.cond(
            jnp.any(block_of(c[0], P + b * block_length) == cfg.mask_id), lambda c: run_block(b, c), lambda c: c, c)
    if cache in ("prefix", "dkv_decode", "dkv_greedy"):  # static window [start, total): blocks unrolled
        carry = (x, jnp.int32(0))
        for b in range(num_blocks):
            carry = denoise_block(b, carry)
        x, nfe = carry
    else:
        x, nfe = jax.lax.fori_loop(0, num_blocks, denoise_block, (x, jnp.int32(0)))
    return SamplerOutput(tokens=x, nfe=nfe)


def end_of_text_fill(x_BT, prompt_len: int, eos_id: int, mask_id: int):
    """Learn2PD's EoTP: every MASK after the first generated EOS of a row becomes EOS."""
    T = x_BT.shape[1]
    pos = jnp.arange(T)
    is_eos = (x_BT == eos_id) & (pos >= prompt_len)
    first_eos_B = jnp.min(jnp.where(is_eos, pos, T), axis=1)
    return jnp.where((x_BT == mask_id) & (pos > first_eos_B[:, None]), eos_id, x_BT)


def greedy_order_scores(key, block, batch: int, block_length: int):
    """dKV-Cache-Greedy's decode order for one block: U(0,1) scores, decoded highest first."""
    block_key = jax.random.fold_in(jax.random.fold_in(key, 0x0D1CE), block)
    return jax.random.uniform(block_key, (batch, block_length))


def window_tokens(marked_T, masked_T, select_K, n_select, window_size: int):
    """dKV-Cache `find_window_tokens` for one row: for each of the first `n_select` entries s of
    `select_K` in turn, mark the first `window_size` positions, visited s-1, s+1, s-2, s+2, ...,
    that are masked (`masked_T`) and not yet marked."""
    T = marked_T.shape[0]
    j = jnp.arange(2 * T)
    offset_J = jnp.where(j % 2 == 0, -(j // 2 + 1), j // 2 + 1)

    def one(marked_T, t):
        p_J = select_K[t] + offset_J
        inside = (p_J >= 0) & (p_J < T)
        p_J = jnp.clip(p_J, 0, T - 1)
        eligible = inside & masked_T[p_J] & ~marked_T[p_J]
        take = eligible & (jnp.cumsum(eligible) <= window_size) & (t < n_select)
        return marked_T | (jnp.zeros(T, jnp.int32).at[p_J].add(take) > 0), None

    marked_T, _ = jax.lax.scan(one, marked_T, jnp.arange(select_K.shape[0]))
    return marked_T


def greedy_recompute(masked_BT, take_BK, still_masked_BK, order_BK, next_k, start, max_k: int, window_size: int):
    """Positions dKV-Cache-Greedy recomputes next step: the ones committed now (`take_BK`), the
    next `next_k` in the block's order and their windows over the step-start masks `masked_BT`."""
    B, T = masked_BT.shape
    K = take_BK.shape[1]
    nxt_BK = top_k_commit(jnp.where(still_masked_BK, order_BK, NEG_INF), next_k)
    in_canvas = lambda m_BK: jax.lax.dynamic_update_slice_in_dim(jnp.zeros((B, T), bool), m_BK, start, axis=1)
    marked = in_canvas(take_BK | nxt_BK)
    if window_size == 0:
        return marked
    select_BK = start + jnp.argsort(-jnp.where(nxt_BK, order_BK, NEG_INF), axis=-1)[:, :min(max_k, K)]
    return jax.vmap(window_tokens, in_axes=(0, 0, 0, None, None))(marked, masked_BT, select_BK, next_k, window_size)
