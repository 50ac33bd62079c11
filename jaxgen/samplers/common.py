"""Pieces every decode loop shares: outputs, token proposal, commit helpers, input checks.

Greedy convention everywhere: token = argmax, confidence = softmax(logits)[token]. The mask
token is never a candidate (its logit is -inf), so no loop can wait forever on it.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import JaxgenError
from jaxgen.model import check_tokens

NEG_INF = -jnp.inf


@flax.struct.dataclass
class SamplerOutput:
    tokens: jax.Array  # [B, P + N]
    nfe: jax.Array  # int32 scalar: model forward passes


def forbid_mask_token(logits_BLV, cfg):
    """Set the mask token's logit to -inf so it is never proposed."""
    if cfg.mask_id is None:
        return logits_BLV
    return logits_BLV.at[..., cfg.mask_id].set(NEG_INF)


def order_keys(x):
    """int32 keys that order like the float32 values `x` (-inf and +inf included; -0.0 == +0.0),
    so that a value threshold can be searched by bisection over integers."""
    x = jnp.asarray(x, jnp.float32)
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.int32)  # -0.0 is +0.0
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def smallest_key(keys, pred):
    """Per row, the smallest integer t in [min, max] of `keys` (last axis) with pred(t) true,
    for a pred that is false below some point and true from it on, and true at the max: 32
    bisection steps of one pass over the row each, instead of a sort (slow on XLA:CPU, and
    O(V log V) for a vocabulary V)."""
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


def sample_tokens(logits, key, temperature, top_k=0, top_p=1.0):
    """(tokens, prob of each token): greedy at temperature 0, else categorical over the
    temperature-scaled, top-k/top-p filtered distribution (SDAR/HF order: T, top-k, top-p).
    A Python-number temperature picks the branch at trace time (no `lax.cond` in the loop)."""

    def greedy(_):
        tok = jnp.argmax(logits, axis=-1)
        prob = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), tok[..., None], axis=-1)[..., 0]
        return tok, prob

    def sample(_):
        scaled = filter_top_k_top_p(logits / temperature, top_k, top_p)
        tok = jax.random.categorical(key, scaled, axis=-1)
        prob = jnp.take_along_axis(jax.nn.softmax(scaled, axis=-1), tok[..., None], axis=-1)[..., 0]
        return tok, prob

    if isinstance(temperature, (int, float)):
        return sample(None) if temperature > 0 else greedy(None)
    return jax.lax.cond(temperature > 0, sample, greedy, None)


def rank_within_rows(score_BL):
    """Rank of each entry in its row by descending score; ties go to the lower index."""
    order = jnp.argsort(-score_BL, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True)


def top_k_commit(conf_BL, k_B):
    """Commit the k highest-confidence candidates per row (candidates have conf > -inf)."""
    k_B = jnp.asarray(k_B)
    k_B = jnp.broadcast_to(k_B, conf_BL.shape[:1]) if k_B.ndim == 0 else k_B
    return (rank_within_rows(conf_BL) < k_B[:, None]) & (conf_BL > NEG_INF)


def num_transfer_tokens(n: int, steps: int) -> np.ndarray:
    """LLaDA/SDAR schedule: n tokens over `steps`, base n//steps, the first n%steps get one more."""
    counts = np.full((steps,), n // steps, np.int32)
    counts[: n % steps] += 1
    return counts


def check_prompt(prompt, cfg, total_len: int, *, diffusion: bool):
    """Validate ids and total length; diffusion prompts may not contain the mask token."""
    check_tokens(prompt, cfg, "prompt")
    if total_len > cfg.max_seq_len:
        raise JaxgenError(f"prompt + new tokens = {total_len} exceeds the model's max_seq_len={cfg.max_seq_len}; "
                          "shorten the prompt or ask for fewer tokens")
    if diffusion:
        if cfg.mask_id is None:
            raise JaxgenError("this model config has mask_id=None; diffusion sampling needs a mask token "
                              "(set mask_id in the config or pass mask_id=...)")
        if not isinstance(prompt, jax.core.Tracer) and np.any(np.asarray(prompt) == cfg.mask_id):
            raise JaxgenError(f"the prompt contains the mask token id {cfg.mask_id}; prompts must be clean tokens")


def check_choice(name: str, value, choices):
    if value not in choices:
        raise JaxgenError(f"{name}={value!r}; use one of {', '.join(map(repr, choices))}")


def check_threshold(threshold, name: str = "threshold"):
    if threshold is not None and not 0.0 < float(threshold) <= 1.0:
        raise JaxgenError(f"{name}={threshold} must lie in (0, 1]")


def with_mask_id(cfg, mask_id):
    """The config with `mask_id` overridden (validated against the vocabulary)."""
    import dataclasses
    if mask_id is None:
        return cfg
    if not 0 <= int(mask_id) < cfg.vocab_size:
        raise JaxgenError(f"mask_id={mask_id} is outside the vocabulary [0, {cfg.vocab_size})")
    return dataclasses.replace(cfg, mask_id=int(mask_id))
