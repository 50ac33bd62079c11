"""Masked diffusion (MDLM / LLaDA): mask each token w.p. t, CE / t on masked tokens, full layout.

Pretraining normalisation follows LLaDA (sum over masked tokens of CE / t, divided by the number
of real tokens); with a `prompt_mask` (SFT) the prompt is never noised and each row's loss is
divided by its answer length, then averaged over rows. The value is an upper bound (ELBO) on the
per-token negative log-likelihood.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen import layouts
from jaxgen.errors import JaxgenError
from jaxgen.model import forward
from jaxgen.objectives.common import cross_entropy, loss_and_prompt_masks, sample_t


def corrupt(tokens, t_BL, noisable_BL, key, mask_id):
    """Replace each noisable token by MASK with probability t (per position)."""
    masked = (jax.random.uniform(key, tokens.shape) < t_BL) & noisable_BL
    return jnp.where(masked, mask_id, tokens), masked


def loss(params, cfg, batch, key, *, eps: float = 1e-3, antithetic: bool = True):
    if cfg.mask_id is None:
        raise JaxgenError("masked diffusion needs cfg.mask_id (the [MASK] token id)")
    tokens = batch["tokens"]
    B, L = tokens.shape
    loss_mask, prompt = loss_and_prompt_masks(batch)
    k_t, k_mask = jax.random.split(key)
    t_B = sample_t(k_t, B, eps, antithetic)
    noisy, masked = corrupt(tokens, t_B[:, None], (loss_mask > 0) & ~prompt, k_mask, cfg.mask_id)
    logits, _ = forward(params, cfg, noisy, layout=layouts.full())
    ce = cross_entropy(logits, tokens)
    weighted = jnp.where(masked, ce / t_B[:, None], 0.0)
    answer = loss_mask * (~prompt)
    sft = "prompt_mask" in batch
    if sft:
        value = jnp.mean(weighted.sum(1) / jnp.maximum(answer.sum(1), 1.0))
    else:
        value = weighted.sum() / jnp.maximum(loss_mask.sum(), 1.0)
    masked_ce = jnp.where(masked, ce, 0.0).sum() / jnp.maximum(masked.sum(), 1)
    return value, {"loss": value, "masked_ce": masked_ce, "mask_rate": masked.sum() / jnp.maximum(answer.sum(), 1.0),
                   "tokens": answer.sum()}
