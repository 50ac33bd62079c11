"""Next-token prediction under the causal layout; MEAP option (mask a few inputs)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxgen import layouts
from jaxgen.errors import JaxgenError
from jaxgen.model import forward
from jaxgen.errors import ConfigError
from jaxgen.objectives.common import cross_entropy, loss_and_prompt_masks
from jaxgen.objectives.options import Options
from jaxgen.objectives.registry import register


def loss(params, cfg, batch, key, *, meap_ratio: float = 0.0):
    """Mean next-token CE over target positions with loss_mask = 1 and outside the prompt.

    MEAP (mask-enhanced AR pretraining): each input token except the first is replaced by the
    mask token with probability `meap_ratio`; targets stay the clean next tokens.
    """
    tokens = batch["tokens"]
    loss_mask, prompt = loss_and_prompt_masks(batch)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    weights = loss_mask[:, 1:] * (~prompt[:, 1:])
    if meap_ratio > 0:
        if cfg.mask_id is None:
            raise JaxgenError("meap_ratio > 0 needs cfg.mask_id")
        hide = jax.random.bernoulli(key, meap_ratio, inputs.shape).at[:, 0].set(False)
        inputs = jnp.where(hide, cfg.mask_id, inputs)
    logits, _ = forward(params, cfg, inputs, layout=layouts.causal())
    ce = cross_entropy(logits, targets)
    total = jnp.maximum(weights.sum(), 1.0)
    value = (ce * weights).sum() / total
    return value, {"loss": value, "ce": value, "tokens": weights.sum()}


@dataclasses.dataclass(frozen=True)
class AROptions(Options):
    meap_ratio: float = 0.0  # MEAP: fraction of inputs replaced by MASK (0 = plain next-token prediction)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.meap_ratio < 1.0:
            raise ConfigError(f"meap_ratio={self.meap_ratio} must be in [0, 1)")

    def loss_kwargs(self) -> dict:
        return dict(super().loss_kwargs(), meap_ratio=self.meap_ratio)


register("ar", loss, AROptions)
