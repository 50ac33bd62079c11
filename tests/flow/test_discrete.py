"""Discrete flow matching vs flow_matching 1.0.10: the mixture path (statistics), posterior ->
velocity and the generalized-KL loss (exact), the Euler solver's jump rates (exact, by recording
the reference's categorical draws) and its sample distribution (statistical)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import flow_matching.solver.discrete_solver as ref_solver
from flow_matching.loss import MixturePathGeneralizedKL
from flow_matching.path import MixtureDiscreteProbPath
from flow_matching.path.scheduler import CondOTScheduler, PolynomialConvexScheduler

from jaxgen.errors import ConfigError, JaxgenError
from jaxgen.flow import discrete, schedulers

V = 5


@pytest.fixture(scope="module")
def batch():
    r = np.random.RandomState(0)
    B, L = 6, 7
    x1, xt = r.randint(0, V, (B, L)), r.randint(0, V, (B, L))
    xt[:, :3] = x1[:, :3]  # some coordinates already at the target
    logits = r.randn(B, L, V).astype(np.float32) * 2
    t = np.linspace(0.05, 0.9, B).astype(np.float32)
    return x1, xt, logits, t


@pytest.mark.parametrize("ours,ref", [(schedulers.cond_ot(), CondOTScheduler()),
                                      (schedulers.polynomial(2.0), PolynomialConvexScheduler(2.0))])
def test_velocity_and_generalized_kl_match_reference(batch, ours, ref):
    x1, xt, logits, t = batch
    path = MixtureDiscreteProbPath(ref)
    want_u = path.posterior_to_velocity(torch.tensor(logits), torch.tensor(xt), torch.tensor(t)).numpy()
    np.testing.assert_allclose(np.asarray(discrete.posterior_to_velocity(ours, logits, xt, t)), want_u, atol=1e-5,
                               rtol=1e-5)
    for red in ("mean", "sum", "none"):
        want = MixturePathGeneralizedKL(path, reduction=red)(torch.tensor(logits), torch.tensor(x1), torch.tensor(xt),
                                                             torch.tensor(t)).numpy()
        got = jax.jit(discrete.generalized_kl_loss, static_argnums=(0, 5))(ours, logits, x1, xt, t, red)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    want_ce = torch.nn.functional.cross_entropy(torch.tensor(logits).reshape(-1, V), torch.tensor(x1).reshape(-1))
    np.testing.assert_allclose(float(discrete.cross_entropy_loss(logits, x1)), float(want_ce), rtol=1e-5)


def test_mixture_path_statistics():
    s = schedulers.polynomial(2.0)
    x0, x1 = jnp.zeros((4, 20000), jnp.int32), jnp.ones((4, 20000), jnp.int32)
    t = jnp.array([0.0, 0.3, 0.7, 1.0])
    xt = discrete.mixture_sample(s, x0, x1, t, jax.random.key(0))
    frac_x1 = np.asarray(xt.mean(1))
    np.testing.assert_allclose(frac_x1, np.asarray(t) ** 2, atol=0.015)  # P(x_t = x_1) = kappa_t
    with pytest.raises(ConfigError, match="convex"):
        discrete.mixture_sample(schedulers.cosine(), x0, x1, t, jax.random.key(0))


def _posterior_torch(x, t, **_):
    """A posterior that depends on x_t and t (so intermediate jumps matter)."""
    logits = torch.stack([torch.cos(x * (k + 1) + 3 * t[:, None]) * 2 for k in range(V)], -1)
    return torch.softmax(logits.float(), -1)


def _posterior(x, t):
    logits = jnp.stack([jnp.cos(x * (k + 1) + 3 * t[:, None]) * 2 for k in range(V)], -1)
    return jax.nn.softmax(logits, -1)


@pytest.mark.parametrize("div_free", [0.0, 0.7])
def test_jump_rates_match_reference(monkeypatch, div_free):
    """Record the reference's categorical inputs: the posterior, then the rates u of jumping rows."""
    calls = []

    def recording_categorical(probs):
        calls.append(probs.clone())
        return probs.argmax(-1)
    monkeypatch.setattr(ref_solver, "categorical", recording_categorical)
    monkeypatch.setattr(ref_solver.torch, "rand", lambda size, device=None: torch.zeros(size))  # every row jumps
    p0 = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15])
    solver = ref_solver.MixtureDiscreteEulerSolver(_posterior_torch, MixtureDiscreteProbPath(CondOTScheduler()), V, p0)
    x_init = torch.tensor(np.random.RandomState(0).randint(0, V, (3, 4)))
    # from t = 0.25 (kappa = 0 at t = 0 makes the div-free term infinite): posterior, rates, ..., posterior
    solver.sample(x_init, 0.25, div_free=div_free, time_grid=torch.tensor([0.25, 1.0]))
    post, u_rows = calls[0].reshape(-1, V), calls[1]
    x, t = jnp.asarray(x_init.numpy()), 0.25
    np.testing.assert_allclose(np.asarray(_posterior(x, jnp.full((3,), t))).reshape(-1, V), post.numpy(), atol=1e-6)
    x1_hat = jnp.asarray(post.argmax(-1).numpy().reshape(3, 4))
    u = discrete.jump_rates(schedulers.cond_ot(), x, x1_hat, t, V, div_free, jnp.asarray(p0.numpy()))
    jumping = np.asarray(u.sum(-1) > 0).reshape(-1)
    assert jumping.sum() == len(u_rows) > 0
    np.testing.assert_allclose(np.asarray(u).reshape(-1, V)[jumping], u_rows.numpy(), atol=1e-5, rtol=1e-5)


def test_one_hot_posterior_and_final_step():
    target = jnp.array([[3, 1, 4]])
    onehot = lambda x, t: jax.nn.one_hot(jnp.broadcast_to(target, x.shape), V)
    x = jnp.zeros((2, 3), jnp.int32)
    xs = discrete.euler_solve(onehot, x, jax.random.key(0), schedulers.cond_ot(), (0.0, 0.5, 1.0), 0.1,
                              return_intermediates=True)
    assert xs.shape == (3, 2, 3)
    np.testing.assert_array_equal(np.asarray(xs[0]), 0)
    np.testing.assert_array_equal(np.asarray(xs[-1]), np.broadcast_to(target, (2, 3)))  # the last step is x1_hat
    out = discrete.euler_solve(onehot, x, jax.random.key(0), schedulers.cond_ot(), (0.0, 0.5, 1.0))
    np.testing.assert_array_equal(np.asarray(out), np.broadcast_to(target, (2, 3)))
    np.testing.assert_allclose(discrete.discretization((0.0, 1.0), 0.3), [0.0, 0.3, 0.6, 0.9, 1.0], atol=1e-7)


def test_sample_distribution_matches_reference():
    """Histogram of final tokens (a posterior that reads x_t and t) over 10k runs each."""
    N, L = 10000, 2
    x_init = np.random.RandomState(1).randint(0, V, (N, L))
    torch.manual_seed(0)
    solver = ref_solver.MixtureDiscreteEulerSolver(_posterior_torch, MixtureDiscreteProbPath(CondOTScheduler()), V)
    want = solver.sample(torch.tensor(x_init), 0.2, time_grid=torch.tensor([0.0, 0.9])).numpy()
    run = jax.jit(lambda k: discrete.euler_solve(_posterior, jnp.asarray(x_init), k, schedulers.cond_ot(), (0.0, 0.9),
                                                 0.2))
    got = np.asarray(run(jax.random.key(0)))
    for j in range(L):
        h_got, h_want = (np.bincount(a[:, j], minlength=V) / N for a in (got, want))
        assert 0.5 * np.abs(h_got - h_want).sum() < 0.035, (h_got, h_want)


def test_bad_input():
    post = lambda x, t: jax.nn.one_hot(x, V)
    x = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(JaxgenError, match="strictly increasing"):
        discrete.euler_solve(post, x, jax.random.key(0), schedulers.cond_ot(), (1.0, 0.0))
    with pytest.raises(JaxgenError, match="longer than step_size"):
        discrete.euler_solve(post, x, jax.random.key(0), schedulers.cond_ot(), (0.0, 0.1), 0.5)
    with pytest.raises(JaxgenError, match="source_p"):
        discrete.euler_solve(post, x, jax.random.key(0), schedulers.cond_ot(), div_free=1.0)
    with pytest.raises(JaxgenError, match=r"\[5\]"):
        discrete.euler_solve(post, x, jax.random.key(0), schedulers.cond_ot(), div_free=1.0, source_p=jnp.ones(4) / 4)
