"""Conditional flow-matching losses and training-time samplers (noise at t=0, data at t=1).

Time samplers take a key and a shape and return t in [0, 1]:
    uniform_t        U(t_min, t_max)
    logit_normal_t   sigmoid(N(mean, std)); the flow_matching image example's "skewed" sampler is
                     logit_normal_t(mean=1.2, std=1.2) clipped to [1e-4, 1] (more weight near data)
    shifted_t        SD3's resolution shift applied to a uniform t (see `shift_time`)

`fm_loss` is the regression of one prediction kind ("v" velocity, "x" data x_1, "eps" noise x_0)
measured in one space (`loss_space`, default the prediction's own); e.g. param="x",
loss_space="v" is the "Back to Basics" recipe (predict x, regress velocity).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.errors import ConfigError
from jaxgen.flow import paths
from jaxgen.flow.schedulers import cond_ot


def uniform_t(key, shape=(), t_min: float = 0.0, t_max: float = 1.0):
    return jax.random.uniform(key, shape, minval=t_min, maxval=t_max)


def logit_normal_t(key, shape=(), mean: float = 0.0, std: float = 1.0):
    """t = sigmoid(n), n ~ N(mean, std^2) (SD3 / xAR use mean 0, std 1)."""
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, shape))


def shift_time(t, shift: float):
    """SD3's time shift in our convention: with noise level s = 1 - t, s' = shift s / (1 + (shift-1) s);
    so t' = t / (t + shift (1 - t)). shift > 1 moves t toward the noise end (t=0); shift = 1 is identity."""
    return t / (t + shift * (1 - t))


def shifted_t(key, shape=(), shift: float = 3.0):
    """A uniform t under `shift_time` (SD3 uses shift 3.0 at 1024px)."""
    return shift_time(uniform_t(key, shape), shift)


T_SAMPLERS = {"uniform": uniform_t, "logit_normal": logit_normal_t, "shifted": shifted_t}


def t_sampler(name: str, **kwargs):
    """`key, shape -> t` for the sampler called `name` (one of T_SAMPLERS) with `kwargs` bound."""
    if name not in T_SAMPLERS:
        raise ConfigError(f"unknown time sampler {name!r}; valid samplers: {', '.join(T_SAMPLERS)}")
    fn = T_SAMPLERS[name]
    return lambda key, shape=(): fn(key, shape, **kwargs)


def _reduce(err, reduction: str):
    if reduction == "mean":
        return jnp.mean(err)
    if reduction == "none":  # per example
        return jnp.mean(err.reshape(err.shape[0], -1), axis=-1)
    raise ConfigError(f"unknown reduction {reduction!r}; valid: mean, none")


def fm_loss(pred, x_0, x_1, t, *, scheduler=None, param: str = "v", loss_space: str | None = None,
            reduction: str = "mean"):
    """Squared error of a prediction `pred` made at x_t = path(x_0, x_1, t).

    pred is the network's output of kind `param` (v, x or eps); it is converted to `loss_space`
    (default: `param`) and compared to that space's target (dx_t, x_1 or x_0). Returns the mean
    (reduction="mean") or a per-example [B] vector (reduction="none")."""
    scheduler = scheduler or cond_ot()
    loss_space = loss_space or param
    x_t, dx_t = paths.sample(scheduler, x_0, x_1, t)
    target = {"v": dx_t, "x": x_1, "eps": x_0}.get(loss_space)
    pred = paths.convert(scheduler, pred, x_t, t, src=param, dst=loss_space)
    return _reduce(jnp.square(pred - target), reduction)


def cfm_loss(apply_fn, x_1, key, *, scheduler=None, param: str = "v", loss_space: str | None = None,
             sample_t=uniform_t, reduction: str = "mean"):
    """The conditional FM loss end to end: x_0 ~ N(0, I), t ~ sample_t(key, [B]), pred = apply_fn(x_t, t)."""
    k0, kt = jax.random.split(key)
    x_0 = jax.random.normal(k0, x_1.shape, x_1.dtype)
    t = sample_t(kt, (x_1.shape[0],)).astype(x_1.dtype)
    x_t, _ = paths.sample(scheduler or cond_ot(), x_0, x_1, t)
    return fm_loss(apply_fn(x_t, t), x_0, x_1, t, scheduler=scheduler, param=param, loss_space=loss_space,
                   reduction=reduction)
