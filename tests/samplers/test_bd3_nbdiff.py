"""BD3-LM sampling modes of `block_diffusion.generate` against a step-by-step reference that
shares the sampler's random draws, and NBDiff decoding against an independent reference of
YuchuanTian/NBDiff `diffusion_generate`, both on the float64 NumPy model."""
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


def nucleus(logits, top_p):
    """HF / SDAR top-p: keep the largest entries while the mass before each is < top_p."""
    out = np.full_like(logits, -np.inf)
    for idx in np.ndindex(logits.shape[:-1]):
        row = logits[idx]
        order = np.argsort(-row, kind="stable")
        before = np.concatenate([[0.0], np.cumsum(softmax(row)[order])[:-1]])
        keep = order[before < top_p]
        out[idx + (keep,)] = row[keep]
    return out


def bd3_reference(params, cfg, prompt, key, gen_length, block, remasking, denoising_steps=None, temperature=0.0,
                  top_k=0, top_p=1.0):
    """BD3-LM's semi-AR sampler (spec 4.1) over whole-sequence block-causal recomputes (no
    cache), with jaxgen's draws: the step `s` of absolute block `b` uses k = fold_in(fold_in(key,
    b), s) for the tokens (Gumbel-max, argmax(log p + gumbel(k)), over T, top-k, top-p) and
    fold_in(k, 1) for the positions (uniforms u): `first_hitting` reveals the masked position of
    largest u (one per row and step, so `block` steps), `ddpm` each masked position with
    u * (steps - s) < 1 (probability (t - s)/t = 1 / (steps - s)). Returns (tokens, NFE)."""
    B, P = prompt.shape
    n_blocks = -(-(P + gen_length) // block)
    x = np.full((B, n_blocks * block), cfg.mask_id)
    x[:, :P] = prompt
    steps = denoising_steps
    bound = block if remasking == "first_hitting" else steps
    nfe = 1 if P // block else 0
    for b in range(P // block, n_blocks):
        s, e = b * block, (b + 1) * block
        for step in range(bound):
            masked = x[:, s:e] == cfg.mask_id
            if not masked.any():
                break
            q, k = np.arange(e)[:, None], np.arange(e)[None, :]
            logits, _ = np_llama.forward(params, cfg, x[:, :e], np.broadcast_to(np.arange(e), (B, e)),
                                         mask_BLS=np.broadcast_to(k // block <= q // block, (B, e, e)))
            logits = logits[:, s:e]
            nfe += 1
            k_tok = jax.random.fold_in(jax.random.fold_in(key, b), step)
            if temperature > 0:
                z = logits / temperature
                if top_k:
                    z = np.where(z < np.sort(z, -1)[..., -top_k:-top_k + 1], -np.inf, z)
                z = nucleus(z, top_p) if top_p < 1 else z
                tok = (z + np.asarray(jax.random.gumbel(k_tok, z.shape))).argmax(-1)
            else:
                tok = logits.argmax(-1)
            u = np.asarray(jax.random.uniform(jax.random.fold_in(k_tok, 1), (B, block)))
            if remasking == "first_hitting":
                commit = np.zeros_like(masked)
                for r in np.flatnonzero(masked.any(1)):
                    commit[r, np.argmax(np.where(masked[r], u[r], -1.0))] = True
            else:
                commit = masked & (u * (steps - step) < 1.0)
            x[:, s:e] = np.where(commit, tok, x[:, s:e])
        nfe += b < n_blocks - 1  # the clean block's K/V write (never for the last block)
    return x[:, :P + gen_length], nfe


@pytest.mark.parametrize("gen_length,kw", [
    (11, dict(remasking="first_hitting", temperature=1.0, top_p=0.9)),  # prompt 5: one fixed token in block 1
    (8, dict(remasking="ddpm", denoising_steps=3)),
    (8, dict(remasking="ddpm", denoising_steps=3, temperature=1.0, top_k=5)),
], ids=["first_hitting", "ddpm", "ddpm-sampled"])
def test_bd3_sampling_matches_reference_with_shared_draws(tiny_cfg, tiny_params, gen_length, kw):
    ref, nfe = bd3_reference(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length, 4, **kw)
    out = block_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=gen_length,
                                   block_length=4, **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert int(out.nfe) == nfe
    assert not np.any(ref == tiny_cfg.mask_id)


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
                          num_small_blocks=num_small, alg=alg,
                          threshold=threshold if alg == "confidence_threshold" else None)  # others: refused
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
