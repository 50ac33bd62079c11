"""Layouts through the whole model: the visibility property, and equality with the dense masks
samplers and objectives used to build by hand (run through the float64 NumPy model)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import np_llama
from jaxgen import cache as cache_lib
from jaxgen import layouts, model

TREE = (-1, 0, 0, 1, 2, 1)
N = 16
PROPERTY_CASES = [  # (layout, split per row; rows 0 and 1 differ)
    (layouts.causal(), None), (layouts.full(), None), (layouts.block_causal(4), None), (layouts.prefix(5), None),
    (layouts.dual_stream(4), None), (layouts.prefix(None), [3, 9]), (layouts.prefix(6, causal_prefix=True), None),
    (layouts.verify_draft(3), [1, 4]), (layouts.tree(TREE), [2, 7]),
]


@pytest.mark.parametrize("layout,split", PROPERTY_CASES, ids=lambda c: getattr(c, "kind", "split"))
def test_invisible_tokens_never_change_outputs(layout, split, tiny_cfg, tiny_params):
    """Property: perturbing a token that query q may not see leaves q's logits unchanged."""
    tokens = jax.random.randint(jax.random.key(1), (2, N), 0, 256)
    positions = jnp.tile(jnp.arange(N // 2), 2)[None].repeat(2, 0) if layout.two_stream else None
    split = None if split is None else jnp.asarray(split, jnp.int32)
    run = jax.jit(lambda t: model.forward(tiny_params, tiny_cfg, t, positions=positions, layout=layout,
                                          split_B=split)[0])
    base = run(tokens)
    visible = np.asarray(layout.mask(np.arange(N), np.arange(N), N, split))
    visible = np.broadcast_to(visible, (2, N, N))
    for k in np.random.RandomState(0).choice(N, 6, replace=False):
        diff = np.abs(np.asarray(run(tokens.at[:, k].set((tokens[:, k] + 7) % 256)) - base)).max(-1)
        np.testing.assert_array_equal(diff[~visible[:, :, k]], 0.0, err_msg=f"{layout.kind}: key {k}")
        assert (diff[:, k] > 0).all()  # a token always sees itself


def test_physical_coordinates_with_logical_positions(tiny_cfg, tiny_params):
    """WeDLM's window: causal over physical order whatever the RoPE positions (a later physical
    slot never reaches an earlier one)."""
    tokens = jax.random.randint(jax.random.key(2), (1, 10), 0, 256)
    positions = jnp.asarray([[0, 3, 5, 9, 1, 2, 4, 6, 7, 8]])
    run = lambda t: model.forward(tiny_params, tiny_cfg, t, positions=positions, layout=layouts.causal(),
                                  layout_idx_BL=jnp.arange(10)[None])[0]
    base, changed = run(tokens), run(tokens.at[0, 6].set(3))
    np.testing.assert_array_equal(np.asarray(changed[0, :6]), np.asarray(base[0, :6]))
    assert not np.allclose(changed[0, 6:], base[0, 6:])


# --- the dense masks the code built by hand before layouts covered them -------------------


def old_step_chunk_mask(k):
    """TiDAR's step chunk: causal rows, then block M_a seeing rows 0..a and itself."""
    m = np.zeros((k + k * k,) * 2, bool)
    m[:k, :k] = np.tril(np.ones((k, k), bool))
    for a in range(k):
        s = k + a * k
        m[s:s + k, :a + 1] = m[s:s + k, s:s + k] = True
    return m


def old_prefill_chunk_mask(P, k):
    m = np.zeros((P + k, P + k), bool)
    m[:P, :P] = np.tril(np.ones((P, P), bool))
    m[P:] = True
    return m


def reference(params, cfg, tokens, positions, chunk_mask, past_len=0, past_tokens=None):
    """float64 logits of one row: a causal prefill of `past_tokens`, then the chunk attending to
    all of it and, among itself, as `chunk_mask` says."""
    past = None
    if past_len:
        _, past = np_llama.forward(params, cfg, past_tokens[None, :past_len], np.arange(past_len)[None],
                                   mask_BLS=np.tril(np.ones((past_len, past_len), bool))[None])
    L = len(tokens)
    mask = np.concatenate([np.ones((L, past_len), bool), chunk_mask], 1)[None]
    logits, _ = np_llama.forward(params, cfg, tokens[None], positions[None], past=past, mask_BLS=mask)
    return np.delete(logits[0], cfg.mask_id, axis=-1)


def assert_close(got, want):
    np.testing.assert_allclose(np.delete(np.asarray(got), 259, axis=-1), want, rtol=2e-4, atol=2e-4)


def prefilled(cfg, params, prompt, lengths, size):
    cache = cache_lib.init_cache(cfg, prompt.shape[0], size)
    _, cache = model.forward(params, cfg, jnp.asarray(prompt), cache=cache)
    return cache_lib.with_lengths(cache, jnp.asarray(lengths, jnp.int32))


def test_tidar_prefill_and_step_equal_their_old_dense_masks(tiny_cfg, tiny_params):
    k, P = 3, 5
    rng = np.random.RandomState(0)
    prompt = rng.randint(0, 256, (2, P)).astype(np.int32)
    chunk = np.concatenate([prompt, np.full((2, k), 259, np.int32)], 1)
    cache = cache_lib.init_cache(tiny_cfg, 2, 32)
    got, _ = model.forward(tiny_params, tiny_cfg, jnp.asarray(chunk), layout=layouts.prefix(P, causal_prefix=True),
                           cache=cache)
    for r in range(2):
        assert_close(got[r], reference(tiny_params, tiny_cfg, chunk[r], np.arange(P + k), old_prefill_chunk_mask(P, k)))
    # a step at a different cache end per row: n = 4 and 7
    n = np.array([4, 7])
    history = rng.randint(0, 256, (2, 8)).astype(np.int32)
    step = np.concatenate([rng.randint(0, 256, (2, k)), np.full((2, k * k), 259)], 1).astype(np.int32)
    offsets = np.concatenate([np.arange(k), np.repeat(np.arange(k), k) + 1 + np.tile(np.arange(k), k)])
    L = k + k * k
    got, _ = model.forward(tiny_params, tiny_cfg, jnp.asarray(step), positions=jnp.asarray(n[:, None] + offsets),
                           layout=layouts.verify_draft(k), cache=cache_lib.write_at(
                               prefilled(tiny_cfg, tiny_params, history, n, 32), jnp.asarray(n)),
                           layout_idx_BL=jnp.asarray(n[:, None] + np.arange(L)), split_B=jnp.asarray(n))
    for r in range(2):
        assert_close(got[r], reference(tiny_params, tiny_cfg, step[r], n[r] + offsets, old_step_chunk_mask(k), n[r],
                                history[r]))


def test_prefix_lm_with_per_row_prompts_equals_the_old_dense_mask(tiny_cfg, tiny_params):
    from jaxgen.objectives.masked_diffusion import prompt_lengths
    tokens = np.random.RandomState(1).randint(0, 256, (2, 12)).astype(np.int32)
    prompt = np.arange(12)[None, :] < np.array([[3], [7]])
    got, _ = model.forward(tiny_params, tiny_cfg, jnp.asarray(tokens), layout=layouts.prefix(None),
                           split_B=prompt_lengths(jnp.asarray(prompt)))
    old = prompt[:, None, :] | ~prompt[:, :, None]  # objectives.masked_diffusion.prefix_lm_mask
    for r in range(2):
        assert_close(got[r], reference(tiny_params, tiny_cfg, tokens[r], np.arange(12), old[r]))


def test_wedlm_window_equals_the_old_dense_mask(tiny_cfg, tiny_params):
    """Causal over the window's slots, logical positions for RoPE, padding rows invalid."""
    rng = np.random.RandomState(2)
    c, F = np.array([5, 3]), 6
    history = rng.randint(0, 256, (2, 6)).astype(np.int32)
    perm = np.array([[1, 4, 0, 2, 3, 5], [0, 2, 5, 1, 3, 4]])
    valid = np.arange(F)[None, :] < np.array([[5], [6]])
    fed = rng.randint(0, 256, (2, F)).astype(np.int32)
    got, _ = model.forward(tiny_params, tiny_cfg, jnp.asarray(fed), positions=jnp.asarray(c[:, None] + perm),
                           layout=layouts.causal(), cache=cache_lib.write_at(
                               prefilled(tiny_cfg, tiny_params, history, c, 32), jnp.asarray(c)),
                           kv_valid_BL=jnp.asarray(valid), layout_idx_BL=jnp.asarray(c[:, None] + np.arange(F)))
    for r in range(2):
        old = np.tril(np.ones((F, F), bool)) & valid[r][None, :]  # samplers.wedlm's chunk mask
        want = reference(tiny_params, tiny_cfg, fed[r], c[r] + perm[r], old, c[r], history[r])
        assert_close(got[r][valid[r]], want[valid[r]])


def test_tree_equals_its_ancestor_mask(tiny_cfg, tiny_params):
    rng = np.random.RandomState(3)
    n = np.array([2, 5])
    history = rng.randint(0, 256, (2, 5)).astype(np.int32)
    nodes = rng.randint(0, 256, (2, len(TREE))).astype(np.int32)
    depth = np.array([0, 1, 1, 2, 2, 2])
    got, _ = model.forward(tiny_params, tiny_cfg, jnp.asarray(nodes), positions=jnp.asarray(n[:, None] + 1 + depth),
                           layout=layouts.tree(TREE), cache=cache_lib.write_at(
                               prefilled(tiny_cfg, tiny_params, history, n, 32), jnp.asarray(n)),
                           layout_idx_BL=jnp.asarray(n[:, None] + np.arange(len(TREE))), split_B=jnp.asarray(n))
    anc = np.zeros((6, 6), bool)
    for i in range(6):
        j = i
        while j >= 0:
            anc[i, j], j = True, TREE[j]
    for r in range(2):
        assert_close(got[r], reference(tiny_params, tiny_cfg, nodes[r], n[r] + 1 + depth, anc, n[r], history[r]))
