"""Objectives: values, the SFT prompt rule, and block size 1 reducing to next-token prediction.

The references score probes with the independent float64 NumPy Llama (`helpers.np_logits`), so
they share no code with `jaxgen.model` or the layouts under test."""
import dataclasses as dc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import causal_mask, np_log_softmax, np_logits
from jaxgen import config, objectives
from jaxgen.objectives import ar, block_diffusion, common, masked_diffusion, nbdiff, wedlm


def batch(n=4, length=16):
    return {"tokens": jax.random.randint(jax.random.key(7), (n, length), 0, 256)}


def test_ar_loss_is_next_token_ce(tiny_cfg, tiny_params):
    b = batch()
    value, _ = ar.loss(tiny_params, tiny_cfg, b, jax.random.key(0))
    logits = np_logits(tiny_params, tiny_cfg, b["tokens"][:, :-1], mask_LL=causal_mask(15))
    ref = -np.mean(np.take_along_axis(np_log_softmax(logits), np.asarray(b["tokens"][:, 1:])[..., None], -1))
    np.testing.assert_allclose(value, ref, rtol=1e-5)
    meap, _ = ar.loss(tiny_params, tiny_cfg, b, jax.random.key(0), meap_ratio=0.3)
    assert np.isfinite(meap) and meap != value


def test_antithetic_times_cover_the_interval():
    t = np.asarray(common.sample_t(jax.random.key(0), 8, 1e-3, True))
    assert t.min() >= 1e-3 and t.max() <= 1.0
    np.testing.assert_allclose(np.sort(np.diff(np.sort(t))), np.full(7, (1 - 1e-3) / 8), rtol=1e-4)


def test_masked_diffusion_sft_never_noises_the_prompt(tiny_cfg, tiny_params):
    b = batch()
    prompt = jnp.zeros((4, 16), bool).at[:, :6].set(True)
    value, metrics = masked_diffusion.loss(tiny_params, tiny_cfg, dict(b, prompt_mask=prompt), jax.random.key(3))
    assert np.isfinite(value)
    # the corruption itself: prompt positions are never masked
    noisy, masked = common.corrupt(b["tokens"], jnp.ones((4, 1)), ~prompt, jax.random.key(1), 259)
    assert not np.asarray(masked)[:, :6].any() and np.asarray(masked)[:, 6:].all()


def test_masked_diffusion_matches_manual_formula(tiny_cfg, tiny_params):
    b = batch()
    key = jax.random.key(11)
    value, _ = masked_diffusion.loss(tiny_params, tiny_cfg, b, key, antithetic=False)
    k_t, k_mask = jax.random.split(key)
    t = common.sample_t(k_t, 4, 1e-3, False)
    noisy, masked = common.corrupt(b["tokens"], t[:, None], jnp.ones((4, 16), bool), k_mask, 259)
    logits = np_logits(tiny_params, tiny_cfg, noisy)  # full attention
    ce = -np.take_along_axis(np_log_softmax(logits), np.asarray(b["tokens"])[..., None], -1)[..., 0]
    ref = (ce * np.asarray(masked) / np.asarray(t)[:, None]).sum() / 64
    np.testing.assert_allclose(value, ref, rtol=1e-5)


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


@pytest.mark.parametrize("objective", ["tidar", "lavida", "nbdiff", "efficient_dlm", "wedlm", "dream"])
def test_new_objectives_from_train_config(tiny_cfg, tiny_params, objective):
    """Each registered objective's loss, with its default options (block size 4) bound."""
    cfg = dc.replace(tiny_cfg, mask_id=259)
    fn = objectives.loss_for(config.TrainConfig(objective=objective, seq_len=16))
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 256, (2, 16)), jnp.int32)
    value, metrics = fn(tiny_params, cfg, {"tokens": tokens}, jax.random.key(0))
    assert np.isfinite(float(value)) and float(value) > 0


def test_nbdiff_block_size_one_is_the_ar_loss(tiny_cfg, tiny_params):
    """NBDiff treats AR as block size 1: nothing is maskable and only the AR loss remains."""
    b = batch()
    value, metrics = nbdiff.loss(tiny_params, tiny_cfg, b, jax.random.key(0), block_size=1)
    ar_value, _ = ar.loss(tiny_params, tiny_cfg, b, jax.random.key(0))
    np.testing.assert_allclose(value, ar_value, rtol=1e-5)
    assert float(metrics["diffusion"]) == 0.0


def block_noise(b, key, maskable):
    """What a block objective draws from `key` for a [2, 16] batch in blocks of 4 (t antithetic=False):
    (t per token, noisy tokens, masked) as numpy."""
    k_t, k_mask = jax.random.split(key)
    t = np.repeat(np.asarray(common.sample_t(k_t, 8, 1e-3, False)).reshape(2, 4), 4, 1)
    noisy, masked = common.corrupt(b["tokens"], jnp.asarray(t), jnp.asarray(maskable), k_mask, 259)
    return t, np.asarray(noisy), np.asarray(masked)


def test_nbdiff_matches_manual_formula(tiny_cfg, tiny_params):
    """Context-causal noisy blocks, shifted targets (row j predicts token j + 1 inside the block),
    block-first tokens never masked, CE / t over maskable tokens, plus the AR loss."""
    b = batch(2, 16)
    key = jax.random.key(5)
    value, _ = nbdiff.loss(tiny_params, tiny_cfg, b, key, block_size=4, antithetic=False, aux_ar_weight=0.5)
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
    value, _ = wedlm.loss(tiny_params, tiny_cfg, b, key, block_size=4, antithetic=False, aux_ar_weight=0.5)
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
    value, _ = masked_diffusion.loss(tiny_params, tiny_cfg, b, key, antithetic=False, shift=True)
    k_t, k_mask = jax.random.split(key)
    t = common.sample_t(k_t, 4, 1e-3, False)
    noisable = jnp.broadcast_to(jnp.arange(16) > 0, (4, 16))
    noisy, masked = common.corrupt(b["tokens"], t[:, None], noisable, k_mask, 259)
    assert not np.asarray(masked)[:, 0].any()
    lp = np_log_softmax(np_logits(tiny_params, tiny_cfg, noisy))[:, :-1]  # full attention
    ce = -np.take_along_axis(lp, np.asarray(b["tokens"])[:, 1:, None], -1)[..., 0]
    ref = (ce * np.asarray(masked)[:, 1:] / np.asarray(t)[:, None]).sum() / 64
    np.testing.assert_allclose(value, ref, rtol=1e-5)
