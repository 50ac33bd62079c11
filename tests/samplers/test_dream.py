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


def test_dream_origin_and_alg_temp_are_keyed_and_complete(tiny_cfg, tiny_params):
    for kw in (dict(alg="origin"), dict(alg="origin", temperature=1.0, top_p=0.9),
               dict(alg="entropy", alg_temp=0.5)):
        a = dream.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(1), gen_length=8, steps=4, **kw).tokens
        b = dream.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(1), gen_length=8, steps=4, **kw).tokens
        np.testing.assert_array_equal(a, b)
        assert (np.asarray(a) != tiny_cfg.mask_id).all()  # the last step reveals everything
        np.testing.assert_array_equal(np.asarray(a)[:, :5], PROMPT)


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
