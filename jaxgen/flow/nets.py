"""Velocity networks for flow matching: a residual MLP with adaptive layer norm (AdaLN).

One architecture serves the 2-D toys, the 8x8 digits and the per-token head of continuous-token
AR (MAR's "SimpleMLPAdaLN" design): the time t, an optional class label and an optional
condition vector (a backbone hidden state) are embedded and summed into one conditioning vector
c; every block modulates its layer norm by (shift, scale, gate) computed from c, and the blocks'
final projections start at zero, so a fresh net is close to the identity map of its input
projection. Pure functions over a params dict: `init(key, spec)`, `apply(params, spec, x, t, ...)`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxgen.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class NetSpec:
    """The shape of a velocity net. num_classes > 0 adds a label embedding with one extra "null"
    label (index num_classes) for classifier-free guidance; cond_dim > 0 takes a condition vector."""

    dim: int  # data dimension (2 for the toys, 64 for the digits, the token dim for continuous AR)
    hidden: int = 256
    depth: int = 3
    time_dim: int = 128  # sinusoidal features of t
    num_classes: int = 0
    cond_dim: int = 0
    time_scale: float = 1000.0  # t in [0, 1] is embedded as t * time_scale (as diffusion nets do)

    def __post_init__(self):
        for name in ("dim", "hidden", "depth", "time_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"NetSpec.{name}={getattr(self, name)!r} must be a positive integer")
        if self.time_dim % 2:
            raise ConfigError(f"NetSpec.time_dim={self.time_dim} must be even (sin and cos halves)")
        for name in ("num_classes", "cond_dim"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"NetSpec.{name}={getattr(self, name)!r} must be >= 0")

    @property
    def null_label(self) -> int:
        return self.num_classes


def time_features(t_B, time_dim: int, scale: float):
    """[B, time_dim] sinusoidal features of t (sin half, cos half; geometric frequencies)."""
    half = time_dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angle = (jnp.asarray(t_B, jnp.float32) * scale)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


def _dense(key, n_in: int, n_out: int, zero: bool = False):
    w = jnp.zeros((n_in, n_out)) if zero else jax.random.normal(key, (n_in, n_out)) / math.sqrt(n_in)
    return {"w": w.astype(jnp.float32), "b": jnp.zeros((n_out,), jnp.float32)}


def _linear(p, x):
    return x @ p["w"] + p["b"]


def init(key, spec: NetSpec) -> dict:
    """Fresh parameters (float32)."""
    keys = iter(jax.random.split(key, 8 + 4 * spec.depth))
    h = spec.hidden
    params = {"in": _dense(next(keys), spec.dim, h),
              "time": [_dense(next(keys), spec.time_dim, h), _dense(next(keys), h, h)],
              "blocks": [{"mod": _dense(next(keys), h, 3 * h, zero=True), "fc1": _dense(next(keys), h, h),
                          "fc2": _dense(next(keys), h, h)} for _ in range(spec.depth)],
              "final_mod": _dense(next(keys), h, 2 * h, zero=True),
              "out": _dense(next(keys), h, spec.dim, zero=True)}
    if spec.num_classes:
        params["label"] = 0.02 * jax.random.normal(next(keys), (spec.num_classes + 1, h), jnp.float32)
    if spec.cond_dim:
        params["cond"] = _dense(next(keys), spec.cond_dim, h)
    return params


def _layer_norm(x, eps: float = 1e-6):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def conditioning(params, spec: NetSpec, t_B, label_B=None, cond_BC=None):
    """[B, hidden] the vector every block is modulated by: time, label and condition embeddings."""
    c = _linear(params["time"][1], jax.nn.silu(_linear(params["time"][0], time_features(t_B, spec.time_dim,
                                                                                          spec.time_scale))))
    if spec.num_classes:
        label = jnp.full(t_B.shape, spec.null_label, jnp.int32) if label_B is None else label_B
        c = c + params["label"][label]
    elif label_B is not None:
        raise ConfigError("this net has no label embedding (NetSpec.num_classes=0); drop label")
    if spec.cond_dim:
        if cond_BC is None:
            raise ConfigError(f"this net takes a condition vector of size {spec.cond_dim}; pass cond")
        c = c + _linear(params["cond"], cond_BC)
    elif cond_BC is not None:
        raise ConfigError("this net takes no condition vector (NetSpec.cond_dim=0); drop cond")
    return jax.nn.silu(c)


def apply(params, spec: NetSpec, x_BD, t, label_B=None, cond_BC=None):
    """The predicted field [B, dim] at x_BD, time t (scalar or [B]); label / cond as the spec says."""
    if x_BD.shape[-1] != spec.dim:
        raise ConfigError(f"x has {x_BD.shape[-1]} features but the net was built for dim={spec.dim}")
    t_B = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x_BD.shape[:1])
    c = conditioning(params, spec, t_B, label_B, cond_BC)
    h = _linear(params["in"], x_BD.astype(jnp.float32))
    for block in params["blocks"]:
        shift, scale, gate = jnp.split(_linear(block["mod"], c), 3, axis=-1)
        y = _layer_norm(h) * (1 + scale) + shift
        h = h + gate * _linear(block["fc2"], jax.nn.silu(_linear(block["fc1"], y)))
    shift, scale = jnp.split(_linear(params["final_mod"], c), 2, axis=-1)
    return _linear(params["out"], _layer_norm(h) * (1 + scale) + shift)


def velocity_fn(params, spec: NetSpec, label_B=None, cond_BC=None):
    """`velocity_fn(x, t)` for `jaxgen.flow.solve` / `log_likelihood` with the label and
    condition bound."""
    return lambda x, t: apply(params, spec, x, t, label_B, cond_BC)


def num_params(params) -> int:
    return sum(int(a.size) for a in jax.tree.leaves(params))
