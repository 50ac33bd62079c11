"""The attention door: a layout plus coordinates and per-row data in, never a dense mask."""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import layouts
from jaxgen.attention import attention, reference
from jaxgen.errors import ConfigError

B, L, S, H, K, D = 2, 5, 9, 4, 2, 8


def qkv(seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (B, L, H, D)), jax.random.normal(kk, (B, S, K, D)),
            jax.random.normal(kv, (B, S, K, D)))


def test_door_takes_no_dense_mask():
    assert not any("mask" in name for name in inspect.signature(attention).parameters)
    q, k, v = qkv()
    with pytest.raises(TypeError):
        attention(q, k, v, layouts.full(), q_idx_BL=jnp.zeros((B, L), jnp.int32),
                  kv_idx_BS=jnp.zeros((B, S), jnp.int32), mask_BLS=jnp.ones((B, L, S), bool))


def test_per_row_prefix_and_valid_keys_equal_the_dense_reference():
    """prefix(None) with per-row prompt lengths and per-row key validity, against reference
    attention with the mask written out by hand; traced split under jit."""
    q, k, v = qkv(1)
    q_idx = jnp.asarray([[0, 2, 4, 6, 8], [1, 3, 5, 7, 8]], jnp.int32)
    kv_idx = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    prompt = np.array([3, 6])
    valid = np.arange(S)[None, :] < np.array([[9], [7]])
    got = jax.jit(lambda s: attention(q, k, v, layouts.prefix(None), q_idx_BL=q_idx, kv_idx_BS=kv_idx,
                                      kv_valid_BS=jnp.asarray(valid), split_B=s))(jnp.asarray(prompt))
    qi, ki = np.asarray(q_idx)[:, :, None], np.arange(S)[None, None, :]
    p = prompt[:, None, None]
    mask = np.where(qi < p, ki < p, True) & valid[:, None, :]
    want = reference.attention(q, k, v, jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_verify_draft_rows_see_the_cache_and_their_outcome():
    q, k, v = qkv(2)
    kk = 2  # draft length: 2 verify rows + 2 blocks of 2 = 6 rows; use the first 5 as queries
    split = jnp.asarray([1, 3], jnp.int32)
    q_idx = split[:, None] + jnp.arange(L)
    kv_idx = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    got = attention(q, k, v, layouts.verify_draft(kk), q_idx_BL=q_idx, kv_idx_BS=kv_idx, split_B=split)
    for b, s in enumerate([1, 3]):
        rows = np.zeros((L, S), bool)
        rows[:, :s] = True  # the cache
        rows[0, s], rows[1, s:s + 2] = True, True  # causal verify rows
        rows[2:4, s] = True  # block M_0: verify row 0 and itself
        rows[2:4, s + 2:s + 4] = True
        rows[4, s:s + 2] = True  # block M_1 (first row): verify rows 0..1 and itself
        rows[4, s + 4:s + 6] = True
        want = reference.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], jnp.asarray(rows)[None])
        np.testing.assert_allclose(np.asarray(got[b]), np.asarray(want[0]), rtol=1e-6, atol=1e-6)


def test_bad_door_input():
    q, k, v = qkv()
    idx = dict(q_idx_BL=jnp.zeros((B, L), jnp.int32), kv_idx_BS=jnp.zeros((B, S), jnp.int32))
    with pytest.raises(ConfigError, match="impl='flash'; available: auto, xla, pallas, cudnn, splash"):
        attention(q, k, v, layouts.causal(), impl="flash", **idx)
    with pytest.raises(ConfigError, match="impl='cudnn' cannot run on the 'cpu' backend"):
        attention(q, k, v, layouts.causal(), impl="cudnn", **idx)
    with pytest.raises(ConfigError, match="needs split"):
        attention(q, k, v, layouts.verify_draft(2), **idx)
