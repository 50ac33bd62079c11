"""Token proposals: filters, sampling and scores of a step's logits.

Greedy convention everywhere: token = argmax, confidence = softmax(logits)[token]. Vocabulary-
wide sorts are slow on XLA:CPU and O(V log V), so top-k / top-p cutoffs are found by bisection
over order-preserving int32 keys.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def order_keys(x):
    """int32 keys that order like the float32 values `x` (-inf and +inf included; -0.0 == +0.0),
    so that a value threshold can be searched by bisection over integers."""
    x = jnp.asarray(x, jnp.float32)
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.int32)  # -0.0 is +0.0
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def smallest_key(keys, pred):
    """Per row, the smallest integer t in [min, max] of `keys` (last axis) with pred(t) true,
    for a pred that is false below some point and true from it on, and true at the max: 32
    bisection steps of one pass over the row each, instead of a sort."""
    lo = jnp.min(keys, axis=-1, keepdims=True)
    hi = jnp.max(keys, axis=-1, keepdims=True)

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without int32 overflow
        ok = pred(mid)
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    return jax.lax.fori_loop(0, 32, halve, (lo, hi))[1]


def nucleus_keep(logits, top_p, *, inclusive: bool = False):
    """Mask of the top-p nucleus: entries whose strictly larger entries hold mass < top_p
    (<= top_p with `inclusive`, Dream's rule); the largest entry is always kept. Equal to
    keeping the sorted entries whose preceding mass is below top_p plus every tie of the
    smallest one kept, the sort-and-cumsum definition, up to float rounding of that mass."""
    keys = order_keys(logits)
    probs = jax.nn.softmax(logits, axis=-1)

    def mass_above_is_small(t):
        mass = jnp.sum(jnp.where(keys > t, probs, 0.0), axis=-1, keepdims=True)
        return mass <= top_p if inclusive else mass < top_p

    return keys >= smallest_key(keys, mass_above_is_small)


def top_two(x):
    """(largest, second largest) along the last axis, a tie counting twice: two max passes
    instead of `lax.top_k`, which sorts the whole vocabulary on XLA:CPU."""
    first = jnp.max(x, axis=-1)
    at_first = jnp.arange(x.shape[-1]) == jnp.argmax(x, axis=-1)[..., None]
    return first, jnp.max(jnp.where(at_first, -jnp.inf, x), axis=-1)


def kth_largest_key(keys, k):
    """Per row, the k-th largest of `keys` (its ties included), by bisection."""
    return smallest_key(keys, lambda t: jnp.sum(keys > t, axis=-1, keepdims=True) < k)


def filter_top_k_top_p(logits, top_k, top_p):
    """Keep the top_k logits (top_k <= 0: all; ties of the k-th kept) and, of those, the
    smallest nucleus with mass >= top_p (HF/SDAR order). top_k and top_p may be traced."""
    keys = order_keys(logits)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, logits.shape[-1]), logits.shape[-1])
    logits = jnp.where(keys < kth_largest_key(keys, k), NEG_INF, logits)
    return jnp.where((top_p < 1.0) & ~nucleus_keep(logits, top_p), NEG_INF, logits)


def prob_of(logits, tok):
    """softmax(logits)[tok] along the last axis."""
    return jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), tok[..., None], axis=-1)[..., 0]


def sample_tokens(logits, key, temperature, top_k=0, top_p=1.0):
    """(tokens, prob of each token): greedy at temperature 0, else categorical over the
    temperature-scaled, top-k/top-p filtered distribution (SDAR/HF order: T, top-k, top-p).
    A Python-number temperature picks the branch at trace time (no `lax.cond` in the loop)."""

    def greedy(_):
        tok = jnp.argmax(logits, axis=-1)
        return tok, prob_of(logits, tok)

    def sample(_):
        scaled = filter_top_k_top_p(logits / temperature, top_k, top_p)
        tok = jax.random.categorical(key, scaled, axis=-1)
        return tok, prob_of(scaled, tok)

    if isinstance(temperature, (int, float)):
        return sample(None) if temperature > 0 else greedy(None)
    return jax.lax.cond(temperature > 0, sample, greedy, None)


def gumbel_argmax(logits, key, temperature):
    """argmax(logits + T * Gumbel): LLaDA's exp(l) / (-log u)^T in log space (T = 0: argmax)."""
    u = jax.random.uniform(key, logits.shape, jnp.float32, minval=1e-20, maxval=1.0)
    gumbel = -jnp.log(-jnp.log(u))
    return jnp.argmax(jnp.where(temperature > 0, logits + temperature * gumbel, logits), axis=-1)


def margin(probs):
    """Top-1 minus top-2 probability (Dream/LaViDa/NBDiff `topk_margin` score)."""
    first, second = top_two(probs)
    return first - second


def neg_entropy(probs, eps: float = 1e-10):
    """sum p log(p + eps): higher is more certain (Dream/LaViDa/NBDiff `entropy` score)."""
    return jnp.sum(probs * jnp.log(probs + eps), axis=-1)
