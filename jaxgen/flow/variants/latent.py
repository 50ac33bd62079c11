"""Latent Flow Matching (VinAIResearch/LFM, spec §2.4): flow matching in the latent space of a
frozen autoencoder, then decode. Offline, the autoencoder is a small MLP trained here (e.g. on the
8x8 digits, x flattened to 64 values in [-1, 1]).

- `AESpec`, `init_autoencoder`, `encode`, `decode`, `ae_loss` (reconstruction MSE) and
  `train_autoencoder` (Adam in one jitted `lax.scan`).
- Latent scaling: LFM multiplies SD-VAE latents by the fixed 0.18215, the factor that gives them
  unit variance; here `latent_scale(ae, spec, x)` computes that factor for our AE, 1 / std over
  all latent entries of the data (a scalar, no shift, as SD/LFM), and `LatentFMSpec.scale` holds
  it. The flow runs on z = scale * encode(x); samples are decode(z / scale).
- `loss(params, spec, batch, key)`: CondOT FM of the latent velocity net on the scaled latents of
  batch["x"] (the AE is frozen: stop_gradient); `sample`: N(0, I) latents through the flow, decoded.

Convention: ours (noise at t=0, data at t=1; spec §0). LFM runs data at 0 and noise at 1 with
z_t = (1 - t) z_0 + (sigma_min + (1 - sigma_min) t) eps, sigma_min = 1e-5: map t -> 1 - t, v -> -v;
we take sigma_min = 0 (CondOT) and fixed-step solvers instead of dopri5 by default.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgen.errors import ConfigError
from jaxgen.flow import losses, nets, solvers
from jaxgen.flow.variants.common import NetVelocity, uniform_grid


@dataclasses.dataclass(frozen=True)
class AESpec:
    """An MLP autoencoder dim -> latent_dim -> dim: `depth` hidden SiLU layers of `hidden` each side."""

    dim: int = 64
    latent_dim: int = 8
    hidden: int = 256
    depth: int = 2

    def __post_init__(self):
        for name in ("dim", "latent_dim", "hidden", "depth"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"AESpec.{name}={v!r} must be an integer >= 1")


def _mlp_init(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (a, b)) / math.sqrt(a), "b": jnp.zeros((b,))}
            for k, a, b in zip(keys, sizes, sizes[1:])]


def _mlp(layers, x):
    for layer in layers[:-1]:
        x = jax.nn.silu(x @ layer["w"] + layer["b"])
    return x @ layers[-1]["w"] + layers[-1]["b"]


def init_autoencoder(key, spec: AESpec) -> dict:
    k_enc, k_dec = jax.random.split(key)
    mid = [spec.hidden] * spec.depth
    return {"enc": _mlp_init(k_enc, [spec.dim, *mid, spec.latent_dim]),
            "dec": _mlp_init(k_dec, [spec.latent_dim, *mid, spec.dim])}


def _flat(x, dim: int):
    x = jnp.asarray(x, jnp.float32)
    x = x.reshape(x.shape[0], -1)
    if x.shape[1] != dim:
        raise ConfigError(f"inputs have {x.shape[1]} values per example but the autoencoder takes dim={dim}")
    return x


def encode(ae, spec: AESpec, x):
    """[B, latent_dim] latents of x [B, ...] (flattened to [B, dim])."""
    return _mlp(ae["enc"], _flat(x, spec.dim))


def decode(ae, spec: AESpec, z_BZ):
    """[B, dim] reconstructions (flat; reshape to the data's shape, e.g. [B, 8, 8, 1])."""
    return _mlp(ae["dec"], z_BZ)


def ae_loss(ae, spec: AESpec, batch, key=None):
    """(reconstruction MSE, metrics) of batch["x"]."""
    x = _flat(batch["x"], spec.dim)
    value = jnp.mean(jnp.square(decode(ae, spec, encode(ae, spec, x)) - x))
    return value, {"loss": value}


def train_autoencoder(key, spec: AESpec, x_N, *, steps: int = 500, batch_size: int = 128,
                      learning_rate: float = 2e-3):
    """(ae params, final minibatch loss): Adam on `ae_loss` over random minibatches of x_N, the
    whole run one jitted `lax.scan`."""
    x = _flat(x_N, spec.dim)
    if not 1 <= batch_size <= x.shape[0]:
        raise ConfigError(f"batch_size={batch_size} must be in [1, {x.shape[0]}] (the number of examples)")
    k_init, k_data = jax.random.split(key)
    return _train(init_autoencoder(k_init, spec), x, k_data, spec, int(steps), int(batch_size), float(learning_rate))


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _train(ae, x, key, spec, steps, batch_size, learning_rate):
    opt = optax.adam(learning_rate)

    def step(carry, k):
        ae, state = carry
        idx = jax.random.randint(k, (batch_size,), 0, x.shape[0])
        value, grads = jax.value_and_grad(lambda p: ae_loss(p, spec, {"x": x[idx]})[0])(ae)
        updates, state = opt.update(grads, state, ae)
        return (optax.apply_updates(ae, updates), state), value

    (ae, _), values = jax.lax.scan(step, (ae, opt.init(ae)), jax.random.split(key, steps))
    return ae, values[-1]


def latent_scale(ae, spec: AESpec, x_N) -> float:
    """1 / std of all latent entries of x_N: the factor that gives the latents unit variance
    (what SD's 0.18215 is for its VAE)."""
    z = np.asarray(encode(ae, spec, x_N))
    return float(1.0 / max(z.std(), 1e-12))


@dataclasses.dataclass(frozen=True)
class LatentFMSpec:
    """A velocity net on the `scale`d latents of a frozen autoencoder."""

    ae: AESpec
    net: nets.NetSpec
    scale: float = 1.0

    def __post_init__(self):
        if self.net.dim != self.ae.latent_dim:
            raise ConfigError(f"net dim={self.net.dim} must equal the autoencoder's latent_dim={self.ae.latent_dim}")
        if not float(self.scale) > 0:
            raise ConfigError(f"latent scale={self.scale!r} must be positive (see latent_scale)")


def init(key, spec: LatentFMSpec, ae) -> dict:
    """{"ae": the trained autoencoder (kept frozen), "net": a fresh latent velocity net}."""
    return {"ae": ae, "net": nets.init(key, spec.net)}


def loss(params, spec: LatentFMSpec, batch, key, *, time_sampler: str = "uniform"):
    """`losses.cfm_loss` on z = scale * encode(x) for batch["x"]; no gradient reaches the AE."""
    z = spec.scale * encode(jax.lax.stop_gradient(params["ae"]), spec.ae, batch["x"])
    value = losses.cfm_loss(lambda z_t, t: nets.apply(params["net"], spec.net, z_t, t), z, key,
                            sample_t=losses.t_sampler(time_sampler))
    return value, {"loss": value}


@functools.partial(jax.jit, static_argnames=("spec", "n", "steps", "method", "return_latents"))
def sample(params, spec: LatentFMSpec, key, n: int, steps: int = 32, method: str = "euler",
           return_latents: bool = False):
    """[n, dim] decoded samples: z_0 ~ N(0, I) latents through the flow, divided by scale, decoded.
    With return_latents, (samples, the scaled latents at t=1)."""
    z_0 = jax.random.normal(key, (n, spec.net.dim))
    z_1 = solvers.solve(NetVelocity(spec.net), z_0, uniform_grid(steps), method, args=(params["net"],))
    x = decode(params["ae"], spec.ae, z_1 / spec.scale)
    return (x, z_1) if return_latents else x
