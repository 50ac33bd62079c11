"""Discrete flow matching on the mixture path (reference: flow_matching's MixtureDiscreteProbPath,
MixturePathGeneralizedKL and MixtureDiscreteEulerSolver).

Tokens x [B, ...] (ints in [0, V)). With a convex scheduler, kappa_t = alpha_t and sigma_t = 1 - kappa_t:
each coordinate of x_t is x_0 with probability sigma_t, else x_1 (noise/source at t=0, data at t=1).
A model predicts the posterior p_{1|t}(x_1 | x_t) over V per coordinate.

Solver step from t to t + h, per coordinate (MixtureDiscreteEulerSolver semantics):
  x1_hat ~ p_{1|t};  u = kappa'/(1-kappa) delta_{x1_hat}
        [+ div_free kappa'/(kappa(1-kappa)) ((1-kappa) p_0 + kappa delta_{x1_hat})];
  u[x_t] = 0;  lambda = sum u;  jump w.p. 1 - exp(-h lambda) to a draw from u / lambda.
The LAST step returns x1_hat itself (no jump), as the reference does.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import JaxgenError
from jaxgen.flow.schedulers import check_convex


def _t_like(t, x):
    """t (scalar or [B]) broadcast against x [B, ...]."""
    t = jnp.asarray(t, jnp.float32)
    return t if t.ndim == 0 else t.reshape(t.shape + (1,) * (x.ndim - 1))


def mixture_sample(scheduler, x_0, x_1, t, key):
    """x_t: x_0 where U < sigma_t (probability 1 - kappa_t), else x_1."""
    check_convex(scheduler, "the mixture discrete path")
    if jnp.shape(x_0) != jnp.shape(x_1):
        raise JaxgenError(f"x_0 and x_1 must have one shape, got {jnp.shape(x_0)} and {jnp.shape(x_1)}")
    sigma = scheduler(_t_like(t, x_1)).sigma_t
    return jnp.where(jax.random.uniform(key, jnp.shape(x_1)) < sigma, x_0, x_1)


def posterior_to_velocity(scheduler, posterior_logits, x_t, t):
    """u_t = kappa'/(1-kappa) (softmax(logits) - onehot(x_t)), [..., V]."""
    V = posterior_logits.shape[-1]
    out = scheduler(_t_like(t, posterior_logits))
    return (out.d_alpha_t / (1 - out.alpha_t)) * (jax.nn.softmax(posterior_logits, -1) - jax.nn.one_hot(x_t, V))


def _reduce(loss, reduction):
    if reduction == "mean":
        return jnp.mean(loss)
    if reduction == "sum":
        return jnp.sum(loss)
    if reduction == "none":
        return loss
    raise JaxgenError(f"unknown reduction {reduction!r}; valid: mean, sum, none")


def generalized_kl_loss(scheduler, logits, x_1, x_t, t, reduction: str = "mean"):
    """-kappa'/(1-kappa) [p(x_t) - delta(x_1, x_t) + (1 - delta(x_1, x_t)) log p(x_1)], p = softmax(logits)."""
    logp = jax.nn.log_softmax(logits, -1)
    logp_x1 = jnp.take_along_axis(logp, x_1[..., None], -1)[..., 0]
    p_xt = jnp.exp(jnp.take_along_axis(logp, x_t[..., None], -1)[..., 0])
    out = scheduler(_t_like(t, x_1))
    jump = out.d_alpha_t / (1 - out.alpha_t)
    same = (x_t == x_1).astype(logp.dtype)
    return _reduce(-jump * (p_xt - same + (1 - same) * logp_x1), reduction)


def cross_entropy_loss(logits, x_1, reduction: str = "mean"):
    """Plain -log p_{1|t}(x_1 | x_t) per coordinate."""
    logp = jax.nn.log_softmax(logits, -1)
    return _reduce(-jnp.take_along_axis(logp, x_1[..., None], -1)[..., 0], reduction)


def jump_rates(scheduler, x_t, x1_hat, t, vocab_size: int, div_free=0.0, source_p=None):
    """The step's rates u [..., V] (zero at x_t) given the sampled x1_hat; t a scalar."""
    out = scheduler(jnp.asarray(t, jnp.float32))
    k, dk = out.alpha_t, out.d_alpha_t
    delta_1 = jax.nn.one_hot(x1_hat, vocab_size, dtype=jnp.float32)
    u = dk / (1 - k) * delta_1
    if source_p is not None and not (isinstance(div_free, (int, float)) and div_free == 0.0):
        w = div_free(t) if callable(div_free) else div_free
        extra = w * dk / (k * (1 - k)) * ((1 - k) * source_p + k * delta_1)
        u = u + jnp.where(jnp.asarray(w) > 0, extra, 0.0)
    return jnp.where(jax.nn.one_hot(x_t, vocab_size, dtype=bool), 0.0, u)


def _gumbel_argmax(logits, uniform):
    """A categorical draw from `logits` given uniforms of the same shape (Gumbel-max)."""
    return jnp.argmax(logits - jnp.log(-jnp.log(uniform)), axis=-1)


def _uniforms(key, shape, n):
    return jax.random.uniform(key, shape + (n,), minval=jnp.finfo(jnp.float32).tiny, maxval=1.0)


def jump_step(key, x_t, u, h):
    """Jump each coordinate w.p. 1 - exp(-h sum u) to a draw from u (normalised); one uniform draw."""
    U = _uniforms(key, x_t.shape, u.shape[-1] + 1)
    jump = U[..., -1] < 1 - jnp.exp(-h * u.sum(-1))
    return jnp.where(jump, _gumbel_argmax(jnp.log(u), U[..., :-1]), x_t).astype(x_t.dtype)


def discretization(time_grid, step_size):
    """The reference's steps: the grid itself, or t0 + k h for k < ceil((T - t0)/h) then T (float32)."""
    if step_size is None:
        return np.asarray(time_grid, np.float32)
    t0, t1 = (float(np.float32(v)) for v in (time_grid[0], time_grid[-1]))
    if not step_size > 0:
        raise JaxgenError(f"step_size={step_size!r} must be positive (or None to step on the time_grid)")
    if not t1 - t0 > step_size:
        raise JaxgenError(f"time interval [{t0}, {t1}] must be longer than step_size={step_size} (and increasing); "
                          "use a smaller step_size")
    n = math.ceil((t1 - t0) / step_size)
    return np.asarray([t0 + step_size * i for i in range(n)] + [t1], np.float32)


def euler_solve(posterior_fn, x_init, key, scheduler, time_grid=(0.0, 1.0), step_size=None, *, div_free=0.0,
                source_p=None, return_intermediates: bool = False):
    """Sample tokens by the mixture-path Euler CTMC solver (see the module docstring).

    posterior_fn(x, t_B) -> probabilities [B, ..., V] (not logits), t_B the step's time repeated over
    the batch. `div_free` is a float or a function of t; a nonzero one needs `source_p` [V]. The
    grid must be concrete and increasing. With return_intermediates, states at the discretization
    points nearest to each time_grid point (the first is x_init), stacked on axis 0."""
    check_convex(scheduler, "the mixture discrete Euler solver")
    g = np.asarray(time_grid, np.float64)
    if g.ndim != 1 or len(g) < 2 or not np.all(np.diff(g) > 0):
        raise JaxgenError(f"time_grid {g.tolist()} must be a strictly increasing sequence of >= 2 times, "
                          "e.g. (0.0, 1.0)")
    if not (isinstance(div_free, (int, float)) and div_free == 0.0) and source_p is None:
        raise JaxgenError("a nonzero div_free term needs source_p, the source distribution [vocab_size]")
    disc = discretization(time_grid, step_size)
    B = x_init.shape[0]
    V = jax.eval_shape(posterior_fn, x_init, jnp.zeros((B,), jnp.float32)).shape[-1]
    if source_p is not None:
        source_p = jnp.asarray(source_p, jnp.float32)
        if source_p.shape != (V,):
            raise JaxgenError(f"source_p must have shape [{V}] (the vocabulary), got {source_p.shape}")

    nearest = np.abs(np.asarray(time_grid, np.float32)[:, None] - disc[None, :]).argmin(1)
    args = (posterior_fn, scheduler, div_free, V, bool(return_intermediates))
    try:
        hash(args)
        run = _euler_jit
    except TypeError:
        run = _euler
    out = run(*args, x_init, key, jnp.asarray(disc), source_p)
    return out[jnp.asarray(nearest)] if return_intermediates else out


def _euler(posterior_fn, scheduler, div_free, V, return_intermediates, x_init, key, disc, source_p):
    B = x_init.shape[0]

    def posterior_logp(x, t):
        return jnp.log(posterior_fn(x, jnp.full((B,), t, jnp.float32)).astype(jnp.float32))

    def body(x, xs):
        t, h, k = xs
        U = _uniforms(k, x.shape, 2 * V + 1)  # one draw per step: posterior, jump target, jump test
        x1_hat = _gumbel_argmax(posterior_logp(x, t), U[..., :V]).astype(x.dtype)
        u = jump_rates(scheduler, x, x1_hat, t, V, div_free, source_p)
        jump = U[..., -1] < 1 - jnp.exp(-h * u.sum(-1))
        x = jnp.where(jump, _gumbel_argmax(jnp.log(u), U[..., V:2 * V]), x).astype(x.dtype)
        return x, (x if return_intermediates else None)

    keys = jax.random.split(key, disc.shape[0] - 1)
    ts, hs = disc[:-1], disc[1:] - disc[:-1]
    x, xs = jax.lax.scan(body, x_init, (ts[:-1], hs[:-1], keys[:-1]))
    # the last step returns the posterior draw itself
    x = _gumbel_argmax(posterior_logp(x, ts[-1]), _uniforms(keys[-1], x.shape, V)).astype(x.dtype)
    if not return_intermediates:
        return x
    return jnp.concatenate([x_init[None], xs, x[None]])


_euler_jit = jax.jit(_euler, static_argnums=(0, 1, 2, 3, 4))
