"""Continuous-token AR (jaxgen.flow.continuous_ar): losses, exact NLLs and samplers on a tiny backbone."""
import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest
from scipy import stats

from jaxgen.config import ModelConfig
from jaxgen.errors import ConfigError
from jaxgen.flow import continuous_ar as car
from jaxgen.flow import continuous_ar_sampling as cars

BACKBONE = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64,
                       max_seq_len=16)
B, L, D = 2, 6, 3
STEPS = 4  # head ODE intervals in the fast tests
LABELS = jnp.array([0, 2], jnp.int32)


def make_spec(**kw):
    base = dict(backbone=BACKBONE, token_dim=D, seq_len=L, head_hidden=32, head_depth=2, head_time_dim=16,
                num_classes=3)
    return car.ContinuousARSpec(**(base | kw))


SPECS = {"causal": make_spec(), "mar": make_spec(order="mar"), "xar": make_spec(order="xar", block_size=2),
         "gaussian": make_spec(gaussian_head=True)}


def perturbed(params, seed, scale=0.3):
    """Fresh params with every head / input leaf jittered (NumPy draws: no compiles), so the head
    reads z (its zero-initialized modulations would otherwise hide the condition)."""
    rng = np.random.RandomState(seed)
    moved = jax.tree.map(lambda a: jnp.asarray(np.asarray(a) + scale * rng.standard_normal(a.shape), jnp.float32),
                         {"head": params["head"], "in": params["in"]})
    return params | moved


@pytest.fixture(scope="module")
def models():
    return {name: perturbed(car.init(jax.random.key(0), spec), 1) for name, spec in SPECS.items()}


@pytest.fixture(scope="module")
def x_BLD():
    return jnp.asarray(np.random.RandomState(5).standard_normal((B, L, D)), jnp.float32)  # no compile


token_losses = jax.jit(car.token_losses, static_argnums=1)


@pytest.mark.parametrize("name", list(SPECS))
def test_loss_nll_sample_shapes_and_finite(models, x_BLD, name):
    spec, params = SPECS[name], models[name]
    per, weight = token_losses(params, spec, x_BLD, jax.random.key(2), LABELS)
    assert per.shape == weight.shape == (B, L) and np.all(np.isfinite(per))
    assert np.all(weight == 1.0) if spec.order != "mar" else 0 < weight.sum() <= B * L
    nll = car.token_nll(params, spec, x_BLD, steps=STEPS, label_B=LABELS)
    assert nll.shape == (B, L) and np.all(np.isfinite(nll))
    x = cars.sample(params, spec, jax.random.key(3), B, steps=STEPS, num_iter=4, cfg_scale=2.0,
                   cfg_schedule="linear" if name == "xar" else "constant", label_B=LABELS)
    assert x.shape == (B, L, D) and np.all(np.isfinite(x))
    assert np.all(np.asarray(x) != 0.0)  # every position was written (the canvas starts at zeros)


@pytest.mark.parametrize("name,changed,same,moved", [("causal", 4, [0, 1, 2, 3], [4, 5]),
                                                     ("xar", 2, [0, 1, 3], [2, 4, 5]),  # entities of 2 tokens
                                                     ("gaussian", 3, [0, 1, 2], [3, 4, 5])])
def test_block_causal_orders_use_only_past_tokens(models, x_BLD, name, changed, same, moved):
    """Changing token `changed` leaves the losses and NLLs of earlier entities (and, for xar, of the
    rest of its own entity: its tokens are independent given z) unchanged; later ones move."""
    spec, params = SPECS[name], models[name]
    x2 = x_BLD.at[:, changed].add(1.5)
    key = jax.random.key(9)
    (l1, _), (l2, _) = (token_losses(params, spec, x, key, LABELS) for x in (x_BLD, x2))
    n1, n2 = (car.token_nll(params, spec, x, steps=STEPS, label_B=LABELS) for x in (x_BLD, x2))
    for a, b in ((l1, l2), (n1, n2)):
        np.testing.assert_allclose(a[:, same], b[:, same], rtol=1e-6, atol=1e-6)
        assert np.all(np.abs(np.asarray(a[:, moved] - b[:, moved])).max(axis=0) > 1e-4)


def test_mar_chain_nll_conditions_on_earlier_steps_only(models, x_BLD):
    spec, params = SPECS["mar"], models["mar"]
    x2 = x_BLD.at[:, L - 1].add(1.5)
    n1, n2 = (car.token_nll(params, spec, x, steps=STEPS, label_B=LABELS) for x in (x_BLD, x2))
    np.testing.assert_allclose(n1[:, :L - 1], n2[:, :L - 1], rtol=1e-6, atol=1e-6)  # raster: last is generated last
    reverse = jnp.tile(jnp.arange(L)[::-1], (B, 1))  # now position L-1 is generated first: the others see it
    r1, r2 = (car.token_nll(params, spec, x, steps=STEPS, label_B=LABELS, order_BL=reverse) for x in (x_BLD, x2))
    assert np.abs(np.asarray(r1[:, :L - 1] - r2[:, :L - 1])).max() > 1e-4


def test_gaussian_head_nll_is_the_closed_form(models, x_BLD):
    spec, params = SPECS["gaussian"], models["gaussian"]
    z = car.teacher_hidden(params, spec, x_BLD, LABELS).reshape(B * L, -1)
    mean, log_std = car.gaussian_params(params["head"], spec, z, jnp.repeat(LABELS, L))
    want = -stats.norm.logpdf(np.asarray(x_BLD).reshape(B * L, D), np.asarray(mean),
                              np.exp(np.asarray(log_std))).sum(-1).reshape(B, L)
    got = car.token_nll(params, spec, x_BLD, steps=STEPS, label_B=LABELS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,exact", [("causal", True), ("mar", True), ("causal", False)])
def test_flow_nll_of_a_constant_velocity_head(models, x_BLD, name, exact):
    """A head whose velocity is the constant c pushes N(0, I) to N(c, I): NLL = -log N(x; c, I)."""
    c = jnp.array([0.5, -1.0, 2.0])
    params = models[name]
    head = params["head"] | {"out": {"w": jnp.zeros_like(params["head"]["out"]["w"]), "b": c}}
    params = params | {"head": head}
    nll = car.token_nll(params, SPECS[name], x_BLD, steps=STEPS, label_B=LABELS, exact_divergence=exact,
                        key=None if exact else jax.random.key(4))
    want = -stats.norm.logpdf(np.asarray(x_BLD) - np.asarray(c)).sum(-1)
    np.testing.assert_allclose(nll, want, rtol=1e-5, atol=1e-5)


def test_training_learns_the_correlation_of_two_tokens():
    """x = (x1, x2), unit Gaussians with correlation 0.9, as two 1-D tokens: a few hundred steps
    bring the causal flow model's exact NLL well below the best model that ignores the context
    (the product of marginals, log(2 pi e) = 2.84 nats) toward the true entropy 2.01."""
    spec = car.ContinuousARSpec(BACKBONE, token_dim=1, seq_len=2, head_hidden=32, head_depth=2, head_time_dim=16)
    rho = 0.9
    chol = jnp.array([[1.0, 0.0], [rho, (1 - rho ** 2) ** 0.5]])
    data = lambda k, n: (jax.random.normal(k, (n, 2)) @ chol.T)[..., None]
    opt = optax.adam(5e-3)

    @jax.jit
    def step(params, state, k):
        kd, kl = jax.random.split(k)
        (value, metrics), grads = jax.value_and_grad(car.loss, has_aux=True)(params, spec, data(kd, 128), kl)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, metrics

    params = car.init(jax.random.key(0), spec)
    x = data(jax.random.key(7), 512)
    before = float(car.token_nll(params, spec, x, steps=8).sum(1).mean())
    state = opt.init(params)
    for i in range(200):
        params, state, metrics = step(params, state, jax.random.key(100 + i))
    assert set(metrics) == {"loss", "loss_tokens"} and np.isfinite(metrics["loss"])
    after = float(car.token_nll(params, spec, x, steps=8).sum(1).mean())
    independent, true = np.log(2 * np.pi * np.e), np.log(2 * np.pi * np.e) + 0.5 * np.log(1 - rho ** 2)
    assert abs(before - independent) < 0.15  # a fresh head is N(0, I) per token
    assert after < independent - 0.5 and after > true - 0.15, (before, after)


@pytest.mark.parametrize("seq_len,num_iter", [(6, 4), (6, 64), (16, 5), (1, 3)])
def test_mar_schedule_reveals_every_position_exactly_once(seq_len, num_iter):
    before, after, cfg_len = cars.mar_schedule(seq_len, num_iter)
    assert before[0] == seq_len and after[-1] == 0 and np.all(before[1:] == after[:-1])
    assert np.all(after[:-1] >= 1) and np.all(cfg_len >= 1)  # MAR keeps one masked until the last iteration
    width = int(np.max(before - after))
    rng = np.random.RandomState(0)  # a random generation order per row (NumPy: no compile per length)
    order = jnp.asarray(np.stack([rng.permutation(seq_len) for _ in range(3)]), jnp.int32)
    revealed = np.concatenate([cars.reveal_positions(order, before, after, k, width=width) for k in range(num_iter)],
                              axis=1)
    for row in revealed:
        np.testing.assert_array_equal(np.sort(row[row < seq_len]), np.arange(seq_len))


@pytest.mark.parametrize("name", ["causal", "mar"])
def test_cfg_scale_one_is_the_conditional_model(models, name):
    """The guided program (null-class rows batched with the conditional ones) at scale 1 draws what
    the unguided conditional sampler draws; scale 3 moves the samples."""
    spec, params = SPECS[name], models[name]
    key = jax.random.key(11)
    plain = cars.sample(params, spec, key, B, steps=STEPS, num_iter=4, label_B=LABELS)
    run = cars._sample_mar if spec.order == "mar" else cars._sample_blocks
    extra = {"num_iter": 4} if spec.order == "mar" else {}
    guided = lambda s: run(params, spec, key, LABELS, jnp.float32(s), jnp.float32(1.0), batch=B, steps=STEPS,
                           method="midpoint", linear=False, guided=True, **extra)
    np.testing.assert_allclose(guided(1.0), plain, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(guided(3.0) - plain)).max() > 1e-3


@pytest.mark.parametrize("name", ["causal", "xar"])
def test_kv_cache_sampling_matches_teacher_forcing(models, name):
    """Each entity the cached sampler drew is what the head draws (same noise) from the hidden
    states of one full teacher-forced forward over the finished sample."""
    spec, params = SPECS[name], models[name]
    key, b, n = jax.random.key(12), spec.block_size, spec.num_entities
    x = cars.sample(params, spec, key, B, steps=STEPS, label_B=LABELS)
    z = car.teacher_hidden(params, spec, x, LABELS)
    noise = jnp.concatenate([jax.random.normal(jax.random.fold_in(key, j), (B, b, D)) for j in range(n)], axis=1)
    cond = (z.reshape(B * L, -1), jnp.repeat(LABELS, L))  # the head treats rows independently: all at once
    want = cars.head_sample(params["head"], spec, cond, None, 1.0, noise.reshape(B * L, D), steps=STEPS,
                            method="midpoint")
    np.testing.assert_allclose(x.reshape(B * L, D), want, rtol=1e-4, atol=1e-4)


def test_bad_inputs_name_the_value_and_the_fix(models, x_BLD):
    spec, params = SPECS["causal"], models["causal"]
    with pytest.raises(ConfigError, match=r"shape \(2, 6, 2\).*token_dim=3"):
        car.loss(params, spec, x_BLD[..., :2], jax.random.key(0))
    with pytest.raises(ConfigError, match="seq_len=20.*max_seq_len is 16; raise max_seq_len"):
        make_spec(seq_len=20)
    with pytest.raises(ConfigError, match="seq_len=16 needs 17 positions.*max_seq_len"):
        make_spec(seq_len=16, order="mar")
    with pytest.raises(ConfigError, match="unknown order 'next_scale'; use one of causal, mar, xar"):
        make_spec(order="next_scale")
    with pytest.raises(ConfigError, match="seq_len=6 is not a multiple of block_size=4"):
        make_spec(order="xar", block_size=4)
    with pytest.raises(ConfigError, match=r"cfg_scale=-1.0 must be .*>= 0"):
        cars.sample(params, spec, jax.random.key(0), B, cfg_scale=-1.0, label_B=LABELS)
    with pytest.raises(ConfigError, match="cfg_scale=2.0 guides toward a class: pass label_B"):
        cars.sample(params, spec, jax.random.key(0), B, cfg_scale=2.0)
    with pytest.raises(ConfigError, match="unknown cfg_schedule 'cosine'"):
        cars.sample(params, spec, jax.random.key(0), B, cfg_schedule="cosine")
    with pytest.raises(ConfigError, match="unconditional.*drop label_B"):
        car.token_nll(params, make_spec(num_classes=0), x_BLD, label_B=LABELS)
    with pytest.raises(ConfigError, match=r"class 3 outside \[0, num_classes=3\)"):
        car.token_nll(params, spec, x_BLD, label_B=jnp.array([0, 3]))
    with pytest.raises(ConfigError, match="unknown ODE method 'rk5'"):
        car.token_nll(params, spec, x_BLD, method="rk5")
