"""Offline evaluation of continuous generators: two-sample distances, exact KL, FD-digits.

Every distance takes two sample sets x [N, D], y [M, D] (numpy or jax) and returns a Python float.
Finite-sample distances are biased upwards by an amount that depends on the set sizes, so report
each next to its `noise_floor`: the same metric between train and held-out data of the same size.

- `mmd2`: unbiased MMD^2 with an RBF kernel averaged over bandwidths; by default the median
  pairwise distance of the pooled sample (first 512 points of each set) times (0.5, 1, 2), so one
  call covers coarse and fine structure without tuning. Can be slightly negative when p = q.
- `energy_distance`: 2 E|x - y| - E|x - x'| - E|y - y'| (unbiased within-set terms); no bandwidth.
- `sliced_wasserstein`: (E_theta W_p^p(theta.x, theta.y))^(1/p) over random unit directions from a
  key; each 1-D W_p is exact (sorted samples on the merged quantile grid, so N != M works). For
  y = x + s in D dims it is |s| / sqrt(D) (p = 2).
- `wasserstein2_exact`: W2 between two equal-size sets by optimal assignment (scipy; N <= ~2k).
- `kl_estimate`: KL(p || q) = E_p[log p - log q] by Monte Carlo on samples of p, with its standard
  error, from exact log densities (a toy's `log_prob` and a model's ODE likelihood).
- FD-digits: Frechet distance between the penultimate (64-d) features of a small MLP trained here
  on the digits train split (deterministic, cached per process). It is not FID; calibrate it with
  FD(train, validation) at the same size. `digits_score` is the matching classifier score
  ("IS-digits"), `digits_logits` the class predictions (e.g. CFG class accuracy).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgen.data.continuous import digits_arrays
from jaxgen.errors import JaxgenError

MEDIAN_SUBSET = 512
BANDWIDTH_FACTORS = (0.5, 1.0, 2.0)


def _sets(x, y, min_n: int = 1):
    """x, y as float32 [N, D], [M, D] with the same D, or an error naming the shapes."""
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise JaxgenError(f"sample sets have shapes {x.shape} and {y.shape}; need [N, D] and [M, D] with the same D")
    if min(len(x), len(y)) < min_n:
        raise JaxgenError(f"sample sets have {len(x)} and {len(y)} points; this metric needs at least {min_n} each")
    return x, y


def _sq_dists(a_ND, b_MD):
    d2 = jnp.sum(a_ND ** 2, -1)[:, None] + jnp.sum(b_MD ** 2, -1)[None, :] - 2 * a_ND @ b_MD.T
    return jnp.maximum(d2, 0.0)


def _offdiag_mean(k_NN):
    n = k_NN.shape[0]
    return (jnp.sum(k_NN) - jnp.trace(k_NN)) / (n * (n - 1))


@jax.jit
def _median_distance(x_ND, y_MD):
    pooled = jnp.concatenate([x_ND[:MEDIAN_SUBSET], y_MD[:MEDIAN_SUBSET]])
    i, j = np.triu_indices(pooled.shape[0], 1)
    return jnp.median(jnp.sqrt(_sq_dists(pooled, pooled)[i, j]))


@jax.jit
def _mmd2(x_ND, y_MD, bandwidths_S):
    def k(d2):
        return jnp.mean(jnp.exp(-d2[..., None] / (2 * bandwidths_S ** 2)), -1)
    return (_offdiag_mean(k(_sq_dists(x_ND, x_ND))) + _offdiag_mean(k(_sq_dists(y_MD, y_MD)))
            - 2 * jnp.mean(k(_sq_dists(x_ND, y_MD))))


def mmd2(x_ND, y_MD, bandwidths=None) -> float:
    """Unbiased MMD^2 (RBF kernel averaged over `bandwidths`; default: median heuristic x (0.5, 1, 2))."""
    x, y = _sets(x_ND, y_MD, min_n=2)
    if bandwidths is None:
        bandwidths = float(_median_distance(x, y)) * np.asarray(BANDWIDTH_FACTORS)
    bw = np.atleast_1d(np.asarray(bandwidths, np.float32))
    if bw.ndim != 1 or not (bw > 0).all():
        raise JaxgenError(f"bandwidths={np.asarray(bandwidths).tolist()} must be positive numbers "
                          "(identical points give a median distance of 0: pass bandwidths explicitly)")
    return float(_mmd2(x, y, bw))


@jax.jit
def _energy(x_ND, y_MD):
    def dist(a, b):
        return jnp.sqrt(_sq_dists(a, b) + 1e-12) - jnp.sqrt(1e-12)
    return 2 * jnp.mean(dist(x_ND, y_MD)) - _offdiag_mean(dist(x_ND, x_ND)) - _offdiag_mean(dist(y_MD, y_MD))


def energy_distance(x_ND, y_MD) -> float:
    """Energy distance 2E|x-y| - E|x-x'| - E|y-y'| (within-set pairs exclude i = j)."""
    return float(_energy(*_sets(x_ND, y_MD, min_n=2)))


def _quantile_grid(n: int, m: int):
    """Widths and sample indices of the merged quantile grid of two empirical 1-D measures: on each
    piece both quantile functions are constant, so sum_k w_k |a[ia_k] - b[ib_k]|^p is exact."""
    u = np.sort(np.concatenate([np.arange(1, n + 1) / n, np.arange(1, m + 1) / m]))
    w = np.diff(u, prepend=0.0)
    mid = u - w / 2
    return (w.astype(np.float32), np.minimum((mid * n).astype(np.int64), n - 1),
            np.minimum((mid * m).astype(np.int64), m - 1))


@functools.partial(jax.jit, static_argnames=("num_projections",))
def _sliced(key, x_ND, y_MD, w_K, ia_K, ib_K, num_projections, p):
    theta_PD = jax.random.normal(key, (num_projections, x_ND.shape[1]))
    theta_PD = theta_PD / jnp.linalg.norm(theta_PD, axis=-1, keepdims=True)
    a_PN = jnp.sort(theta_PD @ x_ND.T, axis=-1)
    b_PM = jnp.sort(theta_PD @ y_MD.T, axis=-1)
    wpp_P = jnp.sum(w_K * jnp.abs(a_PN[:, ia_K] - b_PM[:, ib_K]) ** p, -1)
    return jnp.mean(wpp_P) ** (1.0 / p)


def sliced_wasserstein(key, x_ND, y_MD, num_projections: int = 512, p: int = 2) -> float:
    """Sliced W_p over `num_projections` random unit directions drawn from `key`."""
    x, y = _sets(x_ND, y_MD)
    if num_projections <= 0 or p < 1:
        raise JaxgenError(f"num_projections={num_projections}, p={p}: need num_projections >= 1 and p >= 1")
    return float(_sliced(key, x, y, *_quantile_grid(len(x), len(y)), num_projections=num_projections, p=float(p)))


def wasserstein2_exact(x_ND, y_ND) -> float:
    """Exact W2 between two sets of the same size N (optimal assignment; O(N^3), N <= ~2k)."""
    from scipy.optimize import linear_sum_assignment
    x, y = _sets(x_ND, y_ND)
    if len(x) != len(y):
        raise JaxgenError(f"wasserstein2_exact needs sets of the same size, got {len(x)} and {len(y)}; "
                          "subsample one or use sliced_wasserstein")
    cost = np.asarray(_sq_dists(x.astype(np.float64), y.astype(np.float64)))
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


class KLEstimate(NamedTuple):
    kl: float  # nats
    stderr: float  # Monte Carlo standard error of the mean


def kl_estimate(log_p_N, log_q_N) -> KLEstimate:
    """KL(p || q) ~ mean(log p(x_i) - log q(x_i)) over samples x_i ~ p, with its standard error.
    inf when q gives some sample zero density; an error when p does (the samples are not from p)."""
    log_p, log_q = np.asarray(log_p_N, np.float64), np.asarray(log_q_N, np.float64)
    if log_p.ndim != 1 or log_p.shape != log_q.shape or len(log_p) < 2:
        raise JaxgenError(f"log densities have shapes {log_p.shape} and {log_q.shape}; need two [N] with N >= 2")
    if not np.isfinite(log_p).all():
        raise JaxgenError(f"log p is not finite at {int((~np.isfinite(log_p)).sum())} samples: "
                          "kl_estimate needs samples drawn from p")
    if np.isnan(log_q).any() or (log_q == np.inf).any():
        raise JaxgenError("log q has NaN or +inf values")
    if (log_q == -np.inf).any():
        return KLEstimate(float("inf"), float("inf"))
    diff = log_p - log_q
    return KLEstimate(float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff))))


def noise_floor(metric: Callable, reference_ND, held_out_MD, n: int) -> float:
    """metric(reference[:n], held_out[:n]): what a perfect model scores with n samples. Compare a
    model's n samples against the same reference set to this number."""
    if not isinstance(n, (int, np.integer)) or n <= 0 or n > min(len(reference_ND), len(held_out_MD)):
        raise JaxgenError(f"n={n!r}: need 1 <= n <= {min(len(reference_ND), len(held_out_MD))} "
                          f"(the sizes are {len(reference_ND)} and {len(held_out_MD)})")
    return metric(reference_ND[:n], held_out_MD[:n])


# ----------------------------------------------------------------------------- FD-digits

def _mlp_init(key, sizes=(64, 256, 64, 10)):
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a), "b": jnp.zeros(b)}
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def _features(params, x_N64):
    h = x_N64
    for layer in params[:-1]:
        h = jax.nn.gelu(h @ layer["w"] + layer["b"])
    return h


def _logits(params, x_N64):
    return _features(params, x_N64) @ params[-1]["w"] + params[-1]["b"]


@functools.lru_cache(maxsize=None)
def digits_classifier(seed: int = 0, steps: int = 300):
    """Params of the FD-digits MLP (64-256-64-10, GELU), trained full-batch with AdamW on the digits
    train split with light input noise; deterministic and cached per process (98.6% validation accuracy)."""
    x, y = digits_arrays("train")
    x, y = jnp.asarray(x.reshape(len(x), 64)), jnp.asarray(y)
    key_init, key_noise = jax.random.split(jax.random.key(seed))
    params = _mlp_init(key_init)
    opt = optax.adamw(3e-3, weight_decay=1e-3)

    def loss(params, key):
        noisy = x + 0.1 * jax.random.normal(key, x.shape)
        return optax.softmax_cross_entropy_with_integer_labels(_logits(params, noisy), y).mean()

    def step(carry, key):
        params, state = carry
        grads = jax.grad(loss)(params, key)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), jax.random.split(key_noise, steps)))(params)
    return params


def _digit_images(images) -> np.ndarray:
    x = np.asarray(images, np.float32)
    if x.ndim < 2 or int(np.prod(x.shape[1:])) != 64:
        raise JaxgenError(f"digit images have shape {x.shape}; need [N, 64], [N, 8, 8] or [N, 8, 8, 1] in [-1, 1]")
    return x.reshape(len(x), 64)


def digits_features(images) -> np.ndarray:
    """[N, 64] penultimate features of the FD-digits classifier for images in [-1, 1]."""
    return np.asarray(jax.jit(_features)(digits_classifier(), _digit_images(images)), np.float64)


def digits_logits(images) -> np.ndarray:
    """[N, 10] class logits of the FD-digits classifier (class accuracy of conditional samples)."""
    return np.asarray(jax.jit(_logits)(digits_classifier(), _digit_images(images)))


def frechet_distance(feats_a_NF, feats_b_MF) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with tr (S_a S_b)^(1/2) taken as the
    trace of sqrt(S_a^(1/2) S_b S_a^(1/2)) (symmetric PSD, so eigh; same eigenvalues)."""
    a, b = (np.asarray(f, np.float64) for f in (feats_a_NF, feats_b_MF))
    _sets(a, b, min_n=2)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    mean_term = np.sum((a.mean(0) - b.mean(0)) ** 2)
    return float(mean_term + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)


def fd_digits(images_a, images_b) -> float:
    """FD-digits between two image sets in [-1, 1] (report beside FD(train, validation) at equal size)."""
    return frechet_distance(digits_features(images_a), digits_features(images_b))


def digits_score(images) -> float:
    """Classifier score exp(E_x KL(p(y|x) || p(y))) ("IS-digits", between 1 and 10)."""
    logits_NC = digits_logits(images).astype(np.float64)
    logp_NC = logits_NC - np.logaddexp.reduce(logits_NC, axis=-1, keepdims=True)
    logp_C = np.logaddexp.reduce(logp_NC, axis=0) - np.log(len(logp_NC))
    return float(np.exp(np.mean(np.sum(np.exp(logp_NC) * (logp_NC - logp_C), -1))))
