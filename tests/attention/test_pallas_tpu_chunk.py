"""The TPU chunk-over-cache Pallas kernel (interpret mode on CPU) against the XLA reference: a
decode step, a verify chunk, block-causal, full and two-range chunks over caches filled to
per-row lengths (one row empty -> 0), GQA and MQA, a last partial key tile; its gradients (the
reference's); what its check refuses; its Mosaic lowering for TPU from this CPU machine, and,
where libtpu is installed, its compilation by the real Mosaic compiler (AOT, no TPU needed)."""
import functools
import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import layouts
from jaxgen.attention import attention, pallas_tpu_chunk
from jaxgen.errors import ConfigError

B, H, D, S = 2, 4, 8, 40
kernel = jax.jit(pallas_tpu_chunk.chunk_attention_tpu, static_argnums=(6, 7))  # one XLA program: faster interpret


def qkv(L, K, seed=0):
    """Standard normal q, k, v (NumPy draws: no random-number compiles per shape)."""
    rng = np.random.RandomState(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in
                 ((B, L, H, D), (B, S, K, D), (B, S, K, D)))


def door_args(layout, L, fill, split=None, pad=(0, 0)):
    """Coordinates of a chunk ending at each row's fill (its keys: slots 0..S-1, valid from pad to
    fill), and the kernel's inputs: the layout's two ranges per query."""
    start = jnp.array([max(f - L, 0) for f in fill])
    slots = jnp.arange(S)[None, :]
    kw = dict(q_idx_BL=start[:, None] + jnp.arange(L), kv_idx_BS=jnp.broadcast_to(jnp.arange(S), (B, S)),
              kv_valid_BS=(slots < jnp.array(fill)[:, None]) & (slots >= jnp.array(pad)[:, None]), split_B=split)
    ranges = layout.kv_ranges(kw["q_idx_BL"], None, split)
    ranges = tuple(tuple(jnp.broadcast_to(a, (B, L)).astype(jnp.int32) for a in pair) for pair in ranges)
    return kw, (ranges, kw["kv_idx_BS"], kw["kv_valid_BS"])


# Three compiled shapes (one per distinct (chunk length, kv heads, key tile); the layout's rule,
# fills and padding are data): the 6-query chunks share one program
CASES = {  # layout, chunk length, per-row fill, kv heads, key tile, split, per-row first valid slot
    "decode": (layouts.causal(), 1, (21, 9), 2, 16, None, (0, 0)),  # 40 keys: tiles of 16, the last partial
    "verify_causal": (layouts.causal(), 6, (25, 30), 2, 16, None, (0, 0)),
    "block_causal": (layouts.block_causal(4), 6, (24, 37), 2, 16, None, (0, 0)),
    "full_chunk": (layouts.full(), 6, (24, 13), 2, 16, None, (0, 0)),
    "empty_row": (layouts.causal(), 6, (23, 0), 2, 16, None, (0, 0)),
    "left_padded": (layouts.causal(), 6, (38, 30), 2, 16, None, (17, 0)),  # row 0's span starts at tile 1
    # one kv head (the [B, S, D] view), 8-slot tiles: 40 keys in whole tiles (no partial tile), and
    # row 0 left-padded: its span starts at tile 2
    "mqa_decode": (layouts.causal(), 1, (40, 3), 1, 8, None, (17, 0)),
    "verify_draft_two_ranges": (layouts.verify_draft(2), 6, (30, 17), 2, 16, jnp.array([24, 11]), (0, 0)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_chunk_kernel_equals_the_reference(name):
    layout, L, fill, K, kv_block, split, pad = CASES[name]
    q, k, v = qkv(L, K)
    kw, kernel_args = door_args(layout, L, fill, split, pad)
    got = kernel(q, k, v, *kernel_args, kv_block, True)
    np.testing.assert_allclose(got, attention(q, k, v, layout, impl="xla", **kw), atol=2e-6)
    if fill[1] == 0:
        np.testing.assert_array_equal(got[1], 0.0)


def test_gradients_are_the_references():
    layout, L, fill, K, kv_block, *_ = CASES["verify_causal"]
    q, k, v = qkv(L, K, seed=1)
    kw, kernel_args = door_args(layout, L, fill)
    tpu = lambda q, k, v: kernel(q, k, v, *kernel_args, kv_block, True)
    xla = lambda q, k, v: attention(q, k, v, layout, impl="xla", **kw)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
    for got, want in zip(jax.grad(loss(tpu), (0, 1, 2))(q, k, v), jax.grad(loss(xla), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_key_span_and_block_choice():
    """Each row reads only the tiles of its filled span; the key tile shrinks to fit VMEM."""
    _, (ranges, kv_idx, valid) = door_args(layouts.causal(), 1, (21, 0))
    first, last = pallas_tpu_chunk.key_span(ranges, kv_idx, valid, 8, 5)
    np.testing.assert_array_equal(first, [0, 0])
    np.testing.assert_array_equal(last, [3, 0])  # keys 0..20: tiles 0-2; an empty row reads none
    _, (ranges, kv_idx, valid) = door_args(layouts.causal(), 2, (38, 30), pad=(17, 0))
    first, last = pallas_tpu_chunk.key_span(ranges, kv_idx, valid, 8, 5)
    np.testing.assert_array_equal(first, [2, 0])  # left padding: row 0's keys 17..37 are tiles 2-4
    np.testing.assert_array_equal(last, [5, 4])
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    assert pallas_tpu_chunk.pick_kv_block(spec(8, 1, 32, 128), spec(8, 8192, 8, 128)) == 512
    assert pallas_tpu_chunk.pick_kv_block(spec(2, 1, 32, 128), spec(2, 4096, 32, 128)) == 256  # MHA: wider tiles
    assert pallas_tpu_chunk.key_block(100, 512) == 100  # a short cache is one whole tile


REFUSED = {  # (q shape, q dtype, k shape, k dtype, kv_block): what the message names
    "head dim": ((1, 1, 8, 64), "bfloat16", (1, 1024, 2, 64), "bfloat16", 128),
    "float16": ((1, 1, 8, 128), "float16", (1, 1024, 2, 128), "float16", 128),
    "got bfloat16, float32": ((1, 1, 8, 128), "float32", (1, 1024, 2, 128), "bfloat16", 128),  # mixed
    "kv heads": ((1, 1, 6, 128), "bfloat16", (1, 1024, 3, 128), "bfloat16", 128),
    "multiple of 128": ((1, 1, 8, 128), "bfloat16", (1, 1024, 2, 128), "bfloat16", 96),
    "VMEM": ((1, 128, 64, 128), "bfloat16", (1, 4096, 8, 128), "bfloat16", 512),
    "not a multiple": ((1, 1, 6, 128), "bfloat16", (1, 1024, 4, 128), "bfloat16", 128),
}


@pytest.mark.parametrize("needle", list(REFUSED))
def test_check_refuses_what_the_compiled_kernel_cannot_take(needle):
    q_shape, q_dtype, k_shape, k_dtype, kv_block = REFUSED[needle]
    q, k = jax.ShapeDtypeStruct(q_shape, q_dtype), jax.ShapeDtypeStruct(k_shape, k_dtype)
    with pytest.raises(ConfigError, match=needle) as err:
        pallas_tpu_chunk.check_supported(q, k, kv_block, interpret=False)
    assert needle == "not a multiple" or "impl='xla'" in str(err.value)
    if needle != "not a multiple":
        pallas_tpu_chunk.check_supported(q, k, kv_block, interpret=True)  # interpret mode takes any shape


def lowering_fn(B, L, H, K, D, S, kv_block):
    """A decode chunk ending at traced per-row fills, as the sampler hands it to the kernel."""
    def f(q, k, v, fill_B):
        q_idx = fill_B[:, None] - L + jnp.arange(L)
        ranges = layouts.causal().kv_ranges(q_idx)
        ranges = tuple(tuple(jnp.broadcast_to(a, (B, L)).astype(jnp.int32) for a in pair) for pair in ranges)
        kv_idx = jnp.broadcast_to(jnp.arange(S), (B, S))
        return pallas_tpu_chunk.chunk_attention_tpu(q, k, v, ranges, kv_idx, kv_idx < fill_B[:, None], kv_block)
    return f


@pytest.mark.parametrize("K", [2, 1])
def test_compiled_kernel_lowers_for_tpu(K):
    B, L, H, D, S = 2, 3, 8, 128, 1000  # bf16, head dim 128, a last partial key tile
    q = jax.ShapeDtypeStruct((B, L, H, D), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((B, S, K, D), jnp.bfloat16)
    fill = jax.ShapeDtypeStruct((B,), jnp.int32)
    text = jax.jit(lowering_fn(B, L, H, K, D, S, 256)).trace(q, k, k, fill).lower(
        lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 1 and "jaxgen_tpu_chunk_attention" in text


AOT_SCRIPT = """
import sys, jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
sys.path.insert(0, {tests!r})
from test_pallas_tpu_chunk import lowering_fn
B, L, H, K, D, S = 4, 1, 32, 8, 128, 1000
for name in ("v4:2x2x1", "v5e:2x2", "v6e:2x2"):
    topo = topologies.get_topology_desc(topology_name=name, platform="tpu")
    s = NamedSharding(Mesh(np.array(topo.devices[:1]), ("x",)), P())
    q, k = (jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=s) for shape in ((B, L, H, D), (B, S, K, D)))
    fill = jax.ShapeDtypeStruct((B,), jnp.int32, sharding=s)
    entry = jax.jit(lowering_fn(B, L, H, K, D, S, 512)).lower(q, k, k, fill).compile().as_text().split("ENTRY")[1]
    assert not [l for l in entry.splitlines() if f"{{S}}," in l and "copy" in l], "the cache was relayouted"
    print("compiled", name)
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the Mosaic compiler) not installed")
def test_mosaic_compiles_it_ahead_of_time_without_a_tpu():
    """libtpu compiles for a TPU topology on a CPU host: the real Mosaic passes run, and the cache
    reaches the kernel without a relayout copy."""
    env = dict(os.environ, TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost", TPU_WORKER_ID="0",
               JAX_PLATFORMS="")
    script = AOT_SCRIPT.format(tests=os.path.dirname(__file__))
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("compiled") == 3
