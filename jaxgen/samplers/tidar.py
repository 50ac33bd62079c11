"""TiDAR decoding: verify last step's drafts autoregressively and draft the next block by
diffusion, in one forward pass per step (Liu et al. 2025, "TiDAR: Think in Diffusion, Talk in
Autoregression"; shared/specs/diffusion_lm.md §5.2).

State per row: the committed tokens [0, n) are in an exact KV cache; token n (`last`) is known
but not yet cached; drafts g_1..g_{k-1} propose positions n+1..n+k-1. One step feeds

    [last, g_1..g_{k-1} | M_0 | M_1 | ... | M_{k-1}]          (k + k*k rows, k = draft_length)

under `layouts.verify_draft(k)` (coordinates: the chunk's cache slots n.., split n):
- the first k rows causally over the cache: their AR logits give p_j, the next-token
  distribution after row j;
- M_a = k MASKs at positions n+a+1..n+a+k, attending to the cache, rows 0..a and bidirectionally
  to themselves: the diffusion drafts for every acceptance outcome a, computed before a is known.

Greedy verification accepts the longest prefix g_1..g_a with g_j = argmax p_{j-1}, then appends
argmax p_a (always one AR token). Sampling (temperature > 0) uses speculative rejection: accept
g_j with probability min(1, p(g_j) / q(g_j)), on the first rejection draw from max(p - q, 0),
so outputs are distributed exactly as AR sampling. Rows 0..a were fed causally, so their K/V
are the exact AR K/V: the cache advances by a + 1 and the rest of the chunk is discarded. The
next drafts are M_a's rows 1..k-1 (row 0's position is the AR token's). Greedy TiDAR therefore
returns exactly greedy AR decoding of the same model, with up to k tokens per forward.

On the decode skeleton: forward = the step chunk, propose = the drafts of every outcome, rule =
verification (a, next token), update = write, keep block a's drafts, truncate the cache. The
prefill forward (`layouts.prefix(P, causal_prefix=True)`: the prompt causal, one MASK block
seeing it) also drafts the first block.

Decision (the spec marks the layout [2nd-hand]): one block per acceptance outcome, block size =
draft length. Rows share one batch with per-row cache lengths: each row verifies at its own n
and accepts its own a; finished rows idle. `nfe` counts batched forwards, the slowest row's.
"""
from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import layouts
from jaxgen.cache import init_cache, place_rows, truncate, write_at
from jaxgen.decoding import checks, loop
from jaxgen.decoding import verify as verify_lib
from jaxgen.decoding.checks import check_prompt, with_mask_id
from jaxgen.decoding.loop import SamplerOutput
from jaxgen.decoding.processors import forbid_mask_token
from jaxgen.errors import JaxgenError
from jaxgen.model import forward, is_decode_form


def generate(params, cfg, prompt, key, *, gen_length: int = 128, draft_length: int = 8,
             temperature: float = 0.0, mask_id: int | None = None) -> SamplerOutput:
    """TiDAR decoding of `gen_length` tokens after `prompt` [B, P] (see the module docstring)."""
    cfg = with_mask_id(cfg, mask_id)
    prompt = checks.as_prompt(prompt)
    if gen_length <= 0:
        raise JaxgenError(f"gen_length={gen_length} must be positive")
    if not 2 <= draft_length:
        raise JaxgenError(f"draft_length={draft_length} must be >= 2 (1 is plain AR decoding)")
    checks.check_temperature(temperature)
    P = prompt.shape[1]
    check_prompt(prompt, cfg, P + gen_length, diffusion=True)
    return _generate(params, cfg, prompt, key, jnp.float32(temperature), gen_length=gen_length, k=draft_length,
                     greedy=float(temperature) == 0)


def step_positions(n, k: int):
    """RoPE positions of one step's rows (n scalar or [B]): n..n+k-1, then n+a+1..n+a+k per block a."""
    a = np.repeat(np.arange(k), k)
    r = np.tile(np.arange(k), k)
    return jnp.asarray(n, jnp.int32)[..., None] + jnp.asarray(np.concatenate([np.arange(k), a + 1 + r]), jnp.int32)


def _probs(logits, cfg, temperature):
    return jax.nn.softmax(forbid_mask_token(logits, cfg) / temperature, axis=-1)


def _pick(logits_LV, cfg, key, temperature, greedy):
    """(tokens, their distribution) for draft or AR rows."""
    logits = forbid_mask_token(logits_LV, cfg)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    probs = _probs(logits_LV, cfg, temperature)
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32), probs


def verify(p_logits_kV, drafts_K, q_KV, key, cfg, temperature, greedy):
    """(accepted count a in [0, k-1], next AR token) from the causal rows' logits (one row): the
    shared chain rules of `jaxgen.decoding.verify` on TiDAR's distributions."""
    if greedy:
        return verify_lib.chain_greedy(jnp.argmax(forbid_mask_token(p_logits_kV, cfg), axis=-1).astype(jnp.int32),
                                       drafts_K)
    return verify_lib.chain_sample(_probs(p_logits_kV, cfg, temperature), drafts_K, q_KV, key)


@flax.struct.dataclass
class Drafts:
    """Per-row TiDAR state: tokens [0, end) are known, [0, end - 1) cached; `last` = token end - 1."""
    end: jax.Array  # int32 [B]
    last: jax.Array  # int32 [B]
    drafts: jax.Array  # int32 [B, k - 1]: proposals for positions end..end+k-2
    q: jax.Array  # [B, k - 1, V] their draft distributions ([B, k - 1, 1] when greedy: unused)


@functools.partial(jax.jit, static_argnames=("cfg", "gen_length", "k", "greedy"))
def _generate(params, cfg, prompt, key, temperature, *, gen_length, k, greedy):
    B, P = prompt.shape
    total, L = P + gen_length, k + k * k
    row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(B))
    pick = jax.vmap(lambda logits, kk: _pick(logits, cfg, kk, temperature, greedy))  # over rows
    step_layout = layouts.verify_draft(k)

    def step_forward(state):
        c = state.carry
        n = jnp.minimum(c.end - 1, total - 1)  # finished rows idle at a slot inside the cache
        chunk = jnp.concatenate([c.last[:, None], c.drafts, jnp.full((B, k * k), cfg.mask_id, jnp.int32)], axis=1)
        logits, cache = forward(params, cfg, chunk, positions=step_positions(n, k), layout=step_layout,
                                cache=write_at(state.cache, n), layout_idx_BL=n[:, None] + jnp.arange(L),
                                split_B=n)
        return logits, cache, 1

    def propose(logits, state):
        """The AR rows' logits, and the drafts (with distributions) of every outcome a."""
        blocks = logits[:, k:].reshape(B, k, k, -1)[:, :, 1:]  # [B, a, k - 1, V]
        if greedy:  # no keys
            return logits[:, :k], jnp.argmax(forbid_mask_token(blocks, cfg), axis=-1).astype(jnp.int32), None, None
        keys = jax.vmap(lambda kk: jax.random.split(jax.random.fold_in(kk, state.nfe)))(row_keys)
        drafts, q = jax.vmap(lambda blk, kk: jax.vmap(lambda b: _pick(b, cfg, kk, temperature, greedy))(blk))(
            blocks, keys[:, 1])
        return logits[:, :k], drafts, q, keys[:, 0]

    def rule(proposal, state):
        p_logits, _, _, k_ver = proposal
        c = state.carry
        return jax.vmap(lambda p, d, q, kk: verify(p, d, q, kk, cfg, temperature, greedy),
                        in_axes=(0, 0, 0, None if greedy else 0))(p_logits, c.drafts, c.q, k_ver)

    def update(state, proposal, commit, cache):
        _, drafts_all, q_all, _ = proposal
        (a, nxt), c, live = commit, state.carry, ~state.done
        written = jnp.where(jnp.arange(k) < a[:, None], jnp.concatenate([c.drafts, c.drafts[:, -1:]], 1),
                            nxt[:, None])  # g_1..g_a, then the AR token
        tokens = jnp.where(live[:, None], place_rows(state.tokens, written, c.end), state.tokens)
        new = Drafts(c.end + a + 1, nxt, loop.take_at(drafts_all, a), c.q if greedy else loop.take_at(q_all, a))
        carry = jax.tree.map(lambda n_, o: jnp.where(live.reshape((B,) + (1,) * (n_.ndim - 1)), n_, o), new, c)
        cache = truncate(cache, carry.end - 1)  # rows 0..a of the chunk keep their exact AR K/V
        return state.replace(tokens=tokens, cache=cache, carry=carry, done=carry.end >= total)

    recipe = loop.Recipe(forward=step_forward, propose=propose, rule=rule, update=update)
    state = _prefill(params, cfg, prompt, row_keys, pick, total + L, gen_length, k, greedy)
    state = loop.run(recipe, state, gen_length)
    return SamplerOutput(tokens=state.tokens[:, :total], nfe=state.nfe)


def _prefill(params, cfg, prompt, row_keys, pick, cache_len, gen_length, k, greedy):
    """The prompt causally plus one MASK block drafting positions P+1..P+k-1; the first token."""
    B, P = prompt.shape
    cache = init_cache(cfg, B, cache_len, per_layer=is_decode_form(params))
    chunk = jnp.concatenate([prompt, jnp.full((B, k), cfg.mask_id, jnp.int32)], axis=1)
    logits, cache = forward(params, cfg, chunk, layout=layouts.prefix(P, causal_prefix=True), cache=cache)
    keys = jax.vmap(lambda kk: jax.random.split(jax.random.fold_in(kk, 0)))(row_keys)
    last, _ = pick(logits[:, P - 1], keys[:, 0])
    drafts, q = pick(logits[:, P + 1:], keys[:, 1])
    q = jnp.zeros((B, k - 1, 1), jnp.float32) if greedy else q
    tokens = jnp.zeros((B, P + gen_length + k), jnp.int32).at[:, :P].set(prompt).at[:, P].set(last)
    carry = Drafts(jnp.full((B,), P + 1, jnp.int32), last, drafts, q)
    return loop.new_state(tokens, truncate(cache, P), nfe=1, carry=carry, done=carry.end >= P + gen_length)
