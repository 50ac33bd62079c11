"""`solve` against the reference ODESolver.sample (torchdiffeq), convergence orders, dopri5 vs the
analytic flow map, jit/vmap, and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flow_matching.solver import ODESolver
from torchdiffeq._impl.solvers import FixedGridODESolver

from jaxgen.errors import ConfigError, JaxgenError
from jaxgen.flow import solve, solvers

W = np.random.RandomState(1).randn(3, 3).astype(np.float32) * 0.7
TORCH_NAME = {"euler": "euler", "midpoint": "midpoint", "heun": "heun2", "heun3": "heun3", "rk4": "rk4"}


def field(x, t):
    """A nonlinear, time-dependent field (same formula in torch below)."""
    return jnp.tanh(x @ W) * (1 + t) + 3.0 * t ** 2 - 0.5 * x * jnp.cos(3 * t)


def field_torch(x, t):
    return torch.tanh(x @ torch.tensor(W)) * (1 + t) + 3.0 * t ** 2 - 0.5 * x * torch.cos(3 * t)


def reference(x, time_grid, method, step_size, **kw):
    return ODESolver(field_torch).sample(torch.tensor(x), step_size, method=method, return_intermediates=True,
                                         time_grid=torch.tensor(time_grid, dtype=torch.float32), **kw).numpy()


# forward / reverse, on the grid / with step_size, requested points on and off the step grid
GRIDS = [((0.0, 0.25, 0.6, 1.0), None), ((1.0, 0.4, 0.0), None), ((0.0, 0.3, 0.5, 0.77, 1.0), 0.1),
         ((1.0, 0.35, 0.0), 0.07), ((0.2, 0.9), 1 / 3)]


@pytest.fixture(scope="module")
def x():
    return np.random.RandomState(0).randn(5, 3).astype(np.float32)


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun", "heun3", "rk4"])
def test_fixed_step_matches_reference(method, x):
    for time_grid, step_size in (GRIDS if method in ("euler", "midpoint", "rk4") else GRIDS[2:4]):
        got = solve(field, x, time_grid, method, step_size, return_intermediates=True)
        want = reference(x, time_grid, TORCH_NAME[method], step_size)
        assert got.shape == want.shape == (len(time_grid),) + x.shape
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5, err_msg=f"{time_grid} {step_size}")
    last = solve(field, x, time_grid, method, step_size)  # the same loop without the outputs buffer
    np.testing.assert_allclose(np.asarray(last), want[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("step_size", [0.1, 0.07, 1 / 3, 0.125, 0.3, 0.0999, 1e-2])
@pytest.mark.parametrize("time_grid", [(0.0, 1.0), (1.0, 0.0), (0.1, 0.7), (0.7, -0.2)])
def test_step_grid_is_torchdiffeqs(time_grid, step_size):
    t = torch.tensor(time_grid, dtype=torch.float32)
    sign = -1 if time_grid[0] > time_grid[-1] else 1
    want = sign * FixedGridODESolver._grid_constructor_from_step_size(step_size)(None, None, sign * t).numpy()
    np.testing.assert_array_equal(solvers.step_grid(time_grid, step_size), want)


def test_dopri5_matches_reference_and_is_one_program(x):
    for time_grid in [(0.0, 0.4, 1.0), (1.0, 0.3, 0.0)]:
        want = reference(x, time_grid, "dopri5", None, atol=1e-6, rtol=1e-6)
        f = jax.jit(lambda x: solve(field, x, time_grid, "dopri5", return_intermediates=True, atol=1e-6, rtol=1e-6))
        np.testing.assert_allclose(np.asarray(f(x)), want, atol=2e-5, rtol=2e-5)


# The exact CondOT marginal field between N(0, 1) and N(MU, S^2): x_t = t MU + sigma_t x_0.
MU, S = 2.0, 0.5


def gauss_field(x, t):
    return MU + (t * S ** 2 - (1 - t)) / ((1 - t) ** 2 + t ** 2 * S ** 2) * (x - t * MU)


def gauss_flow(x0, t):
    return t * MU + np.sqrt((1 - t) ** 2 + t ** 2 * S ** 2) * x0


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("heun3", 3), ("rk4", 4)])
def test_convergence_order(method, order):
    """Error at t=1 vs step size on dx/dt = sin(2t) x + t (float64, reference: rk4 with h = 1/4096)."""
    with jax.enable_x64(True):
        x0 = jnp.linspace(-2, 2, 5, dtype=jnp.float64)[:, None]
        f = lambda x, t: jnp.sin(2 * t) * x + t
        exact = np.asarray(solve(f, x0, (0.0, 1.0), "rk4", 1 / 4096))
        errs = np.asarray([np.abs(np.asarray(solve(f, x0, (0.0, 1.0), method, 1 / n)) - exact).max()
                           for n in (8, 16, 32)])
    slopes = np.log2(errs[:-1] / errs[1:])
    assert np.all(np.abs(slopes - order) < 0.15), (errs, slopes)


@pytest.mark.parametrize("tol,bound", [(1e-4, 2e-3), (1e-7, 2e-5)])
def test_dopri5_vs_analytic(tol, bound):
    x0 = jnp.linspace(-3, 3, 7)[:, None]
    got = solve(gauss_field, x0, (0.0, 0.5, 1.0), "dopri5", return_intermediates=True, atol=tol, rtol=tol)
    want = np.stack([gauss_flow(np.asarray(x0), t) for t in (0.0, 0.5, 1.0)])
    assert np.abs(np.asarray(got) - want).max() < bound
    back = solve(gauss_field, jnp.asarray(want[-1]), (1.0, 0.0), "dopri5", atol=tol, rtol=tol)
    assert np.abs(np.asarray(back) - np.asarray(x0)).max() < 10 * bound


def test_jit_vmap_grad_and_pytree_state(x):
    f = jax.jit(lambda x: solve(field, x, (0.0, 1.0), "midpoint", 0.1))
    per_row = jax.vmap(lambda r: solve(field, r[None], (0.0, 1.0), "midpoint", 0.1)[0])(x)
    np.testing.assert_allclose(np.asarray(f(x)), np.asarray(per_row), atol=1e-6)
    g = jax.grad(lambda x: solve(field, x, (0.0, 1.0), "rk4").sum())(jnp.asarray(x))
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g)))
    tree = solve(lambda s, t: {"a": field(s["a"], t), "b": -s["b"]}, {"a": x, "b": jnp.ones(2)}, (0.0, 1.0),
                 "euler", 0.01)
    np.testing.assert_allclose(np.asarray(tree["b"]), np.exp(-1.0), rtol=1e-2)
    traced_grid = jax.jit(lambda x, g: solve(field, x, g, "euler"))(x, jnp.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(np.asarray(traced_grid), reference(x, (0.0, 0.5, 1.0), "euler", None)[-1], atol=1e-5)


def test_bad_input(x):
    with pytest.raises(ConfigError, match="'rk5'.*euler.*dopri5"):
        solve(field, x, method="rk5")
    with pytest.raises(JaxgenError, match=r"strictly increasing or strictly decreasing"):
        solve(field, x, (0.0, 0.6, 0.4, 1.0))
    with pytest.raises(JaxgenError, match="at least two"):
        solve(field, x, (0.0,))
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(JaxgenError, match="step_size"):
            solve(field, x, (0.0, 1.0), "euler", bad)
    with pytest.raises(JaxgenError, match="dopri5"):
        solve(field, x, (0.0, 1.0), "dopri5", 0.1)
    with pytest.raises(JaxgenError, match=r"shaped like x.*\(5, 3\).*\(5, 1\)"):
        solve(lambda x, t: x[:, :1], x)
    with pytest.raises(JaxgenError, match="concrete"):
        jax.jit(lambda x, g: solve(field, x, g, "euler", 0.1))(x, jnp.array([0.0, 1.0]))
    with pytest.raises(JaxgenError, match="floating"):
        solve(field, np.zeros((2, 3), np.int32))


@pytest.mark.parametrize("grid", [(0.0, 1.5), (-0.5, 1.0)])
def test_time_grid_outside_flow_time_is_refused(grid):
    from jaxgen.errors import JaxgenError
    with pytest.raises(JaxgenError, match=r"leaves \[0, 1\]"):
        solve(lambda x, t: -x, jnp.ones((3, 2)), grid)
