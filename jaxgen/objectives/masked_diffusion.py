"""Masked diffusion (MDLM / LLaDA): mask each token w.p. t, CE / t on masked tokens, full layout.

Pretraining normalisation follows LLaDA (sum over masked tokens of CE / t, divided by the number
of real tokens); with a `prompt_mask` (SFT) the prompt is never noised and each row's loss is
divided by its answer length, then averaged over rows. The value is an upper bound (ELBO) on the
per-token negative log-likelihood.

LaViDa options (jacklishufan/LaViDa `llava_llada.py`): `complementary=True` adds, for every row,
a copy masked exactly where the first is not (over noisable tokens), so each token is
supervised once per pair; the copy's masking rate is 1 - t and its CE is weighted 1 / (1 - t)
(our reading: the spec says the weighting follows `forward_process`). `prefix_lm=True` lets the
prompt attend only to itself (`layouts.prefix(None)` with each row's prompt length; the prompt
is each row's leading `prompt_mask` tokens), which `jaxgen.samplers.lavida` relies on to encode
the prompt once. A batch without `prompt_mask` (a plain-text corpus) draws one per row
(`random_prompt_mask`, LaViDaOptions.max_prompt_fraction): otherwise the prompt would be empty
and "prefix-LM" training would be full attention.

Dream (`shift=True`, objective "dream"): the output at position i - 1 predicts token i, as in the
AR model Dream starts from and as `jaxgen.samplers.dream` reads it; position 0 is never noised.
Dream's context-adaptive reweighting (CART) is not implemented: masked tokens keep LLaDA's 1 / t.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxgen import layouts
from jaxgen.errors import JaxgenError
from jaxgen.model import forward
from jaxgen.objectives.common import corrupt, cross_entropy, loss_and_prompt_masks, sample_t
from jaxgen.objectives.options import DiffusionOptions, LaViDaOptions
from jaxgen.objectives.registry import register


def prompt_lengths(prompt_BL):
    """[B] int32: each row's leading run of prompt tokens (the prefix of `layouts.prefix(None)`)."""
    return jnp.sum(jnp.cumprod(prompt_BL.astype(jnp.int32), axis=1), axis=1)


def random_prompt_mask(key, batch: int, length: int, max_prompt_fraction: float):
    """[B, L] bool: each row's first n tokens, n uniform in 1 .. max(1, max_prompt_fraction * L)."""
    longest = max(1, int(max_prompt_fraction * length))
    n_B = jax.random.randint(key, (batch,), 1, longest + 1)
    return jnp.arange(length)[None, :] < n_B[:, None]


def loss(params, cfg, batch, key, *, eps: float = 1e-3, antithetic: bool = True, complementary: bool = False,
         prefix_lm: bool = False, shift: bool = False, max_prompt_fraction: float | None = None):
    if cfg.mask_id is None:
        raise JaxgenError("masked diffusion needs cfg.mask_id (the [MASK] token id)")
    tokens = batch["tokens"]
    B, L = tokens.shape
    if prefix_lm and "prompt_mask" not in batch and max_prompt_fraction is not None:  # plain text: draw prompts
        batch = dict(batch, prompt_mask=random_prompt_mask(jax.random.fold_in(key, 1), B, L, max_prompt_fraction))
    loss_mask, prompt = loss_and_prompt_masks(batch)
    k_t, k_mask = jax.random.split(key)
    t_B = sample_t(k_t, B, eps, antithetic)
    noisable = (loss_mask > 0) & ~prompt
    if shift:  # nothing predicts position 0
        noisable = noisable & (jnp.arange(L) > 0)
    noisy, masked = corrupt(tokens, t_B[:, None], noisable, k_mask, cfg.mask_id)
    if complementary:  # the inverse mask over noisable tokens, as a second copy of every row
        inverse = noisable & ~masked
        noisy = jnp.concatenate([noisy, jnp.where(inverse, cfg.mask_id, tokens)])
        masked = jnp.concatenate([masked, inverse])
        t_B = jnp.concatenate([t_B, jnp.maximum(1.0 - t_B, eps)])
        tokens, loss_mask, prompt = (jnp.concatenate([a, a]) for a in (tokens, loss_mask, prompt))
    # prefix-LM: the prompt sees only itself, the answer sees everything
    layout, split = (layouts.prefix(None), prompt_lengths(prompt)) if prefix_lm else (layouts.full(), None)
    logits, _ = forward(params, cfg, noisy, layout=layout, split_B=split)
    if shift:  # row i reads the output at i - 1 (row 0 is never noised)
        logits = jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
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


register("masked_diffusion", loss, DiffusionOptions)
register("dream", functools.partial(loss, shift=True), DiffusionOptions)
register("lavida", functools.partial(loss, complementary=True, prefix_lm=True), LaViDaOptions)
