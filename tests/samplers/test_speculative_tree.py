"""Speculative decoding with the tree drafters (Token Recycling, lookahead/Jacobi) and the
block-diffusion drafter: greedy output equals greedy AR decoding token for token (batch 1 and a
ragged batch), and the block-diffusion drafter's cached drafts equal an uncached forward."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import layouts
from jaxgen.decoding import drafters
from jaxgen.decoding.drafters import diffusion, jacobi, recycling
from jaxgen.decoding.verify import Warp
from jaxgen.errors import JaxgenError
from jaxgen.model import forward
from jaxgen.samplers import ar, speculative

GEN = 24
ONE = np.array([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]], np.int32)
RAGGED = np.array([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6],
                   [1, 2, 3, 1, 2, 3, 1, 0, 0, 0, 0, 0],
                   [40, 41, 42, 43, 40, 41, 42, 43, 40, 0, 0, 0]], np.int32)
LENGTHS = [12, 7, 9]


@pytest.fixture(scope="module")
def ar_one(tiny_cfg, tiny_params):
    return np.asarray(ar.generate(tiny_params, tiny_cfg, ONE, jax.random.key(0), GEN).tokens)


@pytest.fixture(scope="module")
def ar_ragged(tiny_cfg, tiny_params):
    return np.asarray(ar.generate(tiny_params, tiny_cfg, RAGGED, jax.random.key(0), GEN, prompt_lengths=LENGTHS).tokens)


def test_registry_names():
    assert isinstance(drafters.get("token_recycling"), recycling.TokenRecycling)
    assert isinstance(drafters.get("jacobi", level=3, window=4, guess=4), jacobi.Jacobi)


def test_token_recycling_default_template_equals_ar(tiny_cfg, tiny_params, ar_one):
    out = speculative.generate(tiny_params, tiny_cfg, ONE, jax.random.key(0), GEN, drafter="token_recycling")
    assert np.array_equal(np.asarray(out.tokens), ar_one)
    assert float(out.accepted) >= 1.0


@pytest.mark.parametrize("name,options", [
    ("token_recycling", dict(max_width=2, max_depth=4)),
    ("jacobi", dict(level=3, window=4, guess=4, pool_from_prompt=True)),
])
def test_tree_drafters_ragged_batch_equal_ar(tiny_cfg, tiny_params, ar_ragged, name, options):
    out = speculative.generate(tiny_params, tiny_cfg, RAGGED, jax.random.key(0), GEN,
                               drafter=drafters.get(name, **options), prompt_lengths=LENGTHS)
    assert np.array_equal(np.asarray(out.tokens), ar_ragged)


def test_block_diffusion_drafter_ragged_batch_equals_ar(tiny_cfg, tiny_params, ar_ragged):
    d = diffusion.block_diffusion_drafter(tiny_params, tiny_cfg, denoising_steps=2)
    out = speculative.generate(tiny_params, tiny_cfg, RAGGED, jax.random.key(0), GEN, drafter=d, num_draft=3,
                               prompt_lengths=LENGTHS)
    assert np.array_equal(np.asarray(out.tokens), ar_ragged)


@jax.jit
def _uncached_logits(params, x_BL, end_B, valid_BL):
    """Logits of [committed | block | padding] with no cache: committed rows causal, block rows
    seeing every committed token and the block (prefix layout split at each row's end)."""
    cfg = _uncached_logits.cfg
    logits, _ = forward(params, cfg, x_BL, layout=layouts.prefix(None, causal_prefix=True), split_B=end_B,
                        kv_valid_BL=valid_BL)
    return logits


def _uncached_rounds(params, cfg, tokens, end, N, steps):
    """The block-diffusion drafts recomputed without a cache, each round committing the most
    confident masked positions (SDAR's static low-confidence rule)."""
    B, T = tokens.shape
    block = np.full((B, N), cfg.mask_id)
    masked = np.ones((B, N), bool)
    rows = np.arange(B)[:, None]
    cols = end[:, None] + np.arange(N)
    for k in [N // steps + (i < N % steps) for i in range(steps)]:
        x = np.where(np.arange(T)[None] < end[:, None], tokens, 0)
        x[rows, cols] = block
        valid = np.arange(T)[None] < (end + N)[:, None]
        logits = np.asarray(_uncached_logits(params, jnp.asarray(x), jnp.asarray(end), jnp.asarray(valid)))
        logits = logits[rows, cols].copy()
        logits[..., cfg.mask_id] = -np.inf
        tok = logits.argmax(-1)
        z = logits - logits.max(-1, keepdims=True)
        conf = np.exp(np.take_along_axis(z, tok[..., None], -1)[..., 0]) / np.exp(z).sum(-1)
        conf = np.where(masked, conf, -np.inf)
        for b in range(B):
            pick = np.argsort(-conf[b], kind="stable")[:k]
            block[b, pick], masked[b, pick] = tok[b, pick], False
    return block


def test_block_diffusion_drafts_match_an_uncached_forward(tiny_cfg, tiny_params):
    """With 1 and 2 denoising rounds: drafts after the prompt, then after a step that committed
    N + 1 tokens, and one that committed 1, each equal the uncached recomputation (the draft
    cache stays exact). Sampling: q is each token's warped distribution."""
    cfg, N, T = tiny_cfg, 3, 40
    _uncached_logits.cfg = cfg
    tokens = np.random.default_rng(0).integers(0, 256, (2, T)).astype(np.int32)
    lengths = np.array([9, 6])
    one_round = diffusion.block_diffusion_drafter(tiny_params, cfg).configured(N, None)
    prefilled = jax.jit(one_round.init, static_argnums=(1, 4))(tiny_params, cfg, jnp.asarray(tokens[:, :9]),
                                                               jnp.asarray(lengths), T)
    for steps in (1, 2):
        d = diffusion.block_diffusion_drafter(tiny_params, cfg, denoising_steps=steps).configured(N, None)
        d.check(cfg)
        draft, state, end = jax.jit(d.draft), prefilled, lengths + 1
        for advance in (0, N + 1, 1):
            end = end + advance
            out, q, state = draft(tiny_params, state, jnp.asarray(tokens), jnp.asarray(end), jax.random.key(1))
            assert q is None
            assert np.asarray(out).tolist() == _uncached_rounds(tiny_params, cfg, tokens, end, N, steps).tolist()
    warp = Warp(jnp.float32(0.8), jnp.int32(0), jnp.float32(1.0), greedy=False, filtered=False)
    out, q, _ = jax.jit(lambda s, t, e, k: d.draft(tiny_params, s, t, e, k, warp=warp))(
        prefilled, jnp.asarray(tokens), jnp.asarray(lengths + 1), jax.random.key(2))
    q = np.asarray(q)
    assert q.shape == (2, N, cfg.vocab_size)
    np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-5)
    assert (np.take_along_axis(q, np.asarray(out)[..., None], -1) > 0).all()
    assert (q[..., cfg.mask_id] == 0).all()


def test_block_diffusion_refuses_bad_setups(tiny_cfg, tiny_params):
    d = diffusion.block_diffusion_drafter(tiny_params, dataclasses.replace(tiny_cfg, mask_id=None))
    with pytest.raises(JaxgenError, match="mask"):
        d.configured(4, None).check(tiny_cfg)
    d = diffusion.block_diffusion_drafter(tiny_params, tiny_cfg, denoising_steps=5)
    with pytest.raises(JaxgenError, match="denoising_steps"):
        d.configured(4, None).check(tiny_cfg)
