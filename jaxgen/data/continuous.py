"""Continuous data for flow matching: 2-D toy distributions, sklearn's 8x8 digits, and batches.

Toys are pure JAX: `toy(name).sample(key, n) -> [n, 2]` (n static, so `jax.jit(sample,
static_argnums=1)` works) and, where the density is known in closed form, an exact
`log_prob(x [n, D]) -> [n]` for exact NLL / KL checks. `sample_labeled` also returns the
component / moon / cell each point came from, for class-conditional runs.

Offline data sets (tfds, array_record, read back with `as_data_source()` without TensorFlow, like
`builders.py`), each with a "train" and a "validation" split of {"x": float32, "label": int}:
- `digits`: the 1797 8x8 digits inside scikit-learn (no download), x [8, 8, 1] = pixel/8 - 1 in
  [-1, 1]; every 5th image (index % 5 == 4: 359 images) is validation, the other 1438 are train.
- every toy name (`eight_gaussians`, `gmm`, `moons`, `checkerboard`): `num_train` and
  `num_validation` points drawn from `toy.sample_labeled` with a fixed `data_seed` (train from
  fold_in(key(data_seed), 0), validation from fold_in(key(data_seed), 1)); x [2]. The config name
  holds the toy, sizes and data_seed, so other sizes build beside it, never reusing a stale set.
  (`seed` in the batch functions is the batch-order seed, not the data's.)

`ArrayBatches.at(step)` is a pure function of (seed, step) with the token pipeline's epoch
permutations (`pipeline.Batches`), so a resumed run reads the batches an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import operator
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from jaxgen.data import builders, pipeline
from jaxgen.errors import ConfigError, JaxgenError

SPLITS = pipeline.SPLITS  # ("train", "validation")
DIGITS_VALIDATION_EVERY = 5
TOY_SIZES = (50_000, 10_000)  # default (num_train, num_validation) of a toy data set


class Toy(NamedTuple):
    """A 2-D (or D-d, for gmm) distribution: pure, jit-able functions of (key, n) and x."""

    name: str
    sample: Callable  # (key, n) -> [n, D]
    log_prob: Callable | None  # x [n, D] -> [n]; None when there is no closed form
    sample_labeled: Callable  # (key, n) -> ([n, D] float32, [n] int32 component / moon / cell)
    num_classes: int


def _count(n) -> int:
    try:
        n = operator.index(n)
    except TypeError:
        raise JaxgenError(f"n={n!r}: the number of samples must be a Python int (static under jit)") from None
    if n <= 0:
        raise JaxgenError(f"n={n}: the number of samples must be positive")
    return n


def _toy(name, sample_labeled, log_prob, num_classes) -> Toy:
    """A Toy whose functions are jitted (n static): eager calls then cost one compile per shape,
    not one per op; they stay pure, so callers may jit them again."""
    sample_labeled = jax.jit(sample_labeled, static_argnums=1)
    sample = jax.jit(lambda key, n: sample_labeled(key, n)[0], static_argnums=1)
    return Toy(name, sample, None if log_prob is None else jax.jit(log_prob), sample_labeled, num_classes)


def gmm(means, scales, weights=None, name: str = "gmm") -> Toy:
    """Mixture of diagonal Gaussians: means [K, D], scales scalar / [K] / [K, D], weights [K]
    (normalised; uniform when None). Exact log_prob by logsumexp over components."""
    means_KD = np.asarray(means, np.float32)
    if means_KD.ndim != 2 or means_KD.shape[0] == 0:
        raise ConfigError(f"gmm means have shape {means_KD.shape}; need [K, D] with K >= 1")
    k, d = means_KD.shape
    s = np.asarray(scales, np.float32)
    try:
        scales_KD = np.broadcast_to(s[:, None] if s.ndim == 1 else s, (k, d)).astype(np.float32)
    except ValueError:
        raise ConfigError(f"gmm scales have shape {np.shape(scales)}; "
                          f"need a scalar, [K]={k} or [K, D]={k, d}") from None
    if not (scales_KD > 0).all():
        raise ConfigError(f"gmm scales {np.asarray(scales).tolist()} must all be positive")
    w_K = np.full(k, 1.0 / k, np.float32) if weights is None else np.asarray(weights, np.float32)
    if w_K.shape != (k,) or (w_K < 0).any() or w_K.sum() <= 0:
        raise ConfigError(f"gmm weights {np.asarray(weights).tolist()} need shape [K]={k}, be >= 0 and not all 0")
    logw_K = np.log(w_K / w_K.sum())
    means_KD, scales_KD, logw_K = map(jnp.asarray, (means_KD, scales_KD, logw_K))

    def sample_labeled(key, n):
        n = _count(n)
        k_comp, k_eps = jax.random.split(key)
        comp_N = jax.random.categorical(k_comp, logw_K, shape=(n,))
        eps_ND = jax.random.normal(k_eps, (n, d))
        return means_KD[comp_N] + scales_KD[comp_N] * eps_ND, comp_N.astype(jnp.int32)

    def log_prob(x_ND):
        x_ND = _points(x_ND, d)
        z_NKD = (x_ND[:, None, :] - means_KD) / scales_KD
        log_n_NK = -0.5 * jnp.sum(z_NKD ** 2 + jnp.log(2 * jnp.pi), -1) - jnp.sum(jnp.log(scales_KD), -1)
        return jax.nn.logsumexp(log_n_NK + logw_K, axis=-1)

    return _toy(name, sample_labeled, log_prob, k)


def _points(x, d: int):
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2 or x.shape[-1] != d:
        raise JaxgenError(f"points have shape {tuple(x.shape)}; this density takes [n, {d}]")
    return x


def eight_gaussians(radius: float = 4 / 1.414, std: float = 0.5 / 1.414) -> Toy:
    """FFJORD's "8gaussians": 8 equal Gaussians on a circle (scale 4, std 0.5, then / 1.414)."""
    angles = np.arange(8) * np.pi / 4
    return gmm(radius * np.stack([np.cos(angles), np.sin(angles)], -1), std, name="eight_gaussians")


def default_gmm() -> Toy:
    """An asymmetric 3-component mixture (unequal weights, anisotropic scales) for tests and demos."""
    return gmm([[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]], [[0.5, 0.5], [0.3, 0.8], [0.8, 0.3]], [0.5, 0.3, 0.2])


def moons(noise: float = 0.05, scale: float = 2.0) -> Toy:
    """sklearn-style two moons, centred and scaled: scale * (moon + noise * eps - (0.5, 0.25)).
    Sample-only (no closed-form density)."""

    def sample_labeled(key, n):
        n = _count(n)
        k_moon, k_t, k_eps = jax.random.split(key, 3)
        inner_N = jax.random.bernoulli(k_moon, 0.5, (n,))
        t_N = jax.random.uniform(k_t, (n,), maxval=jnp.pi)
        outer_N2 = jnp.stack([jnp.cos(t_N), jnp.sin(t_N)], -1)
        inner_N2 = jnp.stack([1 - jnp.cos(t_N), 0.5 - jnp.sin(t_N)], -1)
        x_N2 = jnp.where(inner_N[:, None], inner_N2, outer_N2) + noise * jax.random.normal(k_eps, (n, 2))
        return scale * (x_N2 - jnp.array([0.5, 0.25])), inner_N.astype(jnp.int32)

    return _toy("moons", sample_labeled, None, 2)


def checkerboard(cells: int = 4, half_width: float = 4.0) -> Toy:
    """Uniform on the cells (i + j even) of a cells x cells board over [-half_width, half_width]^2
    (defaults: FFJORD's checkerboard, 8 squares of side 2, density 1/32). log_prob is exact:
    -log(filled area) on the board's filled cells, -inf elsewhere."""
    side = 2 * half_width / cells
    filled_C2 = np.array([(i, j) for i in range(cells) for j in range(cells) if (i + j) % 2 == 0], np.float32)
    log_density = -math.log(len(filled_C2) * side ** 2)
    filled = jnp.asarray(filled_C2)

    def sample_labeled(key, n):
        n = _count(n)
        k_cell, k_u = jax.random.split(key)
        cell_N = jax.random.randint(k_cell, (n,), 0, len(filled_C2))
        u_N2 = jax.random.uniform(k_u, (n, 2))
        return (filled[cell_N] + u_N2) * side - half_width, cell_N.astype(jnp.int32)

    def log_prob(x_N2):
        ij_N2 = jnp.floor((_points(x_N2, 2) + half_width) / side)
        inside_N = jnp.all((ij_N2 >= 0) & (ij_N2 < cells), -1) & (jnp.sum(ij_N2, -1) % 2 == 0)
        return jnp.where(inside_N, log_density, -jnp.inf)

    return _toy("checkerboard", sample_labeled, log_prob, len(filled_C2))


TOYS = {"eight_gaussians": eight_gaussians, "gmm": default_gmm, "moons": moons, "checkerboard": checkerboard}


@functools.lru_cache(maxsize=None)
def toy(name: str) -> Toy:
    """The registered toy `name` with its default parameters (one instance per process, so its
    jitted functions compile once)."""
    if name not in TOYS:
        raise ConfigError(f"unknown toy {name!r}; valid toys: {', '.join(sorted(TOYS))}")
    return TOYS[name]()


# ----------------------------------------------------------------------------- offline data sets

def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(x [N, 8, 8, 1] float32 in [-1, 1], labels [N] int32) of one digits split, straight from
    scikit-learn (what the tfds builder stores; the FD-digits classifier trains on "train")."""
    _check_split(split)
    from sklearn.datasets import load_digits
    d = load_digits()
    held_out = np.arange(len(d.target)) % DIGITS_VALIDATION_EVERY == DIGITS_VALIDATION_EVERY - 1
    keep = held_out == (split == "validation")
    x = d.images[keep].astype(np.float32)[..., None] / 8.0 - 1.0
    return x, d.target[keep].astype(np.int32)


def _check_split(split: str):
    if split not in SPLITS:
        raise JaxgenError(f"split={split!r}; use 'train' or 'validation'")


class _Points(tfds.core.GeneratorBasedBuilder):
    """Shared shape of our continuous sets: {"x", "label"}, train/validation. Abstract."""

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s) for s in SPLITS}


class SklearnDigits(_Points):
    """scikit-learn's 8x8 digits (UCI optdigits test set), pixels scaled to [-1, 1]."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=tfds.features.FeaturesDict({
            "x": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.float32),
            "label": tfds.features.ClassLabel(num_classes=10)}))

    def _generate_examples(self, split):
        x, y = digits_arrays(split)
        for i in range(len(y)):
            yield i, {"x": x[i], "label": int(y[i])}


@dataclasses.dataclass
class ToyConfig(tfds.core.BuilderConfig):
    toy: str = "eight_gaussians"
    num_train: int = TOY_SIZES[0]
    num_validation: int = TOY_SIZES[1]
    data_seed: int = 0


class ToyPoints(_Points):
    """A fixed sample of a 2-D toy distribution (train and held-out draws from one seed)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [ToyConfig(name="eight_gaussians_default")]

    def _info(self):
        c = self.builder_config
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=tfds.features.FeaturesDict({
            "x": tfds.features.Tensor(shape=(2,), dtype=np.float32),
            "label": tfds.features.ClassLabel(num_classes=toy(c.toy).num_classes)}))

    def _generate_examples(self, split):
        c = self.builder_config
        x, y = toy_arrays(c.toy, split, num_train=c.num_train, num_validation=c.num_validation, data_seed=c.data_seed)
        for i in range(len(y)):
            yield i, {"x": x[i], "label": int(y[i])}


def toy_arrays(name: str, split: str, *, num_train: int = TOY_SIZES[0], num_validation: int = TOY_SIZES[1],
               data_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x [N, 2], labels [N]) of a toy data set's split, as its builder stores them (before tfds's
    deterministic reordering)."""
    _check_split(split)
    key = jax.random.fold_in(jax.random.key(data_seed), SPLITS.index(split))
    n = num_train if split == "train" else num_validation
    x, y = toy(name).sample_labeled(key, n)
    return np.asarray(x, np.float32), np.asarray(y, np.int32)


def dataset_names() -> tuple[str, ...]:
    return ("digits", *sorted(TOYS))


def continuous_builder(name: str, data_dir: str | None = None, *, num_train: int = TOY_SIZES[0],
                       num_validation: int = TOY_SIZES[1], data_seed: int = 0) -> tfds.core.GeneratorBasedBuilder:
    """The tfds builder of a continuous data set (sizes and data_seed apply to toys only)."""
    data_dir = data_dir or builders.default_data_dir()
    if name == "digits":
        return SklearnDigits(data_dir=data_dir, file_format="array_record")
    if name not in TOYS:
        raise ConfigError(f"unknown continuous data set {name!r}; valid: {', '.join(dataset_names())}")
    for what, n in (("num_train", num_train), ("num_validation", num_validation)):
        if not isinstance(n, (int, np.integer)) or n <= 0:
            raise ConfigError(f"{what}={n!r} must be a positive int")
    config = ToyConfig(name=f"{name}_n{num_train}_v{num_validation}_s{data_seed}", toy=name, num_train=num_train,
                       num_validation=num_validation, data_seed=data_seed)
    return ToyPoints(config=config, data_dir=data_dir, file_format="array_record")


def load_continuous(name: str, split: str, *, data_dir: str = "", **sizes) -> dict[str, np.ndarray]:
    """{"x": float32 [N, ...], "label": int32 [N]} of one split (tfds order); builds it on first use.
    `sizes`: num_train, num_validation, data_seed (toys only)."""
    _check_split(split)
    builder = continuous_builder(name, data_dir or None, **sizes)
    builder.download_and_prepare()
    source = builder.as_data_source()[split]
    items = source.__getitems__(list(range(len(source))))
    return {"x": np.stack([it["x"] for it in items]).astype(np.float32),
            "label": np.asarray([it["label"] for it in items], np.int32)}


@dataclasses.dataclass
class ArrayBatches:
    """Deterministic batches over in-memory arrays: batch `step` = rows of a seeded epoch permutation
    (the same permutations as `pipeline.Batches`)."""

    arrays: dict
    batch_size: int
    seed: int = 0

    def __post_init__(self):
        n = len(next(iter(self.arrays.values())))
        if self.batch_size <= 0 or n < self.batch_size:
            raise JaxgenError(f"batch_size={self.batch_size} with {n} examples; use 1 <= batch_size <= {n}")
        self._index = pipeline.Batches(np.arange(n)[:, None], self.batch_size, self.seed)  # rows = example ids

    def at(self, step: int) -> dict:
        idx = self._index.at(step)["tokens"][:, 0]
        return {k: v[idx] for k, v in self.arrays.items()}


def continuous_batches(name: str, split: str, batch_size: int, seed: int = 0, *, start_step: int = 0,
                       data_dir: str = "", **sizes):
    """Endless iterator of numpy batches {"x", "label"} from step `start_step` on (resume by passing
    the step to restart at); batch s is `ArrayBatches(...).at(s)`."""
    batches = ArrayBatches(load_continuous(name, split, data_dir=data_dir, **sizes), batch_size, seed)
    return (batches.at(step) for step in itertools.count(start_step))


def continuous_data(name: str, batch_size: int, seed: int = 0, *, data_dir: str = "", **sizes):
    """(train ArrayBatches, validation arrays) of a continuous data set, like `pipeline.corpus`."""
    train = load_continuous(name, "train", data_dir=data_dir, **sizes)
    return ArrayBatches(train, batch_size, seed), load_continuous(name, "validation", data_dir=data_dir, **sizes)
