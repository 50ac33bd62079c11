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


def filter_top_k_top_p(logits, top_k, top_p):
    """Keep the top_k logits (top_k <= 0: all) and the smallest nucleus with mass >= top_p.

    top_k and top_p may be traced; one descending sort serves both filters.
    """
    sorted_desc = -jnp.sort(-logits, axis=-1)
    vocab = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_desc, jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None].astype(jnp.int32),
                              axis=-1)
    logits = jnp.where(logits < kth, NEG_INF, logits)
    sorted_desc = jnp.where(sorted_desc < kth, NEG_INF, sorted_desc)
    probs_sorted = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
    # the smallest logit still inside the nucleus: entries whose preceding mass < top_p are kept
    keep_sorted = mass_before < top_p
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((top_p < 1.0) & (logits < cutoff), NEG_INF, logits)


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
