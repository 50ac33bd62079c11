"""Layouts: exact masks, block maps, and the visibility property through the whole model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import layouts, model
from jaxgen.errors import ConfigError

L = 8


def dense(layout, n=L):
    return np.asarray(layout.mask(np.arange(n), np.arange(n), n))


def test_causal_and_full():
    np.testing.assert_array_equal(dense(layouts.causal()), np.tril(np.ones((L, L), bool)))
    assert dense(layouts.full()).all()


def test_block_causal():
    m = dense(layouts.block_causal(4))
    expected = np.kron(np.tril(np.ones((2, 2))), np.ones((4, 4))).astype(bool)
    np.testing.assert_array_equal(m, expected)
    np.testing.assert_array_equal(dense(layouts.block_causal(1)), dense(layouts.causal()))


def test_prefix_lm():
    m = dense(layouts.prefix(3))
    assert m[:3, :3].all() and not m[:3, 3:].any()  # the prefix sees only itself
    assert m[3:].all()  # the suffix sees everything
    mc = dense(layouts.prefix(3, causal_suffix=True))
    assert mc[5, :6].all() and not mc[5, 6:].any()


def test_dual_stream_matches_bd3_definition():
    n, B = 8, 2
    m = dense(layouts.dual_stream(B), 2 * n)
    for q in range(2 * n):
        for k in range(2 * n):
            qc, kc = q >= n, k >= n
            qb, kb = (q % n) // B, (k % n) // B
            want = (qb == kb and qc == kc) or (not qc and kc and kb < qb) or (qc and kc and kb <= qb)
            assert m[q, k] == want, (q, k)


def test_wedlm_ar_diffusion_is_causal_inside_noisy_blocks():
    """[x | x_t]: the clean stream is causal; a noisy block sees the clean tokens before it and,
    with causal_block, its own earlier rows only (bidirectionally without)."""
    n, B = 8, 4
    m = dense(layouts.ar_diffusion(B, causal_block=True), 2 * n)
    bidir = dense(layouts.ar_diffusion(B), 2 * n)
    for q in range(2 * n):
        for k in range(2 * n):
            qn, kn = q >= n, k >= n
            qb, kb = (q % n) // B, (k % n) // B
            want = (not qn and not kn and k <= q) or (qn and not kn and kb < qb) or (qn and kn and qb == kb and k <= q)
            assert m[q, k] == want, (q, k)
            assert bidir[q, k] == (want or (qn and kn and qb == kb)), (q, k)


@pytest.mark.parametrize("layout", [layouts.causal(), layouts.full(), layouts.block_causal(3),
                                    layouts.prefix(5), layouts.dual_stream(2),
                                    layouts.ar_diffusion(3, causal_block=True)])
def test_block_map_agrees_with_dense(layout):
    n = 12
    d = dense(layout, n)
    bm = layout.block_map(n, n, 4, 4, n)
    for i in range(3):
        for j in range(3):
            tile = d[4 * i:4 * i + 4, 4 * j:4 * j + 4]
            assert bm[i, j] == (2 if tile.all() else 1 if tile.any() else 0)


def test_bad_layouts():
    with pytest.raises(ConfigError, match="block size"):
        layouts.block_causal(0)
    with pytest.raises(ConfigError, match="unknown layout"):
        layouts.Layout("sliding")
    with pytest.raises(ConfigError, match="causal_block"):
        layouts.Layout("dual_stream", block=4, causal_block=True)


@pytest.mark.parametrize("layout", [layouts.causal(), layouts.full(), layouts.block_causal(4), layouts.prefix(5),
                                    layouts.dual_stream(4)], ids=lambda l: l.kind)
def test_invisible_tokens_never_change_outputs(layout, tiny_cfg, tiny_params):
    """Property: perturbing a token that query q may not see leaves q's logits unchanged."""
    n = 16
    tokens = jax.random.randint(jax.random.key(1), (1, n), 0, 256)
    positions = jnp.tile(jnp.arange(n // 2), 2)[None] if layout.kind == "dual_stream" else None
    base, _ = model.forward(tiny_params, tiny_cfg, tokens, positions=positions, layout=layout)
    visible = dense(layout, n)
    rng = np.random.RandomState(0)
    for k in rng.choice(n, 5, replace=False):
        changed = tokens.at[0, k].set((tokens[0, k] + 7) % 256)
        out, _ = model.forward(tiny_params, tiny_cfg, changed, positions=positions, layout=layout)
        diff = np.abs(np.asarray(out - base)[0]).max(-1)
        for q in range(n):
            if not visible[q, k]:
                assert diff[q] == 0.0, (layout.kind, q, k)
        assert diff[k] > 0  # a token always sees itself
