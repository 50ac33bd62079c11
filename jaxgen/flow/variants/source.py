"""Source distributions other than N(0, I) for flow matching (spec §2.3: "Is There a Better Source
Distribution than Gaussian?", kwanseokk/SourceFM, arXiv 2512.18184).

A source is a static `SourceSpec` plus a params pytree, with three pure functions:
`sample_source(params, spec, key, n) -> [n, D]`, `log_prob_source(params, spec, x_ND) -> [n]` and
`init_source(key, spec)` / `fit_source(spec, x_ND, key)`. Kinds:

    gaussian        N(0, I): the baseline (no params).
    diag_gaussian   N(mean, diag(std^2)): learnable, reparameterised; fitted by moments.
    gmm             mixture of diagonal Gaussians (logits, means, log_stds): fitted by EM. A
                    "density-matched" source; the paper finds these hurt (spec §2.3), kept for that
                    comparison. The component draw is not reparameterised (means/stds are).
    chi_sphere      Gaussian draws renormalised to radius sqrt(D) (the paper's `ChiSphere`; that the
                    radius is sqrt(D) = sqrt(E chi^2_D) is our reading of the spec). Sample-only: it
                    lives on a sphere, so it has no density on R^D and `log_prob_source` refuses it.
    pruned          "directionally pruned" Gaussian (`PCAPrunedSample`): draw eps ~ N(0, I) and
                    reject it while cos(eps, u) > threshold for any data-sparse direction u (rows are
                    redrawn together, up to max_trials). Its density is N(eps) 1[eps kept] / P(kept);
                    P(kept) is exact (incomplete beta) when the cones are disjoint, else a fixed-key
                    Monte Carlo estimate. Data-sparse directions come from `sparse_directions`:
                    +-PCA axes of the data that get < rejection_threshold of the data by cosine
                    assignment. The paper applies it post hoc to any Gaussian-source model.

`SourceFMSpec` puts a source under the AdaLN velocity net (`jaxgen.flow.nets`) with the paper's
norm alignment (`data_scale`: data multiplied by sqrt(D) / mean ||x||, `norm_align_scale`):
`init`, `loss(params, spec, batch, key) -> (loss, metrics)`, `sample`, and `log_likelihood`, whose
source term is this source's log-density (plus D log data_scale for the data rescaling). The
paper's pruning is post hoc: train with kind="gaussian", then sample the same net params under a
spec whose source is kind="pruned" (`dataclasses.replace(spec, source=...)`, source params from
`fit_source`).

Approximate vs the paper: the chi-sphere radius as above; joint training of a learnable source
(`train_source=True`) is our addition; the FM loss alone rewards shrinking the source, so use it with
care (the paper fits or fixes sources, it does not train them jointly).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import ConfigError
from jaxgen.flow import losses, nets, paths, solvers
from jaxgen.flow import likelihood as likelihood_lib
from jaxgen.flow.schedulers import cond_ot
from jaxgen.flow.variants.common import NetVelocity, uniform_grid

KINDS = ("gaussian", "diag_gaussian", "gmm", "chi_sphere", "pruned")
LOG_2PI = math.log(2 * math.pi)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A source's kind and static sizes. `threshold` and `max_trials` are the pruned source's: a draw
    is rejected if its cosine with a sparse direction exceeds `threshold` (the paper's class default
    0.12; its CLI uses 0.06)."""

    kind: str = "gaussian"
    dim: int = 2
    components: int = 8  # gmm only
    threshold: float = 0.12  # pruned only
    max_trials: int = 64  # pruned only

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"unknown source kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")
        if int(self.dim) <= 0:
            raise ConfigError(f"SourceSpec.dim={self.dim!r} must be a positive integer (the data dimension)")
        if int(self.components) <= 0:
            raise ConfigError(f"SourceSpec.components={self.components!r} must be a positive integer")
        if not -1.0 < float(self.threshold) < 1.0:
            raise ConfigError(f"SourceSpec.threshold={self.threshold!r} is a cosine; use a value in (-1, 1), "
                              "e.g. 0.12")
        if int(self.max_trials) <= 0:
            raise ConfigError(f"SourceSpec.max_trials={self.max_trials!r} must be a positive integer, e.g. 64")


def init_source(key, spec: SourceSpec) -> dict:
    """Fresh params: N(0, I) for the Gaussian kinds, random data-free means for gmm, and a pruned
    source with no directions (= N(0, I)) until `fit_source` / `pruned_params` supplies them."""
    d = spec.dim
    if spec.kind == "diag_gaussian":
        return {"mean": jnp.zeros((d,)), "log_std": jnp.zeros((d,))}
    if spec.kind == "gmm":
        return {"logits": jnp.zeros((spec.components,)), "means": jax.random.normal(key, (spec.components, d)),
                "log_stds": jnp.zeros((spec.components, d))}
    if spec.kind == "pruned":
        return pruned_params(np.zeros((0, d), np.float32), spec.threshold)
    return {}


# ----------------------------------------------------------------------------- sampling, density

def _log_normal(x_ND, mean, log_std):
    z = (x_ND - mean) * jnp.exp(-log_std)
    return -0.5 * jnp.sum(z ** 2 + LOG_2PI, -1) - jnp.sum(log_std * jnp.ones_like(x_ND), -1)


def _rejected(eps_ND, directions_MD, threshold):
    """[n] whether a draw falls inside some pruned cone cos(eps, u) > threshold."""
    unit = eps_ND / jnp.maximum(jnp.linalg.norm(eps_ND, axis=-1, keepdims=True), 1e-30)
    return jnp.any(unit @ directions_MD.T > threshold, axis=-1)


def _pruned_sample(params, spec, key, n):
    """Per-row rejection: all rows draw together, a row keeps its first accepted draw. A row still
    rejected after max_trials keeps its last draw (probability P(rejected)^max_trials)."""
    dirs = params["directions"]

    def cond(carry):
        _, done, i, _ = carry
        return (i < spec.max_trials) & ~jnp.all(done)

    def body(carry):
        x, done, i, k = carry
        k, k_draw = jax.random.split(k)
        cand = jax.random.normal(k_draw, (n, spec.dim))
        take = ~done
        x = jnp.where(take[:, None], cand, x)
        return x, done | ~_rejected(cand, dirs, spec.threshold), i + 1, k

    x0 = jnp.zeros((n, spec.dim))
    x, _, _, _ = jax.lax.while_loop(cond, body, (x0, jnp.zeros((n,), bool), 0, key))
    return x


def sample_source(params, spec: SourceSpec, key, n: int):
    """[n, D] draws of the source (reparameterised in the Gaussian kinds' params)."""
    d = spec.dim
    if spec.kind == "gaussian":
        return jax.random.normal(key, (n, d))
    if spec.kind == "diag_gaussian":
        return params["mean"] + jnp.exp(params["log_std"]) * jax.random.normal(key, (n, d))
    if spec.kind == "gmm":
        k_comp, k_eps = jax.random.split(key)
        comp_N = jax.random.categorical(k_comp, jax.lax.stop_gradient(params["logits"]), shape=(n,))
        return params["means"][comp_N] + jnp.exp(params["log_stds"][comp_N]) * jax.random.normal(k_eps, (n, d))
    if spec.kind == "chi_sphere":
        eps = jax.random.normal(key, (n, d))
        return eps * (math.sqrt(d) / jnp.linalg.norm(eps, axis=-1, keepdims=True))
    return _pruned_sample(params, spec, key, n)


def log_prob_source(params, spec: SourceSpec, x_ND):
    """[n] exact log-density of the source at x_ND [n, D] (-inf inside a pruned cone)."""
    x_ND = jnp.asarray(x_ND)
    if x_ND.ndim != 2 or x_ND.shape[-1] != spec.dim:
        raise ConfigError(f"source points have shape {tuple(x_ND.shape)}; this source takes [n, {spec.dim}]")
    zero = jnp.zeros((spec.dim,))
    if spec.kind == "gaussian":
        return _log_normal(x_ND, zero, zero)
    if spec.kind == "diag_gaussian":
        return _log_normal(x_ND, params["mean"], params["log_std"])
    if spec.kind == "gmm":
        log_nk = jax.vmap(lambda m, s: _log_normal(x_ND, m, s), out_axes=1)(params["means"], params["log_stds"])
        return jax.nn.logsumexp(log_nk + jax.nn.log_softmax(params["logits"]), axis=-1)
    if spec.kind == "chi_sphere":
        raise ConfigError("source kind 'chi_sphere' lives on a sphere and has no density on R^D; use 'gaussian', "
                          "'diag_gaussian', 'gmm' or 'pruned' for likelihoods")
    inside = _rejected(x_ND, params["directions"], spec.threshold)
    return jnp.where(inside, -jnp.inf, _log_normal(x_ND, zero, zero) - params["log_accept"])


# ----------------------------------------------------------------------------- fitting to data

def cone_mass(threshold: float, dim: int) -> float:
    """P(cos(eps, u) > threshold) for eps ~ N(0, I_dim) and a fixed unit u: the direction of eps is
    uniform on the sphere, and cos^2 ~ Beta(1/2, (dim-1)/2), so the mass is
    0.5 I_{1-c^2}((dim-1)/2, 1/2) for c >= 0 (and 1 minus that at -c for c < 0)."""
    c = float(threshold)
    if dim == 1:
        return 0.5  # the direction is +-u with probability 1/2 each
    tail = 0.5 * float(jax.scipy.special.betainc((dim - 1) / 2, 0.5, 1.0 - c * c))
    return tail if c >= 0 else 1.0 - tail


def pruned_params(directions_MD, threshold: float, *, mc_samples: int = 400_000) -> dict:
    """Params of a pruned source with sparse unit directions [M, D]: the directions and log P(kept).
    Disjoint cones (pairwise angle >= twice the cone's half-angle) give the exact
    log(1 - M cone_mass); overlapping ones a fixed-key Monte Carlo estimate of P(kept)."""
    dirs = np.asarray(directions_MD, np.float64)
    if dirs.ndim != 2:
        raise ConfigError(f"pruning directions have shape {dirs.shape}; need [M, D]")
    m, d = dirs.shape
    if m and not np.allclose(np.linalg.norm(dirs, axis=-1), 1.0, atol=1e-5):
        raise ConfigError("pruning directions must be unit vectors; normalise them (u / ||u||)")
    half = math.acos(threshold)
    gram = dirs @ dirs.T
    off = gram[~np.eye(m, dtype=bool)]
    disjoint = m <= 1 or (2 * half <= math.pi and bool(np.all(off <= math.cos(2 * half) + 1e-9)))
    if disjoint:
        kept = 1.0 - m * cone_mass(threshold, d)
    else:
        eps = jax.random.normal(jax.random.key(0), (mc_samples, d))
        kept = 1.0 - float(jnp.mean(_rejected(eps, jnp.asarray(dirs, jnp.float32), threshold)))
    if kept <= 0:
        raise ConfigError(f"pruning threshold {threshold} with {m} directions rejects every draw; raise the threshold")
    return {"directions": jnp.asarray(dirs, jnp.float32), "log_accept": jnp.asarray(math.log(kept), jnp.float32)}


def sparse_directions(x_ND, num_components: int | None = None, rejection_threshold: float = 1e-2) -> np.ndarray:
    """[M, D] data-sparse unit directions (spec §2.3, `find_pruning_axis_with_pca`): the +-PCA axes
    (top num_components, default all) as centroids, each data point assigned to the centroid of
    highest cosine, and a centroid "sparse" when its share of the data is below rejection_threshold."""
    x = np.asarray(x_ND, np.float64).reshape(len(x_ND), -1)
    k = x.shape[1] if num_components is None else int(num_components)
    if not 1 <= k <= x.shape[1]:
        raise ConfigError(f"num_components={num_components} must be in [1, {x.shape[1]}] (the data dimension)")
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    centroids = np.concatenate([vt[:k], -vt[:k]])
    unit = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)
    share = np.bincount(np.argmax(unit @ centroids.T, -1), minlength=len(centroids)) / len(x)
    return centroids[share < rejection_threshold].astype(np.float32)


def _em_gmm(x_ND, params, iters):
    def step(p, _):
        log_nk = jax.vmap(lambda m, s: _log_normal(x_ND, m, s), out_axes=1)(p["means"], p["log_stds"])
        r = jax.nn.softmax(log_nk + jax.nn.log_softmax(p["logits"]), -1)  # [N, K]
        nk = r.sum(0) + 1e-6
        means = (r.T @ x_ND) / nk[:, None]
        var = (r.T @ x_ND ** 2) / nk[:, None] - means ** 2
        return {"logits": jnp.log(nk), "means": means, "log_stds": 0.5 * jnp.log(jnp.maximum(var, 1e-6))}, None
    return jax.lax.scan(step, params, None, length=iters)[0]


def fit_source(spec: SourceSpec, x_ND, key=None, *, em_iters: int = 50, **pruning) -> dict:
    """Params fitted to data x_ND [N, D]: diag_gaussian by moments, gmm by `em_iters` EM steps from
    `components` random data points (needs `key`), pruned by `sparse_directions(x_ND, **pruning)`.
    gaussian and chi_sphere have nothing to fit."""
    x = jnp.asarray(x_ND, jnp.float32).reshape(len(x_ND), -1)
    if x.shape[1] != spec.dim:
        raise ConfigError(f"data has {x.shape[1]} features but the source was built for dim={spec.dim}")
    if spec.kind == "diag_gaussian":
        return {"mean": x.mean(0), "log_std": 0.5 * jnp.log(jnp.maximum(x.var(0), 1e-12))}
    if spec.kind == "gmm":
        if key is None:
            raise ConfigError("fitting a gmm source needs key=... (it starts EM from random data points)")
        idx = jax.random.choice(key, x.shape[0], (spec.components,), replace=False)
        start = {"logits": jnp.zeros((spec.components,)), "means": x[idx],
                 "log_stds": jnp.broadcast_to(0.5 * jnp.log(x.var(0)), (spec.components, spec.dim))}
        return _em_gmm(x, start, em_iters)
    if spec.kind == "pruned":
        return pruned_params(sparse_directions(np.asarray(x), **pruning), spec.threshold)
    return {}


def norm_align_scale(x_ND) -> float:
    """sqrt(D) / mean ||x||: multiplying the data by it matches its mean norm to a standard
    Gaussian's (the paper's `x1 *= 55.4185 / 27.1981` on CIFAR; spec §2.3)."""
    x = np.asarray(x_ND, np.float64).reshape(len(x_ND), -1)
    return float(math.sqrt(x.shape[1]) / np.mean(np.linalg.norm(x, axis=-1)))


# ----------------------------------------------------------------------------- FM with a source

@dataclasses.dataclass(frozen=True)
class SourceFMSpec:
    """A velocity net with a non-standard source; data are multiplied by data_scale for training and
    samples divided by it (norm alignment)."""

    net: nets.NetSpec
    source: SourceSpec
    data_scale: float = 1.0

    def __post_init__(self):
        if self.net.dim != self.source.dim:
            raise ConfigError(f"net dim={self.net.dim} and source dim={self.source.dim} must agree")
        if not float(self.data_scale) > 0:
            raise ConfigError(f"data_scale={self.data_scale!r} must be positive (see norm_align_scale)")


def init(key, spec: SourceFMSpec, source_params=None) -> dict:
    """{"net": fresh velocity net, "source": source_params or init_source(...)}."""
    k_net, k_src = jax.random.split(key)
    src = init_source(k_src, spec.source) if source_params is None else source_params
    return {"net": nets.init(k_net, spec.net), "source": src}


def fm_loss_with_source(apply_fn, x_1, x_0, key, *, sample_t=losses.uniform_t):
    """CondOT FM with a given source batch x_0 (any distribution): t ~ sample_t, regress x_1 - x_0."""
    t = sample_t(key, (x_1.shape[0],)).astype(x_1.dtype)
    x_t, _ = paths.sample(cond_ot(), x_0, x_1, t)
    return losses.fm_loss(apply_fn(x_t, t), x_0, x_1, t)


def loss(params, spec: SourceFMSpec, batch, key, *, train_source: bool = False, time_sampler: str = "uniform"):
    """FM from this source to the (norm-aligned) data batch["x"] [B, D]. With train_source the
    gradient flows into the source params through reparameterised draws (see module caveat)."""
    x_1 = batch["x"].reshape(batch["x"].shape[0], -1) * spec.data_scale
    k_src, k_t = jax.random.split(key)
    src = params["source"] if train_source else jax.lax.stop_gradient(params["source"])
    x_0 = sample_source(src, spec.source, k_src, x_1.shape[0])
    value = fm_loss_with_source(lambda x, t: nets.apply(params["net"], spec.net, x, t), x_1, x_0, k_t,
                                sample_t=losses.t_sampler(time_sampler))
    return value, {"loss": value}


@functools.partial(jax.jit, static_argnames=("spec", "n", "steps", "method"))
def sample(params, spec: SourceFMSpec, key, n: int, steps: int = 32, method: str = "euler"):
    """[n, D] samples: source draws pushed through the flow on a uniform grid, divided by data_scale."""
    x_0 = sample_source(params["source"], spec.source, key, n)
    x_1 = solvers.solve(NetVelocity(spec.net), x_0, uniform_grid(steps), method,
                        args=(params["net"],))
    return x_1 / spec.data_scale


@functools.partial(jax.jit, static_argnames=("spec", "steps", "method"))
def log_likelihood(params, spec: SourceFMSpec, x_ND, steps: int = 32, method: str = "euler"):
    """[n] exact log p(x) in data units: the flow's change of variables back to the source, the
    source's own log-density there, and + D log data_scale for the norm-alignment rescaling."""
    net, src = params["net"], params["source"]
    _, lp = likelihood_lib.log_likelihood(lambda x, t: nets.apply(net, spec.net, x, t), x_ND * spec.data_scale,
                                          lambda x0: log_prob_source(src, spec.source, x0),
                                          uniform_grid(steps, 1.0, 0.0), method)
    return lp + spec.net.dim * math.log(spec.data_scale)

