"""Shared pieces of the objectives: cross-entropy, masks, the diffusion time sampler."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.errors import JaxgenError


def cross_entropy(logits_BLV, targets_BL):
    """Per-token cross-entropy in float32."""
    logp = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets_BL[..., None], axis=-1)[..., 0]


def loss_and_prompt_masks(batch):
    tokens = batch["tokens"]
    loss_mask = batch.get("loss_mask")
    loss_mask = jnp.ones(tokens.shape, jnp.float32) if loss_mask is None else loss_mask.astype(jnp.float32)
    prompt = batch.get("prompt_mask")
    prompt = jnp.zeros(tokens.shape, bool) if prompt is None else prompt.astype(bool)
    return loss_mask, prompt


def block_batch(cfg, batch, block_size: int, what: str):
    """(tokens, loss_mask, prompt) of a block objective's batch, checking what every block
    objective needs: a [MASK] id and a length that is a multiple of the block."""
    if cfg.mask_id is None:
        raise JaxgenError(f"{what} needs cfg.mask_id (the [MASK] token id)")
    tokens = batch["tokens"]
    if tokens.shape[1] % block_size:
        raise JaxgenError(f"sequence length {tokens.shape[1]} is not a multiple of block_size={block_size}")
    return (tokens,) + loss_and_prompt_masks(batch)


def corrupt(tokens, t_BL, noisable_BL, key, mask_id):
    """Replace each noisable token by MASK with probability t (per position)."""
    masked = (jax.random.uniform(key, tokens.shape) < t_BL) & noisable_BL
    return jnp.where(masked, mask_id, tokens), masked


def sample_t(key, n: int, eps: float, antithetic: bool):
    """t = eps + (1 - eps) u, u ~ U(0, 1); antithetic: u_i = (u_0 + i / n) mod 1 (MDLM)."""
    if antithetic:
        u = (jax.random.uniform(key, ()) + jnp.arange(n) / n) % 1.0
    else:
        u = jax.random.uniform(key, (n,))
    return eps + (1.0 - eps) * u


def sample_block_t(key, batch: int, length: int, block_size: int, eps: float, antithetic: bool):
    """[B, L] diffusion times, one t per (row, block of `block_size` tokens), repeated over the block."""
    n = length // block_size
    return jnp.repeat(sample_t(key, batch * n, eps, antithetic).reshape(batch, n), block_size, axis=1)


def next_token_ce(logits_BLV, tokens_BL, weight_BL):
    """Weighted mean next-token CE: row j predicts token j + 1, weighted by that token's weight
    (the clean-stream AR loss of the two-stream objectives)."""
    w = weight_BL[:, 1:]
    return (cross_entropy(logits_BLV[:, :-1], tokens_BL[:, 1:]) * w).sum() / jnp.maximum(w.sum(), 1.0)


def noised_block_batch(cfg, batch, key, *, block_size: int, eps: float, antithetic: bool, what: str,
                       keep_block_first: bool = False):
    """(tokens, answer, t_BL, noisy, masked) of a block objective: one t per (row, block), each
    answer token masked w.p. t (a block's first token never, with `keep_block_first`: NBDiff)."""
    tokens, loss_mask, prompt = block_batch(cfg, batch, block_size, what)
    B, L = tokens.shape
    answer = loss_mask * ~prompt
    k_t, k_mask = jax.random.split(key)
    t_BL = sample_block_t(k_t, B, L, block_size, eps, antithetic)
    maskable = answer > 0
    if keep_block_first:
        maskable = maskable & (jnp.arange(L) % block_size != 0)
    noisy, masked = corrupt(tokens, t_BL, maskable, k_mask, cfg.mask_id)
    return tokens, answer, t_BL, noisy, masked
