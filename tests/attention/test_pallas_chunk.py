"""The chunk-over-cache Pallas kernel (interpret mode on CPU): 1 to a few queries over a long
cache filled to per-row lengths, GQA heads packed into one tile, split-K partials merged; against
the XLA reference and the flash kernel, gradients included, and its CUDA lowering. Also the
cuDNN arm's inputs (is_causal / dense mask / zeroed rows), run through jax's XLA implementation."""
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import layouts
from jaxgen.attention import _cudnn, attention, pallas_chunk

B, H, K, D = 2, 4, 2, 8
S = 40  # five 8-slot key tiles: two splits of the filled span, the last one partial


# the chunk kernel jitted once: calls of one shape (whatever the layout: its rule reaches the
# kernel as range arrays) reuse one compiled program
_chunk_jitted = jax.jit(pallas_chunk.chunk_attention, static_argnums=(6, 7))


@pytest.fixture(autouse=True)
def small_key_tiles(monkeypatch):
    monkeypatch.setattr(sys.modules["jaxgen.attention"], "CHUNK_KV_BLOCK", 8)
    monkeypatch.setattr(pallas_chunk, "chunk_attention", _chunk_jitted)


def qkv(L, seed=0):
    """Standard normal q, k, v (NumPy draws: no random-number compiles per shape)."""
    rng = np.random.RandomState(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in
                 ((B, L, H, D), (B, S, K, D), (B, S, K, D)))


CASES = {  # layout, chunk length, per-row fill (the 4-query chunks share one compiled program)
    "decode_causal": (layouts.causal(), 1, (21, 9)),
    "verify_causal": (layouts.causal(), 4, (25, 30)),
    "block_full": (layouts.full(), 4, (24, 13)),
    "block_causal": (layouts.block_causal(4), 4, (24, 37)),
    "empty_row": (layouts.causal(), 4, (23, 0)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_chunk_kernel_equals_the_reference(name):
    layout, L, fill = CASES[name]
    q, k, v = qkv(L)
    start = jnp.array([fill[0] - L, max(fill[1] - L, 0)])
    kw = dict(q_idx_BL=start[:, None] + jnp.arange(L), kv_idx_BS=jnp.broadcast_to(jnp.arange(S), (B, S)),
              kv_valid_BS=jnp.arange(S)[None, :] < jnp.array(fill)[:, None])
    assert pallas_chunk.serves(L, S)
    got = attention(q, k, v, layout, impl="pallas", **kw)
    np.testing.assert_allclose(got, attention(q, k, v, layout, impl="xla", **kw), atol=2e-6)
    if fill[1] == 0:
        np.testing.assert_array_equal(got[1], 0.0)


def test_chunk_kernel_gradients_come_from_the_flash_kernels():
    layout, L, fill = CASES["verify_causal"]
    q, k, v = qkv(L, seed=1)
    kw = dict(q_idx_BL=jnp.array([[20], [25]]) + jnp.arange(L), kv_idx_BS=jnp.broadcast_to(jnp.arange(S), (B, S)),
              kv_valid_BS=jnp.arange(S)[None, :] < jnp.array(fill)[:, None])
    loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, layout, impl=impl, **kw)))
    for got, want in zip(jax.grad(loss("pallas"), (0, 1, 2))(q, k, v), jax.grad(loss("xla"), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_head_packing_and_split_merge():
    q = jnp.arange(B * 3 * H * D, dtype=jnp.float32).reshape(B, 3, H, D)
    packed = pallas_chunk.pack_heads(q, K)
    assert packed.shape == (B, 2 * 3, K, D)
    np.testing.assert_array_equal(packed[:, 1 * 3 + 2, 1], q[:, 2, 1 * 2 + 1])  # row g*L+l of kv head k: head k*G+g
    np.testing.assert_array_equal(pallas_chunk.unpack_heads(packed, 3, H), q)
    row0 = jnp.array([1.0, 0.0])[None, :, None, None]  # [1, M=2, K=1, D=1]; row 1 saw no key: 0 from the kernel
    o = jnp.stack([row0, 3 * row0], 1)  # two splits
    lse = jnp.array([[[[0.0, pallas_chunk.NEG], [jnp.log(3.0), pallas_chunk.NEG]]]])
    merged = pallas_chunk.merge_splits(o, lse)  # row 0: (1*1 + 3*3) / 4; row 1: no keys anywhere -> 0
    np.testing.assert_allclose(merged[0, :, 0, 0], [2.5, 0.0])
    assert pallas_chunk.num_splits(1, 8, 128, interpret=False) == 32  # one row: split to fill the GPU
    assert pallas_chunk.num_splits(64, 8, 128, interpret=False) == 1
    assert not pallas_chunk.serves(64, 64)  # a training sequence takes the flash kernel


def test_chunk_kernel_lowers_for_cuda():
    q = jax.ShapeDtypeStruct((1, 1, 8, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 512, 2, 64), jnp.bfloat16)
    f = functools.partial(attention, layout=layouts.causal(), q_idx_BL=jnp.full((1, 1), 300),
                          kv_idx_BS=jnp.arange(512)[None], kv_valid_BS=jnp.arange(512)[None] < 301, impl="pallas",
                          interpret=False)
    text = jax.jit(f).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower()


@pytest.mark.parametrize("layout, static", [(layouts.causal(), True), (layouts.full(), True),
                                            (layouts.block_causal(4), True), (layouts.causal(), False)])
def test_cudnn_arm_inputs_equal_the_reference(layout, static):
    """The cuDNN arm's call (is_causal for static 0..T-1 coordinates, else a dense mask; rows
    without keys zeroed), run with jax's XLA implementation: only the backend differs on a GPU."""
    T = 12
    q, k, v = qkv(T)
    k, v = k[:, :T], v[:, :T]
    idx = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    idx = idx if static else jnp.asarray(idx)
    valid = None if static else jnp.arange(T)[None, :] < jnp.array([[7], [0]])
    args = (q, k, v, layout, idx, idx, valid, None, None)
    want = attention(q, k, v, layout, q_idx_BL=idx, kv_idx_BS=idx, kv_valid_BS=valid, impl="xla")
    np.testing.assert_allclose(_cudnn(*args, implementation="xla"), want, atol=2e-6)
