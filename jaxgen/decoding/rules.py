"""Commit rules: which candidate positions of a step become tokens.

Every rule takes scores [B, L] and the candidate mask [B, L] (positions still masked) and
returns a boolean commit mask [B, L] that never includes a non-candidate.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.decoding.propose import NEG_INF


def rank_within_rows(score_BL):
    """Rank of each entry in its row by descending score; ties go to the lower index."""
    order = jnp.argsort(-score_BL, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True)


def top_k_commit(conf_BL, k_B):
    """Commit the k highest-confidence candidates per row (candidates have conf > -inf)."""
    k_B = jnp.asarray(k_B)
    k_B = jnp.broadcast_to(k_B, conf_BL.shape[:1]) if k_B.ndim == 0 else k_B
    return (rank_within_rows(conf_BL) < k_B[:, None]) & (conf_BL > NEG_INF)


def scheduled(conf_BL, cand_BL, k_B):
    """LLaDA / SDAR static: the k most confident candidates."""
    return top_k_commit(jnp.where(cand_BL, conf_BL, NEG_INF), k_B)


def best(conf_BL, cand_BL):
    """The single most confident candidate of each row (rows without candidates: none)."""
    conf = jnp.where(cand_BL, conf_BL, NEG_INF)
    return cand_BL & jax.nn.one_hot(jnp.argmax(conf, axis=-1), conf.shape[-1], dtype=bool)


def best_plus_above(conf_BL, cand_BL, threshold, *, inclusive: bool = True):
    """Fast-dLLM / NBDiff threshold rule: the most confident candidate, plus every candidate with
    confidence >= threshold (> threshold with inclusive=False)."""
    above = conf_BL >= threshold if inclusive else conf_BL > threshold
    return best(conf_BL, cand_BL) | (cand_BL & above)


def factor(conf_BL, cand_BL, factor_value):
    """Fast-dLLM factor rule: commit the n most confident, n = the first rank (from 1) whose
    sorted confidence falls below 1 - factor / (rank + 1); rank 0 always passes, and when the
    first failure is the last candidate the reference commits all of them."""
    conf = jnp.where(cand_BL, conf_BL, NEG_INF)
    m_B = jnp.sum(cand_BL, axis=-1)
    sorted_desc = -jnp.sort(-conf, axis=-1)
    rank = jnp.arange(conf.shape[-1])
    floor = jnp.where(rank == 0, -1.0, 1.0 - factor_value / (rank + 2.0))
    fails = (sorted_desc < floor) & (rank < m_B[:, None])
    first_fail = jnp.min(jnp.where(fails, rank, conf.shape[-1]), axis=-1)
    n_B = jnp.where(first_fail >= m_B - 1, m_B, first_fail)
    return top_k_commit(conf, n_B)


def dynamic(conf_BL, cand_BL, k_B, threshold):
    """SDAR dynamic: every candidate with confidence > threshold if there are at least k of them,
    else the top k."""
    conf = jnp.where(cand_BL, conf_BL, NEG_INF)
    above = conf > threshold
    enough = jnp.sum(above, axis=-1, keepdims=True) >= jnp.reshape(jnp.asarray(k_B), (-1, 1))
    return jnp.where(enough, above, top_k_commit(conf, k_B))


def sequential(cand_BL, k_B):
    """The k leftmost candidates."""
    return scheduled(-jnp.arange(cand_BL.shape[1], dtype=jnp.float32)[None, :], cand_BL, k_B)


def first_hitting(cand_BL, key):
    """BD3-LM first hitting: exactly one uniformly chosen candidate per row."""
    return scheduled(jax.random.uniform(key, cand_BL.shape), cand_BL, 1)


def ddpm(cand_BL, key, step, steps):
    """BD3-LM without first hitting: with t = 1 - step/steps and s = t - 1/steps, each candidate is
    committed independently w.p. (t - s)/t; the last step commits all that remain."""
    return cand_BL & (jax.random.uniform(key, cand_BL.shape) * (steps - step) < 1.0)
