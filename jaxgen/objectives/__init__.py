"""Training objectives: `loss(params, cfg, batch, key, **options) -> (loss, metrics)`.

batch: {"tokens": [B, L] int32, optional "loss_mask": [B, L] (1 = real token),
optional "prompt_mask": [B, L] (SFT: True on the prompt, which is never noised)}.
"""
from __future__ import annotations

import functools

from jaxgen.errors import JaxgenError
from jaxgen.objectives import ar, block_diffusion, masked_diffusion, nbdiff, tidar, wedlm  # noqa: F401


def for_train_config(tcfg, block_size: int | None = None):
    """The loss function a TrainConfig asks for, with its options bound; `block_size` overrides
    the config's (a curriculum stage, `config.block_size_at`)."""
    block_size = block_size or tcfg.block_size
    if tcfg.objective == "ar":
        return functools.partial(ar.loss, meap_ratio=tcfg.meap_ratio)
    if tcfg.objective == "masked_diffusion":
        return functools.partial(masked_diffusion.loss, eps=tcfg.sampling_eps, antithetic=tcfg.antithetic)
    if tcfg.objective == "dream":
        return functools.partial(masked_diffusion.loss, eps=tcfg.sampling_eps, antithetic=tcfg.antithetic,
                                 shift=True)
    if tcfg.objective == "lavida":
        return functools.partial(masked_diffusion.loss, eps=tcfg.sampling_eps, antithetic=tcfg.antithetic,
                                 complementary=True, prefix_lm=True)
    if tcfg.objective == "tidar":
        return functools.partial(tidar.loss, block_size=block_size, alpha=tcfg.tidar_alpha)
    if tcfg.objective == "nbdiff":
        return functools.partial(nbdiff.loss, block_size=block_size, eps=tcfg.sampling_eps,
                                 antithetic=tcfg.antithetic, aux_ar_weight=tcfg.aux_ar_weight)
    if tcfg.objective == "wedlm":
        return functools.partial(wedlm.loss, block_size=block_size, eps=tcfg.sampling_eps,
                                 antithetic=tcfg.antithetic, aux_ar_weight=tcfg.aux_ar_weight)
    if tcfg.objective in ("block_diffusion", "efficient_dlm"):
        beta = tcfg.position_mask_beta if tcfg.objective == "efficient_dlm" else None
        return functools.partial(block_diffusion.loss, block_size=block_size, eps=tcfg.sampling_eps,
                                 antithetic=tcfg.antithetic, position_beta=beta)
    raise JaxgenError(f"objective={tcfg.objective!r} does not train the language model; "
                      "use `jaxgen train`, which dispatches it (learn2pd trains a decoding filter)")
