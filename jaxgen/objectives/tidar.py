"""TiDAR joint objective: AR next-token loss and full-mask block diffusion in one forward.

The model sees [x | MASK * L] (both halves at positions 0..L-1) under the `ar_diffusion` layout:
the clean half is causal and trained on next-token prediction; every MASK block attends to
itself and to the clean tokens before the block, and predicts the block's own tokens (no
shift), which is what `jaxgen.samplers.tidar` asks of it at decode time. The diffusion half is
all MASK (the paper's "full mask" setting), so no noise level is sampled.

loss = (alpha * mean AR CE + mean diffusion CE) / (1 + alpha)   [spec §5.2: alpha = 1, 2nd-hand]
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxgen import layouts
from jaxgen.errors import JaxgenError
from jaxgen.model import forward
from jaxgen.objectives.common import block_batch, cross_entropy, next_token_ce
from jaxgen.objectives.options import BlockOptions, check_weight
from jaxgen.objectives.registry import register


def loss(params, cfg, batch, key, *, block_size: int = 8, alpha: float = 1.0):
    del key  # deterministic: the diffusion half is fully masked
    if alpha < 0:
        raise JaxgenError(f"tidar alpha={alpha} must be >= 0")
    tokens, loss_mask, prompt = block_batch(cfg, batch, block_size, "TiDAR training")
    B, L = tokens.shape
    answer = loss_mask * ~prompt
    inputs = jnp.concatenate([tokens, jnp.full_like(tokens, cfg.mask_id)], axis=1)
    positions = jnp.broadcast_to(jnp.tile(jnp.arange(L, dtype=jnp.int32), 2), (B, 2 * L))
    logits, _ = forward(params, cfg, inputs, positions=positions, layout=layouts.ar_diffusion(block_size))
    ar = next_token_ce(logits[:, :L], tokens, answer)
    diff = (cross_entropy(logits[:, L:], tokens) * answer).sum() / jnp.maximum(answer.sum(), 1.0)
    value = (alpha * ar + diff) / (1.0 + alpha)
    return value, {"loss": value, "ar_ce": ar, "diffusion_ce": diff, "tokens": answer.sum()}


@dataclasses.dataclass(frozen=True)
class TiDAROptions(BlockOptions):
    """TiDAR: the draft block size (and curriculum) and alpha, the AR loss weight (old key: tidar_alpha)."""

    alpha: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        check_weight("alpha", self.alpha)

    def loss_kwargs(self) -> dict:
        return dict(super().loss_kwargs(), alpha=self.alpha)


register("tidar", loss, TiDAROptions)
