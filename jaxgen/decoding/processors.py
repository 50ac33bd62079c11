"""Logits processors: edits of a step's logits before the proposal (forbid a token, guidance;
grammar masks plug in here)."""
from __future__ import annotations

from jaxgen.decoding.propose import NEG_INF


def forbid_token(logits_BLV, token_id):
    """Set one token's logit to -inf so it is never proposed (no-op for None)."""
    if token_id is None:
        return logits_BLV
    return logits_BLV.at[..., token_id].set(NEG_INF)


def forbid_mask_token(logits_BLV, cfg):
    """The mask token is never a candidate, so no loop can wait forever on it."""
    return forbid_token(logits_BLV, cfg.mask_id)


def classifier_free_guidance(cond_logits, uncond_logits, scale):
    """LLaDA's guidance: uncond + (scale + 1) * (cond - uncond)."""
    return uncond_logits + (scale + 1.0) * (cond_logits - uncond_logits)
