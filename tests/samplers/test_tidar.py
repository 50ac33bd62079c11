"""TiDAR: the joint objective's layout, the one-pass draft-and-verify sampler (greedy output
must equal greedy AR decoding), and its speculative-rejection step."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import np_llama
from jaxgen import cache as cache_lib
from jaxgen import layouts, model
from jaxgen.errors import JaxgenError
from jaxgen.objectives import tidar as tidar_objective
from jaxgen.samplers import ar, tidar
from test_fast_dllm import softmax

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


def verify_draft_mask(n, k):
    """Visibility over [n committed tokens | one step chunk of k + k*k rows] (spec 5.2): the
    committed tokens are causal; the k verify rows [last, g_1..g_{k-1}] are causal after them;
    block M_a (k MASKs) sees the committed tokens, verify rows 0..a and itself."""
    L = n + k + k * k
    m = np.tril(np.ones((L, L), bool))
    for a in range(k):
        rows = slice(n + k + a * k, n + k + (a + 1) * k)
        m[rows] = False
        m[rows, :n + a + 1] = True
        m[rows, rows] = True
    return m


def tidar_reference(params, cfg, prompt_P, gen_length, k, temperature, row_key):
    """One row of TiDAR sampling (spec 5.2), whole-sequence recomputes on the float64 model, with
    jaxgen's draws: forward n (the prefill is 0) splits fold_in(row_key, n) into (verify key,
    draft key); a categorical over probs p is drawn as argmax(log p + gumbel) (the drafts of
    every block share one draft gumbel [k - 1, V]); draft g_j is accepted iff u_j * q(g_j) <
    p_{j-1}(g_j) with u = uniform(verify key 0, [k - 1]), and the next token comes from
    max(p_a - q_a, 0) (or p_a when every draft was accepted) with gumbel(verify key 1).
    Returns (tokens, number of accepted drafts)."""
    P, V = len(prompt_P), cfg.vocab_size
    probs = lambda logits: softmax(logits / temperature)
    draw = lambda p, g: int(np.argmax(np.log(p) + g)) if g.ndim == 1 else np.argmax(np.log(p) + g, -1)
    gumbel = lambda key, shape: np.asarray(jax.random.gumbel(key, shape))
    with np.errstate(divide="ignore"):
        # prefill: the prompt causally, then k MASKs (positions P..P+k-1) seeing everything
        toks = np.concatenate([prompt_P, np.full(k, cfg.mask_id)])
        m = np.tril(np.ones((P + k, P + k), bool))
        m[P:] = True
        logits, _ = np_llama.forward(params, cfg, toks[None], np.arange(P + k)[None], mask_BLS=m[None])
        k_last, k_draft = jax.random.split(jax.random.fold_in(row_key, 0))
        seq = list(prompt_P) + [draw(probs(logits[0, P - 1]), gumbel(k_last, (V,)))]
        q = probs(logits[0, P + 1:])
        drafts = draw(q, gumbel(k_draft, (k - 1, V)))
        accepted, step = 0, 0
        while len(seq) < P + gen_length:
            step += 1
            n = len(seq) - 1  # committed; seq[n] is the last (AR) token
            chunk = np.concatenate([[seq[n]], drafts, np.full(k * k, cfg.mask_id)])
            pos = np.concatenate([np.arange(n), n + np.arange(k), n + np.repeat(np.arange(k), k) + 1
                                  + np.tile(np.arange(k), k)])
            logits, _ = np_llama.forward(params, cfg, np.concatenate([seq[:n], chunk])[None], pos[None],
                                         mask_BLS=verify_draft_mask(n, k)[None])
            logits = logits[0, n:]
            k_verify, k_draft = jax.random.split(jax.random.fold_in(row_key, step))
            k_accept, k_next = jax.random.split(k_verify)
            p = probs(logits[:k])
            u = np.asarray(jax.random.uniform(k_accept, (k - 1,)))
            a = 0
            while a < k - 1 and u[a] * q[a, drafts[a]] < p[a, drafts[a]]:
                a += 1
            if a < k - 1:
                residual = np.maximum(p[a] - q[a], 0.0)
                nxt = draw(residual / residual.sum(), gumbel(k_next, (V,)))
            else:
                nxt = draw(p[a], gumbel(k_next, (V,)))
            seq += list(drafts[:a]) + [nxt]
            accepted += a
            block = logits[k + a * k + 1:k + (a + 1) * k]  # block M_a's rows 1..k-1
            q = probs(block)
            drafts = draw(q, gumbel(k_draft, (k - 1, V)))
    return np.array(seq[:P + gen_length]), accepted


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_matches_reference_with_shared_draws(tiny_cfg, tiny_params, trained, temperature):
    """On the random model (drafts are rejected: the residual draws) and on the trained one
    (drafts are accepted), the tokens are the reference's, draw for draw."""
    cfg = dataclasses.replace(tiny_cfg, mask_id=259)
    key = jax.random.key(1)
    accepted = {}
    for name, params, prompt in (("random", tiny_params, PROMPT),
                                 ("trained", trained[1], np.asarray(progressions(jax.random.key(5), 2, 5)))):
        out = tidar.generate(params, cfg, prompt, key, gen_length=8, draft_length=3, temperature=temperature)
        accepted[name] = 0
        for r in range(len(prompt)):
            ref, acc = tidar_reference(params, cfg, prompt[r], 8, 3, temperature, jax.random.fold_in(key, r))
            np.testing.assert_array_equal(np.asarray(out.tokens[r]), ref, err_msg=name)
            accepted[name] += acc
    assert accepted["trained"] > 0  # the acceptance path ran


def test_bad_input(tiny_cfg, tiny_params):
    cfg = dataclasses.replace(tiny_cfg, mask_id=259)
    with pytest.raises(JaxgenError, match="draft_length=1"):
        tidar.generate(tiny_params, cfg, PROMPT, jax.random.key(0), gen_length=8, draft_length=1)
    with pytest.raises(JaxgenError, match="mask token"):
        tidar.generate(tiny_params, cfg, np.array([[1, 259]]), jax.random.key(0), gen_length=8)
    with pytest.raises(JaxgenError, match="multiple of block_size"):
        tidar_objective.loss(tiny_params, cfg, {"tokens": jnp.zeros((1, 6), jnp.int32)}, None, block_size=4)
