"""WeDLM training: masked diffusion under causal attention through topological reordering, with
dual-stream masking and an auxiliary AR loss (WeDLM paper §4.1-4.2 and §6.1; spec §5.1).

The model sees [x_o | x_t] (2L tokens, both streams at logical positions 0..L-1):
- the memory stream x_o is the clean sequence under causal attention, and its logits carry the
  auxiliary next-token loss ("computed on the same sequences");
- the prediction stream x_t gets one masking ratio gamma_k per block of `block_size` tokens;
  each token is masked w.p. gamma_k, then every block is reordered observed-first (each group
  in logical order) while RoPE keeps the logical positions. A token of block k attends to the
  memory tokens before the block and, causally in physical order, to its own block, never to
  other noisy blocks: `layouts.ar_diffusion(block_size, causal_block=True)`. This is exactly
  what `jaxgen.samplers.wedlm` computes at decode time over [committed prefix | reordered
  window], with the clean memory stream standing in for the committed prefix.
- MASK rows predict the token at their own logical position (no shift).

loss = diffusion + aux_ar_weight * AR, with diffusion = sum over masked tokens of CE / gamma_k
divided by the number of answer tokens (Eq. 10 with LLaDA's normalisation) and AR the mean
next-token CE of the memory stream. The paper's block is 32; it gives no AR weight, we use
option `aux_ar_weight` (default 1). Rows are reordered with a gather, so the layout stays
static (no per-row attention mask), as the paper does with Magi Attention.
"""
from __future__ import annotations


import jax.numpy as jnp

from jaxgen import layouts
from jaxgen.errors import JaxgenError
from jaxgen.model import forward
from jaxgen.objectives.common import cross_entropy, next_token_ce, noised_block_batch
from jaxgen.objectives.options import AuxARBlockOptions
from jaxgen.objectives.registry import register


def reorder_blocks(masked_BL, block_size: int):
    """[B, L] physical -> logical index: inside each block, the observed positions first, then
    the masked ones, each group in ascending logical order (WeDLM's topological reordering)."""
    B, L = masked_BL.shape
    in_block = jnp.arange(L, dtype=jnp.int32) % block_size
    rank_key = (masked_BL.astype(jnp.int32) * block_size + in_block).reshape(B, L // block_size, block_size)
    order = jnp.argsort(rank_key, axis=-1).astype(jnp.int32)
    return (order + jnp.arange(0, L, block_size, dtype=jnp.int32)[:, None]).reshape(B, L)


def loss(params, cfg, batch, key, *, block_size: int = 32, eps: float = 1e-3, antithetic: bool = True,
         aux_ar_weight: float = 1.0):
    if aux_ar_weight < 0:
        raise JaxgenError(f"aux_ar_weight={aux_ar_weight} must be >= 0")
    tokens, answer, t_BL, noisy, masked = noised_block_batch(
        cfg, batch, key, block_size=block_size, eps=eps, antithetic=antithetic, what="WeDLM training")
    B, L = tokens.shape
    physical_BL = reorder_blocks(masked, block_size)
    reorder = lambda a: jnp.take_along_axis(a, physical_BL, axis=1)
    logical = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    logits, _ = forward(params, cfg, jnp.concatenate([tokens, reorder(noisy)], axis=1),
                        positions=jnp.concatenate([logical, physical_BL], axis=1),
                        layout=layouts.ar_diffusion(block_size, causal_block=True))
    ar = next_token_ce(logits[:, :L], tokens, answer)
    ce_BL, masked_phys = cross_entropy(logits[:, L:], reorder(tokens)), reorder(masked)
    diff = jnp.where(masked_phys, ce_BL / reorder(t_BL), 0.0).sum() / jnp.maximum(answer.sum(), 1.0)
    value = diff + aux_ar_weight * ar
    masked_ce = jnp.where(masked_phys, ce_BL, 0.0).sum() / jnp.maximum(masked.sum(), 1)
    return value, {"loss": value, "ar_ce": ar, "diffusion": diff, "masked_ce": masked_ce, "tokens": answer.sum()}


register("wedlm", loss, AuxARBlockOptions)
