"""TiDAR decoding: verify last step's drafts autoregressively and draft the next block by
diffusion, in one forward pass per step (Liu et al. 2025, "TiDAR: Think in Diffusion, Talk in
Autoregression"; shared/specs/diffusion_lm.md §5.2).

State per row: the committed tokens [0, n) are in an exact KV cache; token n (`last`) is known
but not yet cached; drafts g_1..g_{k-1} propose positions n+1..n+k-1. One step feeds

    [last, g_1..g_{k-1} | M_0 | M_1 | ... | M_{k-1}]          (k + k*k rows, k = draft_length)

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

Decision (the spec marks the layout [2nd-hand]): one block per acceptance outcome, block size =
draft length; the prefill forward also drafts the first block. Rows of a batch progress
independently (`jax.vmap` over rows); `nfe` is the forward count of the slowest row.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import layouts
from jaxgen.cache import init_cache, truncate, write_at
from jaxgen.errors import JaxgenError
from jaxgen.model import forward, unstack_layers
from jaxgen.decoding.checks import check_prompt, with_mask_id
from jaxgen.decoding.loop import SamplerOutput
from jaxgen.decoding.processors import forbid_mask_token


def generate(params, cfg, prompt, key, *, gen_length: int = 128, draft_length: int = 8,
             temperature: float = 0.0, mask_id: int | None = None) -> SamplerOutput:
    """TiDAR decoding of `gen_length` tokens after `prompt` [B, P] (see the module docstring)."""
    cfg = with_mask_id(cfg, mask_id)
    prompt = jnp.asarray(prompt, jnp.int32)
    if gen_length <= 0:
        raise JaxgenError(f"gen_length={gen_length} must be positive")
    if not 2 <= draft_length:
        raise JaxgenError(f"draft_length={draft_length} must be >= 2 (1 is plain AR decoding)")
    if float(temperature) < 0:
        raise JaxgenError(f"temperature={temperature} must be >= 0")
    P = prompt.shape[1]
    check_prompt(prompt, cfg, P + gen_length, diffusion=True)
    return _generate(params, cfg, prompt, key, jnp.float32(temperature), gen_length=gen_length, k=draft_length,
                     greedy=float(temperature) == 0)


def step_chunk_mask(k: int) -> np.ndarray:
    """[k + k*k, k + k*k] bool: the causal rows, then block M_a seeing rows 0..a and itself."""
    L = k + k * k
    m = np.zeros((L, L), bool)
    m[:k, :k] = np.tril(np.ones((k, k), bool))
    for a in range(k):
        s = k + a * k
        m[s:s + k, : a + 1] = True
        m[s:s + k, s:s + k] = True
    return m


def step_positions(n, k: int):
    """RoPE positions of one step's rows: n..n+k-1, then n+a+1..n+a+k for each block a."""
    a = np.repeat(np.arange(k), k)
    r = np.tile(np.arange(k), k)
    return n + jnp.asarray(np.concatenate([np.arange(k), a + 1 + r]), jnp.int32)


def prefill_chunk_mask(P: int, k: int) -> np.ndarray:
    """[P + k, P + k] bool: the prompt causal, then one MASK block seeing the prompt and itself."""
    m = np.zeros((P + k, P + k), bool)
    m[:P, :P] = np.tril(np.ones((P, P), bool))
    m[P:, :] = True
    return m


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
    """(accepted count a in [0, k-1], next AR token) from the causal rows' logits."""
    k = p_logits_kV.shape[0]
    if greedy:
        ar_tok = jnp.argmax(forbid_mask_token(p_logits_kV, cfg), axis=-1).astype(jnp.int32)
        ok = ar_tok[:-1] == drafts_K
        a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
        return a, ar_tok[a]
    k_acc, k_res = jax.random.split(key)
    p = _probs(p_logits_kV, cfg, temperature)
    idx = jnp.arange(k - 1)
    p_d = p[idx, drafts_K]
    q_d = q_KV[idx, drafts_K]
    ok = jax.random.uniform(k_acc, (k - 1,)) * q_d < p_d  # u < p/q
    a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
    residual = jnp.maximum(p[jnp.minimum(a, k - 2)] - q_KV[jnp.minimum(a, k - 2)], 0.0)
    dist = jnp.where(a < k - 1, residual / jnp.maximum(residual.sum(), 1e-30), p[a])
    return a, jax.random.categorical(k_res, jnp.log(dist)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "gen_length", "k", "greedy"))
def _generate(params, cfg, prompt, key, temperature, *, gen_length, k, greedy):
    params = unstack_layers(params)
    B, P = prompt.shape
    row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(B))
    tokens, nfe = jax.vmap(lambda p, kk: _decode_row(params, cfg, p, kk, temperature, gen_length, k, greedy))(
        prompt, row_keys)
    return SamplerOutput(tokens=tokens, nfe=jnp.max(nfe))


def _decode_row(params, cfg, prompt_P, key, temperature, gen_length, k, greedy):
    P = prompt_P.shape[0]
    total = P + gen_length
    L = k + k * k
    cache = init_cache(cfg, 1, total + L, per_layer=True)
    full = layouts.full()

    # prefill: the prompt causally, plus the MASK block that drafts positions P+1..P+k-1
    chunk = jnp.concatenate([prompt_P, jnp.full((k,), cfg.mask_id, jnp.int32)])[None]
    logits, cache = forward(params, cfg, chunk, layout=full, cache=cache,
                            chunk_mask_BLL=jnp.asarray(prefill_chunk_mask(P, k))[None])
    k0, k1 = jax.random.split(jax.random.fold_in(key, 0))
    last, _ = _pick(logits[0, P - 1], cfg, k0, temperature, greedy)
    drafts, q = _pick(logits[0, P + 1:], cfg, k1, temperature, greedy)
    if q is None:
        q = jnp.zeros((k - 1, 1), jnp.float32)
    cache = truncate(cache, P)
    out = jnp.zeros((total + k,), jnp.int32).at[:P].set(prompt_P).at[P].set(last)
    step_mask = jnp.asarray(step_chunk_mask(k))[None]

    def cond(c):
        return c[0] < total

    def body(c):
        done, out, cache, last, drafts, q, nfe = c
        n = done - 1
        chunk = jnp.concatenate([last[None], drafts, jnp.full((k * k,), cfg.mask_id, jnp.int32)])[None]
        logits, cache = forward(params, cfg, chunk, positions=step_positions(n, k)[None], layout=full, cache=write_at(cache, n),
                                chunk_mask_BLL=step_mask)
        k_ver, k_draft = jax.random.split(jax.random.fold_in(key, nfe))
        a, nxt = verify(logits[0, :k], drafts, q, k_ver, cfg, temperature, greedy)
        block = jax.lax.dynamic_slice_in_dim(logits[0], k + a * k + 1, k - 1, axis=0)
        new_drafts, new_q = _pick(block, cfg, k_draft, temperature, greedy)
        if new_q is None:
            new_q = q
        idx = jnp.arange(k)
        written = jnp.where(idx < a, jnp.concatenate([drafts, drafts[-1:]]), nxt)  # g_1..g_a, then the AR token
        out = jax.lax.dynamic_update_slice_in_dim(out, written, done, axis=0)
        return done + a + 1, out, truncate(cache, n + a + 1), nxt, new_drafts, new_q, nfe + 1

    carry = (jnp.int32(P + 1), out, cache, last, drafts, q, jnp.int32(1))
    _, out, _, _, _, _, nfe = jax.lax.while_loop(cond, body, carry)
    return out[:total], nfe
