"""ODE solvers for flows: `solve(velocity_fn, x_init, time_grid, method, step_size)`.

Semantics are those of the reference `flow_matching.solver.ODESolver.sample`, i.e. of
torchdiffeq's `odeint` (pinned from torchdiffeq 0.2.5, `_impl/solvers.py`, `fixed_grid.py`):

* `velocity_fn(x, t, *args)` gets the state (an array or any pytree of arrays), a scalar time of
  the state's dtype and the optional `args`, and returns a velocity shaped like the state.
* The result is the state at time_grid[-1], or at every time_grid point stacked on a new leading
  axis with `return_intermediates=True` (the first one is x_init).
* The grid may be increasing or decreasing (e.g. (1, 0) to invert a flow); it must be strictly
  monotone and at least two points long.
* Fixed-step methods (euler, midpoint, heun2 = "heun", heun3, rk4):
  - `step_size=None`: one step per time_grid interval.
  - `step_size=h`: steps of h from time_grid[0] (torchdiffeq's grid: n = ceil(|T - t0| / h + 1)
    points t0 + k h, the last replaced by T = time_grid[-1], built in float32 like the
    reference), and the state at a requested time strictly inside a step is the LINEAR
    interpolation of the step's end points: torchdiffeq's default `interp="linear"` is what
    ODESolver uses for every fixed-step method (its cubic Hermite option is never selected).
  - "rk4" is torchdiffeq's `rk4` = the 3/8-rule variant (`rk4_alt_step_func`), not the classic
    1/6-2/6-2/6-1/6 tableau; "heun2" is EDM's Heun (Euler predictor, trapezoid corrector);
    "heun3" is the 3rd-order Heun that flow_matching's docs name.
  Each is a `lax.scan`, so a jitted solve is one compiled program.
* "dopri5": adaptive Dormand-Prince 5(4) with torchdiffeq's controller and dense output (see
  `dopri5.py`); `step_size` must be None, `atol`/`rtol` set the tolerance.

A reversed grid runs with negative steps; torchdiffeq negates time instead, which gives the
same floating-point numbers (rounding is sign-symmetric), so fixed-step results coincide.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import ConfigError, JaxgenError

tmap = jax.tree_util.tree_map


# ---- one fixed step: dy from (t0, dt, t1, y0, f0), op order as torchdiffeq's step functions ----

def _euler(f, t0, dt, t1, y0, f0):
    return tmap(lambda k: dt * k, f0)


def _midpoint(f, t0, dt, t1, y0, f0):
    half = 0.5 * dt
    y_mid = tmap(lambda y, k: y + k * half, y0, f0)
    return tmap(lambda k: dt * k, f(t0 + half, y_mid))


def _heun2(f, t0, dt, t1, y0, f0):
    k2 = f(t0 + dt * 1.0, tmap(lambda y, k: y + dt * k * 1.0, y0, f0))
    return tmap(lambda a, b: dt * (a * 0.5 + b * 0.5), f0, k2)


def _heun3(f, t0, dt, t1, y0, f0):
    k2 = f(t0 + dt * (1 / 3), tmap(lambda y, k: y + dt * k * (1 / 3), y0, f0))
    k3 = f(t0 + dt * (2 / 3), tmap(lambda y, a, b: y + dt * (a * 0.0 + b * (2 / 3)), y0, f0, k2))
    return tmap(lambda a, b, c: dt * (a * 0.25 + b * 0.0 + c * 0.75), f0, k2, k3)


def _rk4(f, t0, dt, t1, y0, f0):
    """The 3/8 rule (torchdiffeq's `rk4`)."""
    k2 = f(t0 + dt * (1 / 3), tmap(lambda y, a: y + dt * a * (1 / 3), y0, f0))
    k3 = f(t0 + dt * (2 / 3), tmap(lambda y, a, b: y + dt * (b - a * (1 / 3)), y0, f0, k2))
    k4 = f(t1, tmap(lambda y, a, b, c: y + dt * (a - b + c), y0, f0, k2, k3))
    return tmap(lambda a, b, c, d: (a + 3 * (b + c) + d) * dt * 0.125, f0, k2, k3, k4)


FIXED_STEPS = {"euler": _euler, "midpoint": _midpoint, "heun": _heun2, "heun2": _heun2, "heun3": _heun3,
               "rk4": _rk4}
ORDER = {"euler": 1, "midpoint": 2, "heun": 2, "heun2": 2, "heun3": 3, "rk4": 4, "dopri5": 5}
METHODS = tuple(FIXED_STEPS) + ("dopri5",)


# ---- argument checks (each names the value and the fix) ----

def _concrete(x) -> bool:
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x))


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ConfigError(f"unknown ODE method {method!r}; valid methods: {', '.join(METHODS)}")
    return method


def check_time_grid(time_grid, dtype=jnp.float32):
    """time_grid as a 1-D array of `dtype`, refusing fewer than two points, a non-monotone grid or
    times outside [0, 1] (flow time)."""
    shape = np.shape(time_grid)
    if len(shape) != 1 or shape[0] < 2:
        raise JaxgenError(f"time_grid must be a 1-D sequence of at least two times (start, ..., end), got shape "
                          f"{shape}; e.g. time_grid=(0.0, 1.0)")
    if _concrete(time_grid):
        g = np.asarray(time_grid, dtype=np.float64)
        d = np.diff(g)
        if not (np.all(d > 0) or np.all(d < 0)):
            raise JaxgenError(f"time_grid {g.tolist()} must be strictly increasing or strictly decreasing (no "
                              "repeated times); sort it, e.g. (0.0, 0.5, 1.0), or reverse it to integrate backwards")
        if g.min() < 0.0 or g.max() > 1.0:
            raise JaxgenError(f"time_grid {g.tolist()} leaves [0, 1], flow time (source at 0, data at 1); rescale "
                              "it into [0, 1]")
        return jnp.asarray(np.asarray(time_grid, dtype=np.dtype(dtype)))
    return jnp.asarray(time_grid, dtype)


def check_step_size(step_size, method: str):
    if step_size is None:
        return None
    if method == "dopri5":
        raise JaxgenError(f"step_size={step_size} was given to the adaptive method 'dopri5'; pass step_size=None "
                          "and set atol/rtol, or pick a fixed-step method")
    if not isinstance(step_size, (int, float, np.floating)) or isinstance(step_size, bool) or not step_size > 0 \
            or not math.isfinite(step_size):
        raise JaxgenError(f"step_size={step_size!r} must be a positive finite number, e.g. 1/32 (or None to step "
                          "on the time_grid)")
    return float(step_size)


def check_velocity(velocity_fn, x, t, args=()) -> None:
    """Refuse a velocity_fn whose output is not shaped like its input state."""
    out = jax.eval_shape(velocity_fn, x, t, *args)
    want = jax.tree_util.tree_structure(x), [jnp.shape(leaf) for leaf in jax.tree_util.tree_leaves(x)]
    got = jax.tree_util.tree_structure(out), [leaf.shape for leaf in jax.tree_util.tree_leaves(out)]
    if want != got:
        raise JaxgenError(f"velocity_fn(x, t) must return an array shaped like x: x has shapes {want[1]}, the "
                          f"velocity has {got[1]}; fix the model's output head (e.g. reshape to x.shape)")


# ---- torchdiffeq's fixed grid ----

def step_grid(time_grid, step_size: float) -> np.ndarray:
    """torchdiffeq's step grid from time_grid[0] to time_grid[-1] with step `step_size` (float32,
    in the direction of the grid; reference: `_grid_constructor_from_step_size` on negated time)."""
    t = np.asarray(time_grid, np.float32)
    sign = np.float32(-1.0 if t[0] > t[-1] else 1.0)
    start, end = sign * t[0], sign * t[-1]
    h = np.float32(step_size)
    niters = int(np.ceil((end - start) / h + np.float32(1)))
    grid = np.arange(0, niters, dtype=np.float32) * h + start
    grid[-1] = end
    return sign * grid


def interp_plan(time_grid, grid) -> tuple[np.ndarray, np.ndarray]:
    """For each requested time (after the first): the step k whose end is the first grid point at
    or past it, and the linear weight inside [grid[k], grid[k+1]] (0 and 1 exactly at its ends)."""
    t = np.asarray(time_grid, np.float32)
    sign = np.float32(-1.0 if t[0] > t[-1] else 1.0)
    s, g = sign * t, sign * np.asarray(grid, np.float32)
    steps, weights = [], []
    k = 0
    for tj in s[1:]:
        while g[k + 1] < tj:
            k += 1
        t0, t1 = g[k], g[k + 1]
        w = np.float32(0) if tj == t0 else np.float32(1) if tj == t1 else (tj - t0) / (t1 - t0)
        steps.append(k)
        weights.append(w)
    return np.asarray(steps, np.int32), np.asarray(weights, np.float32)


def _lerp(y0, y1, w):
    """torchdiffeq's `_linear_interp`: the end points exactly at w = 0 and w = 1."""
    mid = y0 + w.astype(y0.dtype) * (y1 - y0)
    return jnp.where(w == 1, y1, jnp.where(w == 0, y0, mid))


def _fixed(velocity_fn, method, y0, grid, plan, return_intermediates, args):
    """Integrate over `grid` with `method`'s step; `plan` (steps, weights) or None = report at grid points."""
    f = lambda t, y: velocity_fn(y, t, *args)
    step = FIXED_STEPS[method]
    t0s, t1s = grid[:-1], grid[1:]
    idx = jnp.arange(t0s.shape[0], dtype=jnp.int32)

    def advance(y, t0, t1):
        dy = step(f, t0, t1 - t0, t1, y, f(t0, y))
        return tmap(lambda a, b: a + b, y, dy)

    if plan is None:
        def body(y, xs):
            y1 = advance(y, xs[0], xs[1])
            return y1, (y1 if return_intermediates else None)
        y_end, ys = jax.lax.scan(body, y0, (t0s, t1s))
        if not return_intermediates:
            return y_end
        return tmap(lambda a, b: jnp.concatenate([a[None], b]), y0, ys)

    steps_J, weights_J = plan

    def body(carry, xs):
        y, out = carry
        t0, t1, k = xs
        y1 = advance(y, t0, t1)
        hit = steps_J == k

        def put(o, a, b):
            bshape = (-1,) + (1,) * a.ndim
            val = _lerp(a[None], b[None], weights_J.reshape(bshape))
            return jnp.where(hit.reshape(bshape), val, o)
        return (y1, tmap(put, out, y, y1)), None

    out0 = tmap(lambda a: jnp.zeros((steps_J.shape[0],) + a.shape, a.dtype), y0)
    (_, out), _ = jax.lax.scan(body, (y0, out0), (t0s, t1s, idx))
    if not return_intermediates:
        return tmap(lambda o: o[-1], out)
    return tmap(lambda a, o: jnp.concatenate([a[None], o]), y0, out)


def _dopri5(velocity_fn, y0, grid, atol, rtol, max_steps, return_intermediates, args):
    from jaxgen.flow.dopri5 import dopri5
    return dopri5(lambda t, y: velocity_fn(y, t, *args), y0, grid, atol=atol, rtol=rtol, max_steps=max_steps,
                  return_intermediates=return_intermediates)


# Compiled once per (velocity_fn, method, shapes): grids, tolerances and `args` are traced, so
# repeated eager calls with the same function object reuse the program.
_fixed_jit = jax.jit(_fixed, static_argnums=(0, 1, 5))
_dopri5_jit = jax.jit(_dopri5, static_argnums=(0, 5, 6))


def _hashable(fn) -> bool:
    try:
        hash(fn)
        return True
    except TypeError:
        return False


def solve(velocity_fn, x_init, time_grid=(0.0, 1.0), method: str = "euler", step_size=None,
          return_intermediates: bool = False, *, atol: float = 1e-5, rtol: float = 1e-5, max_steps: int = 10_000,
          args=()):
    """Integrate dx/dt = velocity_fn(x, t) from time_grid[0]; see the module docstring.

    Returns the state at time_grid[-1], or [len(time_grid), ...] states with return_intermediates.
    With step_size, time_grid must be concrete (a tuple or NumPy array; it fixes the step count).
    `atol`, `rtol`, `max_steps` are for dopri5 only (its unreached outputs are NaN after max_steps).
    `args` (a tuple of pytrees, e.g. model params) are passed on as velocity_fn(x, t, *args), traced,
    so new values do not recompile."""
    check_method(method)
    step_size = check_step_size(step_size, method)
    leaves = jax.tree_util.tree_leaves(x_init)
    if not leaves:
        raise JaxgenError("x_init is empty; pass the initial state array (e.g. noise of shape [batch, dim])")
    dtype = jnp.result_type(leaves[0])
    if not jnp.issubdtype(dtype, jnp.floating):
        raise JaxgenError(f"x_init must be a floating-point array, got dtype {dtype}; cast it (x.astype(jnp.float32))")
    grid_T = check_time_grid(time_grid, dtype)
    args = tuple(args)
    check_velocity(velocity_fn, x_init, grid_T[0], args)
    jitted = _hashable(velocity_fn)
    if method == "dopri5":
        run = _dopri5_jit if jitted else _dopri5
        return run(velocity_fn, x_init, grid_T, jnp.asarray(atol, dtype), jnp.asarray(rtol, dtype), int(max_steps),
                   bool(return_intermediates), args)
    run = _fixed_jit if jitted else _fixed
    if step_size is None:
        return run(velocity_fn, method, x_init, grid_T, None, bool(return_intermediates), args)
    if not _concrete(time_grid):
        raise JaxgenError("with step_size, time_grid must be concrete (a tuple or NumPy array, not a traced array): "
                          "it fixes the number of steps; close over it instead of passing it through jit")
    tg = np.asarray(time_grid, np.float32)
    grid = step_grid(tg, step_size)
    plan = tuple(jnp.asarray(a) for a in interp_plan(tg, grid))
    return run(velocity_fn, method, x_init, jnp.asarray(grid, dtype), plan, bool(return_intermediates), args)
