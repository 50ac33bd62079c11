"""Small pure layers of the Llama family: RMSNorm, RoPE (HF rotate-half, HF's rope scaling types), SwiGLU."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def rms_norm(x, weight, eps: float):
    """RMSNorm computed in float32 (as Hugging Face does), cast back to x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * x32).astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling=None, seq_len=None):
    """RoPE's inverse frequencies [D/2] (float32) and the factor cos/sin are scaled by, for a
    `config.RopeScaling` (None = plain RoPE), following transformers' `modeling_rope_utils`.

    `seq_len` is used by "dynamic" only (a traced scalar is fine): transformers recomputes NTK
    frequencies from s = max(position_ids) + 1 of each forward call once s exceeds the trained
    length (`original_max_position_embeddings`); we do the same per call, which equals a fresh
    transformers model on one pass, and on prefill + cached decode with growing positions. (A
    transformers model that has already seen a longer sequence keeps those frequencies for later,
    shorter calls; that history is not modelled.)
    """
    exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    kind = "default" if scaling is None else scaling.rope_type
    if kind == "default":
        return inv_freq, 1.0
    factor, original = scaling.factor, scaling.original_max_position_embeddings
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "dynamic":
        if seq_len is None:
            raise ValueError("dynamic RoPE needs seq_len (max position + 1 of the forward call)")
        s = jnp.maximum(jnp.asarray(seq_len, jnp.int32), original).astype(jnp.float32)
        base = theta * (factor * s / original - (factor - 1.0)) ** (head_dim / (head_dim - 2))
        return 1.0 / (base ** exponent), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, factor, original, scaling.low_freq_factor, scaling.high_freq_factor), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling), _yarn_attention_factor(scaling)
    raise ValueError(f"rope_scaling type {kind!r} is unknown")


def _llama3_inv_freq(inv_freq, factor, original, low_freq_factor, high_freq_factor):
    """Llama 3.1: wavelengths above original/low_freq_factor are divided by factor, those below
    original/high_freq_factor kept, and the band between blended linearly in original/wavelength."""
    wavelen = 2 * math.pi / inv_freq
    long_wave = wavelen > original / low_freq_factor
    short_wave = wavelen < original / high_freq_factor
    scaled = jnp.where(long_wave, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    return jnp.where(~long_wave & ~short_wave, blended, scaled)


def _yarn_inv_freq(head_dim, theta, scaling):
    """YaRN: dimensions rotating fewer than beta_slow times over the original length are
    interpolated (/ factor), more than beta_fast times extrapolated (kept), a linear ramp between."""
    beta_fast, beta_slow = scaling.beta_fast or 32.0, scaling.beta_slow or 1.0
    original = scaling.original_max_position_embeddings

    def dim_of(rotations):  # the dimension index whose wavelength fits `rotations` times in `original`
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.truncate is None or scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # weight of the extrapolated (unscaled) frequency
    pos_freqs = theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    return 1.0 / (scaling.factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep


def _yarn_attention_factor(scaling) -> float:
    """YaRN's cos/sin scale: attention_factor if given, else mscale(factor, mscale) /
    mscale(factor, mscale_all_dim) when both are set, else mscale(factor) = 0.1 ln(factor) + 1."""
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)

    def mscale(m=1.0):
        return 1.0 if scaling.factor <= 1 else 0.1 * m * math.log(scaling.factor) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return mscale(scaling.mscale) / mscale(scaling.mscale_all_dim)
    return mscale()


def rope_cos_sin(positions_BL, head_dim: int, theta: float, scaling=None):
    """cos/sin tables [B, L, D] with HF's layout: frequencies repeated as [f, f], times the
    scaling's attention factor (YaRN). `scaling` is a `config.RopeScaling` or None (plain RoPE)."""
    dynamic = scaling is not None and scaling.rope_type == "dynamic"
    seq_len = jnp.max(positions_BL) + 1 if dynamic else None
    inv_freq, attention_factor = rope_inv_freq(head_dim, theta, scaling, seq_len)
    freqs_BLF = positions_BL.astype(jnp.float32)[..., None] * inv_freq
    emb_BLD = jnp.concatenate([freqs_BLF, freqs_BLF], axis=-1)
    cos, sin = jnp.cos(emb_BLD), jnp.sin(emb_BLD)
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos, sin


def apply_rope(x_BLHD, cos_BLD, sin_BLD):
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] (half split)."""
    half = x_BLHD.shape[-1] // 2
    x1, x2 = x_BLHD[..., :half], x_BLHD[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BLD[:, :, None, :], sin_BLD[:, :, None, :]
    out = x_BLHD.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x_BLHD.dtype)


def swiglu(x_BLE, w_gate_EF, w_up_EF, w_down_FE):
    gate = jnp.einsum("ble,ef->blf", x_BLE, w_gate_EF)
    up = jnp.einsum("ble,ef->blf", x_BLE, w_up_EF)
    return jnp.einsum("blf,fe->ble", jax.nn.silu(gate) * up, w_down_FE)
