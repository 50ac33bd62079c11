"""The constraint as rules of a diffusion sampler's recipe (device side of `lave`): wraps the
sampler's own propose / rule / update, adding three carry fields.

- propose: the frontier column of the block (leftmost masked position, everything left of it
  committed) is drawn under the grammar mask there; other columns as the sampler draws them.
- rule: the sampler's commit mask becomes the candidates, which the host verifies
  (`device.lave_step`): a commit mask that may differ, and the tokens to write.
- update: the sampler's own update with those tokens and that mask; a row whose grammar is
  complete has every masked column of its output filled with EOS.

Carry fields: "frontier" [B] (gen position), "fmask" [B, W] (its grammar mask), "complete" [B].
Block transitions must keep them (`keep_fields`).
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxgen.constraints import device

FIELDS = ("frontier", "fmask", "complete")


def initial_fields(session_id, batch: int, words: int) -> dict:
    return dict(frontier=jnp.zeros((batch,), jnp.int32), fmask=device.first_masks(session_id, batch, words),
                complete=jnp.zeros((batch,), bool))


def keep_fields(transition):
    """`transition(state) -> state` that keeps the constraint's carry fields of its input."""

    def kept(state):
        new = transition(state)
        return new.replace(carry=dict(new.carry, **{k: state.carry[k] for k in FIELDS}))

    return kept


def lave_rules(propose, rule, update, *, session_id, words: int, gen_start, current_block, out_start_B, out_end_B,
               mask_id: int, eos_id: int):
    """(propose, rule, update) of a constrained step. gen_start(state) -> [B] gen position of
    the block's first column; current_block(state) -> [B, K] its tokens; columns
    [out_start_B, out_end_B) of the canvas are each row's output, EOS-filled on completion."""

    def constrained_propose(logits_BKV, state):
        K = logits_BKV.shape[1]
        at_frontier_BK = jnp.arange(K)[None, :] == (state.carry["frontier"] - gen_start(state))[:, None]
        masked = device.apply_mask(logits_BKV, state.carry["fmask"][:, None, :])
        return propose(jnp.where(at_frontier_BK[..., None], masked, logits_BKV), state)

    def constrained_rule(proposal, state):
        candidates_BK = rule(proposal, state)
        return device.lave_step(session_id, gen_start(state), current_block(state), proposal[0], candidates_BK, words)

    def constrained_update(state, proposal, verdict, cache):
        commit_BK, tokens_BK, frontier_B, fmask_BW, complete_B = verdict
        state = update(state, (tokens_BK, *proposal[1:]), commit_BK, cache)
        col = jnp.arange(state.tokens.shape[1])[None, :]
        output = (col >= out_start_B[:, None]) & (col < out_end_B[:, None])
        fill = complete_B[:, None] & output & (state.tokens == mask_id)
        carry = dict(state.carry, frontier=frontier_B, fmask=fmask_BW, complete=complete_B)
        return state.replace(tokens=jnp.where(fill, eos_id, state.tokens), carry=carry)

    return constrained_propose, constrained_rule, constrained_update
