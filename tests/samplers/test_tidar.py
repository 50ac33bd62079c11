"""TiDAR: the joint objective's layout, the one-pass draft-and-verify sampler (greedy output
must equal greedy AR decoding), and its speculative-rejection step."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgen import cache as cache_lib
from jaxgen import layouts, model
from jaxgen.errors import JaxgenError
from jaxgen.objectives import tidar as tidar_objective
from jaxgen.samplers import ar, tidar

PROMPT = np.array([[256, 10, 20, 30, 40], [256, 50, 60, 70, 80]], np.int32)


def progressions(key, rows, length):
    """Arithmetic progressions mod 250 with step 1 or 2: drafts become predictable."""
    ks, kd = jax.random.split(key)
    start = jax.random.randint(ks, (rows, 1), 0, 250)
    stride = jax.random.randint(kd, (rows, 1), 1, 3)
    return ((start + stride * jnp.arange(length)) % 250).astype(jnp.int32)


@pytest.fixture(scope="module")
def trained(tiny_cfg):
    """A tiny model trained with the TiDAR objective (block 4) for a few seconds."""
    cfg = dataclasses.replace(tiny_cfg, mask_id=259)
    params = model.init(cfg, jax.random.key(0))
    opt = optax.adam(1e-2)

    @jax.jit
    def step(params, state, key):
        batch = {"tokens": progressions(key, 32, 32)}
        (_, metrics), grads = jax.value_and_grad(
            lambda p: tidar_objective.loss(p, cfg, batch, key, block_size=4), has_aux=True)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, metrics

    state = opt.init(params)
    first = None
    for i in range(200):
        params, state, metrics = step(params, state, jax.random.key(i))
        first = first or {k: float(v) for k, v in metrics.items()}
    return cfg, params, first, {k: float(v) for k, v in metrics.items()}


def test_ar_diffusion_layout():
    n, blk = 8, 4
    m = np.asarray(layouts.ar_diffusion(blk).mask(np.arange(2 * n), np.arange(2 * n), 2 * n))
    want = np.zeros((2 * n, 2 * n), bool)
    want[:n, :n] = np.tril(np.ones((n, n), bool))
    for q in range(n):
        b = q // blk
        want[n + q, : b * blk] = True  # clean tokens before the block
        want[n + q, n + b * blk: n + (b + 1) * blk] = True  # its own MASK block
    np.testing.assert_array_equal(m, want)


def test_verify_rows_of_a_step_equal_causal_decoding(tiny_cfg, tiny_params):
    """The step layout feeds the k verify rows causally after the cache: their logits are the
    plain causal forward's (which is why accepted rows leave exact AR K/V in the cache)."""
    k, n = 3, 5
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, n + k)), jnp.int32)
    causal, _ = model.forward(tiny_params, tiny_cfg, tokens)
    _, cache = model.forward(tiny_params, tiny_cfg, tokens[:, :n], cache=cache_lib.init_cache(tiny_cfg, 2, 32))
    chunk = jnp.concatenate([tokens[:, n:], jnp.full((2, k * k), 259, jnp.int32)], axis=1)
    step, _ = model.forward(tiny_params, tiny_cfg, chunk, positions=tidar.step_positions(jnp.full((2,), n), k),
                            layout=layouts.verify_draft(k), cache=cache, layout_idx_BL=n + jnp.arange(k + k * k)[None],
                            split_B=n)
    np.testing.assert_allclose(np.asarray(step[:, :k]), np.asarray(causal[:, n:]), rtol=1e-5, atol=1e-5)


def test_objective_trains_and_sampler_is_lossless(trained):
    cfg, params, first, last = trained
    assert last["ar_ce"] < 0.3 * first["ar_ce"] and last["diffusion_ce"] < 0.5 * first["diffusion_ce"]
    prompt = np.asarray(progressions(jax.random.key(999), 2, 6))
    base = ar.generate(params, cfg, prompt, jax.random.key(0), max_new_tokens=24)
    out = tidar.generate(params, cfg, prompt, jax.random.key(0), gen_length=24, draft_length=4)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(base.tokens))
    assert 24 / int(out.nfe) >= 2.0, f"tokens per forward {24 / int(out.nfe):.2f}"


def test_greedy_equals_ar_on_random_model(tiny_cfg, tiny_params):
    cfg = dataclasses.replace(tiny_cfg, mask_id=259)
    base = ar.generate(tiny_params, cfg, PROMPT, jax.random.key(0), max_new_tokens=13)
    for k in (2, 5):
        out = tidar.generate(tiny_params, cfg, PROMPT, jax.random.key(0), gen_length=13, draft_length=k)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(base.tokens))


def test_rejection_step_keeps_the_ar_distribution():
    """With one draft g ~ q, the token placed after `last` is distributed as p."""
    V = 6
    cfg = type("C", (), {"mask_id": None})()
    p_logits = jnp.log(jnp.array([[0.4, 0.3, 0.1, 0.1, 0.05, 0.05], [1, 1, 1, 1, 1, 1.0]]))
    q = jnp.array([[0.05, 0.05, 0.1, 0.2, 0.3, 0.3]])

    def one(key):
        kd, kv = jax.random.split(key)
        g = jax.random.categorical(kd, jnp.log(q[0]))[None]
        a, nxt = tidar.verify(p_logits, g, q, kv, cfg, 1.0, greedy=False)
        return jnp.where(a >= 1, g[0], nxt)

    toks = jax.vmap(one)(jax.random.split(jax.random.key(0), 40000))
    freq = np.bincount(np.asarray(toks), minlength=V) / 40000
    np.testing.assert_allclose(freq, [0.4, 0.3, 0.1, 0.1, 0.05, 0.05], atol=0.01)


def test_sampling_runs_and_is_keyed(tiny_cfg, tiny_params):
    cfg = dataclasses.replace(tiny_cfg, mask_id=259)
    a = tidar.generate(tiny_params, cfg, PROMPT, jax.random.key(1), gen_length=8, draft_length=3, temperature=1.0)
    b = tidar.generate(tiny_params, cfg, PROMPT, jax.random.key(1), gen_length=8, draft_length=3, temperature=1.0)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert np.all(np.asarray(a.tokens)[:, 5:] != 259)


def test_bad_input(tiny_cfg, tiny_params):
    cfg = dataclasses.replace(tiny_cfg, mask_id=259)
    with pytest.raises(JaxgenError, match="draft_length=1"):
        tidar.generate(tiny_params, cfg, PROMPT, jax.random.key(0), gen_length=8, draft_length=1)
    with pytest.raises(JaxgenError, match="mask token"):
        tidar.generate(tiny_params, cfg, np.array([[1, 259]]), jax.random.key(0), gen_length=8)
    with pytest.raises(JaxgenError, match="multiple of block_size"):
        tidar_objective.loss(tiny_params, cfg, {"tokens": jnp.zeros((1, 6), jnp.int32)}, None, block_size=4)
