"""VeCoR: a two-sided contrastive velocity regulariser for flow matching (arXiv 2511.18942, spec
§2.2 [paper]).

    L = ||v - v+||^2 + weight * (||v - v+||^2 - ||v - v-||^2)        (per row, mean over rows)

v is the predicted velocity at x_t = t x_1 + (1 - t) x_0, the positive v+ = x_1 - x_0 is the FM
target (pull), and the negative v- (push) is one of NEGATIVES:

    shuffle   the target of another (x_1, x_0) pair of the batch (a random permutation): the
              "inconsistent" velocity of ΔFM (Stoica et al. 2025), the spec's fully specified relative
    perturb   the velocity towards an off-manifold end point x_1 + perturb_std * xi, xi ~ N(0, I):
              v- = v+ + perturb_std * xi

The loss is (1 + w) ||v - v+||^2 - w ||v - v-||^2, i.e. (1 + w) times ΔFM's
||v - v+||^2 - lambda ||v - v-||^2 with lambda = w / (1 + w) < 1, so it stays bounded below for every
w >= 0. Its per-row minimiser is v = v+ + w (v+ - v-): with independent negatives the optimum is the
affine retargeting (1 + w) E[v+ | x_t] - w E[v-] (the cloneofsimo note on ΔFM; tests pin it).
weight = 0 is exactly `losses.cfm_loss` (the same draws from the same key).

Approximate vs the paper: VeCoR's exact negative construction and any normalisation of the
contrast were not read (spec: [paper] only); the two negatives above are the spec's leads.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxgen.errors import ConfigError
from jaxgen.flow import losses, nets, paths, solvers
from jaxgen.flow.schedulers import cond_ot
from jaxgen.flow.variants.common import NetVelocity, uniform_grid

NEGATIVES = ("shuffle", "perturb")


def check(weight, negative: str, perturb_std) -> None:
    if negative not in NEGATIVES:
        raise ConfigError(f"unknown VeCoR negative {negative!r}; valid negatives: {', '.join(NEGATIVES)}")
    if not isinstance(weight, jax.core.Tracer) and not float(weight) >= 0:
        raise ConfigError(f"VeCoR weight={weight!r} must be >= 0 (0 is plain flow matching; e.g. 0.05)")
    if negative == "perturb" and not float(perturb_std) > 0:
        raise ConfigError(f"perturb_std={perturb_std!r} must be positive for negative='perturb' (e.g. 0.5)")


def negatives(key, x_0, x_1, *, negative: str = "shuffle", perturb_std: float = 0.5):
    """[B, ...] the negative velocities v- of the pairs (x_0, x_1) (see NEGATIVES)."""
    if negative == "shuffle":
        perm = jax.random.permutation(key, x_1.shape[0])
        return x_1[perm] - x_0[perm]
    return x_1 - x_0 + perturb_std * jax.random.normal(key, x_1.shape, x_1.dtype)


def contrastive_loss(pred_v, v_pos, v_neg, weight):
    """(loss, parts): the mean over rows of (1 + w) ||v - v+||^2 - w ||v - v-||^2 (squared errors
    averaged over features, as `losses.fm_loss`); parts: fm = mean ||v - v+||^2 (the pull, plain
    FM's loss) and push = mean ||v - v-||^2, both unweighted."""
    b = pred_v.shape[0]
    pull = jnp.mean(jnp.square(pred_v - v_pos).reshape(b, -1), -1)
    push = jnp.mean(jnp.square(pred_v - v_neg).reshape(b, -1), -1)
    value = jnp.mean(pull + weight * (pull - push))
    return value, {"fm": jnp.mean(pull), "push": jnp.mean(push)}


def vecor_loss(apply_fn, x_1, key, *, weight=0.05, negative: str = "shuffle", perturb_std: float = 0.5,
               sample_t=losses.uniform_t):
    """The VeCoR loss of a velocity predictor `apply_fn(x_t, t)` on data x_1 [B, ...]. x_0 and t are
    drawn as `losses.cfm_loss` draws them from `key`; the negatives from a key folded off it."""
    check(weight, negative, perturb_std)
    k0, kt = jax.random.split(key)
    x_0 = jax.random.normal(k0, x_1.shape, x_1.dtype)
    t = sample_t(kt, (x_1.shape[0],)).astype(x_1.dtype)
    x_t, v_pos = paths.sample(cond_ot(), x_0, x_1, t)
    v_neg = negatives(jax.random.fold_in(key, 1), x_0, x_1, negative=negative, perturb_std=perturb_std)
    return contrastive_loss(apply_fn(x_t, t), v_pos, v_neg, weight)


@dataclasses.dataclass(frozen=True)
class VeCoRSpec:
    """A velocity net trained with the VeCoR regulariser."""

    net: nets.NetSpec
    weight: float = 0.05
    negative: str = "shuffle"
    perturb_std: float = 0.5

    def __post_init__(self):
        check(self.weight, self.negative, self.perturb_std)


def init(key, spec: VeCoRSpec) -> dict:
    return nets.init(key, spec.net)


def loss(params, spec: VeCoRSpec, batch, key, *, time_sampler: str = "uniform"):
    """`vecor_loss` of the net on batch["x"] [B, D]; metrics: loss, fm, push."""
    x_1 = batch["x"].reshape(batch["x"].shape[0], -1)
    value, parts = vecor_loss(lambda x, t: nets.apply(params, spec.net, x, t), x_1, key, weight=spec.weight,
                              negative=spec.negative, perturb_std=spec.perturb_std,
                              sample_t=losses.t_sampler(time_sampler))
    return value, {"loss": value, **parts}


@functools.partial(jax.jit, static_argnames=("spec", "n", "steps", "method"))
def sample(params, spec: VeCoRSpec, key, n: int, steps: int = 32, method: str = "euler"):
    """[n, D] samples (the regulariser changes training only): N(0, I) pushed through the net's flow."""
    x_0 = jax.random.normal(key, (n, spec.net.dim))
    return solvers.solve(NetVelocity(spec.net), x_0, uniform_grid(steps), method,
                         args=(params,))

