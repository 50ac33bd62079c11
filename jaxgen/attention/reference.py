"""XLA reference attention with grouped-query heads and a dense boolean mask."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def attention(q_BLHD, k_BSKD, v_BSKD, mask_BLS):
    """softmax(q k^T / sqrt(D) masked) v, computed in float32; rows with no visible key give 0."""
    B, L, H, D = q_BLHD.shape
    K = k_BSKD.shape[2]
    q_BLKGD = q_BLHD.reshape(B, L, K, H // K, D)
    scores = jnp.einsum("blkgd,bskd->bkgls", q_BLKGD, k_BSKD, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(D)))
    mask = mask_BLS[:, None, None, :, :]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask, probs, 0.0).astype(v_BSKD.dtype)
    out = jnp.einsum("bkgls,bskd->blkgd", probs, v_BSKD)
    return out.reshape(B, L, H, D)
