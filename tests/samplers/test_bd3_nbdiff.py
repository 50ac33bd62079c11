"""BD3-LM sampling modes of `block_diffusion.generate`, and NBDiff decoding against an
independent reference of YuchuanTian/NBDiff `diffusion_generate` on the float64 NumPy model."""
import dataclasses

import jax
import numpy as np
import pytest

import np_llama
from jaxgen.errors import JaxgenError
from jaxgen.samplers import block_diffusion, nbdiff
from test_fast_dllm import softmax

PROMPT = np.array([[256, 10, 20, 30, 40], [256, 50, 60, 70, 80]], np.int32)


def test_ddpm_one_step_commits_everything_like_static(tiny_cfg, tiny_params):
    kw = dict(gen_length=8, block_length=4, denoising_steps=1)
    a = block_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), remasking="ddpm", **kw)
    b = block_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), remasking="low_confidence_static",
                                 **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert int(a.nfe) == int(b.nfe)


def test_first_hitting_one_token_per_step(tiny_cfg, tiny_params):
    # prompt 5 = 1 whole block of 4 prefilled + 1 fixed token in the first decode block
    out = block_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=11, block_length=4,
                                   remasking="first_hitting", temperature=1.0, top_p=0.9)
    toks = np.asarray(out.tokens)
    assert not np.any(toks == tiny_cfg.mask_id)
    # prefill 1 + block 1 (3 masks) + blocks 2, 3 (4 each) + 2 stores (the last block's is skipped)
    assert int(out.nfe) == 1 + 3 + 4 + 4 + 2
    again = block_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=11, block_length=4,
                                     remasking="first_hitting", temperature=1.0, top_p=0.9)
    np.testing.assert_array_equal(toks, np.asarray(again.tokens))


def test_ddpm_bounded_by_steps(tiny_cfg, tiny_params):
    out = block_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(1), gen_length=8, block_length=4,
                                   denoising_steps=3, remasking="ddpm")
    assert not np.any(np.asarray(out.tokens) == tiny_cfg.mask_id)
    assert int(out.nfe) <= 1 + 3 * 3 + 2


def nbdiff_reference(params, cfg, prompt, gen_length, block_length, num_small, alg, threshold):
    """Greedy `diffusion_generate` for one row (batch 1, as the reference is usually run)."""
    P = len(prompt)
    T = P + gen_length
    x = np.concatenate([prompt, np.full(gen_length, cfg.mask_id)])
    tril = lambda n: np.tril(np.ones((n, n), bool))[None]
    logits, kv = np_llama.forward(params, cfg, x[None, :P], np.arange(P)[None], mask_BLS=tril(P))
    cache = [(k, v) for k, v in kv]
    x[P] = logits[0, -1].argmax()
    nfe = 1
    sub = block_length // num_small
    for s in range(P, T, block_length):
        e = s + block_length
        for j in range(num_small):
            lo, hi = j * sub, (j + 1) * sub
            while (x[s + lo:s + hi] == cfg.mask_id).any():
                lg, _ = np_llama.forward(params, cfg, x[None, s:e], np.arange(s, e)[None], past=cache)
                nfe += 1
                lg = np.concatenate([lg[:, :1], lg[:, :-1]], 1)[0, lo:hi]
                p = softmax(lg)
                x0 = p.argmax(-1)
                if alg == "entropy":
                    conf = np.sum(p * np.log(p + 1e-10), -1)
                elif alg == "topk_margin":
                    top = np.sort(p, -1)[:, ::-1]
                    conf = top[:, 0] - top[:, 1]
                else:
                    conf = p.max(-1)
                masked = x[s + lo:s + hi] == cfg.mask_id
                conf = np.where(masked, conf, -np.inf)
                take = np.zeros(sub, bool)
                take[conf.argmax()] = True
                if alg == "confidence_threshold":
                    take |= conf > threshold
                x[s + lo:s + hi] = np.where(take & masked, x0, x[s + lo:s + hi])
        lg, kv = np_llama.forward(params, cfg, x[None, s:e], np.arange(s, e)[None], past=cache,
                                  mask_BLS=np.concatenate([np.ones((block_length, s), bool),
                                                           tril(block_length)[0]], 1)[None])
        cache = [(np.concatenate([k, fk], 1), np.concatenate([v, fv], 1)) for (k, v), (fk, fv) in zip(cache, kv)]
        nfe += 1
        if e < T:
            x[e] = lg[0, -1].argmax()
    return x, nfe


@pytest.mark.parametrize("alg,num_small,threshold", [("origin", 1, 0.9), ("confidence_threshold", 2, 0.05),
                                                     ("entropy", 2, 0.9), ("topk_margin", 1, 0.9)])
def test_nbdiff_matches_reference(tiny_cfg, tiny_params, alg, num_small, threshold):
    out = nbdiff.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=12, block_length=4,
                          num_small_blocks=num_small, alg=alg, threshold=threshold)
    nfes = []
    for r in range(len(PROMPT)):
        ref, nfe = nbdiff_reference(tiny_params, tiny_cfg, PROMPT[r], 12, 4, num_small, alg, threshold)
        np.testing.assert_array_equal(np.asarray(out.tokens[r]), ref)
        nfes.append(nfe)
    assert int(out.nfe) <= max(nfes) - 1  # rows progress together; the last store is skipped


def test_nbdiff_eos_stop_and_bad_input(tiny_cfg, tiny_params):
    base = nbdiff.generate(tiny_params, tiny_cfg, PROMPT[:1], jax.random.key(0), gen_length=12, block_length=4)
    eos = int(np.asarray(base.tokens)[0, 6])  # a token the model emits early in the first block
    cfg = dataclasses.replace(tiny_cfg, eos_id=eos)
    out = nbdiff.generate(tiny_params, cfg, PROMPT[:1], jax.random.key(0), gen_length=12, block_length=4,
                          stop_at_eos=True)
    toks = np.asarray(out.tokens)[0]
    assert not np.any(toks == tiny_cfg.mask_id) and np.all(toks[9:] == eos)
    assert int(out.nfe) < int(base.nfe)
    with pytest.raises(JaxgenError, match="num_small_blocks=3"):
        nbdiff.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=8, block_length=4,
                        num_small_blocks=3)
    with pytest.raises(JaxgenError, match="alg='bogus'"):
        nbdiff.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=8, block_length=4, alg="bogus")
