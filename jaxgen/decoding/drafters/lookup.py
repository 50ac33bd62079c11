"""Prompt lookup: draft by copying what followed an earlier occurrence of the last n-gram.

Hugging Face's `PromptLookupCandidateGenerator` semantics (`generate(...,
prompt_lookup_num_tokens=N)`): over the committed tokens (prompt and output so far), for n from
`max_matching_ngram_size` down to 1, find the occurrences of the last n tokens that have at least
one committed token after them; the earliest one (left to right) wins, and the drafts are the
tokens following it. Differences, both forced by static shapes and both harmless to a lossless
verifier: where HF proposes fewer than N tokens (the match is followed by fewer than N committed
tokens) we continue the copy periodically (the tokens after the match, repeated: what the text
would be if it kept repeating), and where HF finds no match (it then decodes one plain token) we
propose the root token N times. HF's EOS truncation of candidates is not applied (no EOS stop).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxgen.decoding.drafters.base import ChainDrafter
from jaxgen.errors import JaxgenError


@dataclasses.dataclass(frozen=True)
class PromptLookup(ChainDrafter):
    """Deterministic chain drafter (q = point masses) with no model and no state."""

    max_matching_ngram_size: int = 2

    def __post_init__(self):
        n = self.max_matching_ngram_size
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise JaxgenError(f"max_matching_ngram_size={n!r} must be an integer >= 1")

    @property
    def name(self) -> str:
        return "prompt_lookup"

    def init(self, operands, cfg, prompt_BP, lengths_B, total_len: int):
        return None

    def draft(self, operands, state, tokens_BT, end_B, key):
        lookup = lambda tokens_T, end: lookup_row(tokens_T, end, self.max_matching_ngram_size, self.num_draft)
        return jax.vmap(lookup)(tokens_BT, end_B), None, state


def lookup_row(tokens_T, end, max_ngram: int, num_draft: int):
    """int32 [num_draft]: the prompt-lookup draft of one row whose tokens [0, end) are committed."""
    T = tokens_T.shape[0]
    col = jnp.arange(T)
    padded = jnp.concatenate([tokens_T, jnp.full((max_ngram,), -1, tokens_T.dtype)])
    shifted = [padded[k:k + T] for k in range(max_ngram)]  # shifted[k][i] = tokens[i + k]
    found, start = jnp.bool_(False), end
    for n in range(max_ngram, 0, -1):  # the longest n-gram with a match wins
        suffix = jax.lax.dynamic_slice_in_dim(padded, jnp.maximum(end - n, 0), n)
        match = col + n < end  # a committed token follows the occurrence
        for k in range(n):
            match = match & (shifted[k] == suffix[k])
        take = ~found & jnp.any(match)
        start = jnp.where(take, jnp.argmax(match) + n, start)  # argmax: the earliest occurrence
        found = found | take
    period = jnp.maximum(end - start, 1)
    copied = tokens_T[start + jnp.arange(num_draft) % period]
    return jnp.where(found, copied, tokens_T[end - 1]).astype(jnp.int32)
