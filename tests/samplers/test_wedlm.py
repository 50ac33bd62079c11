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


def sample_reference(logits_V, gumbel_V, temperature, top_k, top_p):
    """WeDLM's sampler order, top-k -> top-p (HF: keep the largest entries while the mass before
    each is < top_p) -> temperature, then Categorical drawn as the Gumbel-max argmax(z + g)."""
    z = logits_V.copy()
    if top_k:
        z[z < np.sort(z)[-top_k]] = -np.inf
    if top_p < 1:
        order = np.argsort(-z, kind="stable")
        p = np.exp(z[order] - z.max())
        before = np.concatenate([[0.0], np.cumsum(p / p.sum())[:-1]])
        z[order[before >= top_p]] = -np.inf
    return int(np.argmax(z / temperature + gumbel_V))


def wedlm_reference(params, cfg, prompt_P, gen_length, window, threshold, penalty, key=None, temperature=0.0,
                    top_k=0, top_p=1.0):
    """One row: (tokens, forwards including the final prune-only one and the prefill). With
    temperature > 0 the token of window slot i (counted from the window's start before the
    prune) at forward n (the prefill is forward 0) takes row i of gumbel(fold_in(key, n),
    [2 * window, V]) (one row per slot the window can span); `key` is this row's (jaxgen folds
    the row index into the call's key)."""
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
        step_key = None if key is None else jax.random.fold_in(key, nfe)
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
        if temperature > 0:
            g = np.asarray(jax.random.gumbel(step_key, (2 * window, logits.shape[-1])))
            draws = [sample_reference(mask_logits[j], g[lead + i], temperature, top_k, top_p)
                     for j, i in enumerate(mask_idx)]
        for j in fill:
            win[mask_idx[j]] = draws[j] if temperature > 0 else int(np.argmax(mask_logits[j]))
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
    right, each committed by the next forward (gen_length + prefill forwards), and the tokens
    are the reference's window-1 decode."""
    cfg = dataclasses.replace(tiny_cfg, mask_id=259)
    a = wedlm.generate(tiny_params, cfg, PROMPT, jax.random.key(0), gen_length=6, window_size=1,
                       entropy_threshold=None)
    b = wedlm.generate(tiny_params, cfg, PROMPT, jax.random.key(0), gen_length=6, window_size=4,
                       entropy_threshold=None, pos_penalty=1e6)
    assert int(a.nfe) == 7 and int(b.nfe) == 7
    for r in range(len(PROMPT)):
        ref, _ = wedlm_reference(tiny_params, cfg, PROMPT[r], 6, 1, None, 0.0)
        np.testing.assert_array_equal(np.asarray(a.tokens[r]), ref)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))  # same causal predictions


def test_sampling_matches_reference_with_shared_draws(tiny_cfg, tiny_params):
    cfg = dataclasses.replace(tiny_cfg, mask_id=259)
    key = jax.random.key(2)
    out = wedlm.generate(tiny_params, cfg, PROMPT, key, gen_length=8, temperature=0.7, top_k=5, top_p=0.9)
    for r in range(len(PROMPT)):
        ref, _ = wedlm_reference(tiny_params, cfg, PROMPT[r], 8, 16, 0.4, 0.02, key=jax.random.fold_in(key, r),
                                 temperature=0.7, top_k=5, top_p=0.9)
        np.testing.assert_array_equal(np.asarray(out.tokens[r]), ref)


def test_bad_input(tiny_cfg, tiny_params):
    cfg = dataclasses.replace(tiny_cfg, mask_id=259)
    with pytest.raises(JaxgenError, match="window_size=0"):
        wedlm.generate(tiny_params, cfg, PROMPT, jax.random.key(0), gen_length=8, window_size=0)
    with pytest.raises(JaxgenError, match="entropy_threshold=-1"):
        wedlm.generate(tiny_params, cfg, PROMPT, jax.random.key(0), gen_length=8, entropy_threshold=-1)
