"""dKV-Cache-Decode against an independent reference (shared/specs/diffusion_lm.md §3.1).

The reference feeds, on delayed steps, only the positions that were still MASK before the
previous step, with the stored K/V of all others prepended, row by row on the NumPy model.
"""
import jax
import numpy as np
import pytest

import np_llama
from jaxgen.errors import JaxgenError
from jaxgen.decoding import dkv
from jaxgen.samplers import masked_diffusion
from test_fast_dllm import PROMPT, commit_rows, schedule, softmax


def dkv_decode_reference(params, cfg, prompt, gen_length, block_length, steps, reload_every):
    B, P = prompt.shape
    T = P + gen_length
    x = np.concatenate([prompt, np.full((B, gen_length), cfg.mask_id)], 1)
    spb = steps // (gen_length // block_length)
    all_pos = np.broadcast_to(np.arange(T), (B, T))
    for s in range(P, T, block_length):
        e = s + block_length
        k = schedule(block_length, spb)
        prv = cur = None
        stored = None  # per layer (k, v) over all T positions; valid where `cur` of the storing step
        for i in range(spb):
            if i == 0 or i == 1 or i % reload_every == 0:
                logits, fresh = np_llama.forward(params, cfg, x, all_pos)
                stored = [(kk.copy(), vv.copy()) for kk, vv in fresh]
            else:
                logits = np.full((B, T, cfg.vocab_size), -np.inf)
                for r in range(B):
                    fed = np.flatnonzero(~prv[r])
                    kept = np.flatnonzero(prv[r])
                    past = [(kk[r:r + 1, kept], vv[r:r + 1, kept]) for kk, vv in stored]
                    lg, fresh = np_llama.forward(params, cfg, x[r:r + 1, fed], fed[None], past=past)
                    logits[r, fed] = lg[0]
                    for (kk, vv), (fk, fv) in zip(stored, fresh):
                        kk[r, fed], vv[r, fed] = fk[0], fv[0]
            blk_logits = logits[:, s:e]
            blk = x[:, s:e]
            x0 = blk_logits.argmax(-1)
            with np.errstate(invalid="ignore"):  # rows not fed this step are all -inf (and unmasked)
                p = np.take_along_axis(softmax(blk_logits), x0[..., None], -1)[..., 0]
            masked = blk == cfg.mask_id
            take = commit_rows(np.where(masked, p, -np.inf), masked, k[i], None, None)
            x[:, s:e] = np.where(take, x0, blk)
            prv, cur = cur, x != cfg.mask_id
    return x


@pytest.mark.parametrize("reload_every,block_length", [(4, 8), (3, 4), (1, 8)])
def test_dkv_decode_matches_reference(tiny_cfg, tiny_params, reload_every, block_length):
    kw = dict(gen_length=16, block_length=block_length, steps=16)
    out = masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), cache="dkv_decode",
                                    cache_reloading_step=reload_every, **kw)
    ref = dkv_decode_reference(tiny_params, tiny_cfg, PROMPT, 16, block_length, 16, reload_every)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert int(out.nfe) == 16
    if reload_every == 1:  # every step a full forward: exactly LLaDA
        base = masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), **kw)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(base.tokens))


def test_dkv_bad_reloading_step(tiny_cfg, tiny_params):
    with pytest.raises(JaxgenError, match="cache_reloading_step=0"):
        masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=8, steps=8,
                                  block_length=8, cache="dkv_decode", cache_reloading_step=0)


def walk_window(marked, masked, select_ids, window_size):
    """dKV-Cache `find_window_tokens`, written as the pointer walk it is."""
    T = len(marked)
    for s in select_ids:
        left, right, cnt, go_left = s - 1, s + 1, 0, True
        while cnt < window_size:
            if go_left:
                if left >= 0 and not marked[left] and masked[left]:
                    marked[left] = True
                    cnt += 1
                left -= 1
            else:
                if right < T and not marked[right] and masked[right]:
                    marked[right] = True
                    cnt += 1
                right += 1
            go_left = not go_left
            if left < 0 and right > T:
                break
    return marked


def dkv_greedy_reference(params, cfg, prompt, key, gen_length, block_length, steps, reload_every, window_size):
    B, P = prompt.shape
    T = P + gen_length
    x = np.concatenate([prompt, np.full((B, gen_length), cfg.mask_id)], 1)
    spb = steps // (gen_length // block_length)
    k = schedule(block_length, spb)
    acc = np.concatenate([[0], np.cumsum(k)])
    all_pos = np.broadcast_to(np.arange(T), (B, T))
    for b, s in enumerate(range(P, T, block_length)):
        scores = np.asarray(dkv.greedy_order_scores(key, b, B, block_length))
        order = s + np.argsort(-scores, axis=-1, kind="stable")  # the block's decode order, per row
        fed = stored = None
        for i in range(spb):
            mask_index = x == cfg.mask_id
            if i % reload_every == 0:
                logits, fresh = np_llama.forward(params, cfg, x, all_pos)
                stored = [(kk.copy(), vv.copy()) for kk, vv in fresh]
            else:
                logits = np.full((B, T, cfg.vocab_size), -np.inf)
                for r in range(B):
                    ids, kept = np.flatnonzero(fed[r]), np.flatnonzero(~fed[r])
                    past = [(kk[r:r + 1, kept], vv[r:r + 1, kept]) for kk, vv in stored]
                    lg, fresh = np_llama.forward(params, cfg, x[r:r + 1, ids], ids[None], past=past)
                    logits[r, ids] = lg[0]
                    for (kk, vv), (fk, fv) in zip(stored, fresh):
                        kk[r, ids], vv[r, ids] = fk[0], fv[0]
            x0 = np.where(mask_index, logits.argmax(-1), x)
            fed = np.zeros((B, T), bool)
            for r in range(B):
                sel = order[r, acc[i]:acc[i + 1]]
                x[r, sel] = x0[r, sel]
                if i < spb - 1:
                    nxt = order[r, acc[i + 1]:acc[i + 1] + k[i + 1]]
                    fed[r, nxt] = fed[r, sel] = True
                    walk_window(fed[r], mask_index[r], nxt, window_size)
    return x


@pytest.mark.parametrize("reload_every,window_size,block_length", [(3, 2, 8), (2, 0, 8), (4, 1, 4)])
def test_dkv_greedy_matches_reference(tiny_cfg, tiny_params, reload_every, window_size, block_length):
    kw = dict(gen_length=16, block_length=block_length, steps=16, remasking="random")
    key = jax.random.key(3)
    out = masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, key, cache="dkv_greedy",
                                    cache_reloading_step=reload_every, window_size=window_size, **kw)
    ref = dkv_greedy_reference(tiny_params, tiny_cfg, PROMPT, key, 16, block_length, 16, reload_every, window_size)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert int(out.nfe) == 16


def test_window_walk_matches_pointer_walk():
    rng = np.random.default_rng(0)
    for _ in range(20):
        T = 12
        masked = rng.random(T) < 0.6
        marked = rng.random(T) < 0.2
        sel = rng.choice(T, 3, replace=False)
        want = walk_window(marked.copy(), masked, sel, 3)
        got = dkv.window_tokens(jax.numpy.asarray(marked), jax.numpy.asarray(masked),
                                             jax.numpy.asarray(sel), 3, 3)
        np.testing.assert_array_equal(np.asarray(got), want)


def test_dkv_greedy_needs_random_order(tiny_cfg, tiny_params):
    with pytest.raises(JaxgenError, match="remasking='random'"):
        masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=8, steps=8,
                                  block_length=8, cache="dkv_greedy")
