"""Dense cache: append, read and write-at paths equal a full recompute; per-row lengths."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import cache as cache_lib
from jaxgen import layouts, model

TOL = dict(rtol=2e-5, atol=5e-5)


@pytest.mark.parametrize("per_layer", [False, True], ids=["stacked", "per_layer"])
@pytest.mark.parametrize("layout", [layouts.causal(), layouts.block_causal(4)], ids=lambda l: l.kind)
def test_prefill_then_append_equals_full(layout, per_layer, tiny_cfg, tiny_params):
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 256)
    full, _ = model.forward(tiny_params, tiny_cfg, tokens, layout=layout)
    c = cache_lib.init_cache(tiny_cfg, 2, 16, per_layer=per_layer)
    a, c = model.forward(tiny_params, tiny_cfg, tokens[:, :8], layout=layout, cache=c)
    b, c = model.forward(tiny_params, tiny_cfg, tokens[:, 8:], layout=layout, cache=c)
    np.testing.assert_array_equal(c.lengths, [12, 12])
    np.testing.assert_allclose(np.concatenate([a, b], 1), full, **TOL)


def test_read_equals_full_block_causal_and_writes_nothing(tiny_cfg, tiny_params):
    """A denoising step (cache read + current block) equals the full block-causal forward."""
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, 256)
    layout = layouts.block_causal(4)
    full, _ = model.forward(tiny_params, tiny_cfg, tokens, layout=layout)
    _, c = model.forward(tiny_params, tiny_cfg, tokens[:, :8], layout=layout, cache=cache_lib.init_cache(tiny_cfg, 2, 12))
    out, after = model.forward(tiny_params, tiny_cfg, tokens[:, 8:], layout=layout, cache=cache_lib.read(c))
    np.testing.assert_allclose(out, full[:, 8:], **TOL)
    assert after is c
    np.testing.assert_array_equal(cache_lib.truncate(c, 4).lengths, [4, 4])
    np.testing.assert_array_equal(cache_lib.truncate(c, jnp.array([3, 9])).lengths, [3, 8])


def test_per_row_lengths_append_each_row_as_if_alone(tiny_cfg, tiny_params):
    """Rows of lengths 3 and 6 share a batch: each appended token's logits equal that row's own
    full forward, and each row's cache grows from its own length."""
    tokens = jax.random.randint(jax.random.key(4), (2, 8), 0, 256)
    lengths = jnp.array([3, 6])
    c = cache_lib.init_cache(tiny_cfg, 2, 10, per_layer=True)
    _, c = model.forward(tiny_params, tiny_cfg, tokens[:, :6], cache=c)  # row 0's padding written, then forgotten
    c = cache_lib.with_lengths(c, lengths)
    nxt = jnp.stack([tokens[0, 3], tokens[1, 6]])[:, None]
    logits, c = model.forward(tiny_params, tiny_cfg, nxt, cache=c)
    np.testing.assert_array_equal(c.lengths, [4, 7])
    for row, n in ((0, 4), (1, 7)):
        alone, _ = model.forward(tiny_params, tiny_cfg, tokens[row:row + 1, :n])
        np.testing.assert_allclose(logits[row, 0], alone[0, -1], **TOL)


def test_write_at_overwrites_in_place_and_keep_keeps_stored_kv(tiny_cfg, tiny_params):
    tokens = jax.random.randint(jax.random.key(5), (1, 8), 0, 256)
    other = tokens.at[:, 4:].set(7)
    full = layouts.full()
    _, c = model.forward(tiny_params, tiny_cfg, tokens, layout=full, cache=cache_lib.init_cache(tiny_cfg, 1, 8))
    _, over = model.forward(tiny_params, tiny_cfg, other[:, 4:], layout=full, cache=cache_lib.write_at(c, 4))
    np.testing.assert_array_equal(over.lengths, [8])
    _, ref = model.forward(tiny_params, tiny_cfg, other, layout=full, cache=cache_lib.init_cache(tiny_cfg, 1, 8))
    k_over, k_ref, k_old = over.k[:, :, :, 4:], ref.k[:, :, :, 4:], c.k[:, :, :, 4:]
    assert not np.allclose(k_over, k_old)
    keep = jnp.array([[True, False, True, False]])
    _, kept = model.forward(tiny_params, tiny_cfg, other[:, 4:], layout=full, cache=cache_lib.write_at(c, 4, keep))
    np.testing.assert_array_equal(kept.k[:, :, :, 4], c.k[:, :, :, 4])
    np.testing.assert_array_equal(kept.k[0, :, :, 5], over.k[0, :, :, 5])  # layer 0: fresh K/V of its own token
    # first-layer keys depend only on the token at that slot
    np.testing.assert_allclose(k_over[0], k_ref[0], **TOL)


def test_cache_batch_mismatch_is_refused(tiny_cfg, tiny_params):
    c = cache_lib.init_cache(tiny_cfg, 2, 8)
    with pytest.raises(ValueError, match="cache holds 2 rows"):
        model.forward(tiny_params, tiny_cfg, jnp.zeros((3, 2), jnp.int32), cache=c)
