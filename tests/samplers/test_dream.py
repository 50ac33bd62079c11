"""Dream sampler against an independent reference written from shared/specs/diffusion_lm.md §6.3."""
import jax
import numpy as np
import pytest

import np_llama
from jaxgen.errors import JaxgenError
from jaxgen.samplers import dream, masked_diffusion
from test_fast_dllm import PROMPT, softmax


def filter_reference(logits, top_p, top_k):
    floor = np.finfo(np.float32).min
    out = logits.copy()
    for idx in np.ndindex(out.shape[:-1]):
        row = out[idx]
        if top_p is not None and top_p < 1:
            order = np.argsort(-row, kind="stable")
            cum = np.cumsum(softmax(row[order]))
            remove = np.concatenate([[False], cum[:-1] > top_p])
            row[order[remove]] = floor
        if top_k is not None:
            row[row < np.sort(row)[-top_k]] = floor
    return out


def dream_reference(params, cfg, prompt, gen_length, steps, alg, top_p=None, top_k=None, eps=1e-3):
    """Greedy Dream: shifted logits, confidence from the filtered softmax, int(#masked * (1 - s/t))."""
    B, P = prompt.shape
    T = P + gen_length
    x = np.concatenate([prompt, np.full((B, gen_length), cfg.mask_id)], 1)
    ts = np.linspace(1, eps, steps + 1).astype(np.float32)
    for i in range(steps):
        logits, _ = np_llama.forward(params, cfg, x, np.broadcast_to(np.arange(T), (B, T)))
        logits = np.concatenate([logits[:, :1], logits[:, :-1]], 1)
        probs = softmax(filter_reference(logits, top_p, top_k))
        tok = probs.argmax(-1)
        if alg == "maskgit_plus":
            conf = probs.max(-1)
        elif alg == "topk_margin":
            top2 = -np.sort(-probs, -1)[..., :2]
            conf = top2[..., 0] - top2[..., 1]
        else:
            conf = (probs * np.log(probs + 1e-10)).sum(-1)
        masked = x == cfg.mask_id
        m = np.float32(masked.sum() / B)
        n = int(m * (np.float32(1) - ts[i + 1] / ts[i])) if i < steps - 1 else int(m)
        for r in range(B):
            order = np.argsort(-np.where(masked[r], conf[r], -np.inf), kind="stable")[:n]
            x[r, order] = tok[r, order]
    return x


@pytest.mark.parametrize("alg,top_p,top_k", [("maskgit_plus", None, None), ("topk_margin", None, None),
                                              ("entropy", None, None), ("maskgit_plus", 0.5, 3)])
def test_dream_matches_reference(tiny_cfg, tiny_params, alg, top_p, top_k):
    out = dream.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=12, steps=5, alg=alg,
                         top_p=top_p, top_k=top_k)
    ref = dream_reference(tiny_params, tiny_cfg, PROMPT, 12, 5, alg, top_p, top_k)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert int(out.nfe) == 5


def test_dream_reveal_counts_follow_the_time_grid():
    counts = dream.reveal_counts(12, 5, 1e-3)
    assert counts.sum() == 12 and counts[-1] >= 1
    ts = np.linspace(1, 1e-3, 6).astype(np.float32)
    assert counts[0] == int(np.float32(12) * (np.float32(1) - ts[1] / ts[0]))


def dream_sampling_reference(params, cfg, prompt, key, gen_length, steps, alg, temperature=0.0, top_p=None,
                             top_k=None, alg_temp=None, eps=1e-3):
    """Dream's `_sample` with its random draws: step i splits fold_in(key, i) into (token key,
    position key). Tokens: Categorical over the T-scaled, filtered distribution, drawn as the
    Gumbel-max argmax(log p + g) with g = jax.random.gumbel(token key); `origin` reveals each
    MASK iff its uniform (position key) < 1 - s/t (all at the last step); with alg_temp the
    confidence algs reveal n positions drawn without replacement from softmax(conf / alg_temp)
    over the MASKs (Gumbel top-n, g from the position key)."""
    B, P = prompt.shape
    T = P + gen_length
    x = np.concatenate([prompt, np.full((B, gen_length), cfg.mask_id)], 1)
    ts = np.linspace(1, eps, steps + 1).astype(np.float32)
    for i in range(steps):
        k_tok, k_pos = jax.random.split(jax.random.fold_in(key, i))
        logits, _ = np_llama.forward(params, cfg, x, np.broadcast_to(np.arange(T), (B, T)))
        logits = np.concatenate([logits[:, :1], logits[:, :-1]], 1)
        if temperature > 0:
            logits = logits / temperature
        probs = softmax(filter_reference(logits, top_p, top_k))
        if temperature > 0:
            with np.errstate(divide="ignore"):
                tok = (np.log(probs) + np.asarray(jax.random.gumbel(k_tok, probs.shape))).argmax(-1)
        else:
            tok = probs.argmax(-1)
        masked = x == cfg.mask_id
        if alg == "origin":
            p_reveal = np.float32(1) - ts[i + 1] / ts[i] if i < steps - 1 else np.float32(1)
            commit = masked & (np.asarray(jax.random.uniform(k_pos, x.shape)) < p_reveal)
        else:
            assert alg == "entropy"
            conf = (probs * np.log(probs + 1e-10)).sum(-1)
            m = np.float32(masked.sum() / B)
            n = int(m * (np.float32(1) - ts[i + 1] / ts[i])) if i < steps - 1 else int(m)
            z = np.where(masked, conf / alg_temp, -np.inf)
            z = z - z.max(-1, keepdims=True)
            with np.errstate(divide="ignore"):
                z = z - np.log(np.exp(z).sum(-1, keepdims=True))
            score = np.where(masked, z + np.asarray(jax.random.gumbel(k_pos, x.shape)), -np.inf)
            commit = np.zeros_like(masked)
            for r in range(B):
                commit[r, np.argsort(-score[r], kind="stable")[:n]] = True
        x = np.where(commit, tok, x)
    return x


@pytest.mark.parametrize("kw", [dict(alg="origin"), dict(alg="origin", temperature=1.0, top_p=0.9),
                                dict(alg="entropy", alg_temp=0.5)], ids=["origin", "origin-sampled", "alg_temp"])
def test_dream_random_modes_match_reference_with_shared_draws(tiny_cfg, tiny_params, kw):
    out = dream.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(1), gen_length=8, steps=4, **kw)
    ref = dream_sampling_reference(tiny_params, tiny_cfg, PROMPT, jax.random.key(1), 8, 4, **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert (ref != tiny_cfg.mask_id).all()  # the last step reveals everything


def test_dream_through_masked_diffusion_generate(tiny_cfg, tiny_params):
    via = masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=8, steps=4,
                                    block_length=8, alg="entropy")
    direct = dream.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=8, steps=4, alg="entropy")
    np.testing.assert_array_equal(np.asarray(via.tokens), np.asarray(direct.tokens))
    with pytest.raises(JaxgenError, match="block_length"):
        masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=8, steps=4,
                                  block_length=4, alg="entropy")


def test_dream_bad_inputs(tiny_cfg, tiny_params):
    key = jax.random.key(0)
    for bad, match in [(dict(alg="greedy"), "alg='greedy'"), (dict(eps=0.0), "eps=0.0"),
                       (dict(top_p=0.0), "top_p=0.0"), (dict(top_k=0), "top_k=0")]:
        with pytest.raises(JaxgenError, match=match):
            dream.generate(tiny_params, tiny_cfg, PROMPT, key, gen_length=8, steps=4, **bad)
