"""The affine probability path x_t = sigma_t x_0 + alpha_t x_1 (x_0 source noise, x_1 data) and
the closed-form conversions between the three things a network may predict at (x_t, t): the
velocity v = dx_t/dt, the data x_1 ("target", x-prediction) and the noise x_0 ("epsilon").

All are pure functions of a scheduler (see `schedulers`); `t` is a scalar or a [B] vector that is
broadcast over the trailing axes of x (as the reference's AffineProbPath does). Each conversion is
linear in its two arguments, with the coefficients of flow_matching.path.AffineProbPath.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from jaxgen.errors import JaxgenError


class PathSample(NamedTuple):
    x_t: jnp.ndarray
    dx_t: jnp.ndarray


def expand_t(t, x):
    """`t` (scalar or [B]) shaped to broadcast against x [B, ...]."""
    t = jnp.asarray(t, dtype=jnp.result_type(x))
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise JaxgenError(f"t must be a scalar or a [batch] vector matching x's batch {x.shape[0]}, got shape "
                          f"{t.shape}")
    return t.reshape(t.shape + (1,) * (x.ndim - 1))


def _coeffs(scheduler, t, x):
    return scheduler(expand_t(t, x))


def sample(scheduler, x_0, x_1, t) -> PathSample:
    """(x_t, dx_t) on the path: x_t = sigma_t x_0 + alpha_t x_1, dx_t = sigma'_t x_0 + alpha'_t x_1."""
    if jnp.shape(x_0) != jnp.shape(x_1):
        raise JaxgenError(f"x_0 and x_1 must have one shape, got {jnp.shape(x_0)} and {jnp.shape(x_1)}")
    a, s, da, ds = _coeffs(scheduler, t, x_1)
    return PathSample(s * x_0 + a * x_1, ds * x_0 + da * x_1)


def target_to_velocity(scheduler, x_1, x_t, t):
    """v from a predicted x_1: (sigma'/sigma) x_t + ((alpha' sigma - sigma' alpha)/sigma) x_1."""
    a, s, da, ds = _coeffs(scheduler, t, x_t)
    return (ds / s) * x_t + ((da * s - ds * a) / s) * x_1


def epsilon_to_velocity(scheduler, epsilon, x_t, t):
    """v from a predicted x_0: (alpha'/alpha) x_t + ((sigma' alpha - alpha' sigma)/alpha) eps."""
    a, s, da, ds = _coeffs(scheduler, t, x_t)
    return (da / a) * x_t + ((ds * a - da * s) / a) * epsilon


def velocity_to_target(scheduler, velocity, x_t, t):
    """x_1 from a predicted v: (-sigma' x_t + sigma v) / (alpha' sigma - sigma' alpha)."""
    a, s, da, ds = _coeffs(scheduler, t, x_t)
    det = da * s - ds * a
    return (-ds / det) * x_t + (s / det) * velocity


def epsilon_to_target(scheduler, epsilon, x_t, t):
    """x_1 from a predicted x_0: (x_t - sigma eps) / alpha."""
    a, s, _, _ = _coeffs(scheduler, t, x_t)
    return (1 / a) * x_t + (-s / a) * epsilon


def velocity_to_epsilon(scheduler, velocity, x_t, t):
    """x_0 from a predicted v: (-alpha' x_t + alpha v) / (sigma' alpha - alpha' sigma)."""
    a, s, da, ds = _coeffs(scheduler, t, x_t)
    det = ds * a - da * s
    return (-da / det) * x_t + (a / det) * velocity


def target_to_epsilon(scheduler, x_1, x_t, t):
    """x_0 from a predicted x_1: (x_t - alpha x_1) / sigma."""
    a, s, _, _ = _coeffs(scheduler, t, x_t)
    return (1 / s) * x_t + (-a / s) * x_1


PARAMS = ("v", "x", "eps")  # velocity, data x_1, noise x_0

_CONVERT = {("x", "v"): target_to_velocity, ("eps", "v"): epsilon_to_velocity, ("v", "x"): velocity_to_target,
            ("eps", "x"): epsilon_to_target, ("v", "eps"): velocity_to_epsilon, ("x", "eps"): target_to_epsilon}


def convert(scheduler, pred, x_t, t, *, src: str, dst: str):
    """`pred` (a prediction of kind `src`) as a prediction of kind `dst`; kinds are PARAMS."""
    for name, kind in (("src", src), ("dst", dst)):
        if kind not in PARAMS:
            raise JaxgenError(f"unknown prediction kind {name}={kind!r}; valid kinds: {', '.join(PARAMS)} "
                              "(velocity, data x_1, noise x_0)")
    if src == dst:
        return pred
    return _CONVERT[(src, dst)](scheduler, pred, x_t, t)


def schedule_transform(velocity_fn, original, new):
    """velocity(x, r) of a model trained on scheduler `original`, re-timed onto scheduler `new`
    (the reference's ScheduleTransformedModel): with t_r = snr_inv(alpha_r / sigma_r) and
    s_r = sigma_r / sigma_{t_r}, u_r(x) = (s'_r / s_r) x + t'_r s_r u_{t_r}(x / s_r).
    `r` is a scalar (as `solve` passes it) or a [B] vector; velocity_fn is called with t of r's shape."""
    def velocity(x, r):
        r = jnp.asarray(r, jnp.result_type(x))
        a_r, s_r_, da_r, ds_r_ = new(r)
        t = original.snr_inverse(a_r / s_r_)
        a_t, s_t, da_t, ds_t = original(t)
        s = s_r_ / s_t
        dt = s_t * s_t * (s_r_ * da_r - a_r * ds_r_) / (s_r_ * s_r_ * (s_t * da_t - a_t * ds_t))
        ds = (s_t * ds_r_ - s_r_ * ds_t * dt) / (s_t * s_t)
        b = lambda v: expand_t(v, x)
        return b(ds) * x / b(s) + b(dt) * b(s) * velocity_fn(x / b(s), t)
    return velocity
