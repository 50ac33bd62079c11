"""The one attention door: `attention(q, k, v, layout, ...)`.

Callers hand it a layout and coordinates, never a dense mask: the layout's rule (at most two
key ranges per query, plus one per-row `split_B` for per-row layouts) is all a kernel needs to
skip or mask tiles in-kernel. Implementations behind it, each tested against
`reference.attention`:

- `"xla"`: the reference (a dense boolean mask built in the door);
- `"pallas"`: block-sparse flash attention (`pallas_flash`), the layout rule in-kernel, empty
  key tiles skipped, forward and backward kernels; interpret mode on a CPU backend
  (`interpret=None`), compiled elsewhere (Triton on GPU). Every layout but `tree`;
- `"auto"`: the XLA reference for now (the Pallas kernel is not yet measured on an accelerator).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.attention import pallas_flash
from jaxgen.attention.reference import attention as reference_attention
from jaxgen.errors import ConfigError

IMPLS = ("auto", "xla", "pallas")
PALLAS_LAYOUTS_EXCLUDED = ("tree",)  # an ancestor table, not key ranges


def attention(q_BLHD, k_BSKD, v_BSKD, layout, *, q_idx_BL, kv_idx_BS, kv_valid_BS=None, split_B=None,
              seq_len=None, impl: str = "auto", interpret: bool | None = None):
    """Softmax attention of queries over the keys `layout` allows.

    q_idx_BL / kv_idx_BS: layout coordinates of queries and keys (not necessarily RoPE positions);
    kv_valid_BS: which keys exist (cache fill, padding); split_B: the per-row boundary a per-row
    layout reads (scalar or [B]); seq_len: total length for the two-stream training layouts.
    """
    if impl not in IMPLS:
        raise ConfigError(f"attention impl={impl!r}; available: {', '.join(IMPLS)}")
    if impl == "pallas":
        return _pallas(q_BLHD, k_BSKD, v_BSKD, layout, q_idx_BL, kv_idx_BS, kv_valid_BS, split_B, seq_len, interpret)
    mask_BLS = layout.mask(q_idx_BL, kv_idx_BS, seq_len, split_B)
    if kv_valid_BS is not None:
        mask_BLS = mask_BLS & kv_valid_BS[:, None, :]
    return reference_attention(q_BLHD, k_BSKD, v_BSKD, mask_BLS)


def _pallas(q_BLHD, k_BSKD, v_BSKD, layout, q_idx_BL, kv_idx_BS, kv_valid_BS, split_B, seq_len, interpret):
    """The block-sparse Pallas kernel, fed each query's two key ranges."""
    if layout.kind in PALLAS_LAYOUTS_EXCLUDED:
        raise ConfigError(f"attention impl='pallas' cannot serve the {layout.kind!r} layout (its rule is an "
                          "ancestor table, not key ranges); use impl='xla' or 'auto'")
    B, L = q_BLHD.shape[:2]
    S = k_BSKD.shape[1]
    ranges = layout.kv_ranges(jnp.broadcast_to(q_idx_BL, (B, L)), seq_len, split_B)
    ranges = tuple(tuple(jnp.broadcast_to(a, (B, L)).astype(jnp.int32) for a in pair) for pair in ranges)
    valid = jnp.ones((B, S), bool) if kv_valid_BS is None else jnp.broadcast_to(kv_valid_BS, (B, S))
    interpret = jax.default_backend() == "cpu" if interpret is None else interpret
    if not interpret:
        check_compiled_shapes(q_BLHD, k_BSKD)
    return pallas_flash.flash_attention(q_BLHD, k_BSKD, v_BSKD, ranges, jnp.broadcast_to(kv_idx_BS, (B, S)), valid,
                                        64, 64, interpret)


COMPILED_DTYPES = ("float32", "bfloat16", "float16")


def check_compiled_shapes(q_BLHD, k_BSKD):
    """What the compiled (Triton) kernel serves: a power-of-two head dim >= 16, float dtypes, and
    query heads a multiple of kv heads."""
    D, H, K = q_BLHD.shape[-1], q_BLHD.shape[2], k_BSKD.shape[2]
    if D < 16 or D & (D - 1):
        raise ConfigError(f"attention impl='pallas' (compiled) needs a power-of-two head dim >= 16, got {D}; "
                          "use impl='xla'")
    for name, a in (("q", q_BLHD), ("k", k_BSKD)):
        if jnp.dtype(a.dtype).name not in COMPILED_DTYPES:
            raise ConfigError(f"attention impl='pallas' (compiled) takes {', '.join(COMPILED_DTYPES)}; {name} is "
                              f"{jnp.dtype(a.dtype).name}; use impl='xla' or cast")
    if H % K:
        raise ConfigError(f"{H} query heads are not a multiple of {K} kv heads")
