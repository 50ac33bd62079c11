"""Exact log-likelihoods of a flow: integrate the augmented ODE (x, int div u) from data (t=1) back
to the source (t=0), as the reference `ODESolver.compute_likelihood` does:

    log p_1(x_1) = log p_0(x_0) + int_1^0 div u_t(x_t) dt        (= log p_0(x_0) - int_0^1 div u_t dt)

The divergence is exact (trace of the Jacobian by one forward-mode JVP per dimension, batched) or
Hutchinson's estimate z^T (du/dx) z with ONE probe z drawn at the start and held fixed through the
solve, Rademacher (the reference's only choice) or Gaussian. Rows of the batch must be
independent under velocity_fn (as in the reference, which differentiates the batch sum).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import ConfigError, JaxgenError
from jaxgen.flow import solvers

PROBES = ("rademacher", "gaussian")


def divergence(velocity_fn, x, t):
    """(u, div u) with div u [B] the exact trace of du/dx per row, for x [B, ...]."""
    D = math.prod(x.shape[1:])
    basis = jnp.eye(D, dtype=x.dtype).reshape((D, 1) + x.shape[1:])
    tangents = jnp.broadcast_to(basis, (D,) + x.shape)
    u, ju = jax.vmap(lambda e: jax.jvp(lambda y: velocity_fn(y, t), (x,), (e,)), out_axes=(None, 0))(tangents)
    div = jnp.einsum("ibi->b", ju.reshape(D, x.shape[0], D))
    return u, div


def hutchinson(velocity_fn, x, t, z):
    """(u, z^T (du/dx) z) per row: an unbiased divergence estimate when E[z z^T] = I."""
    u, jz = jax.jvp(lambda y: velocity_fn(y, t), (x,), (z,))
    return u, jnp.sum((jz * z).reshape(x.shape[0], -1), axis=-1)


def draw_probe(key, shape, dtype=jnp.float32, dist: str = "rademacher"):
    if dist == "rademacher":
        return jax.random.rademacher(key, shape, dtype)
    if dist == "gaussian":
        return jax.random.normal(key, shape, dtype)
    raise ConfigError(f"unknown Hutchinson probe {dist!r}; valid probes: {', '.join(PROBES)}")


def _check_grid(time_grid):
    if solvers._concrete(time_grid) and np.ndim(time_grid) == 1 and len(time_grid) >= 2:
        g = np.asarray(time_grid, np.float64)
        if g[0] != 1.0 or g[-1] != 0.0:
            raise JaxgenError(f"log_likelihood integrates from data to source: time_grid must start at 1.0 and end "
                              f"at 0.0, got {g.tolist()}; e.g. time_grid=(1.0, 0.0)")


MAX_EXACT_DIM = 1024  # exact divergence: D forward-mode passes per evaluation and a [B, D, D] Jacobian


def check_exact_dim(x_1) -> None:
    """Refuse the exact divergence above MAX_EXACT_DIM dimensions: it costs one Jacobian-vector
    product per dimension at every function evaluation (and a [B, D, D] Jacobian in memory), so a
    64x64x3 image would mean 12288 network passes per step; Hutchinson needs one."""
    dim = int(np.prod(x_1.shape[1:]))
    if dim > MAX_EXACT_DIM:
        raise JaxgenError(f"exact_divergence=True on {dim}-dimensional data (above {MAX_EXACT_DIM}) costs {dim} "
                          "network passes per ODE step; use exact_divergence=False with key=... (Hutchinson's "
                          "unbiased estimate, one pass)")


def log_likelihood(velocity_fn, x_1, log_p0, time_grid=(1.0, 0.0), method: str = "euler", step_size=None, *,
                   exact_divergence: bool = True, key=None, probe=None, probe_dist: str = "rademacher",
                   atol: float = 1e-5, rtol: float = 1e-5, return_intermediates: bool = False):
    """(x_0, log p_1(x_1)) for the flow of velocity_fn(x, t) with source log-density log_p0 ([B, ...] -> [B]).

    Solver arguments are `solve`'s. For Hutchinson (exact_divergence=False) pass `key` (a probe of
    `probe_dist` is drawn) or the probe itself as `probe` (shaped like x_1). With
    return_intermediates, x_0 is replaced by the states at every time_grid point (x only)."""
    solvers.check_method(method)
    x_1 = jnp.asarray(x_1)
    if x_1.ndim < 2:
        raise JaxgenError(f"x_1 must be batched, [batch, ...], got shape {x_1.shape}; use x_1[None] for one point")
    _check_grid(time_grid)
    solvers.check_time_grid(time_grid, x_1.dtype)
    solvers.check_velocity(velocity_fn, x_1, jnp.asarray(1.0, x_1.dtype))
    args = ()
    if exact_divergence:
        check_exact_dim(x_1)
    else:
        if probe is None:
            if key is None:
                raise JaxgenError("Hutchinson divergence (exact_divergence=False) needs key=... or probe=...")
            probe = draw_probe(key, x_1.shape, x_1.dtype, probe_dist)
        elif jnp.shape(probe) != x_1.shape:
            raise JaxgenError(f"probe must be shaped like x_1 {x_1.shape}, got {jnp.shape(probe)}")
        args = (jnp.asarray(probe, x_1.dtype),)
    state = (x_1, jnp.zeros(x_1.shape[:1], x_1.dtype))
    xs, logdet = solvers.solve(_Augmented(velocity_fn), state, time_grid, method, step_size,
                               return_intermediates=return_intermediates, atol=atol, rtol=rtol, args=args)
    x_0 = xs[-1] if return_intermediates else xs
    log_det_end = logdet[-1] if return_intermediates else logdet
    return xs, log_p0(x_0) + log_det_end


@dataclasses.dataclass(frozen=True)
class _Augmented:
    """d/dt (x, log-det) = (u, div u); exact without a probe, Hutchinson with one. Hashable, so
    `solve` reuses its compiled program across calls with the same velocity_fn."""
    velocity_fn: object

    def __call__(self, state, t, probe=None):
        if probe is None:
            return divergence(self.velocity_fn, state[0], t)
        return hutchinson(self.velocity_fn, state[0], t, probe)
