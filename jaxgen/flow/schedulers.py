"""Affine-path schedulers: alpha_t (weight of data x_1), sigma_t (weight of noise x_0) and their
time derivatives, with data at t=1 and noise at t=0 (the flow_matching convention, spec §0).

Each scheduler is a frozen dataclass (hashable, so it can be a static jit argument or be closed
over) whose `__call__(t)` returns a `SchedulerOutput` of arrays shaped like `t`. The formulas are
the reference's (flow_matching.path.scheduler), written out so values match it numerically:

    cond_ot         alpha = t               sigma = 1 - t
    polynomial(n)   alpha = t**n            sigma = 1 - t**n
    vp(b, B)        T = (1-t)**2 (B-b)/2 + (1-t) b;  alpha = exp(-T/2), sigma = sqrt(1 - exp(-T))
    linear_vp       alpha = t               sigma = sqrt(1 - t**2)
    cosine          alpha = sin(pi t / 2)   sigma = cos(pi t / 2)

`snr_inverse(snr)` gives t from alpha_t / sigma_t. Convex schedulers (alpha + sigma = 1: cond_ot,
polynomial) also give `kappa_inverse(kappa)` (t from kappa_t = alpha_t), which the discrete
mixture path needs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax.numpy as jnp

from jaxgen.errors import ConfigError


class SchedulerOutput(NamedTuple):
    alpha_t: jnp.ndarray
    sigma_t: jnp.ndarray
    d_alpha_t: jnp.ndarray
    d_sigma_t: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class CondOT:
    """alpha = t, sigma = 1 - t (rectified flow / conditional OT)."""
    convex = True

    def __call__(self, t) -> SchedulerOutput:
        t = jnp.asarray(t)
        one = jnp.ones_like(t)
        return SchedulerOutput(t, 1 - t, one, -one)

    def kappa_inverse(self, kappa):
        return jnp.asarray(kappa)

    def snr_inverse(self, snr):
        return self.kappa_inverse(snr / (1.0 + snr))


@dataclasses.dataclass(frozen=True)
class Polynomial:
    """alpha = t**n, sigma = 1 - t**n (n > 0)."""
    n: float
    convex = True

    def __post_init__(self):
        if not isinstance(self.n, (int, float)) or isinstance(self.n, bool) or not self.n > 0:
            raise ConfigError(f"polynomial scheduler exponent n={self.n!r} must be a positive number, e.g. 2.0")

    def __call__(self, t) -> SchedulerOutput:
        t = jnp.asarray(t)
        n = self.n
        d = n * t ** (n - 1)
        return SchedulerOutput(t ** n, 1 - t ** n, d, -d)

    def kappa_inverse(self, kappa):
        return jnp.power(jnp.asarray(kappa), 1.0 / self.n)

    def snr_inverse(self, snr):
        return self.kappa_inverse(snr / (1.0 + snr))


@dataclasses.dataclass(frozen=True)
class VP:
    """Variance preserving (the DDPM/score-SDE VP schedule), alpha**2 + sigma**2 = 1."""
    beta_min: float = 0.1
    beta_max: float = 20.0
    convex = False

    def __post_init__(self):
        if not 0 <= self.beta_min < self.beta_max:
            raise ConfigError(f"vp scheduler needs 0 <= beta_min < beta_max, got beta_min={self.beta_min}, "
                              f"beta_max={self.beta_max}")

    def __call__(self, t) -> SchedulerOutput:
        t = jnp.asarray(t)
        b, B = self.beta_min, self.beta_max
        T = 0.5 * (1 - t) ** 2 * (B - b) + (1 - t) * b
        dT = -(1 - t) * (B - b) - b
        e_half, e = jnp.exp(-0.5 * T), jnp.exp(-T)
        sigma = jnp.sqrt(1 - e)
        return SchedulerOutput(e_half, sigma, -0.5 * dT * e_half, 0.5 * dT * e / sigma)

    def snr_inverse(self, snr):
        snr = jnp.asarray(snr)
        b, B = self.beta_min, self.beta_max
        T = -jnp.log(snr ** 2 / (snr ** 2 + 1))
        return 1 - (-b + jnp.sqrt(b ** 2 + 2 * (B - b) * T)) / (B - b)


@dataclasses.dataclass(frozen=True)
class LinearVP:
    """alpha = t, sigma = sqrt(1 - t**2)."""
    convex = False

    def __call__(self, t) -> SchedulerOutput:
        t = jnp.asarray(t)
        sigma = (1 - t ** 2) ** 0.5
        return SchedulerOutput(t, sigma, jnp.ones_like(t), -t / sigma)

    def snr_inverse(self, snr):
        snr = jnp.asarray(snr)
        return jnp.sqrt(snr ** 2 / (1 + snr ** 2))


@dataclasses.dataclass(frozen=True)
class Cosine:
    """alpha = sin(pi t / 2), sigma = cos(pi t / 2)."""
    convex = False

    def __call__(self, t) -> SchedulerOutput:
        t = jnp.asarray(t)
        h = math.pi / 2
        s, c = jnp.sin(h * t), jnp.cos(h * t)
        return SchedulerOutput(s, c, h * c, -h * s)

    def snr_inverse(self, snr):
        return 2.0 * jnp.arctan(jnp.asarray(snr)) / math.pi


def cond_ot() -> CondOT:
    return CondOT()


def polynomial(n: float) -> Polynomial:
    return Polynomial(n)


def vp(beta_min: float = 0.1, beta_max: float = 20.0) -> VP:
    return VP(beta_min, beta_max)


def linear_vp() -> LinearVP:
    return LinearVP()


def cosine() -> Cosine:
    return Cosine()


SCHEDULERS = {"cond_ot": cond_ot, "polynomial": polynomial, "vp": vp, "linear_vp": linear_vp, "cosine": cosine}


def get(name: str, **kwargs):
    """The scheduler called `name` (one of SCHEDULERS), built with `kwargs` (e.g. n=2 for polynomial)."""
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; valid schedulers: {', '.join(SCHEDULERS)}")
    try:
        return SCHEDULERS[name](**kwargs)
    except TypeError as e:
        raise ConfigError(f"scheduler {name!r} got bad arguments {kwargs}: {e}") from None


def check_convex(scheduler, what: str) -> None:
    """Refuse a non-convex scheduler where kappa_t = alpha_t must be a mixing probability."""
    if not getattr(scheduler, "convex", False):
        raise ConfigError(f"{what} needs a convex scheduler (alpha_t + sigma_t = 1: cond_ot or polynomial), "
                          f"got {type(scheduler).__name__}")
