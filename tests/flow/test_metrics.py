"""Evaluation metrics: two-sample distances against known answers, exact KL, FD-digits calibration."""
import functools

import jax
import numpy as np
import pytest

from jaxgen.data import continuous
from jaxgen.errors import JaxgenError
from jaxgen.flow import metrics


def _normal(seed, n=1500, shift=(0.0, 0.0)):
    return np.random.default_rng(seed).normal(size=(n, 2)) + np.asarray(shift)


def test_mmd_and_energy_separate_p_from_q():
    p1, p2, q = _normal(0), _normal(1), _normal(2, shift=(0.5, 0.0))
    for dist in (metrics.mmd2, metrics.energy_distance, functools.partial(metrics.mmd2, bandwidths=[0.3, 1.0])):
        same, diff = dist(p1, p2), dist(p1, q)
        assert abs(same) < 3e-3 and diff > 20 * max(abs(same), 1e-4)
    assert metrics.mmd2(p1, _normal(3, n=700)) < 3e-3  # unequal sizes


def test_sliced_wasserstein_of_a_shift():
    """y = x + s: every projection's 1-D W2 is |theta.s|, so SW2 = |s| / sqrt(D); exact in 1-D."""
    key = jax.random.key(0)
    x = _normal(0, n=1000)
    s = np.array([3.0, 4.0])
    assert metrics.sliced_wasserstein(key, x, x + s) == pytest.approx(5 / np.sqrt(2), rel=0.05)
    assert metrics.sliced_wasserstein(key, x, x + s, p=1) == pytest.approx(5 * 2 / np.pi, rel=0.05)  # E|cos| = 2/pi
    assert metrics.sliced_wasserstein(key, x, _normal(1, n=1000)) < 0.1
    assert metrics.sliced_wasserstein(key, x, _normal(1, n=700) + s) == pytest.approx(5 / np.sqrt(2), rel=0.05)
    assert metrics.sliced_wasserstein(key, x[:, :1], x[:, :1] + 2.5) == pytest.approx(2.5, rel=1e-5)
    assert metrics.wasserstein2_exact(x[:400], x[:400] + s) == pytest.approx(5.0, rel=1e-5)


def test_kl_of_gaussians_matches_the_closed_form():
    mu, sigma_p, sigma_q = np.array([1.0, -0.5]), 1.0, 1.5
    p = continuous.gmm([[0.0, 0.0]], sigma_p)
    q = continuous.gmm([mu], sigma_q)
    exact = np.sum(np.log(sigma_q / sigma_p) + (sigma_p ** 2 + mu ** 2) / (2 * sigma_q ** 2) - 0.5)
    x = p.sample(jax.random.key(0), 50_000)
    est = metrics.kl_estimate(p.log_prob(x), q.log_prob(x))
    assert est.stderr < 0.01 and est.kl == pytest.approx(exact, abs=4 * est.stderr)
    assert metrics.kl_estimate(p.log_prob(x), p.log_prob(x)) == (0.0, 0.0)
    board = continuous.toy("checkerboard")  # a model that misses part of the data: infinite KL
    shifted = board.sample(jax.random.key(1), 100)
    assert metrics.kl_estimate(board.log_prob(shifted), board.log_prob(shifted + 2.0)).kl == np.inf


def test_noise_floor_is_the_metric_at_equal_size():
    train, held_out = _normal(0, 3000), _normal(1, 1000)
    assert metrics.noise_floor(metrics.mmd2, train, held_out, 500) == metrics.mmd2(train[:500], held_out[:500])
    sw = functools.partial(metrics.sliced_wasserstein, jax.random.key(0))
    assert 0 < metrics.noise_floor(sw, train, held_out, 1000) < 0.1
    with pytest.raises(JaxgenError, match=r"n=2000: need 1 <= n <= 1000"):
        metrics.noise_floor(metrics.mmd2, train, held_out, 2000)


def test_fd_digits_is_calibrated():
    """The classifier learns the digits; FD(train, validation) at equal size is far below FD against
    noise or a single class; FD of a feature shift with equal covariances is |shift|^2."""
    train, train_y = continuous.digits_arrays("train")
    val, val_y = continuous.digits_arrays("validation")
    assert np.mean(metrics.digits_logits(val).argmax(-1) == val_y) > 0.95
    floor = metrics.noise_floor(metrics.fd_digits, train, val, len(val))
    noise = np.random.default_rng(0).uniform(-1, 1, val.shape).astype(np.float32)
    assert floor < 0.1 * metrics.fd_digits(train[: len(val)], noise)
    assert floor < 0.1 * metrics.fd_digits(train[: len(val)], train[train_y == 0])
    assert metrics.digits_score(val) > 8.0 > 5.0 > metrics.digits_score(noise)
    feats = metrics.digits_features(val)
    assert feats.shape == (359, 64)
    assert metrics.frechet_distance(feats, feats + 0.5) == pytest.approx(64 * 0.25, rel=1e-4)
    assert abs(metrics.frechet_distance(feats, feats)) < 1e-4


def test_bad_metric_inputs_name_the_value():
    with pytest.raises(JaxgenError, match=r"shapes \(10, 2\) and \(10, 3\)"):
        metrics.mmd2(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(JaxgenError, match=r"shapes \(10,\) and \(10, 1\)"):
        metrics.sliced_wasserstein(jax.random.key(0), np.zeros(10), np.zeros((10, 1)))
    with pytest.raises(JaxgenError, match="same size, got 10 and 9"):
        metrics.wasserstein2_exact(np.zeros((10, 2)), np.zeros((9, 2)))
    with pytest.raises(JaxgenError, match="bandwidths"):
        metrics.mmd2(np.zeros((10, 2)), np.zeros((10, 2)))  # median distance 0
    with pytest.raises(JaxgenError, match=r"digit images have shape \(5, 7, 7\)"):
        metrics.fd_digits(np.zeros((5, 7, 7)), np.zeros((5, 64)))
    with pytest.raises(JaxgenError, match=r"shapes \(5,\) and \(4,\)"):
        metrics.kl_estimate(np.zeros(5), np.zeros(4))
    with pytest.raises(JaxgenError, match="needs samples drawn from p"):
        metrics.kl_estimate(np.array([0.0, -np.inf]), np.zeros(2))
