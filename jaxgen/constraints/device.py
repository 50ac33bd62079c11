"""The traced side: host calls into an open session (by its traced int32 id, so one compiled
program serves every constraint of the same shapes) and the on-device use of their bitmasks.

Every function here is jit-compatible; `words` = ceil(vocab / 32) is static (from the shapes).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.constraints import sessions
from jaxgen.constraints.host_call import host_call
from jaxgen.decoding.propose import NEG_INF

_FIRST_MASKS = sessions.timed("fill_masks")
_AR_START = sessions.timed("ar_start")
_AR_STEP = sessions.timed("ar_step")
_ADVANCE = sessions.timed("advance")
_TREE_MASKS = sessions.timed("tree_masks")
_LAVE_STEP = sessions.timed("lave_step")
_BUDGET_TREE_MASKS = sessions.timed("budget_tree_masks")
_BUDGET_ADVANCE = sessions.timed("budget_advance")


def _spec(shape, dtype=jnp.int32):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def unpack(mask_BW, vocab_size: int):
    """int32 [..., W] bitmask -> bool [..., vocab_size] (bit v % 32 of word v // 32)."""
    v = jnp.arange(vocab_size)
    return (jnp.right_shift(jnp.take(mask_BW, v // 32, axis=-1), v % 32) & 1).astype(bool)


def apply_mask(logits_BV, mask_BW):
    """-inf at every id the bitmask does not allow (mask [..., W] broadcasts over logits [..., V])."""
    return jnp.where(unpack(mask_BW, logits_BV.shape[-1]), logits_BV, NEG_INF)


def first_masks(session_id, batch: int, words: int):
    """int32 [B, W]: each row's mask before any generated token."""
    return host_call(_FIRST_MASKS, [_spec((batch, words))], session_id)[0]


def ar_start(session_id, batch: int, words: int):
    """int32 [B, W]: AR's first masks (after each row's first length-budget witness search)."""
    return host_call(_AR_START, [_spec((batch, words))], session_id)[0]


def ar_step(session_id, proposed_B, active_B, words: int):
    """Active rows commit their proposed token (the host's matchers take it, or the length
    budget replaces it, see `jaxgen.constraints.budget`); returns (committed tokens [B], next
    masks [B, W]). Needs `ar_start` first. One operand and one result cross to the host (each
    buffer costs a few us of the round trip)."""
    B = proposed_B.shape[0]
    packed = jnp.concatenate([jnp.reshape(session_id, (1,)).astype(jnp.int32), proposed_B.astype(jnp.int32),
                              active_B.astype(jnp.int32)])
    out_BW = host_call(_ar_step_packed, [_spec((B, 1 + words))], packed)[0]
    return out_BW[:, 0], out_BW[:, 1:]


def _ar_step_packed(packed):
    """[session id, proposed [B], active [B]] -> [B, 1 + W]: committed tokens, then masks."""
    B = (packed.shape[0] - 1) // 2
    committed_B, mask_BW = _AR_STEP(packed[0], packed[1: B + 1], packed[B + 1:] != 0)
    return (np.concatenate([committed_B[:, None], mask_BW], axis=1),)


def advance(session_id, tokens_BK, counts_B, words: int):
    """Row b's matcher takes tokens[b, :counts[b]] (accepted draft tokens plus the bonus token,
    say); returns the next masks [B, W]."""
    B = tokens_BK.shape[0]
    return host_call(_ADVANCE, [_spec((B, words))], session_id, tokens_BK.astype(jnp.int32),
                     counts_B.astype(jnp.int32))[0]


def tree_masks(session_id, chunk_BT, parents, words: int):
    """int32 [B, T, W]: the grammar mask of the token after every node of a static draft tree.

    chunk_BT: [root, N nodes] per row; the root (column 0) is the last committed token, which
    the session's matchers have already taken. parents: T static ints, parents[0] = -1 and
    parents[j] < j. Node j's mask is the next-token mask after the committed prefix plus the
    tokens on the path root -> j (root excluded); a node the grammar refuses, and its subtree,
    gets an all-zero mask. The matchers are left as they were (each walk rolls back).
    """
    B, T = chunk_BT.shape
    return host_call(_TREE_MASKS, [_spec((B, T, words))], session_id, chunk_BT.astype(jnp.int32),
                     _checked_parents(parents, T))[0]


def budget_tree_masks(session_id, chunk_BT, parents, words: int):
    """`tree_masks` under AR's length budget (open the session with `ar_start`; commit with
    `budget_advance`): (masks int32 [B, T, W], free int32 [B]). Row b may accept at most
    free[b] draft nodes this step (deeper nodes' masks are zeros); the root's mask is AR's
    (only the witness's head when the row has no slack left). See `Budget.free_tokens`."""
    B, T = chunk_BT.shape
    return host_call(_BUDGET_TREE_MASKS, [_spec((B, T, words)), _spec((B,))], session_id,
                     chunk_BT.astype(jnp.int32), _checked_parents(parents, T))


def budget_advance(session_id, tokens_BK, counts_B):
    """Row b commits tokens[b, :counts[b]] through AR's length budget; returns the tokens
    committed [B, K] (the budget may replace a row's last one, as `ar_step` does)."""
    return host_call(_BUDGET_ADVANCE, [_spec(tokens_BK.shape)], session_id, tokens_BK.astype(jnp.int32),
                     counts_B.astype(jnp.int32))[0]


def _checked_parents(parents, T: int):
    parents = tuple(int(p) for p in parents)
    if not parents or parents[0] != -1 or any(not 0 <= p < j for j, p in enumerate(parents) if j):
        raise ValueError(f"parents={parents} must start with -1 and give each node an earlier parent")
    if T != len(parents):
        raise ValueError(f"chunk has {T} columns but parents names {len(parents)} nodes")
    return jnp.asarray(parents, jnp.int32)


def lave_step(session_id, gen_start_B, block_BK, proposal_BK, candidates_BK, words: int):
    """Diffusion: verify a step's candidate commits of the current block (see
    `jaxgen.constraints.lave`). Returns (commit [B, K] bool, tokens [B, K], frontier [B] (gen
    position of the leftmost masked token), frontier masks [B, W], complete [B] bool)."""
    B, K = block_BK.shape
    commit, tokens, frontier, fmask, complete = host_call(
        _LAVE_STEP, [_spec((B, K), jnp.bool_), _spec((B, K)), _spec((B,)), _spec((B, words)), _spec((B,), jnp.bool_)],
        session_id, gen_start_B.astype(jnp.int32), block_BK.astype(jnp.int32), proposal_BK.astype(jnp.int32),
        candidates_BK)
    return commit, tokens, frontier, fmask, complete
