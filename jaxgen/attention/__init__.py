"""The one attention door: `attention(q, k, v, layout, ...)`.

Callers hand it a layout and coordinates, never a dense mask: the layout's rule (at most two
key ranges per query, plus one per-row `split_B` for per-row layouts) is all a kernel needs to
skip or mask tiles in-kernel. Implementations behind it, each tested against
`reference.attention`:

- `"xla"`: the reference (a dense boolean mask built in the door);
- `"pallas"`: block-sparse flash attention (`pallas_flash`, forward and backward kernels; every
  layout but `tree`), and for a short chunk over a longer cache the chunk-over-cache kernel
  (`pallas_chunk`: GQA heads packed, filled tiles only, split-K). Interpret mode on a CPU
  backend (`interpret=None`), compiled (Triton) on GPU; on TPU the chunk-over-cache kernel only
  (`pallas_tpu_chunk`, Mosaic: scalar-prefetched filled span, unfilled tiles never fetched);
- `"cudnn"`: `jax.nn.dot_product_attention(implementation="cudnn")` on NVIDIA GPUs: no mask for
  a causal or full layout over static 0..T-1 coordinates, else the layout's dense mask;
- `"splash"`: jax's TPU splash attention (`splash`) with a static block-sparse mask built from
  the layout: needs static (numpy) coordinates, as the model's training forwards pass them;
- `"auto"`: per platform and call: TPU -> splash where it serves the call; NVIDIA GPU -> cuDNN
  for chunks of >= `CUDNN_MIN_QUERIES` queries in a dtype and head dim cuDNN serves; else xla.
  The Pallas kernels are chosen explicitly until a GPU measurement makes them auto's choice.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.attention import pallas_chunk, pallas_flash
from jaxgen.attention.reference import attention as reference_attention
from jaxgen.config import ATTENTION_IMPLS
from jaxgen.errors import ConfigError

IMPLS = ATTENTION_IMPLS
PALLAS_LAYOUTS_EXCLUDED = ("tree",)  # an ancestor table, not key ranges
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MIN_QUERIES = 16  # auto leaves decode steps (a few queries) to XLA's fused einsum
CHUNK_KV_BLOCK = 64


def attention(q_BLHD, k_BSKD, v_BSKD, layout, *, q_idx_BL, kv_idx_BS, kv_valid_BS=None, split_B=None,
              seq_len=None, impl: str = "auto", interpret: bool | None = None):
    """Softmax attention of queries over the keys `layout` allows.

    q_idx_BL / kv_idx_BS: layout coordinates of queries and keys (not necessarily RoPE positions;
    numpy arrays when static, which splash needs); kv_valid_BS: which keys exist (cache fill,
    padding); split_B: the per-row boundary a per-row layout reads (scalar or [B]); seq_len:
    total length for the two-stream training layouts. interpret: None = Pallas interpret mode on
    a CPU backend only; False forces the compiled kernels (lowering checks).
    """
    if impl not in IMPLS:
        raise ConfigError(f"attention impl={impl!r}; available: {', '.join(IMPLS)}")
    args = (q_BLHD, k_BSKD, v_BSKD, layout, q_idx_BL, kv_idx_BS, kv_valid_BS, split_B, seq_len)
    interpret = jax.default_backend() == "cpu" if interpret is None else interpret
    if impl == "auto":
        impl = choose(*args, interpret=interpret)
    if impl == "pallas":
        return _pallas(*args, interpret)
    if impl == "cudnn":
        return _cudnn(*args)
    if impl == "splash":
        return _splash(*args, interpret)
    return _xla(*args)


def choose(q_BLHD, k_BSKD, v_BSKD, layout, q_idx_BL, kv_idx_BS, kv_valid_BS, split_B, seq_len, *,
           interpret: bool) -> str:
    """What `impl="auto"` runs for this call on this platform (xla when nothing else serves it)."""
    platform = jax.default_backend()
    if platform == "tpu" and not interpret:
        from jaxgen.attention import splash
        try:
            splash.check_supported(q_BLHD, k_BSKD, layout, q_idx_BL, kv_idx_BS, split_B, interpret)
            return "splash"
        except ConfigError:
            return "xla"
    if platform == "gpu" and cudnn_serves(q_BLHD, k_BSKD):
        return "cudnn"
    return "xla"


def _xla(q_BLHD, k_BSKD, v_BSKD, layout, q_idx_BL, kv_idx_BS, kv_valid_BS, split_B, seq_len):
    return reference_attention(q_BLHD, k_BSKD, v_BSKD, dense_mask(layout, q_idx_BL, kv_idx_BS, kv_valid_BS, split_B,
                                                                  seq_len))


def dense_mask(layout, q_idx_BL, kv_idx_BS, kv_valid_BS, split_B, seq_len):
    """[B, L, S] bool: the layout's rule and the keys' validity."""
    mask_BLS = layout.mask(q_idx_BL, kv_idx_BS, seq_len, split_B)
    if kv_valid_BS is not None:
        mask_BLS = mask_BLS & jnp.asarray(kv_valid_BS)[:, None, :]
    return mask_BLS


def _pallas(q_BLHD, k_BSKD, v_BSKD, layout, q_idx_BL, kv_idx_BS, kv_valid_BS, split_B, seq_len, interpret):
    """The Pallas kernels, fed each query's two key ranges: the chunk-over-cache kernel for a
    short chunk over a longer cache, else block-sparse flash attention."""
    if layout.kind in PALLAS_LAYOUTS_EXCLUDED:
        raise ConfigError(f"attention impl='pallas' cannot serve the {layout.kind!r} layout (its rule is an "
                          "ancestor table, not key ranges); use impl='xla' or 'auto'")
    on_tpu = not interpret and jax.default_backend() == "tpu"
    if not interpret and not on_tpu:
        check_compiled_shapes(q_BLHD, k_BSKD)
    B, L = q_BLHD.shape[:2]
    S = k_BSKD.shape[1]
    ranges = layout.kv_ranges(jnp.broadcast_to(q_idx_BL, (B, L)), seq_len, split_B)
    ranges = tuple(tuple(jnp.broadcast_to(a, (B, L)).astype(jnp.int32) for a in pair) for pair in ranges)
    valid = jnp.ones((B, S), bool) if kv_valid_BS is None else jnp.broadcast_to(kv_valid_BS, (B, S))
    kv_idx = jnp.broadcast_to(kv_idx_BS, (B, S))
    if on_tpu:
        return _pallas_tpu(q_BLHD, k_BSKD, v_BSKD, ranges, kv_idx, valid)
    if pallas_chunk.serves(L, S):
        return pallas_chunk.chunk_attention(q_BLHD, k_BSKD, v_BSKD, ranges, kv_idx, valid, CHUNK_KV_BLOCK, interpret)
    return pallas_flash.flash_attention(q_BLHD, k_BSKD, v_BSKD, ranges, kv_idx, valid, 64, 64, interpret)


def _pallas_tpu(q_BLHD, k_BSKD, v_BSKD, ranges, kv_idx_BS, kv_valid_BS):
    """Compiled Pallas on TPU: the chunk-over-cache kernel (Mosaic) for a short chunk over a longer
    cache; longer sequences take splash (static coordinates) or xla."""
    from jaxgen.attention import pallas_tpu_chunk
    L, S = q_BLHD.shape[1], k_BSKD.shape[1]
    if not pallas_tpu_chunk.serves(L, S):
        raise ConfigError(f"attention impl='pallas' on TPU serves a chunk of <= {pallas_chunk.MAX_QUERIES} queries "
                          f"over a longer cache, got {L} queries over {S} keys; use impl='splash' (training "
                          "forwards, static coordinates), 'xla' or 'auto'")
    kv_block = pallas_tpu_chunk.pick_kv_block(q_BLHD, k_BSKD)
    return pallas_tpu_chunk.chunk_attention_tpu(q_BLHD, k_BSKD, v_BSKD, ranges, kv_idx_BS, kv_valid_BS, kv_block)


def _cudnn(q_BLHD, k_BSKD, v_BSKD, layout, q_idx_BL, kv_idx_BS, kv_valid_BS, split_B, seq_len,
           implementation: str = "cudnn"):
    """cuDNN's fused attention: `is_causal` (no mask in memory) for a causal layout over static
    0..T-1 coordinates, no mask for a full one, else the layout's dense mask (rows that see no
    key zeroed, as the reference). `implementation="xla"` runs the same call on any backend."""
    if implementation == "cudnn":
        refuse_platform("cudnn", ("cpu", "tpu"), "cuDNN attention runs on NVIDIA GPUs; use impl='xla' or 'auto'")
        if not cudnn_serves(q_BLHD, k_BSKD, min_queries=1):
            raise ConfigError(f"attention impl='cudnn' takes {' or '.join(CUDNN_DTYPES)} and a head dim <= 128 that "
                              f"is a multiple of 8; got {jnp.dtype(q_BLHD.dtype).name}, head dim "
                              f"{q_BLHD.shape[-1]}; use impl='xla' or 'auto'")
    dpa = lambda **kw: jax.nn.dot_product_attention(q_BLHD, k_BSKD, v_BSKD, implementation=implementation, **kw)
    if kv_valid_BS is None and layout.kind in ("causal", "full") and identity_coords(q_idx_BL, kv_idx_BS):
        return dpa(is_causal=layout.kind == "causal")
    mask_BLS = dense_mask(layout, q_idx_BL, kv_idx_BS, kv_valid_BS, split_B, seq_len)
    out = dpa(mask=mask_BLS[:, None])
    return jnp.where(mask_BLS.any(-1)[..., None, None], out, 0).astype(out.dtype)


def cudnn_serves(q_BLHD, k_BSKD, min_queries: int = CUDNN_MIN_QUERIES) -> bool:
    """cuDNN's flash attention conditions (jax's `check_is_flash_attention`, pre-Hopper bound),
    and, for auto, a chunk long enough to be worth it."""
    D, L, S = q_BLHD.shape[-1], q_BLHD.shape[1], k_BSKD.shape[1]
    return (jnp.dtype(q_BLHD.dtype).name in CUDNN_DTYPES and D <= 128 and D % 8 == 0 and L >= min_queries
            and L % 2 == 0 and S % 2 == 0)


def _splash(q_BLHD, k_BSKD, v_BSKD, layout, q_idx_BL, kv_idx_BS, kv_valid_BS, split_B, seq_len, interpret):
    """jax's splash attention, its block-sparse mask built from the layout at trace time."""
    from jaxgen.attention import splash
    if not interpret:
        refuse_platform("splash", ("gpu",), "splash attention is a TPU kernel; use impl='pallas' on GPU, or 'xla' "
                       "or 'auto'")
    splash.check_supported(q_BLHD, k_BSKD, layout, q_idx_BL, kv_idx_BS, split_B, interpret)
    return splash.splash_attention(q_BLHD, k_BSKD, v_BSKD, layout, q_idx=q_idx_BL, kv_idx=kv_idx_BS,
                                   kv_valid_BS=kv_valid_BS, split=split_B, seq_len=seq_len, interpret=interpret)


def identity_coords(q_idx_BL, kv_idx_BS) -> bool:
    """Static coordinates 0..T-1 for queries and keys alike (a training forward)."""
    if not (isinstance(q_idx_BL, np.ndarray) and isinstance(kv_idx_BS, np.ndarray)):
        return False
    q, k = np.atleast_2d(q_idx_BL), np.atleast_2d(kv_idx_BS)
    return q.shape[-1] == k.shape[-1] and bool((q == np.arange(q.shape[-1])).all() and (k == np.arange(k.shape[-1])).all())


def refuse_platform(impl: str, platforms: tuple, advice: str) -> None:
    """A compiled kernel asked for on a backend it cannot run on. (A CPU backend may still lower
    the GPU / TPU kernels: `interpret=False` there is how lowering is checked.)"""
    platform = jax.default_backend()
    if platform in platforms:
        raise ConfigError(f"attention impl={impl!r} cannot run on the {platform!r} backend: {advice}")


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
