"""log_likelihood against the reference compute_likelihood, the analytic density of an affine
Gaussian flow, and Hutchinson (same probe as the reference; unbiasedness)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flow_matching.solver import ODESolver

from jaxgen.errors import ConfigError, JaxgenError
from jaxgen.flow import likelihood, log_likelihood

W = np.random.RandomState(1).randn(3, 3).astype(np.float32) * 0.5


def field(x, t):
    return jnp.tanh(x @ W) * (1 + t) + 0.3 * x * t


def field_torch(x, t):
    return torch.tanh(x @ torch.tensor(W)) * (1 + t) + 0.3 * x * t


def log_normal(x):
    return -0.5 * jnp.sum(x ** 2, -1) - 0.5 * x.shape[-1] * np.log(2 * np.pi)


def log_normal_torch(x):
    return -0.5 * torch.sum(x ** 2, -1) - 0.5 * x.shape[-1] * np.log(2 * np.pi)


@pytest.fixture(scope="module")
def x1():
    return np.random.RandomState(0).randn(6, 3).astype(np.float32)


def reference(x1, method, step_size, exact, seed=0, time_grid=(1.0, 0.0)):
    torch.manual_seed(seed)
    x0, lp = ODESolver(field_torch).compute_likelihood(torch.tensor(x1), log_normal_torch, step_size, method=method,
                                                       exact_divergence=exact, atol=1e-5, rtol=1e-5,
                                                       time_grid=torch.tensor(time_grid))
    return x0.detach().numpy(), lp.detach().numpy()


@pytest.mark.parametrize("method,step_size,time_grid", [("euler", 0.05, (1.0, 0.0)), ("midpoint", None,
                                                        (1.0, 0.6, 0.3, 0.0)), ("rk4", 0.07, (1.0, 0.0)),
                                                        ("dopri5", None, (1.0, 0.0))])
def test_exact_divergence_matches_reference(x1, method, step_size, time_grid):
    x0, lp = log_likelihood(field, x1, log_normal, time_grid, method, step_size)
    want_x0, want_lp = reference(x1, method, step_size, True, time_grid=time_grid)
    tol = 1e-4 if method != "dopri5" else 2e-4
    np.testing.assert_allclose(np.asarray(x0), want_x0, atol=tol, rtol=tol)
    np.testing.assert_allclose(np.asarray(lp), want_lp, atol=tol, rtol=tol)


def test_hutchinson_with_the_references_probe(x1):
    torch.manual_seed(3)  # compute_likelihood draws z = sign(randn_like(x_1)) first thing
    z = ((torch.randn_like(torch.tensor(x1)) < 0) * 2.0 - 1.0).numpy()
    _, want = reference(x1, "midpoint", 0.05, False, seed=3)
    _, got = log_likelihood(field, x1, log_normal, method="midpoint", step_size=0.05, exact_divergence=False,
                            probe=z)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(x1, dist):
    x, t = jnp.asarray(x1), jnp.float32(0.4)
    _, exact = likelihood.divergence(field, x, t)
    keys = jax.random.split(jax.random.key(0), 2000)
    one = lambda k: likelihood.hutchinson(field, x, t, likelihood.draw_probe(k, x.shape, x.dtype, dist))[1]
    est = jax.jit(jax.vmap(one))(keys)
    mean, sem = est.mean(0), est.std(0) / np.sqrt(len(keys))
    assert np.all(np.abs(np.asarray(mean - exact)) < 4 * np.asarray(sem) + 1e-6)


# Exact CondOT marginal field from N(0, I) to N(MU, S^2 I): the flow's density at t=1 is N(MU, S^2 I).
MU, S = 2.0, 0.5


def gauss_field(x, t):
    return MU + (t * S ** 2 - (1 - t)) / ((1 - t) ** 2 + t ** 2 * S ** 2) * (x - t * MU)


def test_affine_gaussian_flow_has_the_analytic_density():
    # 1-D; the first three are the spec's side-by-side points (§6: -0.725791, -0.225791, -1.205791)
    x1 = jnp.concatenate([jnp.array([2.5, 2.0, 2.7]), jnp.asarray(np.random.RandomState(2).randn(5)) * S + MU])[:, None]
    want = jax.scipy.stats.norm.logpdf(x1[:, 0], MU, S)
    np.testing.assert_allclose(np.asarray(want[:3]), [-0.725791, -0.225791, -1.205791], atol=1e-6)
    for method, step_size in [("rk4", 0.01), ("dopri5", None)]:
        x0, lp = log_likelihood(gauss_field, x1, log_normal, method=method, step_size=step_size, atol=1e-7, rtol=1e-7)
        np.testing.assert_allclose(np.asarray(lp), np.asarray(want), atol=1e-4)
        np.testing.assert_allclose(np.asarray(x0), np.asarray((x1 - MU) / S), atol=1e-4)


def test_jit_intermediates_and_bad_input(x1):
    f = jax.jit(lambda x: log_likelihood(field, x, log_normal, (1.0, 0.5, 0.0), "midpoint", return_intermediates=True))
    xs, lp = f(x1)
    assert xs.shape == (3,) + x1.shape and lp.shape == (6,)
    with pytest.raises(JaxgenError, match="start at 1.0 and end at 0.0"):
        log_likelihood(field, x1, log_normal, (0.0, 1.0))
    with pytest.raises(JaxgenError, match="key=... or probe"):
        log_likelihood(field, x1, log_normal, exact_divergence=False)
    with pytest.raises(ConfigError, match="'sphere'"):
        log_likelihood(field, x1, log_normal, exact_divergence=False, key=jax.random.key(0), probe_dist="sphere")
    with pytest.raises(JaxgenError, match="shaped like x"):
        log_likelihood(lambda x, t: x.sum(-1), x1, log_normal)
    with pytest.raises(JaxgenError, match="batched"):
        log_likelihood(field, x1[0], log_normal)


def test_exact_divergence_is_refused_above_its_documented_dimension():
    from jaxgen.errors import JaxgenError
    from jaxgen.flow import likelihood
    x = jnp.ones((2, likelihood.MAX_EXACT_DIM + 1))
    with pytest.raises(JaxgenError, match="use exact_divergence=False"):
        likelihood.log_likelihood(lambda x, t: -x, x, lambda x: -0.5 * (x ** 2).sum(-1))
