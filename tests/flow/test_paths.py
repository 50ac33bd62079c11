"""Schedulers, affine path samples, x/eps/v conversions and FM losses against flow_matching 1.0.10."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flow_matching.path import AffineProbPath
from flow_matching.path.scheduler import (CondOTScheduler, CosineScheduler, LinearVPScheduler,
                                          PolynomialConvexScheduler, VPScheduler)

from jaxgen.errors import ConfigError, JaxgenError
from jaxgen.flow import losses, paths, schedulers

PAIRS = {
    "cond_ot": (schedulers.cond_ot(), CondOTScheduler()),
    "polynomial2": (schedulers.polynomial(2.0), PolynomialConvexScheduler(2.0)),
    "polynomial0.5": (schedulers.polynomial(0.5), PolynomialConvexScheduler(0.5)),
    "vp": (schedulers.vp(), VPScheduler()),
    "vp_custom": (schedulers.vp(0.5, 10.0), VPScheduler(0.5, 10.0)),
    "linear_vp": (schedulers.linear_vp(), LinearVPScheduler()),
    "cosine": (schedulers.cosine(), CosineScheduler()),
}
CONVERSIONS = ("target_to_velocity", "epsilon_to_velocity", "velocity_to_target", "epsilon_to_target",
               "velocity_to_epsilon", "target_to_epsilon")


def assert_close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), b.detach().numpy() if torch.is_tensor(b) else b, rtol=tol, atol=tol)


@pytest.fixture
def inputs():
    rng = np.random.RandomState(0)
    B = 16
    t = np.linspace(0.05, 0.95, B).astype(np.float32)
    x0, x1, other = (rng.randn(B, 3, 2).astype(np.float32) for _ in range(3))
    return t, x0, x1, other


@pytest.mark.parametrize("name", PAIRS)
def test_scheduler_values_match_reference(name, inputs):
    ours, ref = PAIRS[name]
    t = inputs[0]
    got, want = ours(jnp.asarray(t)), ref(torch.tensor(t))
    for field in ("alpha_t", "sigma_t", "d_alpha_t", "d_sigma_t"):
        assert_close(getattr(got, field), getattr(want, field))
    snr = (got.alpha_t / got.sigma_t)
    assert_close(ours.snr_inverse(snr), ref.snr_inverse(torch.tensor(np.asarray(snr))), 1e-4)
    assert_close(ours.snr_inverse(snr), t, 1e-4)  # inversion recovers t
    if ours.convex:
        assert_close(ours.kappa_inverse(got.alpha_t), t, 1e-5)


@pytest.mark.parametrize("name", PAIRS)
def test_path_sample_and_conversions_match_reference(name, inputs):
    ours, ref = PAIRS[name]
    t, x0, x1, other = inputs
    path = AffineProbPath(ref)
    want = path.sample(x_0=torch.tensor(x0), x_1=torch.tensor(x1), t=torch.tensor(t))
    x_t, dx_t = jax.jit(paths.sample, static_argnums=0)(ours, x0, x1, t)
    assert_close(x_t, want.x_t)
    assert_close(dx_t, want.dx_t)
    tt = torch.tensor(t)[:, None, None]  # the reference's converters want t broadcast already
    for conv in CONVERSIONS:
        assert_close(getattr(paths, conv)(ours, other, x_t, t),
              getattr(path, conv)(torch.tensor(other), torch.tensor(np.asarray(x_t)), tt), 1e-4)
    # round trips and the exact conditional targets
    assert_close(paths.target_to_velocity(ours, x1, x_t, t), dx_t, 1e-4)
    assert_close(paths.epsilon_to_velocity(ours, x0, x_t, t), dx_t, 1e-4)
    assert_close(paths.velocity_to_target(ours, dx_t, x_t, t), x1, 1e-4)
    assert_close(paths.velocity_to_epsilon(ours, dx_t, x_t, t), x0, 1e-4)


def test_scalar_t_and_vmap(inputs):
    t, x0, x1, _ = inputs
    s = schedulers.cosine()
    a = paths.sample(s, x0, x1, 0.3)
    b = paths.sample(s, x0, x1, np.full(16, 0.3, np.float32))
    assert_close(a.x_t, np.asarray(b.x_t))
    v = jax.vmap(lambda a_, b_, t_: paths.sample(s, a_[None], b_[None], t_[None]).x_t[0])(x0, x1, t)
    assert_close(v, np.asarray(paths.sample(s, x0, x1, t).x_t))


def test_scheduler_registry_and_bad_input():
    assert schedulers.get("polynomial", n=3).n == 3
    with pytest.raises(ConfigError, match="'nope'.*cond_ot.*cosine"):
        schedulers.get("nope")
    with pytest.raises(ConfigError, match="n=-1"):
        schedulers.polynomial(-1)
    with pytest.raises(ConfigError, match="beta_min"):
        schedulers.vp(5.0, 1.0)
    with pytest.raises(JaxgenError, match="batch"):
        paths.sample(schedulers.cond_ot(), np.zeros((4, 2)), np.zeros((4, 2)), np.zeros(3))
    with pytest.raises(JaxgenError, match="'w'"):
        paths.convert(schedulers.cond_ot(), np.zeros((4, 2)), np.zeros((4, 2)), 0.5, src="w", dst="v")


@pytest.mark.parametrize("param", paths.PARAMS)
@pytest.mark.parametrize("space", paths.PARAMS)
def test_fm_loss_is_zero_at_the_exact_prediction(param, space, inputs):
    t, x0, x1, other = inputs
    s = schedulers.cond_ot()
    exact = {"v": x1 - x0, "x": x1, "eps": x0}[param]
    assert float(losses.fm_loss(exact, x0, x1, t, scheduler=s, param=param, loss_space=space)) < 1e-9
    bad = losses.fm_loss(exact + 0.1, x0, x1, t, scheduler=s, param=param, loss_space=space, reduction="none")
    assert bad.shape == (16,) and float(bad.min()) > 0


def test_fm_loss_x_pred_in_v_space_is_back_to_basics(inputs):
    t, x0, x1, other = inputs
    got = losses.fm_loss(other, x0, x1, t, param="x", loss_space="v")
    x_t = t[:, None, None] * x1 + (1 - t[:, None, None]) * x0
    want = np.mean(((other - x_t) / (1 - t[:, None, None]) - (x1 - x0)) ** 2)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_cfm_loss_end_to_end_jits():
    x1 = jnp.ones((8, 2))
    perfect_v = lambda x_t, t: (x1 - x_t) / (1 - t[:, None])  # exact conditional velocity to the point mass
    loss = jax.jit(lambda k: losses.cfm_loss(perfect_v, x1, k))(jax.random.key(0))
    assert float(loss) < 1e-6


def test_time_samplers():
    key = jax.random.key(0)
    u = losses.uniform_t(key, (20000,))
    ln = losses.logit_normal_t(key, (20000,), mean=1.2, std=1.2)
    sh = losses.shifted_t(key, (20000,), shift=3.0)
    for t in (u, ln, sh):
        assert t.shape == (20000,) and float(t.min()) >= 0 and float(t.max()) <= 1
    np.testing.assert_allclose(float(jnp.mean(jnp.log(ln / (1 - ln)))), 1.2, atol=0.05)
    assert float(jnp.mean(sh)) < float(jnp.mean(u)) - 0.15  # shift > 1 moves mass toward noise (t=0)
    tt = jnp.linspace(0, 1, 11)
    assert_close(losses.shift_time(tt, 1.0), np.asarray(tt))
    noise = 1 - tt  # SD3's formula on the noise level
    assert_close(1 - losses.shift_time(tt, 3.0), np.asarray(3 * noise / (1 + 2 * noise)))
    assert losses.t_sampler("logit_normal", mean=0.0)(key, (3,)).shape == (3,)
    with pytest.raises(ConfigError, match="'beta'.*uniform"):
        losses.t_sampler("beta")


def test_schedule_transform_matches_reference(inputs):
    from flow_matching.path.scheduler import ScheduleTransformedModel
    t, x0, x1, other = inputs
    W = np.random.RandomState(3).randn(2, 2).astype(np.float32)
    model = lambda x, t: jnp.tanh(x @ W) * (1 + paths.expand_t(t, x))
    model_torch = lambda x, t: torch.tanh(x @ torch.tensor(W)) * (1 + t)
    ref = ScheduleTransformedModel(model_torch, CondOTScheduler(), CosineScheduler())
    ours = paths.schedule_transform(model, schedulers.cond_ot(), schedulers.cosine())
    for r in (0.1, 0.5, 0.9):
        assert_close(ours(x0, r), ref(x=torch.tensor(x0), t=torch.tensor(r)), 1e-5)
    tt = t[:, None, None]
    want = ScheduleTransformedModel(lambda x, t: model_torch(x, t), CondOTScheduler(), CosineScheduler())(
        x=torch.tensor(x0), t=torch.tensor(tt))
    assert_close(ours(x0, t), want, 1e-5)  # a [B] time vector
