"""NBDiff adaptation objective: block diffusion with shifted logits plus an auxiliary AR loss.

What `jaxgen.samplers.nbdiff` asks of a model: the context is causal, the active block is
bidirectional, the block's first token is already known (sampled AR-style from the previous
block's last logit) and the output at in-block position j predicts token j + 1. The model sees
[x | x_t] (shared positions 0..L-1) under the `ar_diffusion` layout: the clean stream is causal
and carries the auxiliary next-token loss; each noisy block attends to itself and to the clean
tokens before it. One t per (row, block); every token of a block but its first is masked w.p. t.

loss = diffusion + aux_ar_weight * AR, with diffusion = sum over masked tokens of CE / t divided
by the number of maskable tokens, and AR the mean next-token CE of the clean stream.

With block size 1 nothing is maskable and the loss is the AR loss: NBDiff treats AR as block
size 1 and grows the block from there (option `curriculum_steps`), starting from AR
weights (`TrainConfig.init_from`). The paper's growth schedule and loss weight are not public;
we double the block in equal stages and weight the AR loss 1 (spec §4.3).
"""
from __future__ import annotations


import jax.numpy as jnp

from jaxgen import layouts
from jaxgen.errors import JaxgenError
from jaxgen.model import forward
from jaxgen.objectives.common import cross_entropy, next_token_ce, noised_block_batch
from jaxgen.objectives.options import AuxARBlockOptions
from jaxgen.objectives.registry import register


def loss(params, cfg, batch, key, *, block_size: int = 4, eps: float = 1e-3, antithetic: bool = True,
         aux_ar_weight: float = 1.0):
    if aux_ar_weight < 0:
        raise JaxgenError(f"aux_ar_weight={aux_ar_weight} must be >= 0")
    tokens, answer, t_BL, noisy, masked = noised_block_batch(
        cfg, batch, key, block_size=block_size, eps=eps, antithetic=antithetic, what="NBDiff training",
        keep_block_first=True)  # a block's first token is known at decode time (the AR step)
    B, L = tokens.shape
    positions = jnp.broadcast_to(jnp.tile(jnp.arange(L, dtype=jnp.int32), 2), (B, 2 * L))
    logits, _ = forward(params, cfg, jnp.concatenate([tokens, noisy], axis=1), positions=positions,
                        layout=layouts.ar_diffusion(block_size))
    ar = next_token_ce(logits[:, :L], tokens, answer)
    next_ce = cross_entropy(logits[:, L:-1], tokens[:, 1:])  # row j of a noisy block predicts token j + 1
    diff_terms = jnp.where(masked[:, 1:], next_ce / t_BL[:, 1:], 0.0)
    maskable = answer * (jnp.arange(L) % block_size != 0)
    diff = diff_terms.sum() / jnp.maximum(maskable.sum(), 1.0)
    value = diff + aux_ar_weight * ar
    return value, {"loss": value, "ar_ce": ar, "diffusion": diff, "tokens": answer.sum()}


register("nbdiff", loss, AuxARBlockOptions)
