"""Training objectives: `loss(params, cfg, batch, key, **options) -> (loss, metrics)`.

batch: {"tokens": [B, L] int32, optional "loss_mask": [B, L] (1 = real token),
optional "prompt_mask": [B, L] (SFT: True on the prompt, which is never noised)}.
"""
from __future__ import annotations

import functools

from jaxgen.objectives import ar, block_diffusion, masked_diffusion, tidar  # noqa: F401


def for_train_config(tcfg):
    """The loss function a TrainConfig asks for, with its options bound."""
    if tcfg.objective == "ar":
        return functools.partial(ar.loss, meap_ratio=tcfg.meap_ratio)
    if tcfg.objective == "masked_diffusion":
        return functools.partial(masked_diffusion.loss, eps=tcfg.sampling_eps, antithetic=tcfg.antithetic)
    if tcfg.objective == "lavida":
        return functools.partial(masked_diffusion.loss, eps=tcfg.sampling_eps, antithetic=tcfg.antithetic,
                                 complementary=True, prefix_lm=True)
    if tcfg.objective == "tidar":
        return functools.partial(tidar.loss, block_size=tcfg.block_size, alpha=tcfg.tidar_alpha)
    return functools.partial(block_diffusion.loss, block_size=tcfg.block_size, eps=tcfg.sampling_eps,
                             antithetic=tcfg.antithetic)
