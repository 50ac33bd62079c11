"""The one attention door: `attention(q, k, v, layout, ...)`.

Implementations live behind it; today the XLA reference serves every platform (`impl="auto"`
or `"xla"`). Pallas kernels plug in here and are tested against `reference.attention`.
"""
from __future__ import annotations

from jaxgen.attention.reference import attention as reference_attention
from jaxgen.errors import ConfigError

IMPLS = ("auto", "xla")


def attention(q_BLHD, k_BSKD, v_BSKD, layout, *, q_idx_BL, kv_idx_BS, kv_valid_BS=None,
              seq_len=None, impl: str = "auto", mask_BLS=None):
    """Softmax attention of queries over keys allowed by `layout` (and `kv_valid`). A dense
    `mask_BLS` (tree / reordered decoding) replaces the layout's mask."""
    if impl not in IMPLS:
        raise ConfigError(f"attention impl={impl!r}; available: {', '.join(IMPLS)}")
    if mask_BLS is None:
        mask_BLS = layout.mask(q_idx_BL, kv_idx_BS, seq_len)
    if kv_valid_BS is not None:
        mask_BLS = mask_BLS & kv_valid_BS[:, None, :]
    return reference_attention(q_BLHD, k_BSKD, v_BSKD, mask_BLS)
