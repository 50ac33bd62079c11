"""Sampling continuous-token AR models (`jaxgen.flow.continuous_ar`) on the decode skeleton.

causal / xar: one entity (block_size tokens; one token for causal) per step over the backbone's
  KV cache: each step feeds the previous entity's vectors (clean, t=1 for xar) at the next slots,
  reads z for the entity's positions and solves the head ODE from temperature * N(0, I) at t=0
  to t=1. Guided rows run the null class as extra batch rows with their own cache, fed the same
  generated tokens. Linear CFG follows xAR: scale_j = 1 + (s - 1) j / (n - 1) over entities.
mar: `num_iter` iterations, each a full bidirectional forward over [class | known tokens and
  [MASK]]; a random order per row; after iteration k the first mask_len_k tokens of the order
  stay masked, with MAR's mask_len_k = max(1, min(#masked - 1, floor(L cos(pi/2 (k+1)/K))))
  (all revealed at the last iteration), and the head is solved for the newly revealed positions
  only (a fixed-width gather of the widest iteration). Linear CFG is MAR's:
  scale_k = 1 + (s - 1)(L - mask_len_k) / L (mask_len_k of the formula, 1 at the last step).

CFG: v = v_null + s (v_cond - v_null) (s = 1: the conditional model; one doubled batch per head
evaluation); the Gaussian head guides its mean and keeps the conditional std. The whole loop is one
jitted `lax.while_loop` (`jaxgen.decoding.loop.run`); programs are cached per static option set.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import cache as cache_lib
from jaxgen.decoding import loop
from jaxgen.errors import ConfigError
from jaxgen.flow import continuous_ar as car
from jaxgen.flow import guidance, nets, solvers

CFG_SCHEDULES = ("constant", "linear")


def sample(params, spec: car.ContinuousARSpec, key, batch: int, *, steps: int = 32, method: str = "midpoint",
           cfg_scale: float = 1.0, cfg_schedule: str = "constant", num_iter: int = 64, temperature: float = 1.0,
           label_B=None):
    """x [batch, seq_len, token_dim] drawn from the model (see the module docstring).

    steps / method: the head's ODE grid (steps intervals from t=0 to 1; dopri5 adapts instead).
    cfg_scale (>= 0; 1 = no guidance) needs label_B on a class-conditional model; label_B=None
    samples the null class. num_iter: mar's unmasking iterations. temperature scales the source
    noise (MAR's noise temperature)."""
    _check_sample_args(spec, batch, steps, method, cfg_scale, cfg_schedule, num_iter, temperature, label_B)
    guided = label_B is not None and float(cfg_scale) != 1.0
    args = (params, spec, key, car.labels_or_null(spec, label_B, batch), jnp.float32(cfg_scale),
            jnp.float32(temperature))
    static = dict(batch=batch, steps=steps, method=method, linear=cfg_schedule == "linear", guided=guided)
    if spec.order == "mar":
        return _sample_mar(*args, num_iter=num_iter, **static)
    return _sample_blocks(*args, **static)


def _check_sample_args(spec, batch, steps, method, cfg_scale, cfg_schedule, num_iter, temperature, label_B):
    for name, value in (("batch", batch), ("steps", steps), ("num_iter", num_iter)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")
    solvers.check_method(method)
    if not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise ConfigError(f"cfg_scale={cfg_scale!r} must be a finite number >= 0 (1.0 = no guidance)")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ConfigError(f"unknown cfg_schedule {cfg_schedule!r}; use one of {', '.join(CFG_SCHEDULES)}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"temperature={temperature!r} must be a finite number >= 0 (scales the source noise)")
    car.check_labels(spec, label_B, batch)
    if float(cfg_scale) != 1.0 and label_B is None:
        raise ConfigError(f"cfg_scale={cfg_scale} guides toward a class: pass label_B (a class-conditional model, "
                          "num_classes > 0) or use cfg_scale=1.0")


# ---- the head ----

def head_sample(head, spec, cond, null, scale, noise_ND, *, steps: int, method: str):
    """[N, D] tokens from the head given cond = (z [N, E], label [N]) and, for CFG, null (the null
    class's (z, label)) and scale s; noise_ND is the (temperature-scaled) source sample."""
    if spec.gaussian_head:
        mean, log_std = car.gaussian_params(head, spec, *cond)
        if null is not None:
            mean_null, _ = car.gaussian_params(head, spec, *null)
            mean = mean_null + scale * (mean - mean_null)
        return mean + jnp.exp(log_std) * noise_ND

    def field(x, t, c):
        return nets.apply(head, spec.head, x, t, car.head_label(spec, c[1]), c[0])

    if null is None:
        velocity = lambda x, t: field(x, t, cond)
    else:  # guidance.guide's w = s - 1: (1 + w) v_cond - w v_null, one doubled batch
        velocity = guidance.guide(field, cond, null, scale - 1.0)
    grid = (0.0, 1.0) if method == "dopri5" else np.linspace(0.0, 1.0, steps + 1)
    return solvers.solve(velocity, noise_ND, grid, method)


def _halves(a, guided: bool, batch: int):
    """(conditional rows, null rows or None) of a row-doubled array."""
    return (a[:batch], a[batch:]) if guided else (a, None)


def _rows(label_B, spec, guided: bool):
    """Labels of the forward's rows: [cond | null] when guided."""
    if not guided:
        return label_B
    return jnp.concatenate([label_B, jnp.full_like(label_B, spec.null_label)])


def _solve_rows(params, spec, z_RNE, label_R, scale, noise_BND, *, batch, steps, method, guided):
    """Head samples [B, N, D] for N positions per row from their z (rows doubled when guided)."""
    B, N, D = noise_BND.shape
    flat = lambda a: a.reshape((-1,) + a.shape[2:])
    z_c, z_u = _halves(z_RNE, guided, batch)
    lab_R = jnp.repeat(label_R[:, None], N, axis=1)
    l_c, l_u = _halves(lab_R, guided, batch)
    null = None if z_u is None else (flat(z_u), flat(l_u))
    x = head_sample(params["head"], spec, (flat(z_c), flat(l_c)), null, scale, flat(noise_BND), steps=steps,
                    method=method)
    return x.reshape(B, N, D)


# ---- causal / xar: one entity per step over the KV cache ----

@functools.partial(jax.jit, static_argnames=("spec", "batch", "steps", "method", "linear", "guided"))
def _sample_blocks(params, spec, key, label_B, cfg_scale, temperature, *, batch, steps, method, linear, guided):
    B, b, n, D = batch, spec.block_size, spec.num_entities, spec.token_dim
    label_R = _rows(label_B, spec, guided)
    R = label_R.shape[0]
    dup = (lambda a: jnp.concatenate([a, a])) if guided else (lambda a: a)

    def forward(state):
        z, cache = car.hidden(params, spec, state.carry, cache=state.cache)
        return z, cache, 1

    def propose(z_RbE, state):
        j = state.step
        scale = cfg_scale
        if linear:
            scale = 1.0 + (cfg_scale - 1.0) * (j / max(n - 1, 1) if n > 1 else 1.0)
        noise = temperature * jax.random.normal(loop.step_key(key, j), (B, b, D))
        return _solve_rows(params, spec, z_RbE, label_R, scale, noise, batch=B, steps=steps, method=method,
                           guided=guided)

    def update(state, x_BbD, commit, cache):
        canvas = jax.lax.dynamic_update_slice_in_dim(state.tokens, x_BbD, state.step * b, axis=1)
        nxt = dup(car.context_inputs(params, spec, x_BbD))  # clean context (t=1 for xar)
        return state.replace(tokens=canvas, cache=cache, carry=nxt)

    recipe = loop.Recipe(forward=forward, propose=propose, rule=lambda proposal, state: None, update=update)
    first = jnp.broadcast_to(car.class_rows(params, label_R)[:, None], (R, b, spec.backbone.hidden_size))
    cache = cache_lib.init_cache(spec.model_cfg, R, spec.seq_len)
    state = loop.new_state(jnp.zeros((B, spec.seq_len, D), jnp.float32), cache, carry=first)
    return loop.run(recipe, state, n).tokens


# ---- mar: K bidirectional iterations, cosine unmasking in a random order ----

def mar_schedule(seq_len: int, num_iter: int):
    """Static per-iteration (masked before, masked after, mask_len for the CFG schedule), MAR's
    `sample_tokens` arithmetic: mask_len = max(1, min(#masked - 1, floor(L cos(pi/2 (k+1)/K))))."""
    before, after, cfg_len = [], [], []
    masked = seq_len
    for k in range(num_iter):
        mask_len = max(1, min(masked - 1, int(np.floor(seq_len * np.cos(math.pi / 2.0 * (k + 1) / num_iter)))))
        nxt = 0 if k == num_iter - 1 else mask_len
        before.append(masked), after.append(nxt), cfg_len.append(mask_len)
        masked = nxt
    return np.asarray(before, np.int32), np.asarray(after, np.int32), np.asarray(cfg_len, np.int32)


def reveal_positions(order_BL, before, after, k, *, width: int):
    """[B, width] the positions revealed at iteration k: order[after[k]:before[k]] (the tokens that
    leave the masked prefix of the order), padded with L (an index the canvas write drops)."""
    B, L = order_BL.shape
    order_pad = jnp.concatenate([order_BL, jnp.full((B, width), L, order_BL.dtype)], axis=1)
    pos = jax.lax.dynamic_slice_in_dim(order_pad, after[k], width, axis=1)
    return jnp.where(jnp.arange(width) < before[k] - after[k], pos, L)


@functools.partial(jax.jit, static_argnames=("spec", "batch", "steps", "method", "linear", "guided", "num_iter"))
def _sample_mar(params, spec, key, label_B, cfg_scale, temperature, *, batch, steps, method, linear, guided,
                num_iter):
    B, L, D = batch, spec.seq_len, spec.token_dim
    before, after, cfg_len = mar_schedule(L, num_iter)
    width = int(np.max(before - after))  # widest reveal: the head's static gather
    before, after, cfg_len = jnp.asarray(before), jnp.asarray(after), jnp.asarray(cfg_len)
    label_R = _rows(label_B, spec, guided)
    dup = (lambda a: jnp.concatenate([a, a])) if guided else (lambda a: a)
    k_order, k_noise = jax.random.split(key)
    order_BL = jax.random.permutation(k_order, jnp.tile(jnp.arange(L), (B, 1)), axis=1, independent=True)
    rank_BL = jnp.argsort(order_BL, axis=1)

    reveal = functools.partial(reveal_positions, order_BL, before, after, width=width)

    def forward(state):
        masked = rank_BL < before[state.step]
        z, _ = car.hidden(params, spec, car.mar_inputs(params, label_R, dup(state.tokens), dup(masked)))
        return z[:, 1:], None, 1

    def propose(z_RLE, state):
        k = state.step
        pos_R = dup(jnp.minimum(reveal(k), L - 1))
        z_RWE = jnp.take_along_axis(z_RLE, pos_R[..., None], axis=1)
        scale = 1.0 + (cfg_scale - 1.0) * (L - cfg_len[k]) / L if linear else cfg_scale
        noise = temperature * jax.random.normal(loop.step_key(k_noise, k), (B, width, D))
        return _solve_rows(params, spec, z_RWE, label_R, scale, noise, batch=B, steps=steps, method=method,
                           guided=guided)

    def update(state, x_BWD, commit, cache):
        rows = jnp.arange(B)[:, None]
        canvas = state.tokens.at[rows, reveal(state.step)].set(x_BWD, mode="drop")
        return state.replace(tokens=canvas)

    recipe = loop.Recipe(forward=forward, propose=propose, rule=lambda proposal, state: None, update=update)
    state = loop.new_state(jnp.zeros((B, L, D), jnp.float32))
    return loop.run(recipe, state, num_iter).tokens
