"""Block-diffusion drafter: a model adapted to block diffusion drafts N tokens at once by filling
N MASK tokens after the committed prefix (FlexDraft-like self-speculation, Zhang et al. 2026;
the drafting half of TiDAR, Liu et al. 2025).

The draft model keeps its own KV cache of the committed tokens (causal K/V, exact). One draft:

1. one forward over a window of L = 2N + 1 slots ending at end + N: the up to N + 1 committed
   tokens not yet cached (the last step's accepted tokens and bonus; older ones are cached),
   then N MASK tokens at positions end..end+N-1. Layout `prefix(None, causal_prefix=True)` with
   the per-row split `end`: committed rows are causal (their K/V, written to the cache, are the
   AR K/V), MASK rows see every committed token and each other (bidirectionally);
2. `denoising_steps` rounds commit the block: each round takes the warped pick at every still
   masked position (argmax when the target decodes greedily, else a sample from the target's
   warpers applied to the draft logits) and keeps the k[round] most confident
   (`num_transfer_tokens(N, denoising_steps)`: SDAR's `low_confidence_static`); rounds after the
   first re-read the block over the cache (read-only, layout `full`).

q of a token = the warped distribution it was drawn from, at the round it was committed, so the
target's rejection sampling stays lossless. The cache then keeps the committed slots only (the
MASK slots are overwritten by the next window), so each step costs `denoising_steps` draft
forwards, the first one also caching the last step's tokens.

Which models fit: ones trained to fill a MASK block after a causal clean prefix, e.g. the TiDAR
objective's `ar_diffusion` layout (causal clean stream, bidirectional noisy blocks seeing the
clean past), or FlexDraft's attention-tuned target. SDAR-style block-causal models see their
clean prefix block-causally; here it is causal (the AR path). Any model with a mask token runs
(e.g. the target itself): drafts are only as good as its training, outputs are always the
target's. Deviations from FlexDraft: no bonus-guided calibration MLP, no batch-size switch
between parallel and sequential draft-and-verify (we always draft, then verify).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxgen import layouts
from jaxgen.cache import read, slice_rows, with_lengths, write_at
from jaxgen.decoding import rules
from jaxgen.decoding.drafters.base import ChainDrafter
from jaxgen.decoding.drafters.model import prompt_cache
from jaxgen.decoding.processors import forbid_mask_token
from jaxgen.decoding.propose import prob_of
from jaxgen.decoding.schedules import num_transfer_tokens
from jaxgen.decoding.verify import greedy_warp
from jaxgen.errors import JaxgenError
from jaxgen.model import forward


def draft_window(end_B, num_draft: int, total_len: int):
    """(start_B, L): the window [start, start + L) of one draft forward, L = 2N + 1, ending at
    end + N (clipped into [0, total_len)): it covers the N + 1 newest committed tokens and the
    N MASK slots."""
    L = 2 * num_draft + 1
    return jnp.clip(end_B + num_draft - L, 0, total_len - L), L


def window_chunk(tokens_BT, end_B, start_B, L: int, num_draft: int, mask_id: int):
    """(chunk_BL, valid_BL): committed tokens before end, MASK at end..end+N-1, padding after
    (invalid: never a key)."""
    slot_BL = start_B[:, None] + jnp.arange(L)
    committed = slot_BL < end_B[:, None]
    masked = ~committed & (slot_BL < end_B[:, None] + num_draft)
    chunk = jnp.where(committed, slice_rows(tokens_BT, start_B, L), mask_id)
    return chunk.astype(jnp.int32), committed | masked


def commit_round(block_BN, q_BNV, masked_BN, logits_BNV, k: int, warp, key):
    """One denoising round: pick at every position, commit the k most confident still-masked
    ones (with their q). Returns (block, q, masked)."""
    tok_BN, q_new = warp.pick(logits_BNV, key)
    conf_BN = prob_of(logits_BNV, tok_BN) if warp.greedy else jnp.take_along_axis(q_new, tok_BN[..., None], -1)[..., 0]
    commit_BN = rules.scheduled(conf_BN, masked_BN, k)
    block_BN = jnp.where(commit_BN, tok_BN, block_BN)
    if q_BNV is not None:
        q_BNV = jnp.where(commit_BN[..., None], q_new, q_BNV)
    return block_BN, q_BNV, masked_BN & ~commit_BN


@dataclasses.dataclass(frozen=True)
class BlockDiffusionDrafter(ChainDrafter):
    """Drafts num_draft tokens per step by block diffusion with `params` (operands, not part of
    the identity) of the model `draft_cfg` (see the module docstring)."""

    draft_cfg: Any = None
    params: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)
    denoising_steps: int = 1
    uses_warp = True

    def __post_init__(self):
        s = self.denoising_steps
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            raise JaxgenError(f"denoising_steps={s!r} must be an integer >= 1 (draft forwards per step)")

    @property
    def name(self) -> str:
        return "block_diffusion"

    def operands(self):
        return self.params

    def check(self, cfg) -> None:
        dc = self.draft_cfg
        if dc.vocab_size != cfg.vocab_size:
            raise JaxgenError(f"the draft model's vocab_size={dc.vocab_size} differs from the target's vocab_size="
                              f"{cfg.vocab_size}; a draft model must share the target's vocabulary (its tokenizer)")
        if dc.mask_id is None:
            raise JaxgenError("the block-diffusion draft model has mask_id=None; it drafts by filling MASK tokens: "
                              "use a model with a mask token (set mask_id in its config)")
        if self.denoising_steps > self.num_draft:
            raise JaxgenError(f"denoising_steps={self.denoising_steps} > num_draft={self.num_draft} would leave "
                              "rounds that commit nothing; use denoising_steps <= num_draft")

    def init(self, operands, cfg, prompt_BP, lengths_B, total_len: int):
        N = self.num_draft
        if total_len < 2 * N + 1:
            raise JaxgenError(f"the block-diffusion drafter needs prompt + new tokens >= num_draft + 1 = {N + 1} "
                              f"(its window spans 2 * num_draft + 1 slots); ask for more tokens or draft fewer")
        return prompt_cache(operands, self.draft_cfg, prompt_BP, lengths_B, total_len)

    def draft(self, operands, state, tokens_BT, end_B, key, warp=None):
        cfg, N = self.draft_cfg, self.num_draft
        warp = greedy_warp() if warp is None else warp
        start_B, L = draft_window(end_B, N, state.max_len)
        chunk_BL, valid_BL = window_chunk(tokens_BT, end_B, start_B, L, N, cfg.mask_id)
        logits_BNV, cache = forward(operands, cfg, chunk_BL, layout=layouts.prefix(None, causal_prefix=True),
                                    cache=write_at(with_lengths(state, start_B), start_B), kv_valid_BL=valid_BL,
                                    split_B=end_B, out_rows=(end_B - start_B, N))
        cache = with_lengths(cache, end_B)  # the committed tokens' K/V; the MASK slots are scratch
        B = tokens_BT.shape[0]
        block_BN = jnp.full((B, N), cfg.mask_id, jnp.int32)
        q_BNV = None if warp.greedy else jnp.zeros((B, N, cfg.vocab_size), jnp.float32)
        masked_BN = jnp.ones((B, N), bool)
        positions_BN = end_B[:, None] + jnp.arange(N)
        keys = jax.random.split(key, self.denoising_steps)
        for r, k in enumerate(num_transfer_tokens(N, self.denoising_steps)):
            if r:  # later rounds re-read the partly filled block over the cache
                logits_BNV, _ = forward(operands, cfg, block_BN, positions=positions_BN, layout=layouts.full(),
                                        cache=read(cache))
            block_BN, q_BNV, masked_BN = commit_round(block_BN, q_BNV, masked_BN, forbid_mask_token(logits_BNV, cfg),
                                                      int(k), warp, keys[r])
        return block_BN, q_BNV, cache


def block_diffusion_drafter(draft_params, draft_cfg, denoising_steps: int = 1) -> BlockDiffusionDrafter:
    """A block-diffusion drafter from a model with a mask token (`draft_cfg.mask_id`; the target's
    own params work too); `denoising_steps` draft forwards per step (<= num_draft)."""
    return BlockDiffusionDrafter(draft_cfg=draft_cfg, params=draft_params, denoising_steps=denoising_steps)
