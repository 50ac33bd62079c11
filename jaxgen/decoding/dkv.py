"""dKV-Cache (horseee/dKV-Cache) refresh rules for `masked_diffusion.generate(cache="dkv_decode" |
"dkv_greedy")`: the greedy variant's per-block decode order and the positions it recomputes."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.decoding.propose import NEG_INF
from jaxgen.decoding.rules import top_k_commit


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
