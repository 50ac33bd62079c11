"""A draft model: a smaller jaxgen model drafting num_draft tokens autoregressively.

It keeps its own KV cache with per-row lengths. Invariant at each `draft`: slots [0, end - 2)
hold the committed tokens' K/V (rolled back: whatever the last draft wrote past them is
forgotten). A draft feeds the last two committed tokens (the first of them is uncached after a
step that accepted every draft), then each draft token in turn: N draft forwards, the first of
two tokens. Greedy (argmax) when the target decodes greedily, else sampled from the target's
warpers applied to the draft logits, with q returned. With the target itself as the draft
model, greedy drafts are always accepted.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxgen.cache import init_cache, slice_rows, with_lengths, write_at
from jaxgen.decoding.drafters.base import ChainDrafter
from jaxgen.decoding.processors import forbid_mask_token
from jaxgen.decoding.verify import greedy_warp
from jaxgen.errors import JaxgenError
from jaxgen.model import forward, is_decode_form


@dataclasses.dataclass(frozen=True)
class ModelDrafter(ChainDrafter):
    """Drafts with `params` (operands, not part of the identity) of the model `draft_cfg`."""

    draft_cfg: Any = None
    params: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)
    uses_warp = True

    @property
    def name(self) -> str:
        return "model"

    def operands(self):
        return self.params

    def check(self, cfg) -> None:
        if self.draft_cfg.vocab_size != cfg.vocab_size:
            raise JaxgenError(f"the draft model's vocab_size={self.draft_cfg.vocab_size} differs from the target's "
                              f"vocab_size={cfg.vocab_size}; a draft model must share the target's vocabulary "
                              "(its tokenizer)")

    def init(self, operands, cfg, prompt_BP, lengths_B, total_len: int):
        return prompt_cache(operands, self.draft_cfg, prompt_BP, lengths_B, total_len)

    def draft(self, operands, state, tokens_BT, end_B, key, warp=None):
        cfg, N = self.draft_cfg, self.num_draft
        warp = greedy_warp() if warp is None else warp
        keys = jax.random.split(key, N)
        start = end_B - 2  # >= 0: every row has a prompt token and the first new token
        slot = (lambda s_B: s_B[0]) if end_B.shape[0] == 1 else (lambda s_B: s_B)  # one row: in-place slice writes
        cache = with_lengths(state, start)
        logits, cache = forward(operands, cfg, slice_rows(tokens_BT, start, 2), cache=write_at(cache, slot(start)),
                                out_rows=(1, 1))
        first, q_first = warp.pick(forbid_mask_token(logits[:, 0], cfg), keys[0])

        def next_token(carry, j):
            cache, tok_B = carry
            logits, cache = forward(operands, cfg, tok_B[:, None], cache=write_at(cache, slot(end_B - 1 + j)))
            tok_B, q_BV = warp.pick(forbid_mask_token(logits[:, 0], cfg), keys[j])
            return (cache, tok_B), (tok_B, q_BV)

        (cache, _), (rest_NB, q_rest) = jax.lax.scan(next_token, (cache, first), jnp.arange(1, N))
        draft_BN = jnp.concatenate([first[:, None], rest_NB.T], axis=1)
        q_BNV = None if warp.greedy else jnp.concatenate([q_first[:, None], q_rest.transpose(1, 0, 2)], axis=1)
        return draft_BN, q_BNV, cache


def model_drafter(draft_params, draft_cfg) -> ModelDrafter:
    """A drafter running the jaxgen model (`draft_params`, `draft_cfg`); its vocabulary must be the
    target's. Decode-form params (`jaxgen.model.decode_params`) draft fastest on CPU."""
    return ModelDrafter(draft_cfg=draft_cfg, params=draft_params)


def prompt_cache(params, draft_cfg, prompt_BP, lengths_B, total_len: int):
    """A draft model's KV cache of the (right-padded) prompt, `total_len` slots long."""
    if total_len > draft_cfg.max_seq_len:
        raise JaxgenError(f"the draft model's max_seq_len={draft_cfg.max_seq_len} is below the {total_len} "
                          "positions this call needs (prompt + new tokens + draft); use a draft model with a "
                          "longer max_seq_len or ask for fewer tokens")
    cache = init_cache(draft_cfg, prompt_BP.shape[0], total_len, per_layer=is_decode_form(params))
    _, cache = forward(params, draft_cfg, prompt_BP, cache=cache, out_rows=(0, 1))  # K/V only
    return with_lengths(cache, lengths_B)
