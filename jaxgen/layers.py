"""Small pure layers of the Llama family: RMSNorm, RoPE (HF rotate-half), SwiGLU."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x, weight, eps: float):
    """RMSNorm computed in float32 (as Hugging Face does), cast back to x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * x32).astype(x.dtype)


def rope_cos_sin(positions_BL, head_dim: int, theta: float):
    """cos/sin tables [B, L, D] with HF's layout: frequencies repeated as [f, f]."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs_BLF = positions_BL.astype(jnp.float32)[..., None] * inv_freq
    emb_BLD = jnp.concatenate([freqs_BLF, freqs_BLF], axis=-1)
    return jnp.cos(emb_BLD), jnp.sin(emb_BLD)


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
