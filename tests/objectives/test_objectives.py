"""Objectives: values, the SFT prompt rule, and block size 1 reducing to next-token prediction.

Every registered objective's value is checked against a hand computation on a tiny batch. The
references score probes with the independent float64 NumPy Llama (`helpers.np_logits`), so they
share no code with `jaxgen.model` or the layouts under test, and they redraw the noise from the
objective's key with `jax.random` alone as the documented recipe states it (`draws`: split the
key into (times, masks); t = eps + (1 - eps) u; a token is masked iff its uniform < its rate),
not through `jaxgen.objectives.common`."""
import jax
import jax.numpy as jnp
import numpy as np

from helpers import causal_mask, np_log_softmax, np_logits
from jaxgen import config, objectives
from jaxgen.objectives import ar, block_diffusion, common, masked_diffusion, nbdiff, wedlm


EPS = np.float32(1e-3)


def batch(n=4, length=16):
    return {"tokens": jax.random.randint(jax.random.key(7), (n, length), 0, 256)}


def registered(objective, **options):
    """The loss `jaxgen train --objective <objective>` trains with these options (seq_len 16)."""
    return objectives.loss_for(objectives.configure(config.TrainConfig(objective=objective, seq_len=16), **options))


def draws(key, n_times, shape):
    """(t [n_times] float32, mask uniforms [shape]) an objective draws from `key` with
    antithetic=False: t = eps + (1 - eps) u, u ~ U(0, 1) (float32 arithmetic, as in training)."""
    k_t, k_mask = jax.random.split(key)
    u = np.asarray(jax.random.uniform(k_t, (n_times,)))
    return EPS + np.float32(1.0 - 1e-3) * u, np.asarray(jax.random.uniform(k_mask, shape))


def token_ce(logits, targets):
    """float64 -log softmax(logits)[target], per position."""
    return -np.take_along_axis(np_log_softmax(logits), np.asarray(targets)[..., None], -1)[..., 0]


def test_ar_loss_is_next_token_ce(tiny_cfg, tiny_params):
    b = batch()
    value, _ = ar.loss(tiny_params, tiny_cfg, b, jax.random.key(0))
    logits = np_logits(tiny_params, tiny_cfg, b["tokens"][:, :-1], mask_LL=causal_mask(15))
    ref = -np.mean(np.take_along_axis(np_log_softmax(logits), np.asarray(b["tokens"][:, 1:])[..., None], -1))
    np.testing.assert_allclose(value, ref, rtol=1e-5)
    # MEAP: inputs after the first are MASK w.p. meap_ratio (bernoulli = uniform < p); targets stay clean
    meap, _ = registered("ar", meap_ratio=0.3)(tiny_params, tiny_cfg, b, jax.random.key(0))
    hide = np.asarray(jax.random.uniform(jax.random.key(0), (4, 15))) < 0.3
    hide[:, 0] = False
    assert hide.any()
    inputs = np.where(hide, 259, np.asarray(b["tokens"])[:, :-1])
    logits = np_logits(tiny_params, tiny_cfg, inputs, mask_LL=causal_mask(15))
    np.testing.assert_allclose(meap, token_ce(logits, np.asarray(b["tokens"])[:, 1:]).mean(), rtol=1e-5)


def test_antithetic_times_cover_the_interval():
    t = np.asarray(common.sample_t(jax.random.key(0), 8, 1e-3, True))
    assert t.min() >= 1e-3 and t.max() <= 1.0
    np.testing.assert_allclose(np.sort(np.diff(np.sort(t))), np.full(7, (1 - 1e-3) / 8), rtol=1e-4)


def test_masked_diffusion_sft_never_noises_the_prompt(tiny_cfg, tiny_params):
    """SFT (LLaDA): prompt tokens are never masked (though their masking draw says so) and each
    row's sum of CE / t over masked answer tokens is divided by that row's answer length."""
    b = batch()
    prompt = np.arange(16)[None, :] < np.array([[6], [3], [9], [6]])
    key = jax.random.key(3)
    value, metrics = masked_diffusion.loss(tiny_params, tiny_cfg, dict(b, prompt_mask=jnp.asarray(prompt)), key,
                                           antithetic=False)
    t, u = draws(key, 4, (4, 16))
    masked = (u < t[:, None]) & ~prompt
    assert ((u < t[:, None]) & prompt).any() and masked.any()  # the rule, not luck, keeps the prompt clean
    noisy = np.where(masked, 259, np.asarray(b["tokens"]))
    ce = token_ce(np_logits(tiny_params, tiny_cfg, noisy), b["tokens"])  # full attention
    ref = np.mean((ce * masked / t[:, None]).sum(1) / (~prompt).sum(1))
    np.testing.assert_allclose(value, ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["mask_rate"], masked.sum() / (~prompt).sum(), rtol=1e-6)


def test_masked_diffusion_matches_manual_formula(tiny_cfg, tiny_params):
    """Pretraining (LLaDA / MDLM): sum over masked tokens of CE / t, over the number of tokens."""
    b = batch()
    key = jax.random.key(11)
    value, _ = registered("masked_diffusion", antithetic=False)(tiny_params, tiny_cfg, b, key)
    t, u = draws(key, 4, (4, 16))
    masked = u < t[:, None]
    assert masked.any() and not masked.all()
    ce = token_ce(np_logits(tiny_params, tiny_cfg, np.where(masked, 259, np.asarray(b["tokens"]))), b["tokens"])
    np.testing.assert_allclose(value, (ce * masked / t[:, None]).sum() / 64, rtol=1e-5)


def test_block_size_one_reduces_to_ar(tiny_cfg, tiny_params):
    """B=1, every token masked (t -> 1): the loss is next-token CE where position i sees x_<i
    and a MASK query at position i."""
    b = batch(2, 8)
    value, _ = block_diffusion.loss(tiny_params, tiny_cfg, b, jax.random.key(0), block_size=1, eps=1.0)
    toks = np.asarray(b["tokens"])
    ces = []
    for i in range(8):
        probe = np.concatenate([toks[:, :i], np.full((2, 1), 259)], 1)
        lp = np_log_softmax(np_logits(tiny_params, tiny_cfg, probe, mask_LL=causal_mask(i + 1))[:, -1])
        ces.append(-lp[np.arange(2), toks[:, i]])
    np.testing.assert_allclose(value, np.mean(ces), rtol=1e-5)


def test_block_diffusion_gradients_flow(tiny_cfg, tiny_params):
    """Every parameter gets a gradient, and it is the loss's derivative: along the gradient's
    direction u the central difference (L(p + h u) - L(p - h u)) / 2h is |g| (the noise is a
    function of the key alone)."""
    b = batch()
    value_and_grad = jax.jit(jax.value_and_grad(  # one compile serves the gradient and the differences
        lambda p: block_diffusion.loss(p, tiny_cfg, b, jax.random.key(1), block_size=4)[0]))
    _, g = value_and_grad(tiny_params)
    assert all(np.isfinite(x).all() and np.abs(x).max() > 0 for x in jax.tree.leaves(g))
    norm = float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g))))
    h = 1e-3
    loss = lambda sign: float(value_and_grad(jax.tree.map(lambda p, d: p + sign * h * d / norm, tiny_params, g))[0])
    slope = (loss(1) - loss(-1)) / (2 * h)
    np.testing.assert_allclose(slope, norm, rtol=1e-2)


def test_nbdiff_block_size_one_is_the_ar_loss(tiny_cfg, tiny_params):
    """NBDiff treats AR as block size 1: nothing is maskable and only the AR loss remains."""
    b = batch()
    value, metrics = nbdiff.loss(tiny_params, tiny_cfg, b, jax.random.key(0), block_size=1)
    ar_value, _ = ar.loss(tiny_params, tiny_cfg, b, jax.random.key(0))
    np.testing.assert_allclose(value, ar_value, rtol=1e-5)
    assert float(metrics["diffusion"]) == 0.0


def block_noise(b, key, maskable):
    """What a block objective draws from `key` for a [2, 16] batch in blocks of 4 (antithetic=False):
    (t per token, noisy tokens, masked) as numpy; one t per (row, block), row-major."""
    t, u = draws(key, 8, (2, 16))
    t = np.repeat(t.reshape(2, 4), 4, 1)
    masked = (u < t) & maskable
    return t, np.where(masked, 259, np.asarray(b["tokens"])), masked


def test_nbdiff_matches_manual_formula(tiny_cfg, tiny_params):
    """Context-causal noisy blocks, shifted targets (row j predicts token j + 1 inside the block),
    block-first tokens never masked, CE / t over maskable tokens, plus the AR loss."""
    b = batch(2, 16)
    key = jax.random.key(5)
    value, _ = registered("nbdiff", antithetic=False, aux_ar_weight=0.5)(tiny_params, tiny_cfg, b, key)
    toks = np.asarray(b["tokens"])
    maskable = np.broadcast_to(np.arange(16) % 4 != 0, (2, 16))
    t, noisy, masked = block_noise(b, key, maskable)
    assert masked.any() and not masked[:, ::4].any()
    diff = 0.0
    for j in range(15):
        if not masked[:, j + 1].any():
            continue
        s = j // 4 * 4  # the clean tokens before the block (causal among themselves), then the noisy block
        probe = np.concatenate([toks[:, :s], noisy[:, s:s + 4]], 1)
        pos = np.arange(s + 4)
        mask = (pos[None, :] <= pos[:, None]) | (pos[:, None] >= s)
        lp = np_log_softmax(np_logits(tiny_params, tiny_cfg, probe, mask_LL=mask)[:, j])
        ce = -lp[np.arange(2), toks[:, j + 1]]
        diff += np.sum(np.where(masked[:, j + 1], ce / t[:, j + 1], 0.0))
    ar_value, _ = ar.loss(tiny_params, tiny_cfg, b, key)
    np.testing.assert_allclose(value, diff / maskable.sum() + 0.5 * float(ar_value), rtol=1e-4)


def test_position_dependent_masking():
    t = jnp.asarray([[0.2, 0.6, 1.0]])
    p = np.asarray(block_diffusion.position_mask_prob(t, 8, beta=0.3)).reshape(3, 8)
    assert (np.diff(p[:2], axis=1) > 0).all()  # later tokens masked more while t < 1
    np.testing.assert_allclose(p[2], 1.0)  # t = 1: everything masked
    np.testing.assert_allclose(p[:2].mean(1), [0.2, 0.6], rtol=1e-5)  # mean rate t (no clip at this beta)
    flat = np.asarray(block_diffusion.position_mask_prob(t, 8, beta=0.0)).reshape(3, 8)
    np.testing.assert_allclose(flat, np.repeat([[0.2], [0.6], [1.0]], 8, 1), rtol=1e-6)


def test_efficient_dlm_with_beta_zero_is_block_diffusion(tiny_cfg, tiny_params):
    b = batch()
    plain, _ = block_diffusion.loss(tiny_params, tiny_cfg, b, jax.random.key(2), block_size=4)
    flat, _ = block_diffusion.loss(tiny_params, tiny_cfg, b, jax.random.key(2), block_size=4, position_beta=0.0)
    np.testing.assert_allclose(plain, flat, rtol=1e-6)
    skewed, _ = block_diffusion.loss(tiny_params, tiny_cfg, b, jax.random.key(2), block_size=4, position_beta=2.0)
    assert np.isfinite(skewed) and skewed != plain


def test_wedlm_reordering_puts_observed_tokens_first():
    masked = jnp.asarray([[0, 1, 0, 1, 1, 1, 0, 0]], bool)
    np.testing.assert_array_equal(wedlm.reorder_blocks(masked, 4), [[0, 2, 1, 3, 6, 7, 4, 5]])


def test_wedlm_matches_decode_time_probes(tiny_cfg, tiny_params):
    """Each noisy block is scored exactly as the WeDLM sampler sees it: one causal forward over
    [clean tokens before the block | the block reordered observed-first], logical RoPE positions;
    MASK rows predict their own position; CE / gamma over the answer tokens, plus the AR loss."""
    b = batch(2, 16)
    key = jax.random.key(9)
    value, _ = registered("wedlm", antithetic=False, aux_ar_weight=0.5)(tiny_params, tiny_cfg, b, key)
    toks = np.asarray(b["tokens"])
    t, noisy, masked = block_noise(b, key, np.ones((2, 16), bool))
    assert masked.any() and not masked.all()
    diff = 0.0
    for row in range(2):
        for s in range(0, 16, 4):
            block = np.arange(s, s + 4)
            order = np.concatenate([block[~masked[row, block]], block[masked[row, block]]])
            probe = np.concatenate([toks[row, :s], noisy[row, order]])[None]
            pos = np.concatenate([np.arange(s), order])[None]
            # causal in physical order, RoPE at the logical positions
            logits = np_logits(tiny_params, tiny_cfg, probe, positions_BL=pos, mask_LL=causal_mask(s + 4))
            lp = np_log_softmax(logits[0, s:])
            for phys, logical in enumerate(order):
                if masked[row, logical]:
                    diff += -lp[phys, toks[row, logical]] / t[row, logical]
    ar_value, _ = ar.loss(tiny_params, tiny_cfg, b, key)
    np.testing.assert_allclose(value, diff / 32 + 0.5 * float(ar_value), rtol=1e-4)


def test_dream_shift_predicts_the_next_position(tiny_cfg, tiny_params):
    """Dream: output i - 1 scores token i; position 0 is never noised."""
    b = batch()
    key = jax.random.key(4)
    value, _ = registered("dream", antithetic=False)(tiny_params, tiny_cfg, b, key)
    t, u = draws(key, 4, (4, 16))
    masked = (u < t[:, None]) & (np.arange(16) > 0)
    assert (u[:, 0] < t).any()  # position 0 drew "mask" somewhere, and stays clean
    logits = np_logits(tiny_params, tiny_cfg, np.where(masked, 259, np.asarray(b["tokens"])))[:, :-1]
    ce = token_ce(logits, np.asarray(b["tokens"])[:, 1:])  # full attention, output i - 1 -> token i
    np.testing.assert_allclose(value, (ce * masked[:, 1:] / t[:, None]).sum() / 64, rtol=1e-5)


def test_tidar_matches_manual_formula(tiny_cfg, tiny_params):
    """TiDAR (spec 5.2): (alpha * AR CE + diffusion CE) / (1 + alpha). The AR term is plain causal
    next-token CE; block j of the all-MASK half sees the clean tokens before the block and its
    own MASKs and predicts its own tokens (no shift). Only answer tokens (not the prompt) count."""
    b = batch(2, 16)
    prompt = np.arange(16)[None, :] < np.array([[3], [6]])
    value, metrics = registered("tidar", alpha=0.5)(tiny_params, tiny_cfg, dict(b, prompt_mask=jnp.asarray(prompt)),
                                                    jax.random.key(0))
    toks, answer = np.asarray(b["tokens"]), ~prompt
    ar_ce = token_ce(np_logits(tiny_params, tiny_cfg, toks, mask_LL=causal_mask(16))[:, :-1], toks[:, 1:])
    ar_ref = (ar_ce * answer[:, 1:]).sum() / answer[:, 1:].sum()
    diff = 0.0
    for s in range(0, 16, 4):
        probe = np.concatenate([toks[:, :s], np.full((2, 4), 259)], 1)
        mask = causal_mask(s + 4)
        mask[s:, :] = True  # the MASK block sees the clean prefix and itself
        ce = token_ce(np_logits(tiny_params, tiny_cfg, probe, mask_LL=mask)[:, s:], toks[:, s:s + 4])
        diff += (ce * answer[:, s:s + 4]).sum()
    diff /= answer.sum()
    np.testing.assert_allclose(metrics["ar_ce"], ar_ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["diffusion_ce"], diff, rtol=1e-5)
    np.testing.assert_allclose(value, (0.5 * ar_ref + diff) / 1.5, rtol=1e-5)


def test_lavida_matches_manual_formula(tiny_cfg, tiny_params):
    """LaViDa: every row twice, masked where drawn and then exactly where not (over answer tokens,
    so each answer token is supervised once per pair; the copy's rate 1 - t weights it); prefix-LM
    attention (each row's prompt sees only itself, answers see everything); SFT normalisation
    over the 2B rows."""
    b = batch(2, 16)
    P = np.array([3, 6])
    prompt = np.arange(16)[None, :] < P[:, None]
    key = jax.random.key(6)
    value, _ = registered("lavida", antithetic=False)(tiny_params, tiny_cfg, dict(b, prompt_mask=jnp.asarray(prompt)),
                                                     key)
    toks = np.asarray(b["tokens"])
    t, u = draws(key, 2, (2, 16))
    first = (u < t[:, None]) & ~prompt
    second = ~first & ~prompt
    assert first.any() and second.any()
    pos = np.arange(16)
    attend = (pos[None, None, :] < P[:, None, None]) | (pos[None, :, None] >= P[:, None, None])  # [B, q, k]
    per_row = []
    for masked, rate in ((first, t), (second, np.maximum(1 - t, EPS))):
        logits = np_logits(tiny_params, tiny_cfg, np.where(masked, 259, toks), mask_LL=attend)
        per_row.append((token_ce(logits, toks) * masked / rate[:, None]).sum(1) / (~prompt).sum(1))
    np.testing.assert_allclose(value, np.mean(per_row), rtol=1e-5)


def test_efficient_dlm_matches_manual_formula(tiny_cfg, tiny_params):
    """Efficient-DLM: one t per block; token i of a block is masked w.p.
    p_i = clip(t * w_i / mean(w), eps, 1), w_i = exp(beta (1 - t) i), and weighted 1 / p_i; a
    noisy block sees the clean blocks before it (block-causal among themselves) and itself."""
    b = batch(2, 16)
    key = jax.random.key(8)
    value, _ = registered("efficient_dlm", antithetic=False, position_mask_beta=2.0)(tiny_params, tiny_cfg, b, key)
    toks = np.asarray(b["tokens"])
    t, u = draws(key, 8, (2, 16))
    w = np.exp(2.0 * (1.0 - t.astype(np.float64))[:, None] * np.arange(4))
    p = np.clip(t[:, None] * w / w.mean(1, keepdims=True), 1e-3, 1.0).reshape(2, 16)
    assert (np.diff(p.reshape(8, 4), axis=1) >= 0).all() and (p.reshape(8, 4).std(1) > 0.01).any()
    masked = u < p
    assert masked.any() and not masked.all()
    noisy = np.where(masked, 259, toks)
    total = 0.0
    for s in range(0, 16, 4):
        probe = np.concatenate([toks[:, :s], noisy[:, s:s + 4]], 1)
        q, k = np.arange(s + 4)[:, None], np.arange(s + 4)[None, :]
        mask = (k // 4 <= q // 4) | (q >= s)  # clean blocks block-causal; the noisy block sees all
        ce = token_ce(np_logits(tiny_params, tiny_cfg, probe, mask_LL=mask)[:, s:], toks[:, s:s + 4])
        total += (ce * masked[:, s:s + 4] / p[:, s:s + 4]).sum()
    np.testing.assert_allclose(value, total / 32, rtol=2e-5)
