"""Samplers against independent step-by-step references written from the specs (no cache, no jit),
on the float64 NumPy model (`helpers.np_logits`) with hand-built masks."""
import contextlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import np_logits
from jaxgen import model
from jaxgen.errors import JaxgenError
from jaxgen.samplers import ar, block_diffusion, masked_diffusion

PROMPT = np.array([[256, 10, 20, 30, 40], [256, 50, 60, 70, 80]], np.int32)


def logits_of(params, cfg, x, mask):
    """float64 logits of the independent NumPy model (`helpers.np_logits`) under `mask` ("causal",
    an [L, L] boolean array, or None for full attention), the mask token at -inf."""
    if isinstance(mask, str):
        mask = np.tril(np.ones((x.shape[1], x.shape[1]), bool))
    out = np_logits(params, cfg, x, mask_LL=mask)
    out[..., cfg.mask_id] = -np.inf
    return out


def block_causal_mask(length, block):
    q, k = np.arange(length)[:, None], np.arange(length)[None, :]
    return k // block <= q // block


def softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def schedule(n, steps):
    k = np.full(steps, n // steps)
    k[: n % steps] += 1
    return k


# ---------------------------------------------------------------- autoregressive
def test_ar_greedy_equals_recompute(tiny_cfg, tiny_params):
    out = ar.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), max_new_tokens=12)
    x = PROMPT.copy()
    for _ in range(12):
        nxt = logits_of(tiny_params, tiny_cfg, x, "causal")[:, -1].argmax(-1)
        x = np.concatenate([x, nxt[:, None]], 1)
    np.testing.assert_array_equal(np.asarray(out.tokens), x)
    assert int(out.nfe) == 12


def test_ar_sampling_is_keyed_and_filtered(tiny_cfg, tiny_params):
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=3)
    a = ar.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(1), **kw).tokens
    b = ar.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(1), **kw).tokens
    c = ar.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(2), **kw).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # every sampled token is within the top 3 of its step's distribution
    x = np.asarray(a)
    for t in range(PROMPT.shape[1], x.shape[1]):
        lg = logits_of(tiny_params, tiny_cfg, x[:, :t], "causal")[:, -1]
        top3 = np.argsort(-lg, -1)[:, :3]
        assert all(x[r, t] in top3[r] for r in range(2))
    # top_p tiny -> greedy
    g = ar.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(3), max_new_tokens=10, temperature=1.0,
                    top_p=1e-6).tokens
    np.testing.assert_array_equal(g, ar.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0),
                                                 max_new_tokens=10).tokens)


@contextlib.contextmanager
def favour_token(monkeypatch, token_id, bias=1e4, then=None):
    """Make the model put +bias on one token's logit everywhere (and +bias / 10 on token `then`,
    if given); compiled samplers are rebuilt."""
    original = model.forward

    def biased(*args, **kwargs):
        out, c = original(*args, **kwargs)
        if not kwargs.get("return_hidden"):
            out = out.at[..., token_id].add(bias)
            out = out if then is None else out.at[..., then].add(bias / 10)
        return out, c

    jax.clear_caches()
    # every jaxgen module that calls the model (samplers import `forward` by name)
    users = [m for name, m in list(sys.modules.items()) if name.startswith("jaxgen") and m is not None
             and getattr(m, "forward", None) is original]
    assert block_diffusion in users and model in users
    for module in users:
        monkeypatch.setattr(module, "forward", biased)
    try:
        yield
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def test_ar_stop_at_eos(tiny_cfg, tiny_params, monkeypatch):
    with favour_token(monkeypatch, tiny_cfg.eos_id):
        out = ar.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), max_new_tokens=8, stop_at_eos=True)
    assert (np.asarray(out.tokens)[:, 5:] == tiny_cfg.eos_id).all()
    assert int(out.nfe) == 1


# ---------------------------------------------------------------- LLaDA
def llada_reference(params, cfg, prompt, gen_length, steps, block_length, key=None, temperature=0.0,
                    remasking="low_confidence", cfg_scale=0.0):
    """ML-GSAI/LLaDA generate.py, written from the spec, on the float64 NumPy model, with
    jaxgen's draws: step n (counted over all blocks) splits fold_in(key, n) into (token key,
    confidence key); tokens are argmax(logits + T * gumbel), gumbel = -log(-log u),
    u = uniform(token key, [B, block, V], 1e-20, 1) (LLaDA's exp(l) / (-log u)^T); `random`
    remasking ranks by uniform(confidence key, [B, block]), `low_confidence` by
    softmax(logits)[x0]; cfg_scale guides against prompt -> MASK as
    uncond + (scale + 1)(cond - uncond)."""
    x = np.concatenate([prompt, np.full((len(prompt), gen_length), cfg.mask_id)], 1)
    P = prompt.shape[1]
    nb = gen_length // block_length
    spb = steps // nb
    n = 0
    for b in range(nb):
        k = schedule(block_length, spb)
        s, e = P + b * block_length, P + (b + 1) * block_length
        for i in range(spb):
            logits = np_logits(params, cfg, x)  # the float64 NumPy model, full attention
            if cfg_scale:
                un = np_logits(params, cfg, np.where(np.arange(x.shape[1]) < P, cfg.mask_id, x))
                logits = un + (cfg_scale + 1) * (logits - un)
            logits = logits[:, s:e]
            logits[..., cfg.mask_id] = -np.inf
            x0 = logits.argmax(-1)
            if key is not None:
                k_tok, k_conf = jax.random.split(jax.random.fold_in(key, n))
                if temperature > 0:
                    u = np.asarray(jax.random.uniform(k_tok, logits.shape, jnp.float32, 1e-20, 1.0), np.float64)
                    x0 = (logits + temperature * -np.log(-np.log(u))).argmax(-1)
            if remasking == "random":
                p = np.asarray(jax.random.uniform(k_conf, x0.shape), np.float64)
            else:
                p = np.take_along_axis(softmax(logits), x0[..., None], -1)[..., 0]
            n += 1
            mask = x[:, s:e] == cfg.mask_id
            conf = np.where(mask, p, -np.inf)
            for r in range(len(x)):
                idx = np.argsort(-conf[r], kind="stable")[: k[i]]
                x[r, s + idx] = x0[r, idx]
    return x


@pytest.mark.parametrize("steps,block", [(8, 8), (8, 4), (4, 4)])
def test_llada_matches_reference(tiny_cfg, tiny_params, steps, block):
    out = masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=8, steps=steps,
                                    block_length=block)
    ref = llada_reference(tiny_params, tiny_cfg, PROMPT, 8, steps, block)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert int(out.nfe) == steps


@pytest.mark.parametrize("kw", [dict(remasking="random"), dict(temperature=1.0), dict(cfg_scale=1.5)],
                         ids=["random", "temperature", "cfg_scale"])
def test_llada_random_remasking_temperature_and_guidance_match_reference(tiny_cfg, tiny_params, kw):
    out = masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(5), gen_length=8, steps=8,
                                    block_length=4, **kw)
    ref = llada_reference(tiny_params, tiny_cfg, PROMPT, 8, 8, 4, key=jax.random.key(5), **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


# ---------------------------------------------------------------- SDAR
def sdar_reference(params, cfg, prompt, gen_length, block, steps, remasking, threshold):
    """JetAstra/SDAR block_diffusion_generate, greedy, with full recompute (no cache) and the
    jaxgen rule that only masked positions are committed."""
    P = prompt.shape[1]
    nblocks = -(-(P + gen_length) // block)
    x = np.full((len(prompt), nblocks * block), cfg.mask_id)
    x[:, :P] = prompt
    k = schedule(block, steps)
    nfe = 1 if P // block else 0
    for b in range(P // block, nblocks):
        s, e = b * block, (b + 1) * block
        for step in range(steps):
            mask = x[:, s:e] == cfg.mask_id
            if not mask.any():
                break
            logits = logits_of(params, cfg, x[:, :e], block_causal_mask(e, block))[:, s:e]
            nfe += 1
            tok = logits.argmax(-1)
            conf = np.where(mask, np.take_along_axis(softmax(logits), tok[..., None], -1)[..., 0], -np.inf)
            for r in range(len(x)):
                if not mask[r].any():
                    continue
                if remasking == "sequential":
                    idx = np.nonzero(mask[r])[0][: k[step]]
                else:
                    idx = [i for i in np.argsort(-conf[r], kind="stable")[: k[step]] if mask[r, i]]
                    if remasking == "low_confidence_dynamic" and (conf[r] > threshold).sum() >= k[step]:
                        idx = np.nonzero(conf[r] > threshold)[0]
                x[r, s + np.asarray(idx, int)] = tok[r, idx]
        if b < nblocks - 1:
            nfe += 1
    return x[:, : P + gen_length], nfe


@pytest.mark.parametrize("remasking", ["low_confidence_static", "low_confidence_dynamic", "sequential"])
@pytest.mark.parametrize("prompt_len", [5, 8])  # 5: the prompt ends inside a block
def test_sdar_matches_reference(tiny_cfg, tiny_params, remasking, prompt_len):
    prompt = np.concatenate([PROMPT, PROMPT], 1)[:, :prompt_len]
    kw = dict(gen_length=10, block_length=4, denoising_steps=2, remasking=remasking,
              threshold=0.3 if remasking == "low_confidence_dynamic" else None)  # the other rules refuse one
    out = block_diffusion.generate(tiny_params, tiny_cfg, prompt, jax.random.key(0), **kw)
    ref, nfe = sdar_reference(tiny_params, tiny_cfg, prompt, 10, 4, 2, remasking, 0.3)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert int(out.nfe) == nfe
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, :prompt_len], prompt)


@pytest.mark.parametrize("prompt_len", [5, 8])
def test_fused_block_write_keeps_tokens_and_saves_a_forward_per_block(tiny_cfg, tiny_params, prompt_len):
    prompt = np.concatenate([PROMPT, PROMPT], 1)[:, :prompt_len]
    kw = dict(gen_length=10, block_length=4, denoising_steps=2, remasking="low_confidence_dynamic", threshold=0.3)
    plain = block_diffusion.generate(tiny_params, tiny_cfg, prompt, jax.random.key(0), **kw)
    fused = block_diffusion.generate(tiny_params, tiny_cfg, prompt, jax.random.key(0), fuse_block_write=True, **kw)
    np.testing.assert_array_equal(np.asarray(fused.tokens), np.asarray(plain.tokens))
    decode_blocks = -(-(prompt_len + 10) // 4) - prompt_len // 4
    assert int(fused.nfe) == int(plain.nfe) - (decode_blocks - 1)


def test_block_size_one_is_autoregression_with_a_mask_query(tiny_cfg, tiny_params):
    out = block_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=6, block_length=1,
                                   denoising_steps=1, remasking="low_confidence_static")
    x = PROMPT.copy()
    for _ in range(6):
        probe = np.concatenate([x, np.full((2, 1), tiny_cfg.mask_id)], 1)
        nxt = logits_of(tiny_params, tiny_cfg, probe, "causal")[:, -1].argmax(-1)
        x = np.concatenate([x, nxt[:, None]], 1)
    np.testing.assert_array_equal(np.asarray(out.tokens), x)


def test_dynamic_threshold_commits_several_per_step(tiny_cfg, tiny_params):
    slow = block_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=16, block_length=8,
                                    denoising_steps=8, remasking="low_confidence_static")
    fast = block_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=16, block_length=8,
                                    denoising_steps=8, remasking="low_confidence_dynamic", threshold=0.05)
    assert int(fast.nfe) < int(slow.nfe)


def test_mask_token_is_never_a_candidate(tiny_cfg, tiny_params, monkeypatch):
    """The model's top token everywhere is MASK, its second EOS: every sampler emits EOS (so the
    biased model is the one decoding), never MASK."""
    params, eos = tiny_params, tiny_cfg.eos_id
    with favour_token(monkeypatch, tiny_cfg.mask_id, then=eos):
        outs = [masked_diffusion.generate(params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=8, steps=8,
                                          block_length=8),
                block_diffusion.generate(params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=8),
                ar.generate(params, tiny_cfg, PROMPT, jax.random.key(0), max_new_tokens=4)]
    for out in outs:
        np.testing.assert_array_equal(np.asarray(out.tokens)[:, :5], PROMPT)
        assert (np.asarray(out.tokens)[:, 5:] == eos).all()


def test_bad_inputs(tiny_cfg, tiny_params):
    key = jax.random.key(0)
    with pytest.raises(JaxgenError, match="not a multiple of block_length"):
        masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, key, gen_length=10, steps=10, block_length=4)
    with pytest.raises(JaxgenError, match="number of blocks"):
        masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, key, gen_length=8, steps=5, block_length=4)
    with pytest.raises(JaxgenError, match="remasking"):
        masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, key, gen_length=8, steps=8, remasking="oracle")
    with pytest.raises(JaxgenError, match="exceeds gen_length"):
        block_diffusion.generate(tiny_params, tiny_cfg, PROMPT, key, gen_length=4, block_length=8)
    with pytest.raises(JaxgenError, match="threshold"):
        block_diffusion.generate(tiny_params, tiny_cfg, PROMPT, key, gen_length=8, threshold=1.5)
    with pytest.raises(JaxgenError, match="mask token"):
        block_diffusion.generate(tiny_params, tiny_cfg, np.where(np.arange(5) == 1, 259, PROMPT), key, gen_length=8)
    with pytest.raises(JaxgenError, match="outside the vocabulary"):
        ar.generate(tiny_params, tiny_cfg, PROMPT + 300, key, max_new_tokens=4)
    with pytest.raises(JaxgenError, match="max_seq_len"):
        ar.generate(tiny_params, tiny_cfg, PROMPT, key, max_new_tokens=500)
    with pytest.raises(JaxgenError, match="mask_id=999"):
        masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, key, gen_length=8, steps=8, mask_id=999)
