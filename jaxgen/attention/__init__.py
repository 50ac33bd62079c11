"""The one attention door: `attention(q, k, v, layout, ...)`.

Callers hand it a layout and coordinates, never a dense mask: the layout's rule (at most two
key ranges per query, plus one per-row `split_B` for per-row layouts) is all a kernel needs to
skip or mask tiles in-kernel. Implementations live behind it; today the XLA reference serves
every platform (`impl="auto"` or `"xla"`). Pallas kernels plug in here and are tested against
`reference.attention`.
"""
from __future__ import annotations

from jaxgen.attention.reference import attention as reference_attention
from jaxgen.errors import ConfigError

IMPLS = ("auto", "xla")


def attention(q_BLHD, k_BSKD, v_BSKD, layout, *, q_idx_BL, kv_idx_BS, kv_valid_BS=None, split_B=None,
              seq_len=None, impl: str = "auto"):
    """Softmax attention of queries over the keys `layout` allows.

    q_idx_BL / kv_idx_BS: layout coordinates of queries and keys (not necessarily RoPE positions);
    kv_valid_BS: which keys exist (cache fill, padding); split_B: the per-row boundary a per-row
    layout reads (scalar or [B]); seq_len: total length for the two-stream training layouts.
    """
    if impl not in IMPLS:
        raise ConfigError(f"attention impl={impl!r}; available: {', '.join(IMPLS)}")
    mask_BLS = layout.mask(q_idx_BL, kv_idx_BS, seq_len, split_B)
    if kv_valid_BS is not None:
        mask_BLS = mask_BLS & kv_valid_BS[:, None, :]
    return reference_attention(q_BLHD, k_BSKD, v_BSKD, mask_BLS)
