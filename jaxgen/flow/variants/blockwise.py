"""Blockwise Flow Matching (BFM; arXiv 2510.21167, spec §2.1 [paper]): [0, 1] cut into K segments
S_k = [tau_k, tau_{k+1}), one small velocity net per segment.

- Params: K copies of one `nets.NetSpec` stacked on a leading [K] axis (`init`).
- Training (`loss`): the batch is split in row order into K equal groups; group k draws
  t in S_k (t = tau_k + u (tau_{k+1} - tau_k), u ~ time_sampler) and only net k sees it, so net k's
  gradient comes only from its segment's times. This is the spec's "sample k, t in S_k",
  stratified (every batch has B/K rows per segment; batches are shuffled, so the row order is
  random). B must be a multiple of K.
- Sampling (`sample`): segment by segment, `solve` with net k on a grid from tau_k to tau_{k+1}
  whose end points are exactly the edges, so every stage of every step (Heun's, RK4's evaluations
  at the step's end included) uses the net of the segment the step lies in. A velocity routed by t
  alone (`routed_velocity_fn`) cannot do that: at t = tau_{k+1} it already picks net k+1; it equals
  `sample` for Euler on an edge-aligned grid only.

Left out (offline, no DINOv2): the paper's Semantic Feature Guidance (a feature net aligned to
frozen DINOv2 features, REPA-style) and its Feature Residual Approximation at inference.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import ConfigError
from jaxgen.flow import losses, nets, paths, solvers
from jaxgen.flow.schedulers import cond_ot
from jaxgen.flow.variants.common import NetVelocity, uniform_grid


def uniform_edges(num_segments: int) -> tuple[float, ...]:
    """K + 1 equally spaced edges 0 = tau_0 < ... < tau_K = 1."""
    if not isinstance(num_segments, (int, np.integer)) or num_segments < 1:
        raise ConfigError(f"num_segments={num_segments!r} must be an integer >= 1 (K time segments)")
    return tuple(float(e) for e in np.linspace(0.0, 1.0, num_segments + 1))


@dataclasses.dataclass(frozen=True)
class BlockwiseSpec:
    """One velocity-net shape shared by K segments with the given edges (K + 1 floats, strictly
    increasing from 0.0 to 1.0)."""

    net: nets.NetSpec
    edges: tuple = (0.0, 0.5, 1.0)

    def __post_init__(self):
        e = tuple(float(v) for v in self.edges)
        object.__setattr__(self, "edges", e)
        if len(e) < 2:
            raise ConfigError(f"edges={e} must hold K + 1 >= 2 times (K >= 1 segments), e.g. (0.0, 0.5, 1.0)")
        if e[0] != 0.0 or e[-1] != 1.0:
            raise ConfigError(f"edges={e} must start at 0.0 and end at 1.0 (they cut [0, 1])")
        if not all(b > a for a, b in zip(e, e[1:])):
            raise ConfigError(f"edges={e} must be strictly increasing (no empty segment)")

    @property
    def num_segments(self) -> int:
        return len(self.edges) - 1


def init(key, spec: BlockwiseSpec) -> dict:
    """K independent nets, stacked: every leaf gets a leading [K] axis."""
    keys = jax.random.split(key, spec.num_segments)
    return jax.tree.map(lambda *a: jnp.stack(a), *[nets.init(keys[k], spec.net) for k in range(spec.num_segments)])


def net_params(params, k: int):
    """Segment k's net (a plain `nets` params dict)."""
    return jax.tree.map(lambda a: a[k], params)


def segment_of(spec: BlockwiseSpec, t):
    """Segment index of t (int32, t's shape): k with tau_k <= t < tau_{k+1}; t = 1 is in the last."""
    inner = jnp.asarray(spec.edges[1:-1], jnp.float32)
    return jnp.searchsorted(inner, jnp.asarray(t, jnp.float32), side="right").astype(jnp.int32)


def segment_times(spec: BlockwiseSpec, key, rows_per_segment: int, sample_t=losses.uniform_t):
    """[K, R] training times: row k in S_k (u ~ sample_t mapped affinely into [tau_k, tau_{k+1}])."""
    e = jnp.asarray(spec.edges, jnp.float32)
    u = sample_t(key, (spec.num_segments, rows_per_segment))
    return e[:-1, None] + u * (e[1:] - e[:-1])[:, None]


def loss(params, spec: BlockwiseSpec, batch, key, *, time_sampler: str = "uniform"):
    """CondOT FM with rows [k B/K, (k+1) B/K) of batch["x"] [B, D] trained by net k at t in S_k.
    Metrics: the loss and each segment's loss (`loss_seg{k}`)."""
    x_1 = batch["x"].reshape(batch["x"].shape[0], -1)
    b, k_seg = x_1.shape[0], spec.num_segments
    if b % k_seg:
        raise ConfigError(f"batch size {b} must be a multiple of the number of segments K={k_seg} (each segment "
                          "trains on B/K rows)")
    k0, kt = jax.random.split(key)
    x_1 = x_1.reshape(k_seg, b // k_seg, -1)
    x_0 = jax.random.normal(k0, x_1.shape, x_1.dtype)
    t_KR = segment_times(spec, kt, b // k_seg, losses.t_sampler(time_sampler)).astype(x_1.dtype)

    def one(p, x0, x1, t):
        x_t, _ = paths.sample(cond_ot(), x0, x1, t)
        return losses.fm_loss(nets.apply(p, spec.net, x_t, t), x0, x1, t)

    per_seg = jax.vmap(one)(params, x_0, x_1, t_KR)
    value = per_seg.mean()
    return value, {"loss": value, **{f"loss_seg{k}": per_seg[k] for k in range(k_seg)}}


def segment_grids(spec: BlockwiseSpec, steps_per_segment) -> list[np.ndarray]:
    """Per segment, a float32 grid from tau_k to tau_{k+1} (end points exact) with n_k uniform steps;
    steps_per_segment is one int for all segments or K ints."""
    k_seg = spec.num_segments
    steps = (steps_per_segment,) * k_seg if np.ndim(steps_per_segment) == 0 else tuple(steps_per_segment)
    if len(steps) != k_seg or not all(isinstance(n, (int, np.integer)) and n >= 1 for n in steps):
        raise ConfigError(f"steps_per_segment={steps_per_segment!r} must be an int >= 1 or {k_seg} of them (one "
                          "per segment)")
    return [uniform_grid(n, spec.edges[k], spec.edges[k + 1]) for k, n in enumerate(steps)]


def sample_from(params, spec: BlockwiseSpec, x_0, steps_per_segment=4, method: str = "euler"):
    """Integrate x_0 [B, D] from t=0 to 1, net k alone over segment k (see the module docstring)."""
    x = x_0
    for k, grid in enumerate(segment_grids(spec, steps_per_segment)):
        x = solvers.solve(NetVelocity(spec.net), x, grid, method, args=(net_params(params, k),))
    return x


def sample(params, spec: BlockwiseSpec, key, n: int, steps_per_segment=4, method: str = "euler"):
    """[n, D] samples from N(0, I) source draws (`sample_from`)."""
    return sample_from(params, spec, jax.random.normal(key, (n, spec.net.dim)), steps_per_segment, method)


def routed_velocity_fn(params, spec: BlockwiseSpec):
    """velocity(x, t) = net_{segment_of(t)}(x, t), for one `solve` over [0, 1]. Exact only for
    Euler on an edge-aligned grid (multi-stage methods evaluate the next segment's net at a step's
    right edge); use `sample` otherwise."""
    def velocity(x, t):
        return nets.apply(net_params(params, segment_of(spec, t)), spec.net, x, t)
    return velocity

