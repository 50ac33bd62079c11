"""Block diffusion (BD3-LM / SDAR vectorized training) under the dual-stream layout.

The model sees [x_t | x_0] (2L tokens, both halves at positions 0..L-1): noisy blocks attend
bidirectionally inside their block and to the clean earlier blocks; the clean stream is
block-causal. One t per (row, block); tokens are masked w.p. t and the CE on masked tokens is
weighted 1/t, summed and divided by the number of real tokens. Only the x_t half is projected to
the vocabulary. With block_size 1 this is next-token prediction with a MASK query token.

Efficient-DLM (`position_beta`, arXiv 2512.14067): at decode time blocks fill left to right, so
later tokens of a block are masked more often in training. Token i of a block is masked w.p.
p_i(t) = min(1, t * w_i / mean_j w_j), w_i = exp(beta (1 - t) i): the spec's weight (2nd-hand),
normalised by us so that a block's mean masking rate stays t before the clip (uniform at t = 1,
left-to-right as t -> 0). Masked CE is weighted 1 / p_i, the per-token form of LLaDA's 1 / t.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxgen import layouts
from jaxgen.model import forward, logits_from_hidden
from jaxgen.errors import ConfigError
from jaxgen.objectives.common import block_batch, corrupt, cross_entropy, sample_block_t
from jaxgen.objectives.options import BlockOptions, DiffusionOptions
from jaxgen.objectives.registry import register


def position_mask_prob(t_Bn, block_size: int, beta: float, eps: float = 1e-3):
    """[B, n * block_size] masking probabilities of Efficient-DLM's position-dependent masking."""
    i = jnp.arange(block_size, dtype=jnp.float32)
    w_BnK = jnp.exp(beta * (1.0 - t_Bn)[..., None] * i)
    p_BnK = t_Bn[..., None] * w_BnK / w_BnK.mean(-1, keepdims=True)
    return jnp.clip(p_BnK, eps, 1.0).reshape(t_Bn.shape[0], -1)


def loss(params, cfg, batch, key, *, block_size: int = 4, eps: float = 1e-3, antithetic: bool = True,
         position_beta: float | None = None):
    tokens, loss_mask, prompt = block_batch(cfg, batch, block_size, "block diffusion")
    B, L = tokens.shape
    k_t, k_mask = jax.random.split(key)
    t_BL = sample_block_t(k_t, B, L, block_size, eps, antithetic)
    if position_beta is not None:
        t_BL = position_mask_prob(t_BL[:, ::block_size], block_size, position_beta, eps)
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


@dataclasses.dataclass(frozen=True)
class BlockDiffusionOptions(BlockOptions, DiffusionOptions):
    """BD3-LM / SDAR block diffusion: block size (and curriculum) plus the diffusion time sampler."""


@dataclasses.dataclass(frozen=True)
class EfficientDLMOptions(BlockDiffusionOptions):
    position_mask_beta: float = 1.0  # w_i(t) = exp(beta (1 - t) i) inside a block; 0 = uniform (block diffusion)

    def __post_init__(self):
        super().__post_init__()
        if not math.isfinite(self.position_mask_beta):
            raise ConfigError(f"position_mask_beta={self.position_mask_beta} must be a finite number")

    def loss_kwargs(self) -> dict:
        return dict(super().loss_kwargs(), position_beta=self.position_mask_beta)


register("block_diffusion", loss, BlockDiffusionOptions)
register("efficient_dlm", loss, EfficientDLMOptions)
