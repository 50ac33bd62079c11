"""The one decode skeleton: a state pytree and `run`, a `lax.while_loop` over recipe steps.

A sampler is a `Recipe`: how a step runs the model (`forward`), proposes tokens (`propose`),
chooses what to commit (`rule`) and writes the result (`update`), plus optional maintenance
between steps (`after`: block transitions, K/V writes) and the loop condition (`active`).
Samplers hold no loop of their own; everything static (lengths, block size, modes) is closed
over by the recipe, everything dynamic lives in the state.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class SamplerOutput:
    tokens: jax.Array  # [B, P + N]
    nfe: jax.Array  # int32 scalar: model forward passes


@flax.struct.dataclass
class DecodeState:
    tokens: jax.Array  # [B, T] the canvas
    cache: Any  # a jaxgen.cache.KVCache, or None
    step: jax.Array  # int32: loop iterations so far
    nfe: jax.Array  # int32: model forwards so far
    done: jax.Array  # bool [B]: rows that finished (they idle)
    carry: Any = None  # the recipe's own fields (a pytree)


def new_state(tokens, cache=None, *, nfe=0, carry=None, done=None) -> DecodeState:
    B = tokens.shape[0]
    done = jnp.zeros((B,), bool) if done is None else done
    return DecodeState(tokens, cache, jnp.int32(0), jnp.int32(nfe), done, carry)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One sampler's rules (see the module docstring). Signatures:

    forward(state) -> (logits, cache, forwards run)
    propose(logits, state) -> proposal (a pytree; e.g. (tokens, scores))
    rule(proposal, state) -> commit (a pytree; e.g. a [B, L] mask)
    update(state, proposal, commit, cache) -> state
    after(state) -> state                     (default: unchanged)
    active(state) -> bool scalar              (default: some row not done)
    """
    forward: Callable
    propose: Callable
    rule: Callable
    update: Callable
    after: Callable | None = None
    active: Callable | None = None


def step(recipe: Recipe, state: DecodeState) -> DecodeState:
    """One iteration: forward, propose, rule, update, then maintenance; counts forwards."""
    logits, cache, forwards = recipe.forward(state)
    proposal = recipe.propose(logits, state)
    commit = recipe.rule(proposal, state)
    state = recipe.update(state, proposal, commit, cache)
    state = state.replace(step=state.step + 1, nfe=state.nfe + forwards)
    state = state if recipe.after is None else recipe.after(state)
    for observer in _OBSERVERS:  # traced in only inside `observe_steps`
        jax.debug.callback(observer, state.step, state.nfe, state.tokens, ordered=True)
    return state


_OBSERVERS: list[Callable] = []


@contextlib.contextmanager
def observe_steps(observer: Callable):
    """Within the block, every decode-loop step of every sampler calls `observer(step, nfe,
    tokens)` on the host with the canvas after it (`jax.debug.callback`): the sampler's own
    program, same key and arithmetic, plus one host copy per step. Compiled programs are dropped
    on entry and exit (`jax.clear_caches`) so the callback is traced in, and out again."""
    _OBSERVERS.append(observer)
    jax.clear_caches()
    try:
        yield
    finally:
        _OBSERVERS.remove(observer)
        jax.clear_caches()


def run(recipe: Recipe, state: DecodeState, max_steps: int) -> DecodeState:
    """Step until no row is active or `max_steps` iterations ran (a static bound)."""
    active = recipe.active or (lambda s: ~jnp.all(s.done))
    return jax.lax.while_loop(lambda s: (s.step < max_steps) & active(s), lambda s: step(recipe, s), state)


def step_key(key, *indices):
    """The key of one step: `key` folded with each index in turn."""
    for i in indices:
        key = jax.random.fold_in(key, i)
    return key


def take_at(x_BL, idx_B):
    """x[b, idx[b]] for each row (x [B, L, ...])."""
    return x_BL[jnp.arange(x_BL.shape[0]), idx_B]
