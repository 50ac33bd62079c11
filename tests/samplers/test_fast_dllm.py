"""Fast-dLLM (threshold / factor rules, prefix and dual caches) against an independent reference.

The reference below follows NVlabs/Fast-dLLM `llada/generate.py` step by step (as described in
shared/specs/diffusion_lm.md §2), on the float64 NumPy model of `np_llama`, whose K/V handoff
reproduces the stale-cache semantics without touching jaxgen's cache code.
"""
import jax
import numpy as np
import pytest

import np_llama
from jaxgen.errors import JaxgenError
from jaxgen.samplers import masked_diffusion

PROMPT = np.array([[256, 10, 20, 30, 40], [256, 50, 60, 70, 80]], np.int32)


def schedule(n, steps):
    k = np.full(steps, n // steps)
    k[: n % steps] += 1
    return k


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def commit_rows(conf, masked, k, threshold, factor):
    """Which masked positions one step commits, per row."""
    take = np.zeros_like(masked)
    for r in range(len(conf)):
        order = np.argsort(-conf[r], kind="stable")
        m = int(masked[r].sum())
        if m == 0:
            continue
        if threshold is not None:
            take[r] = masked[r] & (conf[r] >= threshold)
            take[r, order[0]] = True
        elif factor is not None:
            ranked = conf[r][order[:m]]
            fails = [j for j in range(1, m) if ranked[j] < 1 - factor / (j + 2)]
            n = m if not fails or fails[0] == m - 1 else fails[0]
            take[r, order[:n]] = True
        else:
            take[r, order[:k]] = True
    return take & masked


def fast_dllm_reference(params, cfg, prompt, gen_length, block_length, steps, cache, threshold=None, factor=None):
    """Returns (tokens, nfe, no-op forwards): the reference's cached loops always run one more
    forward after the block-start step, even when that step already cleaned the block."""
    B, P = prompt.shape
    T = P + gen_length
    x = np.concatenate([prompt, np.full((B, gen_length), cfg.mask_id)], 1)
    spb = steps // (gen_length // block_length)
    nfe = noops = 0
    positions = lambda a, b: np.broadcast_to(np.arange(a, b), (B, b - a))
    for s in range(P, T, block_length):
        e = s + block_length
        k = schedule(block_length, spb)

        def commit(block_logits, i):
            blk = x[:, s:e]
            x0 = block_logits.argmax(-1)
            p = np.take_along_axis(softmax(block_logits), x0[..., None], -1)[..., 0]
            masked = blk == cfg.mask_id
            take = commit_rows(np.where(masked, p, -np.inf), masked, k[min(i, spb - 1)], threshold, factor)
            x[:, s:e] = np.where(take, x0, blk)

        if cache is None:
            i = 0
            while True:
                nfe += 1
                commit(np_llama.forward(params, cfg, x, positions(0, T))[0][:, s:e], i)
                i += 1
                if not (x[:, s:e] == cfg.mask_id).any():
                    break
            continue
        logits, kv = np_llama.forward(params, cfg, x, positions(0, T))
        nfe += 1
        commit(logits[:, s:e], 0)
        i = 1
        while True:
            nfe += 1
            noops += not (x[:, s:e] == cfg.mask_id).any()
            if cache == "prefix":
                past = [(k_[:, :s], v_[:, :s]) for k_, v_ in kv]
                logits, _ = np_llama.forward(params, cfg, x[:, s:], positions(s, T), past=past)
                commit(logits[:, :block_length], i)
            else:
                logits, _ = np_llama.forward(params, cfg, x[:, s:e], positions(s, e), past=kv, replace_at=s)
                commit(logits, i)
            if not (x[:, s:e] == cfg.mask_id).any():
                break
            i += 1
    return x, nfe, noops


CASES = [  # (cache, rule kwargs, gen_length, block_length, steps)
    (None, dict(threshold=0.3), 16, 8, 2),  # thresholds and factors chosen so steps commit several
    (None, dict(factor=2.0), 16, 8, 2),
    ("prefix", dict(), 16, 8, 8),
    ("prefix", dict(threshold=0.2), 16, 8, 2),  # block-start step sometimes cleans the block
    ("dual", dict(), 16, 8, 8),
    ("dual", dict(threshold=0.3), 16, 4, 4),
    ("dual", dict(factor=2.0), 16, 8, 2),
]


@pytest.mark.parametrize("cache,rule,gen_length,block_length,steps", CASES,
                         ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(map(str, v.items())) or "sched")
def test_fast_dllm_matches_reference(tiny_cfg, tiny_params, cache, rule, gen_length, block_length, steps):
    out = masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=gen_length,
                                    block_length=block_length, steps=steps, cache=cache, **rule)
    ref, nfe, noops = fast_dllm_reference(tiny_params, tiny_cfg, PROMPT, gen_length, block_length, steps, cache,
                                          **rule)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert int(out.nfe) == nfe - noops  # we skip the reference's no-op forward (see module docstring)


def test_caches_are_approximations_of_no_cache(tiny_cfg, tiny_params):
    """The caches are stale by design (the reference differs from its no-cache run on most tokens
    of a random model), so only validity is checked here; agreement is measured by the bench."""
    kw = dict(gen_length=16, block_length=8, steps=16)
    for cache in ("prefix", "dual"):
        toks = np.asarray(masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), cache=cache,
                                                    **kw).tokens)
        np.testing.assert_array_equal(toks[:, :5], PROMPT)
        assert (toks != tiny_cfg.mask_id).all()


def test_threshold_decodes_in_fewer_steps(tiny_cfg, tiny_params):
    kw = dict(gen_length=16, block_length=8, steps=16)
    slow = masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), **kw)
    fast = masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), threshold=0.05, **kw)
    assert int(fast.nfe) < int(slow.nfe) == 16
    assert (np.asarray(fast.tokens) != tiny_cfg.mask_id).all()


def test_fast_dllm_bad_inputs(tiny_cfg, tiny_params):
    key = jax.random.key(0)
    kw = dict(gen_length=8, steps=8, block_length=8)
    for bad, match in [(dict(cache="paged"), "cache='paged'"), (dict(threshold=0.0), "threshold=0.0"),
                       (dict(threshold=1.2), "threshold=1.2"), (dict(factor=-1.0), "factor=-1.0"),
                       (dict(threshold=0.9, factor=1.0), "one of them"),
                       (dict(cache="dual", cfg_scale=1.0), "cfg_scale")]:
        with pytest.raises(JaxgenError, match=match):
            masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, key, **kw, **bad)
