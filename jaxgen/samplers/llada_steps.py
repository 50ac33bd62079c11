"""One denoising step of LLaDA-style decoding for each cache mode (`masked_diffusion.generate`
assembles these into the decode loop): the full refresh forward of a block's step 0, the
reduced forwards of later steps (prefix, dual, dKV, over the static windows of
`window_groups`), proposals, the commit rule and the block transitions. The semantics of each
mode are in `jaxgen.samplers.masked_diffusion`'s docstring.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxgen import cache as cache_lib
from jaxgen import layouts
from jaxgen.cache import read, write_at
from jaxgen.decoding import dkv, rules
from jaxgen.decoding.processors import classifier_free_guidance, forbid_mask_token, forbid_token
from jaxgen.decoding.propose import gumbel_argmax, prob_of
from jaxgen.decoding.schedules import num_transfer_tokens
from jaxgen.model import forward, is_decode_form
from jaxgen.samplers import learn2pd


def guided_logits(params, cfg, x_BL, prompt_len, cfg_scale, out_rows=None, valid_BL=None):
    """Full-layout logits (of `out_rows` only, see `model.forward`); with a guidance scale,
    classifier-free guidance against prompt -> MASK (`prompt_len` a scalar or one per row).
    cfg_scale=None skips guidance at trace time. valid_BL: the canvas columns that are keys."""
    if cfg_scale is None:
        return forward(params, cfg, x_BL, layout=layouts.full(), out_rows=out_rows, kv_valid_BL=valid_BL)[0]
    in_prompt = jnp.arange(x_BL.shape[1])[None, :] < jnp.reshape(jnp.asarray(prompt_len), (-1, 1))
    uncond = jnp.where(in_prompt, cfg.mask_id, x_BL)
    twice = lambda a: None if a is None else jnp.concatenate([a, a])
    rows = None if out_rows is None else (twice(jnp.broadcast_to(out_rows[0], x_BL.shape[:1])), out_rows[1])
    both, _ = forward(params, cfg, jnp.concatenate([x_BL, uncond]), layout=layouts.full(), out_rows=rows,
                      kv_valid_BL=twice(valid_BL))
    return classifier_free_guidance(*jnp.split(both, 2), cfg_scale)


def commit(rule, conf_BK, masked_BK, level, k, commit_filter):
    """The step's commit mask under the chosen rule (see the module docstring)."""
    if rule == "threshold":
        return rules.best_plus_above(conf_BK, masked_BK, level)
    if rule == "factor":
        return rules.factor(conf_BK, masked_BK, level)
    if rule == "commit_filter":
        return learn2pd.filter_commit(commit_filter, conf_BK, masked_BK, level)
    return rules.scheduled(conf_BK, masked_BK, k)


STATIC_WINDOW = ("prefix", "dkv_decode", "dkv_greedy")  # blocks unrolled: each feeds [start, end of canvas)


class Ctx(NamedTuple):
    """Everything one call's step rules read: arrays (traced) and settings (static)."""
    params: dict
    cfg: object
    key: jax.Array
    temperature: jax.Array
    cfg_scale: jax.Array | None
    level: jax.Array
    commit_filter: dict | None
    lengths_B: jax.Array
    total: int
    block_length: int
    per_block: int
    remasking: str
    rule: str
    cache: str | None
    eos_logit_inf: bool
    confidence_eos_inf: bool
    reload_every: int
    window_size: int
    eotp: bool


def _start_of(ctx, state):
    """[B]: each row's current block start."""
    return ctx.lengths_B + state.carry["block"] * ctx.block_length


def _block_of(ctx, x, start_B):
    return jax.vmap(lambda r, s: jax.lax.dynamic_slice_in_dim(r, s, ctx.block_length))(x, start_B)


def _valid(ctx, gen_length):
    """[B, total]: canvas columns that are keys (ragged rows: padding after each row is not)."""
    return jnp.arange(ctx.total)[None, :] < (ctx.lengths_B + gen_length)[:, None]


def _refresh(ctx, gen_length, state):
    """Step 0 of a block: a full forward (writing every K/V in cached modes); block logits."""
    rows, valid = (_start_of(ctx, state), ctx.block_length), _valid(ctx, gen_length)
    if ctx.cache is None:
        return guided_logits(ctx.params, ctx.cfg, state.tokens, ctx.lengths_B, ctx.cfg_scale, rows, valid), state.cache
    B = state.tokens.shape[0]
    fresh = cache_lib.init_cache(ctx.cfg, B, ctx.total, per_layer=is_decode_form(ctx.params))
    logits, kv = forward(ctx.params, ctx.cfg, state.tokens, layout=layouts.full(), cache=fresh, out_rows=rows,
                         kv_valid_BL=valid)
    kv = cache_lib.with_lengths(kv, ctx.lengths_B + gen_length)
    return logits, cache_lib.truncate(kv, _start_of(ctx, state)) if ctx.cache == "prefix" else kv


def _later_step(ctx, gen_length, state, lo):
    """(block logits, cache) of a step after step 0; `lo` is the static window's first column in
    the static-window modes (columns before the block start are dead, see the module docstring)."""
    x, kv, bl, full = state.tokens, state.cache, ctx.block_length, layouts.full()
    if ctx.cache is None:
        return _refresh(ctx, gen_length, state)
    if ctx.cache in STATIC_WINDOW:
        start = _start_of(ctx, state)[0]  # one prompt length in these modes
        live_BW = jnp.broadcast_to(jnp.arange(lo, ctx.total) >= start, (x.shape[0], ctx.total - lo))
    if ctx.cache == "prefix":
        positions = jnp.broadcast_to(jnp.arange(lo, ctx.total), live_BW.shape)
        return forward(ctx.params, ctx.cfg, x[:, lo:], positions, full, read(kv), out_rows=(start - lo, bl),
                       kv_valid_BL=live_BW)[0], kv
    if ctx.cache == "dual":
        start_B = _start_of(ctx, state)
        return forward(ctx.params, ctx.cfg, _block_of(ctx, x, start_B), start_B[:, None] + jnp.arange(bl), full,
                       write_at(kv, start_B))

    def reload(_):  # every K/V fresh and stored
        return forward(ctx.params, ctx.cfg, x, layout=full, cache=write_at(kv, 0), out_rows=(start, bl))

    def delayed(_):  # tokens unmasked before the previous step attend with their stored K/V
        kept = state.carry["kept"][:, lo:] | ~live_BW
        return forward(ctx.params, ctx.cfg, x[:, lo:], layout=full, cache=write_at(kv, lo, kept),
                       out_rows=(start - lo, bl))

    step = state.carry["step"]
    is_reload = (step % ctx.reload_every == 0) | ((step == 1) & (ctx.cache == "dkv_decode"))
    return jax.lax.cond(is_reload, reload, delayed, None)


def _kept_after(ctx, state, x_after, take_BK):
    """Positions whose stored K/V the next step keeps (dKV modes)."""
    x_before, step, mask_id = state.tokens, state.carry["step"], ctx.cfg.mask_id
    start = _start_of(ctx, state)[0]
    if ctx.cache != "dkv_greedy":
        return x_before != mask_id
    counts = num_transfer_tokens(ctx.block_length, ctx.per_block)
    next_k = jnp.asarray(counts)[jnp.minimum(step + 1, ctx.per_block - 1)] * (step + 1 < ctx.per_block)
    still_masked = _block_of(ctx, x_after, _start_of(ctx, state)) == mask_id
    recompute = dkv.greedy_recompute(x_before == mask_id, take_BK, still_masked, state.carry["order"], next_k, start,
                                     int(counts.max()), ctx.window_size)
    return ~recompute


def step_rules(ctx, gen_length, lo=None):
    """forward / propose / rule / update of one denoising step; `lo`: the static window's first
    column (static-window modes)."""
    cfg = ctx.cfg
    schedule = jnp.asarray(num_transfer_tokens(ctx.block_length, ctx.per_block))

    def step_forward(state):
        if ctx.cache is None:
            logits, kv = _refresh(ctx, gen_length, state)
        else:
            logits, kv = jax.lax.cond(state.carry["step"] == 0, lambda s: _refresh(ctx, gen_length, s),
                                      lambda s: _later_step(ctx, gen_length, s, lo), state)
        return logits, kv, 1

    def propose(logits, state):
        logits = forbid_token(forbid_mask_token(logits, cfg), cfg.eos_id if ctx.eos_logit_inf else None)
        k_tok, k_conf = jax.random.split(jax.random.fold_in(ctx.key, state.nfe))
        x0 = gumbel_argmax(logits, k_tok, ctx.temperature).astype(jnp.int32)
        if ctx.cache == "dkv_greedy":  # one random order per block
            return x0, state.carry["order"]
        if ctx.remasking == "random":
            return x0, jax.random.uniform(k_conf, x0.shape)
        return x0, prob_of(forbid_token(logits, cfg.eos_id if ctx.confidence_eos_inf else None), x0)

    def rule(proposal, state):
        masked = _block_of(ctx, state.tokens, _start_of(ctx, state)) == cfg.mask_id
        k = schedule[jnp.minimum(state.carry["step"], ctx.per_block - 1)]
        return commit(ctx.rule, proposal[1], masked, ctx.level, k, ctx.commit_filter)

    def update(state, proposal, take, kv):
        start_B = _start_of(ctx, state)
        x_new = cache_lib.place_rows(state.tokens, jnp.where(take, proposal[0], _block_of(ctx, state.tokens, start_B)),
                                     start_B)
        if ctx.eotp:
            x_new = learn2pd.end_of_text_fill(x_new, ctx.lengths_B, cfg.eos_id, cfg.mask_id)
        carry = dict(state.carry, step=state.carry["step"] + 1)
        if ctx.cache in ("dkv_decode", "dkv_greedy"):
            carry["kept"] = _kept_after(ctx, state, x_new, take)
        return state.replace(tokens=x_new, cache=kv, carry=carry)

    return dict(forward=step_forward, propose=propose, rule=rule, update=update)


def block_carry(ctx, b, batch):
    """The recipe's fields at the start of block `b` (possibly traced)."""
    carry = dict(block=jnp.asarray(b, jnp.int32), step=jnp.int32(0))
    if ctx.cache in ("dkv_decode", "dkv_greedy"):
        carry["kept"] = jnp.zeros((batch, ctx.total), bool)
    if ctx.cache == "dkv_greedy":
        carry["order"] = dkv.greedy_order_scores(ctx.key, b, batch, ctx.block_length)
    return carry


def block_unclean(ctx, state):
    return jnp.any(_block_of(ctx, state.tokens, _start_of(ctx, state)) == ctx.cfg.mask_id)


def next_block(ctx, num_blocks, state):
    """After a block's last step: the next block with a MASK (EoTP leaves later blocks clean)."""
    b = state.carry["block"] + 1
    if ctx.eotp:
        has_mask = jnp.stack([jnp.any(_block_of(ctx, state.tokens, ctx.lengths_B + c * ctx.block_length)
                                      == ctx.cfg.mask_id) for c in range(num_blocks)])
        later = (jnp.arange(num_blocks) >= b) & has_mask
        b = jnp.where(jnp.any(later), jnp.argmax(later), num_blocks)
    return state.replace(carry=block_carry(ctx, b, state.tokens.shape[0]))


WINDOW_GROUPS = 4  # static windows of the prefix / dKV modes (compiled step programs per call)


def window_groups(prompt_len: int, gen_length: int, block_length: int) -> list[tuple[int, int]]:
    """[(lo, end_block)]: blocks [previous end_block, end_block) feed the static window
    [lo, end of canvas). At most WINDOW_GROUPS windows, each a whole number of blocks no shorter
    than any of its blocks' [block start, end of canvas)."""
    num_blocks = gen_length // block_length
    groups = min(WINDOW_GROUPS, num_blocks)
    # window j (largest first) spans ceil(num_blocks * (groups - j) / groups) blocks
    spans = [-(-num_blocks * (groups - j) // groups) for j in range(groups)]
    ends = spans[1:] + [0]
    return [(prompt_len + (num_blocks - span) * block_length, num_blocks - end) for span, end in zip(spans, ends)]
