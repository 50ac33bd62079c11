"""Transition Matching, discrete-time (DTM; Shaul, Singer, Gat, Lipman, arXiv 2506.23589; spec §2.5
[paper + summaries]).

T transitions over the supervising process X_t = (1 - t/T) X_0 + (t/T) X_T (t = 0..T, X_0 ~ N(0, I)
source, X_T data), whose step is X_{t+1} - X_t = Y / T with Y = X_T - X_0. The model is

    p(x_{t+1} | x_t) = int delta(x_{t+1} - x_t - y / T) p(y | x_t) dy

with p(y | x_t) a small flow-matching head conditioned on a backbone feature h = B(x_t, t):
- training (`loss`): t ~ U{0..T-1}; the head regresses FM on Y given h (inner time s,
  y_s = s Y + (1 - s) eps', target Y - eps'), i.e. `losses.cfm_loss` of the head;
- sampling (`sample`): x_0 ~ N(0, I); for t = 0..T-1: y from the head's inner ODE (head_steps
  steps from eps'), x_{t+1} = x_t + y / T (`transition_sample`, the loop any y-sampler runs in).

The defining property: if y is drawn from the exact posterior p(Y | X_t = x_t), the chain's
marginals are the supervising process's at every t, whatever T (since X_{t+1} = X_t + Y / T),
while a deterministic T-step Euler FM with the exact velocity E[Y | x_t] is not (it shrinks the
covariance); tests pin both on a Gaussian toy with `gaussian_posterior`.

Our backbone is a small MLP on (x_t, time features of t/T) and the head sees only h (the spec's
form). Not built: ARTM (each transition generated token by token, independent noise per step) and
FHTM (full-history, causal).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jaxgen.errors import ConfigError
from jaxgen.flow import losses, nets, solvers
from jaxgen.flow.variants.common import NetVelocity, uniform_grid


@dataclasses.dataclass(frozen=True)
class DTMSpec:
    """Sizes of the backbone (an MLP to a feature of feature_dim), the head (an AdaLN velocity net
    conditioned on that feature) and the two step counts: T transitions, head_steps inner steps."""

    dim: int
    transitions: int = 8
    hidden: int = 128
    depth: int = 2
    feature_dim: int = 64
    time_dim: int = 32
    head_hidden: int = 64
    head_depth: int = 2
    head_steps: int = 4
    head_method: str = "euler"

    def __post_init__(self):
        for name in ("dim", "transitions", "hidden", "depth", "feature_dim", "time_dim", "head_hidden", "head_depth",
                     "head_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"DTMSpec.{name}={v!r} must be an integer >= 1")
        if self.time_dim % 2:
            raise ConfigError(f"DTMSpec.time_dim={self.time_dim} must be even (sin and cos halves)")
        solvers.check_method(self.head_method)

    @property
    def head(self) -> nets.NetSpec:
        return nets.NetSpec(dim=self.dim, hidden=self.head_hidden, depth=self.head_depth, time_dim=self.time_dim,
                            cond_dim=self.feature_dim)


def _dense(key, n_in, n_out):
    return {"w": jax.random.normal(key, (n_in, n_out)) / math.sqrt(n_in), "b": jnp.zeros((n_out,))}


def init(key, spec: DTMSpec) -> dict:
    """{"backbone": MLP layers, "head": `nets.init` of spec.head}."""
    k_head, *ks = jax.random.split(key, spec.depth + 2)
    sizes = [spec.dim + spec.time_dim] + [spec.hidden] * spec.depth + [spec.feature_dim]
    return {"backbone": [_dense(k, a, b) for k, a, b in zip(ks, sizes, sizes[1:])],
            "head": nets.init(k_head, spec.head)}


def backbone(params, spec: DTMSpec, x_BD, t):
    """[B, feature_dim] feature h = B(x_t, t) for integer transition index t (scalar or [B])."""
    t_B = jnp.broadcast_to(jnp.asarray(t, jnp.float32) / spec.transitions, x_BD.shape[:1])
    h = jnp.concatenate([x_BD, nets.time_features(t_B, spec.time_dim, 1000.0)], -1)
    layers = params["backbone"]
    for layer in layers[:-1]:
        h = jax.nn.silu(h @ layer["w"] + layer["b"])
    return h @ layers[-1]["w"] + layers[-1]["b"]


def process(x_0, x_T, t, transitions: int):
    """(X_t, Y) of the supervising process at integer t ([B] or scalar): X_t = (1 - t/T) X_0 + (t/T) X_T."""
    a = jnp.asarray(t, x_0.dtype) / transitions
    a = a.reshape(a.shape + (1,) * (x_0.ndim - a.ndim))
    return (1 - a) * x_0 + a * x_T, x_T - x_0


def loss(params, spec: DTMSpec, batch, key, *, time_sampler: str = "uniform"):
    """DTM's loss on batch["x"] [B, D]: the head's FM loss on Y = X_T - X_0 given h = B(X_t, t),
    t ~ U{0..T-1}; `time_sampler` draws the head's inner time s."""
    x_T = batch["x"].reshape(batch["x"].shape[0], -1)
    k0, kt, ky = jax.random.split(key, 3)
    x_0 = jax.random.normal(k0, x_T.shape, x_T.dtype)
    t_B = jax.random.randint(kt, (x_T.shape[0],), 0, spec.transitions)
    x_t, y = process(x_0, x_T, t_B, spec.transitions)
    h = backbone(params, spec, x_t, t_B)
    value = losses.cfm_loss(lambda y_s, s: nets.apply(params["head"], spec.head, y_s, s, cond_BC=h), y, ky,
                            sample_t=losses.t_sampler(time_sampler))
    return value, {"loss": value}


def transition_sample(sample_y, x_0, transitions: int, key, return_path: bool = False):
    """Run x_{t+1} = x_t + sample_y(x_t, t, key_t) / T for t = 0..T-1 (one `lax.scan`); key_t is
    fold_in(key, t). Returns x_T, or [T + 1, ...] states x_0..x_T with return_path."""
    def body(x, t):
        x_next = x + sample_y(x, t, jax.random.fold_in(key, t)) / transitions
        return x_next, x_next

    x_T, xs = jax.lax.scan(body, x_0, jnp.arange(transitions))
    return jnp.concatenate([x_0[None], xs]) if return_path else x_T


def head_sampler(params, spec: DTMSpec):
    """sample_y(x_t, t, key): y from the head's ODE (head_steps of head_method from eps' ~ N(0, I))
    conditioned on h = B(x_t, t)."""
    grid = uniform_grid(spec.head_steps)

    def sample_y(x_t, t, key):
        h = backbone(params, spec, x_t, t)
        eps = jax.random.normal(key, x_t.shape, x_t.dtype)
        return solvers.solve(NetVelocity(spec.head), eps, grid, spec.head_method, args=(params["head"], h))
    return sample_y


@functools.partial(jax.jit, static_argnames=("spec", "n", "return_path"))
def sample(params, spec: DTMSpec, key, n: int, return_path: bool = False):
    """[n, D] samples (or the [T + 1, n, D] path): x_0 ~ N(0, I), then T head-sampled transitions."""
    k0, k_steps = jax.random.split(key)
    x_0 = jax.random.normal(k0, (n, spec.dim))
    return transition_sample(head_sampler(params, spec), x_0, spec.transitions, k_steps, return_path)


def gaussian_posterior(mean_D, cov_DD, transitions: int):
    """Exact y-sampler for data N(mean, cov) and source N(0, I): Y | X_t = x is Gaussian with
    mean mu + C_yx C_xx^-1 (x - a mu), cov (cov + I) - C_yx C_xx^-1 C_xy, where a = t/T,
    C_xx = (1-a)^2 I + a^2 cov and C_yx = a cov - (1-a) I. Also returns the exact velocity
    E[Y | x_t] (for the FM-Euler contrast)."""
    mu, sig = jnp.asarray(mean_D, jnp.float32), jnp.asarray(cov_DD, jnp.float32)
    eye = jnp.eye(mu.shape[0])

    def moments(t):
        a = jnp.asarray(t, jnp.float32) / transitions
        c_xx = (1 - a) ** 2 * eye + a ** 2 * sig
        c_yx = a * sig - (1 - a) * eye
        gain = jnp.linalg.solve(c_xx, c_yx.T).T  # C_yx C_xx^-1 (all symmetric)
        return a, gain, sig + eye - gain @ c_yx.T

    def mean_y(x_BD, t):
        a, gain, _ = moments(t)
        return mu + (x_BD - a * mu) @ gain.T

    def sample_y(x_BD, t, key):
        _, _, cov = moments(t)
        chol = jnp.linalg.cholesky(cov + 1e-6 * eye)
        return mean_y(x_BD, t) + jax.random.normal(key, x_BD.shape) @ chol.T

    return sample_y, mean_y
