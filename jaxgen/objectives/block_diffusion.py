"""Block diffusion (BD3-LM / SDAR vectorized training) under the dual-stream layout.

The model sees [x_t | x_0] (2L tokens, both halves at positions 0..L-1): noisy blocks attend
bidirectionally inside their block and to the clean earlier blocks; the clean stream is
block-causal. One t per (row, block); tokens are masked w.p. t and the CE on masked tokens is
weighted 1/t, summed and divided by the number of real tokens. Only the x_t half is projected to
the vocabulary. With block_size 1 this is next-token prediction with a MASK query token.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen import layouts
from jaxgen.errors import JaxgenError
from jaxgen.model import forward, logits_from_hidden
from jaxgen.objectives.common import cross_entropy, loss_and_prompt_masks, sample_t
from jaxgen.objectives.masked_diffusion import corrupt


def loss(params, cfg, batch, key, *, block_size: int = 4, eps: float = 1e-3, antithetic: bool = True):
    if cfg.mask_id is None:
        raise JaxgenError("block diffusion needs cfg.mask_id (the [MASK] token id)")
    tokens = batch["tokens"]
    B, L = tokens.shape
    if L % block_size:
        raise JaxgenError(f"sequence length {L} is not a multiple of block_size={block_size}")
    loss_mask, prompt = loss_and_prompt_masks(batch)
    k_t, k_mask = jax.random.split(key)
    nb = L // block_size
    t_Bn = sample_t(k_t, B * nb, eps, antithetic).reshape(B, nb)
    t_BL = jnp.repeat(t_Bn, block_size, axis=1)
    noisy, masked = corrupt(tokens, t_BL, (loss_mask > 0) & ~prompt, k_mask, cfg.mask_id)
    positions = jnp.broadcast_to(jnp.tile(jnp.arange(L, dtype=jnp.int32), 2), (B, 2 * L))
    hidden, _ = forward(params, cfg, jnp.concatenate([noisy, tokens], axis=1), positions=positions,
                        layout=layouts.dual_stream(block_size), return_hidden=True)
    logits = logits_from_hidden(params, cfg, hidden[:, :L])
    ce = cross_entropy(logits, tokens)
    weighted = jnp.where(masked, ce / t_BL, 0.0)
    value = weighted.sum() / jnp.maximum((loss_mask * ~prompt).sum(), 1.0)
    masked_ce = jnp.where(masked, ce, 0.0).sum() / jnp.maximum(masked.sum(), 1)
    return value, {"loss": value, "masked_ce": masked_ce, "tokens": (loss_mask * ~prompt).sum()}
