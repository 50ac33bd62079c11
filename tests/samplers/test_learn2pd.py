"""Learn2PD: the learned commit filter and End-of-Text Prediction against a NumPy reference of
the LLaDA loop (the filter's fitting: tests/training/test_filter_fit.py)."""
import jax
import numpy as np
import pytest

import np_llama
from jaxgen.errors import JaxgenError
from jaxgen.samplers import learn2pd, masked_diffusion
from test_fast_dllm import PROMPT, softmax

EOS = 257


def np_filter_accept(filt, conf, masked, tau):
    f = {k: np.asarray(v, np.float64) for k, v in filt.items()}
    feats = np.where(masked, conf, 1.0)
    logits = np.maximum(feats @ f["w1"] + f["b1"], 0) @ f["w2"] + f["b2"]
    return 1 / (1 + np.exp(-logits)) >= tau


def llada_reference(params, cfg, prompt, gen_length, block_length, *, filt=None, tau=0.5, eotp=False):
    """LLaDA low-confidence decoding, one token per step unless a filter accepts more; with EoTP,
    MASKs after the first generated EOS become EOS and clean blocks are skipped. (tokens, nfe)"""
    B, P = prompt.shape
    T = P + gen_length
    x = np.concatenate([prompt, np.full((B, gen_length), cfg.mask_id)], 1)
    nfe = 0
    for s in range(P, T, block_length):
        e = s + block_length
        while (x[:, s:e] == cfg.mask_id).any():
            logits, _ = np_llama.forward(params, cfg, x, np.broadcast_to(np.arange(T), (B, T)))
            nfe += 1
            z = logits[:, s:e].copy()
            z[..., cfg.mask_id] = -np.inf
            p = softmax(z)
            x0, conf = p.argmax(-1), p.max(-1)
            masked = x[:, s:e] == cfg.mask_id
            take = np.zeros_like(masked)
            for r in range(B):
                if masked[r].any():
                    take[r, np.argmax(np.where(masked[r], conf[r], -np.inf))] = True
            if filt is not None:
                take |= np_filter_accept(filt, conf, masked, tau)
            x[:, s:e] = np.where(take & masked, x0, x[:, s:e])
            if eotp:
                for r in range(B):
                    eos = np.nonzero(x[r, P:] == EOS)[0]
                    if len(eos):
                        tail = x[r, P + eos[0] + 1:]
                        tail[tail == cfg.mask_id] = EOS
    return x, nfe


def random_filter(block_length, seed, bias):
    filt = learn2pd.init_filter(block_length, jax.random.key(seed))
    return dict(filt, b2=filt["b2"] + bias)


@pytest.fixture(scope="module")
def eos_params(tiny_params):
    """The tiny model with EOS made likely, so decodes end early at different places per row."""
    head = tiny_params["lm_head"]
    return dict(tiny_params, lm_head=head.at[:, EOS].set(head[:, EOS] + 0.9 * head.max(axis=1)))


def test_filter_that_rejects_everything_is_llada_one_token_per_step(tiny_cfg, tiny_params):
    filt = random_filter(8, 0, -1e4)
    out = masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=16, steps=16,
                                    block_length=8, commit_filter=filt)
    base = masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=16, steps=16,
                                     block_length=8)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(base.tokens))
    assert int(out.nfe) == int(base.nfe) == 16


@pytest.mark.parametrize("seed,bias,tau,eotp", [(1, 0.0, 0.5, False), (2, 0.5, 0.6, False), (3, 0.0, 0.5, True)])
def test_filter_and_eotp_match_reference(tiny_cfg, tiny_params, eos_params, seed, bias, tau, eotp):
    params = eos_params if eotp else tiny_params
    filt = random_filter(8, seed, bias)
    out = masked_diffusion.generate(params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=24, steps=24,
                                    block_length=8, commit_filter=filt, filter_threshold=tau, eotp=eotp)
    ref, nfe = llada_reference(params, tiny_cfg, PROMPT, 24, 8, filt=filt, tau=tau, eotp=eotp)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert int(out.nfe) == nfe < 24  # the filter commits several tokens on some steps


def test_eotp_stops_after_end_of_text(tiny_cfg, eos_params):
    kw = dict(gen_length=32, steps=32, block_length=8)
    base = masked_diffusion.generate(eos_params, tiny_cfg, PROMPT, jax.random.key(0), **kw)
    out = masked_diffusion.generate(eos_params, tiny_cfg, PROMPT, jax.random.key(0), eotp=True, **kw)
    ref, nfe = llada_reference(eos_params, tiny_cfg, PROMPT, 32, 8, eotp=True)
    toks = np.asarray(out.tokens)
    np.testing.assert_array_equal(toks, ref)
    assert int(out.nfe) == nfe < int(base.nfe) == 32
    for row in toks[:, PROMPT.shape[1]:]:
        first = np.nonzero(row == EOS)[0][0]
        later_blocks = row[(first // 8 + 1) * 8:]  # tokens of the EOS block committed earlier stay
        assert first < 24 and (later_blocks == EOS).all() and len(later_blocks) >= 8


def test_bad_filter_inputs(tiny_cfg, tiny_params):
    kw = dict(gen_length=16, steps=16, block_length=8)
    with pytest.raises(JaxgenError, match="separate commit rules"):
        masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), threshold=0.9,
                                  commit_filter=random_filter(8, 0, 0.0), **kw)
    with pytest.raises(JaxgenError, match="blocks of 4"):
        masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0),
                                  commit_filter=random_filter(4, 0, 0.0), **kw)
    with pytest.raises(JaxgenError, match="filter_threshold"):
        masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), filter_threshold=1.5,
                                  commit_filter=random_filter(8, 0, 0.0), **kw)
    with pytest.raises(JaxgenError, match="low_confidence"):
        masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), remasking="random",
                                  commit_filter=random_filter(8, 0, 0.0), **kw)
