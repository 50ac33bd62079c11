"""LaViDa: the shifted transfer schedule, the prefix-LM prompt cache sampler against a NumPy
reference, and the complementary-masking / prefix-LM objective."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import np_llama
from jaxgen import layouts, model
from jaxgen.errors import JaxgenError
from jaxgen.objectives import masked_diffusion as md_objective
from jaxgen.samplers import lavida
from test_fast_dllm import PROMPT, softmax


def test_shift_schedule_by_hand():
    # t = 0, .25, .5, .75, 1 -> sigma = 3t / (1 + 2t) = 0, .5, .75, .9, 1 -> floor(8 sigma) = 0, 4, 6, 7, 8
    np.testing.assert_array_equal(lavida.transfer_schedule(8, 4, "shift", 3.0), [1, 1, 2, 4])
    for n, steps in [(32, 8), (16, 16), (5, 8), (64, 10)]:
        for sch in ("shift", "cosine", "logit_normal"):
            c = lavida.transfer_schedule(n, steps, sch)
            assert c.sum() == n and c.min() >= 1 and len(c) == min(n, steps)
    np.testing.assert_array_equal(lavida.transfer_schedule(10, 4, None), [3, 3, 2, 2])


def lavida_reference(params, cfg, prompt, gen_length, block_length, counts, remasking):
    B, P = prompt.shape
    _, kv = np_llama.forward(params, cfg, prompt, np.broadcast_to(np.arange(P), (B, P)))  # bidirectional prompt
    x = np.full((B, gen_length), cfg.mask_id)
    pos = np.broadcast_to(np.arange(P, P + gen_length), (B, gen_length))
    nfe = 1
    for s in range(0, gen_length, block_length):
        e = s + block_length
        for k in counts:
            if not (x[:, s:e] == cfg.mask_id).any():
                continue
            logits, _ = np_llama.forward(params, cfg, x, pos, past=kv)
            nfe += 1
            p = softmax(logits[:, s:e])
            x0 = p.argmax(-1)
            if remasking == "low_confidence":
                conf = p.max(-1)
            elif remasking == "entropy":
                conf = np.sum(p * np.log(p + 1e-10), -1)
            else:
                top = np.sort(p, -1)[..., ::-1]
                conf = top[..., 0] - top[..., 1]
            masked = x[:, s:e] == cfg.mask_id
            conf = np.where(masked, conf, -np.inf)
            for r in range(B):
                sel = np.argsort(-conf[r], kind="stable")[:k]
                sel = sel[masked[r, sel]]
                x[r, s + sel] = x0[r, sel]
    return np.concatenate([prompt, x], 1), nfe


@pytest.mark.parametrize("remasking,schedule", [("low_confidence", "shift"), ("entropy", None), ("margin", "cosine")])
def test_lavida_matches_reference(tiny_cfg, tiny_params, remasking, schedule):
    out = lavida.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=16, steps=8, block_length=8,
                          remasking=remasking, schedule=schedule)
    counts = lavida.transfer_schedule(8, 4, schedule)
    ref, nfe = lavida_reference(tiny_params, tiny_cfg, PROMPT, 16, 8, counts, remasking)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert int(out.nfe) == nfe


def test_complementary_and_prefix_lm_objective(tiny_cfg, tiny_params):
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 12)), jnp.int32)
    prompt = jnp.arange(12)[None, :].repeat(2, 0) < 4
    batch = {"tokens": tokens, "prompt_mask": prompt}
    value, metrics = md_objective.loss(tiny_params, tiny_cfg, batch, jax.random.key(0), complementary=True,
                                       prefix_lm=True)
    assert np.isfinite(float(value))
    # the two copies mask every answer token exactly once: half of the doubled answer tokens
    assert float(metrics["mask_rate"]) == pytest.approx(0.5)
    # prefix-LM: prompt outputs do not depend on the answer (the layout the objective uses)
    split = md_objective.prompt_lengths(prompt)
    np.testing.assert_array_equal(np.asarray(split), [4, 4])
    a, _ = model.forward(tiny_params, tiny_cfg, tokens, layout=layouts.prefix(None), split_B=split)
    b, _ = model.forward(tiny_params, tiny_cfg, tokens.at[:, 6].set(7), layout=layouts.prefix(None), split_B=split)
    np.testing.assert_allclose(np.asarray(a[:, :4]), np.asarray(b[:, :4]), rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(a[:, 4:]), np.asarray(b[:, 4:]))


def test_bad_input(tiny_cfg, tiny_params):
    with pytest.raises(JaxgenError, match="schedule='linear'"):
        lavida.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=8, steps=8, block_length=8,
                        schedule="linear")
    with pytest.raises(JaxgenError, match="remasking='entrophy'"):
        lavida.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=8, steps=8, block_length=8,
                        remasking="entrophy")
