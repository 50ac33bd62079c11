"""The flow-matching variants (jaxgen.flow.variants), each pinned by its defining property:

- source: with a zero velocity the model's log-likelihood is the source's log-density (shifted by
  the norm alignment's D log s); pruning removes exactly the cones' Gaussian mass.
- blockwise: net k's gradient comes only from its segment's rows and times; K identical nets
  sample as one net; the net switch is exact at the edges for multi-stage solvers.
- vecor: weight 0 is cfm_loss; the regulariser pushes predictions away from negatives and its
  optimum is the affine retargeting (1 + w) v+ - w v-.
- transition: with the exact posterior of Y, T transitions keep the path's marginals (a T-step
  Euler FM with the exact velocity does not); the DTM sampler is wired as that loop.
- latent: the AE reconstructs digits after seconds of training; with a zero velocity the sampler
  decodes the scaled source latents.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgen.data.continuous import digits_arrays, toy
from jaxgen.errors import ConfigError
from jaxgen.flow import losses, nets, solve
from jaxgen.flow.variants import blockwise, latent, source, transition, vecor

TINY = nets.NetSpec(dim=2, hidden=16, depth=1, time_dim=8)


def randomise_out(params, seed, scale=0.3):
    """A fresh net's output projection is zero; give it random weights so gradients reach every layer
    (NumPy draws: no compiles; stacked nets, as blockwise's, get independent draws per net)."""
    rng = np.random.RandomState(seed)
    draw = lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), jnp.float32)
    out = {"w": draw(params["out"]["w"]), "b": params["out"]["b"]}
    mod = {"w": draw(params["final_mod"]["w"]), "b": params["final_mod"]["b"]}
    return {**params, "out": out, "final_mod": mod}


@pytest.fixture(scope="module")
def gmm_data():
    return toy("gmm").sample(jax.random.key(2), 2000)


# ----------------------------------------------------------------------------- source

@pytest.mark.parametrize("kind", ["gaussian", "diag_gaussian", "gmm", "pruned"])
def test_zero_velocity_likelihood_is_the_source_density(kind, gmm_data):
    sspec = source.SourceSpec(kind=kind, dim=2, components=3, threshold=0.8)
    if kind == "pruned":  # two disjoint cones; data points fall in them too (log p = -inf there)
        sp = source.pruned_params(np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), sspec.threshold)
    else:
        sp = source.fit_source(sspec, gmm_data, jax.random.key(3))
    scale = source.norm_align_scale(gmm_data)
    spec = source.SourceFMSpec(TINY, sspec, data_scale=scale)
    params = source.init(jax.random.key(0), spec, sp)  # a fresh net: velocity exactly 0
    x = gmm_data[:64]
    got = source.log_likelihood(params, spec, x, steps=4)
    want = source.log_prob_source(sp, sspec, x * scale) + 2 * math.log(scale)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(np.asarray(got)[fin], np.asarray(want)[fin], rtol=1e-6, atol=1e-6)
    if kind == "pruned":
        assert 0 < (~fin).sum() < len(fin)
        # the sampler pushes source draws through the (identity) flow and undoes the data scaling
        np.testing.assert_allclose(np.asarray(source.sample(params, spec, jax.random.key(5), 16, steps=3)),
                                   np.asarray(source.sample_source(sp, sspec, jax.random.key(5), 16)) / scale,
                                   atol=1e-6)


def test_fitted_sources_match_the_data(gmm_data):
    diag = source.fit_source(source.SourceSpec("diag_gaussian"), gmm_data)
    np.testing.assert_allclose(np.asarray(diag["mean"]), np.asarray(gmm_data.mean(0)), atol=1e-5)
    np.testing.assert_allclose(np.exp(np.asarray(diag["log_std"])), np.asarray(gmm_data.std(0)), rtol=1e-4)
    spec = source.SourceSpec("gmm", components=3)
    fitted = source.fit_source(spec, gmm_data, jax.random.key(3))
    fit_ll = float(source.log_prob_source(fitted, spec, gmm_data).mean())
    assert abs(fit_ll - float(toy("gmm").log_prob(gmm_data).mean())) < 0.05  # EM finds the true mixture
    # norm alignment: the scaled data's mean norm is the standard Gaussian's sqrt(D)
    s = source.norm_align_scale(gmm_data)
    assert np.mean(np.linalg.norm(np.asarray(gmm_data) * s, axis=-1)) == pytest.approx(math.sqrt(2), rel=1e-5)


def test_pruning_removes_exactly_the_cone_mass():
    c = 0.8  # half-angle acos(0.8) ~ 36.9 deg: cones around +x and +y do not overlap
    dirs = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    spec = source.SourceSpec("pruned", dim=2, threshold=c)
    sp = source.pruned_params(dirs, c)
    removed = 2 * math.acos(c) / math.pi  # in 2-D a cone holds acos(c) / pi of N(0, I)
    assert float(sp["log_accept"]) == pytest.approx(math.log(1 - removed), rel=1e-5)
    # a Monte Carlo rejection rate of N(0, I) draws agrees (4 standard errors)
    n = 100_000
    rng = np.random.RandomState(1)  # Monte Carlo draws with NumPy: no random-number compile per shape
    log_prob = jax.jit(source.log_prob_source, static_argnums=1)  # one program per input shape, not op by op
    rejected = float(jnp.mean(~jnp.isfinite(log_prob(sp, spec, rng.standard_normal((n, 2)).astype(np.float32)))))
    assert abs(rejected - removed) < 4 * math.sqrt(removed * (1 - removed) / n)
    # the density integrates to 1 (grid quadrature), and no sample falls in a cone
    h = 0.02
    g = (-7 + h * (np.arange(700) + 0.5)).astype(np.float32)  # cell centres over [-7, 7]
    xy = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    mass = float(jnp.sum(jnp.exp(log_prob(sp, spec, xy)))) * h * h
    assert mass == pytest.approx(1.0, abs=1e-3)
    draws = source.sample_source(sp, spec, jax.random.key(4), 4000)
    assert bool(jnp.all(jnp.isfinite(log_prob(sp, spec, draws))))
    # higher dimension: the incomplete-beta cone mass against Monte Carlo
    for d in (3, 6):
        u = rng.standard_normal((n, d))
        mc = float(np.mean(u[:, 0] / np.linalg.norm(u, axis=-1) > 0.3))
        assert abs(source.cone_mass(0.3, d) - mc) < 4 * math.sqrt(mc * (1 - mc) / n)
    # overlapping cones (acos(0.5) = 60 deg around axes 90 deg apart): Monte Carlo P(kept)
    over = source.pruned_params(dirs, 0.5)
    assert math.exp(float(over["log_accept"])) == pytest.approx(1 - 210 / 360, abs=3e-3)  # union [-60, 150] deg


def test_sparse_directions_and_chi_sphere():
    x = np.random.RandomState(0).standard_normal((500, 2)) * np.array([0.3, 1.0]) + np.array([3.0, 0.0])
    found = source.sparse_directions(x)  # centroids +-x, +-y; the data all point along +x
    want = np.array([[-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert len(found) == 3
    assert all(np.min(np.linalg.norm(want - f, axis=-1)) < 0.05 for f in found)
    spec = source.SourceSpec("chi_sphere", dim=5)
    draws = source.sample_source({}, spec, jax.random.key(0), 100)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(draws), axis=-1), math.sqrt(5), rtol=1e-5)
    with pytest.raises(ConfigError, match="no density"):
        source.log_prob_source({}, spec, draws)


def test_source_loss_trains_the_source_only_when_asked(gmm_data):
    spec = source.SourceFMSpec(TINY, source.SourceSpec("diag_gaussian"))
    params = source.init(jax.random.key(0), spec)
    params["net"] = randomise_out(params["net"], 1)
    batch = {"x": gmm_data[:32]}

    @jax.jit
    def source_grad_norms(params):
        grad = lambda train: jax.grad(lambda p: source.loss(p, spec, batch, jax.random.key(2), train_source=train)[0])
        return [sum(jnp.sum(a ** 2) for a in jax.tree.leaves(grad(train)(params)["source"])) for train in (False, True)]

    frozen, trained = source_grad_norms(params)
    assert float(frozen) == 0 and float(trained) > 0


def test_source_errors():
    with pytest.raises(ConfigError, match="unknown source kind 'normal'"):
        source.SourceSpec("normal")
    with pytest.raises(ConfigError, match="threshold=1.5"):
        source.SourceSpec("pruned", threshold=1.5)
    with pytest.raises(ConfigError, match="unit vectors"):
        source.pruned_params(np.array([[2.0, 0.0]]), 0.5)
    with pytest.raises(ConfigError, match="must agree"):
        source.SourceFMSpec(TINY, source.SourceSpec(dim=3))


# ----------------------------------------------------------------------------- blockwise

BW = blockwise.BlockwiseSpec(TINY, edges=(0.0, 0.3, 0.7, 1.0))


@pytest.fixture(scope="module")
def bw_params():
    params = blockwise.init(jax.random.key(0), BW)
    return randomise_out(params, 1)  # the K stacked nets, each its own draw


def test_each_segment_net_learns_only_from_its_segment(bw_params, gmm_data):
    t = blockwise.segment_times(BW, jax.random.key(0), 1000)
    seg = np.asarray(blockwise.segment_of(BW, t))
    np.testing.assert_array_equal(seg, np.repeat(np.arange(3)[:, None], 1000, 1))  # t of group k lies in S_k
    assert np.all(np.asarray(t) >= np.array(BW.edges[:-1])[:, None])
    assert np.all(np.asarray(t) < np.array(BW.edges[1:])[:, None])
    x = np.asarray(gmm_data[:12])  # rows 4k..4k+3 train segment k
    grad = jax.jit(jax.grad(lambda p, x: blockwise.loss(p, BW, {"x": x}, jax.random.key(4))[0]))
    g0 = grad(bw_params, x)
    for k in range(3):
        moved = x.copy()
        moved[4 * k:4 * k + 4] += 1.0  # change segment k's rows only
        g1 = grad(bw_params, moved)
        for j in range(3):
            same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(blockwise.net_params(g0, j)),
                                                            jax.tree.leaves(blockwise.net_params(g1, j))))
            assert same == (j != k), (k, j)


def test_identical_segment_nets_sample_like_one_net(bw_params):
    one = blockwise.net_params(bw_params, 1)
    stacked = jax.tree.map(lambda a: jnp.stack([a] * 3), one)
    x_0 = jnp.asarray(np.random.RandomState(5).standard_normal((8, 2)), jnp.float32)
    grid = np.concatenate([g[:-1] for g in blockwise.segment_grids(BW, 2)] + [np.float32([1.0])])
    got = blockwise.sample_from(stacked, BW, x_0, 2, "heun2")
    want = solve(nets.velocity_fn(one, TINY), x_0, grid, "heun2")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-6)


def test_net_switch_is_exact_at_segment_edges(bw_params):
    c = jnp.array([[1.0, -2.0], [3.0, 0.5], [-1.0, 1.0]])  # net k's velocity is the constant c_k
    const = jax.tree.map(jnp.zeros_like, bw_params)
    const["out"]["b"] = c
    x_0 = jnp.asarray(np.random.RandomState(6).standard_normal((4, 2)), jnp.float32)
    want = x_0 + (c * jnp.diff(jnp.array(BW.edges))[:, None]).sum(0)
    np.testing.assert_allclose(np.asarray(blockwise.sample_from(const, BW, x_0, 2, "heun2")), np.asarray(want),
                               atol=1e-6)
    grid = np.concatenate([g[:-1] for g in blockwise.segment_grids(BW, 2)] + [np.float32([1.0])])
    routed = blockwise.routed_velocity_fn(const, BW)
    np.testing.assert_allclose(np.asarray(solve(routed, x_0, grid, "euler")), np.asarray(want), atol=1e-6)
    assert not np.allclose(np.asarray(solve(routed, x_0, grid, "heun2")), np.asarray(want), atol=1e-3)


def test_blockwise_errors():
    with pytest.raises(ConfigError, match="num_segments=0"):
        blockwise.uniform_edges(0)
    with pytest.raises(ConfigError, match="strictly increasing"):
        blockwise.BlockwiseSpec(TINY, edges=(0.0, 0.6, 0.4, 1.0))
    with pytest.raises(ConfigError, match="K >= 1"):
        blockwise.BlockwiseSpec(TINY, edges=(0.0,))
    with pytest.raises(ConfigError, match="start at 0.0"):
        blockwise.BlockwiseSpec(TINY, edges=(0.1, 1.0))
    with pytest.raises(ConfigError, match="multiple of the number of segments"):
        blockwise.loss(blockwise.init(jax.random.key(0), BW), BW, {"x": jnp.zeros((5, 2))}, jax.random.key(0))
    with pytest.raises(ConfigError, match="steps_per_segment"):
        blockwise.segment_grids(BW, (2, 2))


# ----------------------------------------------------------------------------- vecor

@pytest.fixture(scope="module")
def tiny_params():
    return randomise_out(nets.init(jax.random.key(0), TINY), 1)


def test_vecor_weight_zero_is_plain_cfm_and_pushes_from_negatives(tiny_params, gmm_data):
    @jax.jit
    def at_zero(params, x_1, key):
        apply_fn = lambda x, t: nets.apply(params, TINY, x, t)
        return ([vecor.vecor_loss(apply_fn, x_1, key, weight=0.0, negative=n) for n in vecor.NEGATIVES],
                losses.cfm_loss(apply_fn, x_1, key))

    got, want = at_zero(tiny_params, gmm_data[:64], jax.random.key(3))
    for value, parts in got:
        assert float(value) == pytest.approx(float(want), rel=1e-6)
        assert float(parts["fm"]) == pytest.approx(float(want), rel=1e-6)
    # at the FM optimum (pred = v+) the descent direction is w (v+ - v-): away from every negative
    rng = np.random.RandomState(4)
    v_pos, v_neg = (jnp.asarray(rng.standard_normal((16, 2)), jnp.float32) for _ in range(2))
    w, lr = 0.3, 0.5
    grad_fn = jax.jit(jax.grad(lambda v: vecor.contrastive_loss(v, v_pos, v_neg, w)[0]))
    grad = grad_fn(v_pos)
    np.testing.assert_allclose(np.asarray(-grad), np.asarray(2 * w * (v_pos - v_neg) / v_pos.size), atol=1e-7)
    dist = lambda v: np.linalg.norm(np.asarray(v - v_neg), axis=-1)
    assert np.all(dist(v_pos - lr * grad) > dist(v_pos))
    # per-row optimum: the affine retargeting (1 + w) v+ - w v-, i.e. (1 + w) x DeltaFM at lambda = w / (1 + w)
    np.testing.assert_allclose(np.asarray(grad_fn((1 + w) * v_pos - w * v_neg)), 0.0, atol=1e-7)
    v = rng.standard_normal((16, 2)).astype(np.float32)
    vp, vn, lam = np.asarray(v_pos), np.asarray(v_neg), w / (1 + w)
    delta_fm = np.mean(np.mean((v - vp) ** 2, -1) - lam * np.mean((v - vn) ** 2, -1))
    assert float(vecor.contrastive_loss(v, vp, vn, w)[0]) == pytest.approx((1 + w) * delta_fm, rel=1e-5)


def test_vecor_training_step_moves_predictions_away_from_negatives(tiny_params, gmm_data):
    x_1 = gmm_data[:128]
    key = jax.random.key(3)

    @jax.jit
    def push_after_step(params, weight):
        """mean ||v - v-||^2 at the batch's x_t after one SGD step on the VeCoR loss with `weight`."""
        apply_fn = lambda p: lambda x, t: nets.apply(p, TINY, x, t)
        g = jax.grad(lambda p: vecor.vecor_loss(apply_fn(p), x_1, key, weight=weight)[0])(params)
        stepped = jax.tree.map(lambda p, d: p - 0.05 * d, params, g)
        k0, kt = jax.random.split(key)  # the draws vecor_loss makes from `key`
        x_0 = jax.random.normal(k0, x_1.shape)
        t = jax.random.uniform(kt, (x_1.shape[0],))
        x_t = t[:, None] * x_1 + (1 - t[:, None]) * x_0
        v_neg = vecor.negatives(jax.random.fold_in(key, 1), x_0, x_1)
        return jnp.mean((apply_fn(stepped)(x_t, t) - v_neg) ** 2)

    assert float(push_after_step(tiny_params, 0.5)) > float(push_after_step(tiny_params, 0.0))
    spec = vecor.VeCoRSpec(TINY, weight=0.5)
    value, metrics = jax.jit(vecor.loss, static_argnums=1)(tiny_params, spec, {"x": x_1}, key)
    assert float(value) == pytest.approx(1.5 * float(metrics["fm"]) - 0.5 * float(metrics["push"]), rel=1e-5)
    assert vecor.sample(tiny_params, spec, jax.random.key(0), 4, steps=2).shape == (4, 2)


def test_vecor_errors():
    with pytest.raises(ConfigError, match="unknown VeCoR negative 'swap'"):
        vecor.VeCoRSpec(TINY, negative="swap")
    with pytest.raises(ConfigError, match="weight=-0.1"):
        vecor.VeCoRSpec(TINY, weight=-0.1)
    with pytest.raises(ConfigError, match="perturb_std=0"):
        vecor.VeCoRSpec(TINY, negative="perturb", perturb_std=0)


# ----------------------------------------------------------------------------- transition

def test_transitions_with_the_exact_posterior_keep_the_path_marginals():
    T, n = 3, 40_000
    mu, cov = jnp.array([1.0, -0.5]), jnp.array([[0.05, 0.02], [0.02, 1.5]])
    sample_y, mean_y = transition.gaussian_posterior(mu, cov, T)
    x_0 = jnp.asarray(np.random.RandomState(0).standard_normal((n, 2)), jnp.float32)
    path = np.asarray(transition.transition_sample(sample_y, x_0, T, jax.random.key(1), return_path=True))
    for t in range(T + 1):
        a = t / T
        want_cov = (1 - a) ** 2 * np.eye(2) + a ** 2 * np.asarray(cov)
        np.testing.assert_allclose(path[t].mean(0), a * np.asarray(mu), atol=0.03)
        np.testing.assert_allclose(np.cov(path[t].T), want_cov, atol=0.04, rtol=0.05)
    # deterministic FM (Euler with the exact velocity E[Y | x_t]) at the same T collapses the covariance
    euler = np.asarray(transition.transition_sample(lambda x, t, k: mean_y(x, t), x_0, T, jax.random.key(1)))
    assert np.cov(euler.T)[0, 0] < 0.3 * 0.05 and np.cov(euler.T)[1, 1] < 0.6 * 1.5


DTM = transition.DTMSpec(dim=2, transitions=2, hidden=64, depth=2, feature_dim=32, time_dim=16, head_hidden=64,
                         head_depth=2, head_steps=8)


def test_dtm_sampler_is_the_transition_loop_over_its_head():
    params = transition.init(jax.random.key(0), DTM)
    key = jax.random.key(1)
    # a fresh head has velocity 0: each y is its eps' draw, so x_T = x_0 + sum_t eps'_t / T
    k0, k_steps = jax.random.split(key)
    want = jax.random.normal(k0, (4000, 2))
    for t in range(DTM.transitions):  # transition_sample's key for step t: fold_in(k_steps, t)
        want = want + jax.random.normal(jax.random.fold_in(k_steps, t), (4000, 2)) / DTM.transitions
    np.testing.assert_allclose(np.asarray(transition.sample(params, DTM, key, 4000)), np.asarray(want), atol=1e-6)
    with pytest.raises(ConfigError, match="transitions=0"):
        transition.DTMSpec(dim=2, transitions=0)


def test_dtm_learns_a_gaussian_in_two_transitions():
    """Trained briefly, 2 DTM transitions reproduce the data covariance; 2 Euler steps of the EXACT
    FM velocity do not (spec §2.5, "Demystifying TM": the stochastic Y keeps the covariance)."""
    mu, chol = jnp.array([1.0, -0.5]), jnp.array([[0.3, 0.0], [0.5, 1.0]])
    cov = np.asarray(chol @ chol.T)
    opt = optax.adam(3e-3)

    @jax.jit
    def train(params, key):
        def step(carry, k):
            p, state = carry
            kx, kl = jax.random.split(k)
            x = mu + jax.random.normal(kx, (256, 2)) @ chol.T
            value, g = jax.value_and_grad(lambda p: transition.loss(p, DTM, {"x": x}, kl)[0])(p)
            updates, state = opt.update(g, state, p)
            return (optax.apply_updates(p, updates), state), value
        (p, _), values = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, 600))
        return p, values

    start = transition.init(jax.random.key(0), DTM)
    params, values = train(start, jax.random.key(1))
    assert float(values[-50:].mean()) < 0.6 * float(values[:5].mean())
    for part in ("backbone", "head"):  # the loss trains both
        leaves = zip(jax.tree.leaves(start[part]), jax.tree.leaves(params[part]))
        assert not all(np.array_equal(a, b) for a, b in leaves)
    x = np.asarray(transition.sample(params, DTM, jax.random.key(2), 4000))
    np.testing.assert_allclose(x.mean(0), np.asarray(mu), atol=0.15)
    np.testing.assert_allclose(np.cov(x.T), cov, atol=0.15)
    _, mean_y = transition.gaussian_posterior(mu, cov, 2)
    x_0 = jnp.asarray(np.random.RandomState(3).standard_normal((4000, 2)), jnp.float32)
    euler = np.asarray(transition.transition_sample(lambda x, t, k: mean_y(x, t), x_0, 2, jax.random.key(4)))
    assert np.max(np.abs(np.cov(euler.T) - cov)) > 0.5


# ----------------------------------------------------------------------------- latent

AE = latent.AESpec(dim=64, latent_dim=16, hidden=128, depth=2)


@pytest.fixture(scope="module")
def digits_ae():
    x_train = digits_arrays("train")[0]
    ae, _ = latent.train_autoencoder(jax.random.key(0), AE, x_train, steps=300)
    return ae, x_train


def test_autoencoder_reconstructs_digits(digits_ae):
    ae, x_train = digits_ae
    x_val = digits_arrays("validation")[0].reshape(-1, 64)
    mse = float(latent.ae_loss(ae, AE, {"x": x_val})[0])
    baseline = float(np.mean((x_val - x_train.reshape(-1, 64).mean(0)) ** 2))  # predict the mean image
    assert mse < 0.2 * baseline, (mse, baseline)  # (PCA with 16 components: ~0.16 x baseline)


def test_latent_fm_with_zero_velocity_decodes_the_source_latents(digits_ae):
    ae, x_train = digits_ae
    scale = latent.latent_scale(ae, AE, x_train)
    z = scale * np.asarray(latent.encode(ae, AE, x_train))
    assert z.std() == pytest.approx(1.0, rel=1e-4)  # LFM's unit-variance latents
    spec = latent.LatentFMSpec(AE, nets.NetSpec(dim=16, hidden=16, depth=1, time_dim=8), scale)
    params = latent.init(jax.random.key(1), spec, ae)
    x, z_1 = latent.sample(params, spec, jax.random.key(2), 5, steps=3, return_latents=True)
    z_0 = jax.random.normal(jax.random.key(2), (5, 16))
    np.testing.assert_array_equal(np.asarray(z_1), np.asarray(z_0))
    np.testing.assert_allclose(np.asarray(x), np.asarray(latent.decode(ae, AE, z_0 / scale)), atol=1e-6)
    # the loss is FM on the scaled latents; the autoencoder stays frozen
    params["net"] = randomise_out(params["net"], 3)
    batch = {"x": x_train[:32]}

    @jax.jit
    def loss_grads_and_cfm(p):
        want = losses.cfm_loss(lambda zt, t: nets.apply(p["net"], spec.net, zt, t),
                               scale * latent.encode(p["ae"], AE, batch["x"]), jax.random.key(4))
        return jax.value_and_grad(lambda p: latent.loss(p, spec, batch, jax.random.key(4))[0])(p), want

    (value, grads), want = loss_grads_and_cfm(params)
    assert float(value) == pytest.approx(float(want), rel=1e-6)
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(grads["ae"]))
    assert float(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads["net"]))) > 0
    with pytest.raises(ConfigError, match="latent_dim=16"):
        latent.LatentFMSpec(AE, nets.NetSpec(dim=8), scale)
