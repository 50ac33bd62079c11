"""Adaptive Dormand-Prince 5(4) in one `lax.while_loop`, with torchdiffeq's controller.

Pinned from torchdiffeq 0.2.5 (`rk_common.py`, `dopri5.py`, `misc.py`, `interp.py`), the solver
the reference ODESolver uses for method="dopri5":
* the first step from Hairer's heuristic (`_select_initial_step`, one extra evaluation);
* error ratio = RMS over ALL elements of the state (the whole batch shares one step size; for a
  pytree state the max of the leaves' RMS) of err / (atol + rtol max(|y0|, |y1|));
* accept when ratio <= 1; next step = dt min(10, max(0.9 ratio^(-1/5), 0.2 if rejected else 1));
* steps are NOT clipped to the requested times: a requested time is read off the 4th-order
  dense-output polynomial of the step that covers it (so the last step may evaluate the field a
  little beyond time_grid[-1], as torchdiffeq does);
* the two stages at the step's end are evaluated one float ulp before it (torchdiffeq's
  Perturb.PREV for nodes with c = 1).
Time runs in the state's dtype (torchdiffeq keeps time in float64); direction is handled by
integrating s = sign * t forward with the field sign * f(sign * s, y), as torchdiffeq does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

tmap = jax.tree_util.tree_map

# Dormand-Prince-Shampine tableau: nodes C, rows A, 5th-order weights B, B - B*(4th order), dense mid
C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
A = ((1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
     (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
     (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
     (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
E = (35 / 384 - 1951 / 21600, 0.0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
     -2187 / 6784 - -12231 / 42400, 11 / 84 - 649 / 6300, -1.0 / 60.0)
MID = tuple(c / 2 for c in (6025192743 / 30085553152, 0.0, 51252292925 / 65400821598, -2691868925 / 45128329728,
                            187940372067 / 1594534317056, -1776094331 / 19743644256, 11237099 / 235043384))
SAFETY, IFACTOR, DFACTOR, ORDER = 0.9, 10.0, 0.2, 5


def _rms(tree):
    return jnp.max(jnp.stack([jnp.sqrt(jnp.mean(jnp.square(jnp.abs(x)))) for x in jax.tree_util.tree_leaves(tree)]))


def _combine(y0, ks, coeffs, dt):
    """y0 + sum_i k_i (c_i dt) over the pytree, skipping zero coefficients."""
    def leaf(y, *k):
        acc = y
        for c, ki in zip(coeffs, k):
            if c != 0.0:
                acc = acc + ki * (c * dt)
        return acc
    return tmap(leaf, y0, *ks)


def _initial_step(f, t0, y0, f0, atol, rtol):
    """Hairer's starting step for a method of order 5 (torchdiffeq `_select_initial_step`, order-1=4)."""
    scale = tmap(lambda y: atol + jnp.abs(y) * rtol, y0)
    d0 = _rms(tmap(lambda y, s: y / s, y0, scale))
    d1 = _rms(tmap(lambda k, s: k / s, f0, scale))
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
    f1 = f(t0 + h0, tmap(lambda y, k: y + h0 * k, y0, f0))
    d2 = _rms(tmap(lambda a, b, s: (a - b) / s, f1, f0, scale)) / h0
    h1 = jnp.where((d1 <= 1e-15) & (d2 <= 1e-15), jnp.maximum(1e-6, h0 * 1e-3),
                   (0.01 / jnp.maximum(d1, d2)) ** (1.0 / ORDER))
    return jnp.minimum(100 * h0, h1)


def _step(f, y0, f0, t0, dt, atol, rtol):
    """One Dormand-Prince step: (y1, f1, error ratio, dense-output coefficients [e, d, c, b, a])."""
    t1 = t0 + dt
    ks = [f0]
    for ci, row in zip(C, A):
        ti = jnp.nextafter(t1, t1 - 1) if ci == 1.0 else t0 + ci * dt
        ks.append(f(ti, _combine(y0, ks, row, dt)))
    y1, f1 = _combine(y0, ks[:-1], A[-1], dt), ks[-1]  # FSAL: 5th-order weights are the last row
    err = _combine(tmap(jnp.zeros_like, y0), ks, E, dt)
    ratio = _rms(tmap(lambda e, a, b: e / (atol + rtol * jnp.maximum(jnp.abs(a), jnp.abs(b))), err, y0, y1))
    y_mid = _combine(y0, ks, MID, dt)

    args = (y0, y1, y_mid, f0, f1)
    coeff = (y0, tmap(lambda k0: dt * k0, f0),  # torchdiffeq `_interp_fit`: [e, d, c, b, a]
             tmap(lambda y0, y1, ym, k0, k1: dt * (k1 - 4 * k0) - 11 * y0 - 5 * y1 + 16 * ym, *args),
             tmap(lambda y0, y1, ym, k0, k1: dt * (5 * k0 - 3 * k1) + 18 * y0 + 14 * y1 - 32 * ym, *args),
             tmap(lambda y0, y1, ym, k0, k1: 2 * dt * (k1 - k0) - 8 * (y1 + y0) + 16 * ym, *args))
    return y1, f1, ratio, coeff


def _next_dt(dt, ratio):
    dfactor = jnp.where(ratio < 1, 1.0, DFACTOR)
    factor = jnp.minimum(IFACTOR, jnp.maximum(SAFETY / ratio ** (1.0 / ORDER), dfactor))
    return jnp.where(ratio == 0, dt * IFACTOR, dt * factor)


def _interp(coeff, t0, t1, t):
    x = (t - t0) / (t1 - t0)

    def leaf(e, d, c, b, a):
        x_ = x.astype(e.dtype)
        x2 = x_ * x_
        x3 = x2 * x_
        return e + x_ * d + x2 * c + x3 * b + x3 * x_ * a
    return tmap(leaf, *coeff)


def dopri5(f, y0, time_grid, *, atol, rtol, max_steps, return_intermediates):
    """f(t, y) integrated through `time_grid` (strictly monotone); states at its points."""
    dtype = time_grid.dtype
    sign = jnp.where(time_grid[-1] < time_grid[0], -1.0, 1.0).astype(dtype)
    s_T = sign * time_grid
    g = lambda s, y: tmap(lambda v: sign.astype(v.dtype) * v, f(sign * s, y))
    atol, rtol = jnp.asarray(atol, dtype), jnp.asarray(rtol, dtype)  # traced is fine
    J = time_grid.shape[0]

    f0 = g(s_T[0], y0)
    dt0 = _initial_step(g, s_T[0], y0, f0, atol, rtol)
    coeff0 = (y0,) + tuple(tmap(jnp.zeros_like, y0) for _ in range(4))
    out0 = tmap(lambda y: jnp.full((J,) + y.shape, jnp.nan, y.dtype).at[0].set(y), y0)
    # carry: y, f, t_start and t_end of the last accepted step, next dt, its dense coeffs, next output j, outputs, n
    init = (y0, f0, s_T[0], s_T[0], dt0, coeff0, jnp.int32(1), out0, jnp.int32(0))

    def cond(c):
        return (c[6] < J) & (c[8] < max_steps)

    def body(c):
        y, fy, ta, tb, dt, coeff, j, out, n = c
        t_req = s_T[j]

        def advance(_):
            y1, f1, ratio, coeff1 = _step(g, y, fy, tb, dt, atol, rtol)
            ok = ratio <= 1
            pick = lambda new, old: tmap(lambda a, b: jnp.where(ok, a, b), new, old)
            return (pick(y1, y), pick(f1, fy), tb, jnp.where(ok, tb + dt, tb), _next_dt(dt, ratio),
                    pick(coeff1, coeff), j, out, n + 1)

        def emit(_):
            val = _interp(coeff, ta, tb, t_req)
            return (y, fy, ta, tb, dt, coeff, j + 1, tmap(lambda o, v: o.at[j].set(v), out, val), n)

        return jax.lax.cond(t_req > tb, advance, emit, None)

    out = jax.lax.while_loop(cond, body, init)[7]
    return out if return_intermediates else tmap(lambda o: o[-1], out)
