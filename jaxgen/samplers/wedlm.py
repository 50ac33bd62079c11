"""WeDLM streaming decoding: diffusion-style parallel filling under a plain causal layout, with
an exact AR KV cache (tencent/WeDLM engine `wedlm_decoder.py` + `sampler.py`, read from the
fork naoro/WeDLM; shared/specs/diffusion_lm.md §5.1).

Topological reordering: the window is fed in *physical* order [decoded tokens | MASKs] (each
group in logical order) while RoPE keeps the *logical* positions, and attention is causal over
the physical order after the cache: `layouts.causal()` over the window's cache slots (its
layout coordinates), the logical positions going to RoPE only. Every MASK so sees all decoded
tokens, and the leading decoded tokens see only the cache and each other, so their K/V are
exactly the AR K/V.

Per row, `c` tokens are committed (cached). Each step:
1. `lead` = the number of leading decoded tokens of the window [c, c + window_size); the fed
   window is [c, c + window_size + lead) (MASKs refilled at its end);
2. one forward over the reordered window, writing K/V at slots c.. in physical order;
3. prune: the `lead` leading tokens are committed (their K/V in slots c..c+lead are exact);
4. fill: over the remaining MASKs, adjusted entropy H(p) + (i - i_first_mask) * pos_penalty;
   every MASK with adjusted entropy < entropy_threshold, else the single argmin, takes its
   sampled token (top-k -> top-p -> temperature, WeDLM's order; greedy at temperature 0).
MASK rows predict their own positions (no shift). The prompt is prefilled causally; the window
starts as `window_size` MASKs after it.

Decisions: entropy and tokens come from the mask-forbidden distribution (the mask token is never
a candidate). The loop stops once [P, P + gen_length) holds no MASK: the reference runs one more
forward whose only effect is to prune (commit) those last tokens, so our NFE is the
reference's minus one. On the decode skeleton: forward = the reordered window, propose =
tokens and entropies, rule = the fill, update = write, commit the lead, truncate the cache. Rows
share one batch with per-row cache lengths and window starts; finished rows idle; `nfe` counts
batched forwards, the slowest row's.
`experiments/reference_parity.py --wedlm` drives the engine's own decoder and sampler with
WeDLM's `hf_compat` model on CPU against this sampler: identical tokens, NFE as stated.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxgen import layouts
from jaxgen.cache import init_cache, place_rows, truncate, write_at
from jaxgen.errors import JaxgenError
from jaxgen.model import forward, is_decode_form
from jaxgen.decoding import checks, loop
from jaxgen.decoding.checks import check_prompt, with_mask_id
from jaxgen.decoding.loop import SamplerOutput
from jaxgen.decoding.processors import forbid_mask_token
from jaxgen.decoding.propose import filter_top_k_top_p


def generate(params, cfg, prompt, key, *, gen_length: int = 128, window_size: int = 16,
             entropy_threshold: float | None = 0.4, pos_penalty: float = 0.02, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, mask_id: int | None = None) -> SamplerOutput:
    """WeDLM streaming sliding-window decoding (see the module docstring); defaults follow the
    WeDLM engine (`wedlm_window_size=16`, entropy threshold 0.4, penalty 0.02). entropy_threshold
    None fills one position per step (the argmin). top_k / top_p filter sampling (temperature > 0)
    only."""
    cfg = with_mask_id(cfg, mask_id)
    prompt = checks.as_prompt(prompt)
    if gen_length <= 0 or window_size <= 0:
        raise JaxgenError(f"gen_length={gen_length} and window_size={window_size} must be positive")
    if entropy_threshold is not None and checks.concrete(entropy_threshold) and not float(entropy_threshold) > 0:
        raise JaxgenError(f"entropy_threshold={entropy_threshold} must be > 0 (or None: one token per step)")
    checks.check_nonnegative(pos_penalty=pos_penalty)
    checks.check_temperature(temperature)
    checks.check_top_k(top_k)
    checks.check_top_p(top_p)
    checks.check_filters_need_sampling(temperature, top_k, top_p)
    check_prompt(prompt, cfg, prompt.shape[1] + gen_length, diffusion=True)
    thr = -jnp.inf if entropy_threshold is None else jnp.float32(entropy_threshold)
    return _generate(params, cfg, prompt, key, thr, jnp.float32(pos_penalty), jnp.float32(temperature),
                     jnp.int32(top_k), jnp.float32(top_p), gen_length=gen_length, window=window_size,
                     greedy=float(temperature) == 0)


def physical_order(tokens_W, valid_W, mask_id):
    """Permutation (per row, last axis) putting decoded tokens first, then MASKs, then padding,
    each in logical order."""
    group = jnp.where(~valid_W, 2, jnp.where(tokens_W == mask_id, 1, 0))
    return jnp.argsort(group, axis=-1, stable=True)


def select_fill(entropy_W, is_mask_W, threshold, pos_penalty):
    """WeDLM's position rule over the window's MASKs (see the module docstring)."""
    idx = jnp.arange(entropy_W.shape[0])
    first = jnp.argmax(is_mask_W)
    adjusted = jnp.where(is_mask_W, entropy_W + (idx - first) * pos_penalty, jnp.inf)
    below = is_mask_W & (adjusted < threshold)
    best = jax.nn.one_hot(jnp.argmin(adjusted), entropy_W.shape[0], dtype=bool) & is_mask_W
    return jnp.where(jnp.any(below), below, best)


@functools.partial(jax.jit, static_argnames=("cfg", "gen_length", "window", "greedy"))
def _generate(params, cfg, prompt, key, threshold, pos_penalty, temperature, top_k, top_p, *, gen_length, window,
              greedy):
    B, P = prompt.shape
    total, W, F = P + gen_length, window, 2 * window  # F: window_size + at most window_size leading decoded
    row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(B))

    def view(state):
        """Each row's window: (start c [B], lead [B], fed [B, F] logical order, valid [B, F])."""
        c = state.carry
        fed = jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, F))(state.tokens, c)
        lead = jnp.sum(jnp.cumprod((fed[:, :W] != cfg.mask_id).astype(jnp.int32), axis=1), axis=1)
        return c, lead, fed, jnp.arange(F) < (W + lead)[:, None]

    def step_forward(state):  # the window in physical order, causal over its slots, logical RoPE
        c, _, fed, valid = view(state)
        perm = physical_order(fed, valid, cfg.mask_id)
        take = lambda a: jnp.take_along_axis(a, perm, axis=1)
        logits, cache = forward(params, cfg, take(fed), positions=c[:, None] + perm, layout=layouts.causal(),
                                cache=write_at(state.cache, c), kv_valid_BL=take(valid),
                                layout_idx_BL=c[:, None] + jnp.arange(F))
        return jnp.take_along_axis(logits, jnp.argsort(perm, axis=1)[..., None], axis=1), cache, 1  # logical order

    def propose(logits_W, state):
        logits_W = forbid_mask_token(logits_W, cfg)
        logp = jax.nn.log_softmax(logits_W, axis=-1)
        entropy = -jnp.sum(jnp.where(jnp.isfinite(logp), jnp.exp(logp) * logp, 0.0), axis=-1)
        if greedy:
            return jnp.argmax(logits_W, axis=-1).astype(jnp.int32), entropy
        filtered = filter_top_k_top_p(logits_W, top_k, top_p) / temperature
        draw = lambda kk, f: jax.random.categorical(jax.random.fold_in(kk, state.nfe), f, axis=-1)
        return jax.vmap(draw)(row_keys, filtered).astype(jnp.int32), entropy

    def rule(proposal, state):
        _, _, fed, valid = view(state)
        fill = jax.vmap(select_fill, in_axes=(0, 0, None, None))(proposal[1], (fed == cfg.mask_id) & valid,
                                                                  threshold, pos_penalty)
        return fill & ~state.done[:, None]

    def update(state, proposal, fill, cache):
        c, lead, fed, _ = view(state)
        tokens = place_rows(state.tokens, jnp.where(fill, proposal[0], fed), c)
        c = jnp.where(state.done, c, c + lead)  # the leading decoded tokens are committed with exact K/V
        done = ~jnp.any(tokens[:, P:total] == cfg.mask_id, axis=1)
        return state.replace(tokens=tokens, cache=truncate(cache, c), carry=c, done=done)

    cache = init_cache(cfg, B, total + F, per_layer=is_decode_form(params))
    _, cache = forward(params, cfg, prompt, layout=layouts.causal(), cache=cache)
    canvas = jnp.full((B, total + F), cfg.mask_id, jnp.int32).at[:, :P].set(prompt)
    state = loop.new_state(canvas, cache, nfe=1, carry=jnp.full((B,), P, jnp.int32))
    recipe = loop.Recipe(forward=step_forward, propose=propose, rule=rule, update=update)
    state = loop.run(recipe, state, gen_length + F)  # every step fills a MASK of [P, total + F): never binding
    return SamplerOutput(tokens=state.tokens[:, :total], nfe=state.nfe)
