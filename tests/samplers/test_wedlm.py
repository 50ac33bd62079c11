"""WeDLM streaming decoding against an independent reference of the engine's loop
(naoro/WeDLM `wedlm_decoder.py` + `sampler.py`, shared/specs/diffusion_lm.md §5.1), written
with Python lists and the float64 NumPy model."""
import dataclasses

import jax
import numpy as np
import pytest

import np_llama
from jaxgen.errors import JaxgenError
from jaxgen.samplers import wedlm

PROMPT = np.array([[256, 10, 20, 30, 40], [256, 50, 60, 70, 80]], np.int32)


def entropy(logits):
    z = logits - logits.max()
    p = np.exp(z) / np.exp(z).sum()
    nz = p > 0
    return -np.sum(p[nz] * np.log(p[nz]))


def wedlm_reference(params, cfg, prompt_P, gen_length, window, threshold, penalty):
    """One row: (tokens, forwards including the final prune-only one and the prefill)."""
    P = len(prompt_P)
    seq = list(prompt_P)  # committed tokens
    _, kv = np_llama.forward(params, cfg, prompt_P[None], np.arange(P)[None],
                             mask_BLS=np.tril(np.ones((P, P), bool))[None])  # causal prefill
    cache = [(k[0], v[0]) for k, v in kv]  # exact K/V of the committed tokens
    win, flags = [cfg.mask_id] * window, [True] * window
    nfe = 1
    while True:
        lead = flags.index(True) if True in flags else len(flags)
        win, flags = win + [cfg.mask_id] * lead, flags + [True] * lead  # refill
        order = [i for i, f in enumerate(flags) if not f] + [i for i, f in enumerate(flags) if f]
        n = len(order)
        c = len(seq)
        toks = np.array([win[i] for i in order])[None]
        pos = np.array([c + i for i in order])[None]
        past = [(k[None], v[None]) for k, v in cache]
        vis = np.concatenate([np.ones((n, c), bool), np.tril(np.ones((n, n), bool))], 1)[None]
        logits, fresh = np_llama.forward(params, cfg, toks, pos, past=past, mask_BLS=vis)
        nfe += 1
        # prune the leading decoded tokens: their K/V (first `lead` rows) join the cache
        for j in range(lead):
            seq.append(win[j])
        cache = [(np.concatenate([k, fk[0, :lead]]), np.concatenate([v, fv[0, :lead]]))
                 for (k, v), (fk, fv) in zip(cache, fresh)]
        win, flags = win[lead:], flags[lead:]
        if len(seq) - P >= gen_length:
            return np.array(seq[:P + gen_length]), nfe
        n_decoded = n - sum(flags)
        mask_idx = [i for i, f in enumerate(flags) if f]
        mask_logits = logits[0, n_decoded:]  # MASK rows, in logical order
        ent = np.array([entropy(l) for l in mask_logits]) + (np.array(mask_idx) - mask_idx[0]) * penalty
        fill = list(np.flatnonzero(ent < threshold)) if threshold is not None else []
        if not fill:
            fill = [int(np.argmin(ent))]
        for j in fill:
            win[mask_idx[j]] = int(np.argmax(mask_logits[j]))
            flags[mask_idx[j]] = False


@pytest.mark.parametrize("window,threshold,penalty", [(4, 0.4, 0.02), (3, None, 0.0), (4, 3.0, 0.1), (5, 3.5, 0.1)])
def test_wedlm_matches_reference(tiny_cfg, tiny_params, window, threshold, penalty):
    cfg = dataclasses.replace(tiny_cfg, mask_id=259)
    out = wedlm.generate(tiny_params, cfg, PROMPT, jax.random.key(0), gen_length=12, window_size=window,
                         entropy_threshold=threshold, pos_penalty=penalty)
    nfes = []
    for r in range(len(PROMPT)):
        ref, nfe = wedlm_reference(tiny_params, cfg, PROMPT[r], 12, window, threshold, penalty)
        np.testing.assert_array_equal(np.asarray(out.tokens[r]), ref)
        nfes.append(nfe)
    assert int(out.nfe) == max(nfes) - 1  # we skip the final prune-only forward
    if threshold is not None and threshold > 1:  # random weights reach these entropies: parallel fills
        assert int(out.nfe) < 12


def test_one_token_per_step_near_left_is_ar(tiny_cfg, tiny_params):
    """Window 1, or a huge position penalty without threshold: one token per step, left to
    right, each committed by the next forward (gen_length + prefill forwards)."""
    cfg = dataclasses.replace(tiny_cfg, mask_id=259)
    a = wedlm.generate(tiny_params, cfg, PROMPT, jax.random.key(0), gen_length=6, window_size=1,
                       entropy_threshold=None)
    b = wedlm.generate(tiny_params, cfg, PROMPT, jax.random.key(0), gen_length=6, window_size=4,
                       entropy_threshold=None, pos_penalty=1e6)
    assert int(a.nfe) == 7 and int(b.nfe) == 7
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))  # same causal predictions
    assert np.all(np.asarray(a.tokens) != 259) and np.all(np.asarray(b.tokens) != 259)


def test_sampling_and_bad_input(tiny_cfg, tiny_params):
    cfg = dataclasses.replace(tiny_cfg, mask_id=259)
    a = wedlm.generate(tiny_params, cfg, PROMPT, jax.random.key(2), gen_length=8, temperature=0.7, top_k=5)
    b = wedlm.generate(tiny_params, cfg, PROMPT, jax.random.key(2), gen_length=8, temperature=0.7, top_k=5)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert np.all(np.asarray(a.tokens) != 259)
    with pytest.raises(JaxgenError, match="window_size=0"):
        wedlm.generate(tiny_params, cfg, PROMPT, jax.random.key(0), gen_length=8, window_size=0)
    with pytest.raises(JaxgenError, match="entropy_threshold=-1"):
        wedlm.generate(tiny_params, cfg, PROMPT, jax.random.key(0), gen_length=8, entropy_threshold=-1)
