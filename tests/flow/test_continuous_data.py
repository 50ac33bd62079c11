"""Continuous data: 2-D toys (exact densities), offline digits / toy data sets, step-indexed batches."""
import jax
import numpy as np
import pytest

from jaxgen.data import continuous
from jaxgen.errors import ConfigError, JaxgenError
from jaxgen.flow import metrics

EXACT = ("eight_gaussians", "gmm", "checkerboard")


def _grid(half=7.0, step=0.02):
    """Cell midpoints of a square grid (never on a checkerboard edge) and the cell area."""
    g = np.arange(-half, half, step) + step / 2
    xx, yy = np.meshgrid(g, g)
    return np.stack([xx.ravel(), yy.ravel()], -1).astype(np.float32), step ** 2


@pytest.mark.parametrize("name", EXACT)
def test_log_prob_is_a_density_that_the_samples_follow(name):
    """log_prob integrates to 1 on a grid, and the mean log_prob of samples matches the grid's
    E_p[log p] (minus the entropy) within Monte Carlo error."""
    toy = continuous.toy(name)
    pts, area = _grid()
    lp = np.asarray(jax.jit(toy.log_prob)(pts), np.float64)
    p = np.exp(lp)
    assert p.sum() * area == pytest.approx(1.0, abs=2e-3)
    neg_entropy = np.sum(p * np.where(p > 0, lp, 0.0)) * area
    x = jax.jit(toy.sample, static_argnums=1)(jax.random.key(1), 20_000)
    assert x.shape == (20_000, 2)
    lp_x = np.asarray(toy.log_prob(x), np.float64)
    assert np.isfinite(lp_x).all()  # every sample lies in the support
    assert lp_x.mean() == pytest.approx(neg_entropy, abs=4 * lp_x.std() / np.sqrt(len(lp_x)) + 5e-3)


def test_samples_are_keyed_labeled_and_weighted():
    gmm = continuous.toy("gmm")
    key = jax.random.key(7)
    np.testing.assert_allclose(gmm.sample(key, 100), jax.jit(gmm.sample, static_argnums=1)(key, 100), rtol=1e-5)
    assert not np.allclose(gmm.sample(key, 100), gmm.sample(jax.random.key(8), 100))
    x, comp = gmm.sample_labeled(key, 30_000)
    np.testing.assert_allclose(np.bincount(comp, minlength=3) / len(comp), [0.5, 0.3, 0.2], atol=0.015)
    np.testing.assert_allclose(x[comp == 1].std(0), [0.3, 0.8], rtol=0.05)  # anisotropic scales
    mix = continuous.gmm(np.zeros((2, 5)), [1.0, 2.0])  # any D, scales per component
    assert mix.sample(key, 10).shape == (10, 5) and mix.log_prob(np.zeros((4, 5))).shape == (4,)


def test_moons_and_checkerboard_samples():
    moons = continuous.toy("moons")
    assert moons.log_prob is None
    a, which = moons.sample_labeled(jax.random.key(0), 1500)
    b = moons.sample(jax.random.key(1), 1500)
    assert 0.45 < np.mean(which) < 0.55 and np.abs(a).max() < 3.5
    other = continuous.toy("eight_gaussians").sample(jax.random.key(2), 1500)
    assert abs(metrics.mmd2(a, b)) < 2e-3 < 0.05 < metrics.mmd2(a, other)
    board, cell = continuous.toy("checkerboard").sample_labeled(jax.random.key(3), 16_000)
    assert np.abs(board).max() <= 4.0 and set(np.unique(cell)) == set(range(8))
    np.testing.assert_allclose(np.bincount(cell) / len(cell), 1 / 8, atol=0.01)


def test_bad_toy_inputs_name_the_value():
    valid = "valid toys: checkerboard, eight_gaussians, gmm, moons"
    with pytest.raises(ConfigError, match=f"unknown toy 'spiral'; {valid}"):
        continuous.toy("spiral")
    toy = continuous.toy("eight_gaussians")
    for n in (0, -3):
        with pytest.raises(JaxgenError, match=f"n={n}: the number of samples must be positive"):
            toy.sample(jax.random.key(0), n)
    with pytest.raises(JaxgenError, match=r"shape \(4, 3\); this density takes \[n, 2\]"):
        toy.log_prob(np.zeros((4, 3)))
    with pytest.raises(ConfigError, match=r"weights \[1.0, 2.0\] need shape \[K\]=3"):
        continuous.gmm(np.zeros((3, 2)), 1.0, [1.0, 2.0])
    with pytest.raises(ConfigError, match="scales"):
        continuous.gmm(np.zeros((3, 2)), [1.0, 2.0])


def test_digits_builds_offline(data_dir):
    train = continuous.load_continuous("digits", "train", data_dir=data_dir)
    val = continuous.load_continuous("digits", "validation", data_dir=data_dir)
    assert train["x"].shape == (1438, 8, 8, 1) and val["x"].shape == (359, 8, 8, 1)
    for split in (train, val):
        assert split["x"].dtype == np.float32 and split["x"].min() == -1.0 and split["x"].max() == 1.0
        assert set(np.unique(split["label"])) == set(range(10))
    x, y = continuous.digits_arrays("validation")  # same examples as sklearn's, in tfds order
    order = np.lexsort(val["x"].reshape(len(y), -1).T)
    ref = np.lexsort(x.reshape(len(y), -1).T)
    np.testing.assert_array_equal(val["x"][order], x[ref])
    np.testing.assert_array_equal(val["label"][order], y[ref])


def test_toy_data_set_and_resumable_batches(data_dir):
    sizes = dict(num_train=1000, num_validation=200, data_seed=3)
    train = continuous.load_continuous("eight_gaussians", "train", data_dir=data_dir, **sizes)
    x, y = continuous.toy_arrays("eight_gaussians", "train", **sizes)
    assert train["x"].shape == (1000, 2) and train["label"].max() == 7
    np.testing.assert_array_equal(np.sort(train["x"], 0), np.sort(x, 0))  # the seed's draw, reordered by tfds
    val = continuous.load_continuous("eight_gaussians", "validation", data_dir=data_dir, **sizes)
    assert len(val["x"]) == 200 and not np.isin(val["x"][:, 0], train["x"][:, 0]).any()  # held-out draw
    fresh = continuous.continuous_batches("eight_gaussians", "validation", 50, seed=1, data_dir=data_dir, **sizes)
    first = [next(fresh) for _ in range(6)]
    assert first[0]["x"].shape == (50, 2) and first[0]["label"].dtype == np.int32
    epoch = np.concatenate([b["x"] for b in first[:4]])  # one epoch covers every row once
    np.testing.assert_array_equal(np.sort(epoch, 0), np.sort(val["x"], 0))
    resumed = continuous.continuous_batches("eight_gaussians", "validation", 50, seed=1, start_step=5,
                                            data_dir=data_dir, **sizes)
    np.testing.assert_array_equal(next(resumed)["x"], first[5]["x"])
    batches, held_out = continuous.continuous_data("eight_gaussians", 64, data_dir=data_dir, **sizes)
    assert batches.at(3)["x"].shape == (64, 2) and len(held_out["x"]) == 200


def test_bad_data_inputs_name_the_value(data_dir):
    with pytest.raises(ConfigError, match="unknown continuous data set 'cifar'; valid: digits, checkerboard"):
        continuous.load_continuous("cifar", "train", data_dir=data_dir)
    with pytest.raises(JaxgenError, match="split='test'"):
        continuous.load_continuous("digits", "test", data_dir=data_dir)
    with pytest.raises(ConfigError, match="num_train=0"):
        continuous.load_continuous("moons", "train", data_dir=data_dir, num_train=0)
    with pytest.raises(JaxgenError, match="batch_size=500 with 359 examples"):
        next(continuous.continuous_batches("digits", "validation", 500, data_dir=data_dir))
