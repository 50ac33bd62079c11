"""What a run trains: a family gives the one train loop its model, data, checks and record.

The loop (`loop.train`) is the same for every paradigm: a jitted step of grad(objective loss) +
optax over `loss(params, spec, batch, key)`, orbax checkpoints, bit-for-bit resume, the resume
and divergence guards, metrics.jsonl. What differs between paradigms that train different
things lives in a `Family`; an objective names its family when it registers
(`objectives.register(name, loss, Options, family="flow")`), and the loop asks it for:

    spec(cfg, tcfg)               the static, hashable model description the run trains: the `cfg`
                                  its loss receives and run_config.json's "model" records
    init(spec, key)               fresh params (a plain pytree)
    param_shardings(spec, mesh, rules)
    prepare(spec, tcfg, tokenizer, have_data)
                                  checks before the run folder is touched; returns what `data` needs
    data(spec, tcfg, prepared)    (train batches, validation rows): batches.at(step) a pure function
                                  of (tcfg.seed, step), so a resumed run reads what it would have
    check_data(spec, tcfg, batches, validation)
    batch_sharding(spec, mesh, tcfg)   one sharding, or a tree matching a batch
    unit, per_step(spec, tcfg)    the throughput metrics.jsonl logs: f"{unit}_per_s"
    to_record(spec), from_record(d)    run_config.json's "model", and back (`runs.load_run`)

Families here: "lm" (the backbone language model on packed token rows: `vocab` checks, the
tfds corpus), "flow" (a velocity net `jaxgen.flow.nets` on `jaxgen.data.continuous` data, x
flattened to [B, D]) and "continuous_ar" (`jaxgen.flow.continuous_ar` over the same data cut
into tokens [B, L, D]; its backbone is the run's ModelConfig). A new paradigm that trains
something else subclasses `Family` and calls `register`; the loop stays as it is.
"""
from __future__ import annotations

import abc
import dataclasses
import math

import jax
import numpy as np

from jaxgen import config as config_lib
from jaxgen import data as data_lib
from jaxgen import model, objectives, parallel
from jaxgen.data import continuous
from jaxgen.errors import ConfigError, JaxgenError
from jaxgen.flow import continuous_ar as car
from jaxgen.flow import nets
from jaxgen.objectives import registry
from jaxgen.training import vocab


class Family(abc.ABC):
    """Base of the families (see the module docstring); subclasses override every method."""

    name = ""
    what = ""  # what it trains, in words (for messages)
    unit = "tokens"  # metrics.jsonl logs f"{unit}_per_s"; train() returns f"{unit}_per_step"
    reads_model_config = False  # whether `jaxgen train`'s ModelConfig (preset + model keys) is its input
    unread_keys: tuple[str, ...] = ()  # config keys it never reads (`jaxgen train` refuses them when set)
    train_defaults: dict = {}  # TrainConfig fields `jaxgen train` sets for this family unless given

    @abc.abstractmethod
    def owns(self, spec) -> bool:
        ...

    @abc.abstractmethod
    def spec(self, cfg, tcfg):
        ...

    @abc.abstractmethod
    def init(self, spec, key):
        ...

    @abc.abstractmethod
    def param_shardings(self, spec, mesh, rules: str):
        ...

    @abc.abstractmethod
    def prepare(self, spec, tcfg, tokenizer, have_data: bool):
        ...

    @abc.abstractmethod
    def data(self, spec, tcfg, prepared):
        ...

    @abc.abstractmethod
    def check_data(self, spec, tcfg, batches, validation) -> None:
        ...

    @abc.abstractmethod
    def batch_sharding(self, spec, mesh, tcfg):
        ...

    @abc.abstractmethod
    def per_step(self, spec, tcfg) -> int:
        ...

    def to_record(self, spec) -> dict:
        return dataclasses.asdict(spec)

    @abc.abstractmethod
    def from_record(self, record: dict):
        ...


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make `family` known under `family.name` (objectives name it when they register)."""
    _FAMILIES[family.name] = family
    return family


def get(name: str) -> Family:
    if name not in _FAMILIES:
        raise ConfigError(f"unknown training family {name!r}; known: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def of_objective(objective: str) -> Family:
    """The family that `objective` trains."""
    return get(objectives.get(objective).family)


def of_spec(spec) -> Family:
    """The family whose model description `spec` is (a ModelConfig: "lm")."""
    for family in _FAMILIES.values():
        if family.owns(spec):
            return family
    raise ConfigError(f"{type(spec).__name__} is no model description of a training family "
                      f"({', '.join(sorted(_FAMILIES))}); pass a ModelConfig, a jaxgen.flow.nets.NetSpec, ...")


def for_run(cfg, tcfg):
    """(family, spec) of a run of `tcfg`'s objective with model description `cfg` (checked; for
    families that build it from the options and data, None builds it)."""
    family = of_objective(tcfg.objective)
    return family, family.spec(cfg, tcfg)


def replicated_shardings(init, spec, mesh):
    """Every parameter of `init(spec, key)` replicated over `mesh` (small nets: data parallel only)."""
    abstract = jax.eval_shape(lambda: init(spec, jax.random.key(0)))
    return jax.tree.map(lambda _: parallel.replicated(mesh), abstract)


# ----------------------------------------------------------------------------- language model

class LanguageModel(Family):
    """The backbone language model on packed token rows {"tokens": [B, L]} of the tfds corpus;
    the model config must agree with the tokenizer (`vocab.check_model`) and the corpus with it."""

    name = registry.LM
    what = "a language model"
    unit = "tokens"
    reads_model_config = True

    def owns(self, spec) -> bool:
        return isinstance(spec, config_lib.ModelConfig)

    def spec(self, cfg, tcfg):
        if not isinstance(cfg, config_lib.ModelConfig):
            raise ConfigError(f"objective {tcfg.objective} trains a language model: pass its ModelConfig, not "
                              f"{type(cfg).__name__}")
        return cfg

    def init(self, spec, key):
        return model.init(spec, key)

    def param_shardings(self, spec, mesh, rules: str):
        return parallel.param_shardings(spec, mesh, rules)

    def prepare(self, spec, tcfg, tokenizer, have_data: bool):
        if not have_data or tokenizer is not None:
            tokenizer = tokenizer or data_lib.get_tokenizer(tcfg.tokenizer)
            vocab.check_model(spec, tcfg, tokenizer)
        return tokenizer

    def data(self, spec, tcfg, tokenizer):
        return data_lib.corpus(tcfg, tokenizer)

    def check_data(self, spec, tcfg, batches, validation) -> None:
        vocab.check_rows(spec, tcfg, batches.rows, "train corpus")
        if validation is not None:
            vocab.check_rows(spec, tcfg, validation, "validation corpus")

    def batch_sharding(self, spec, mesh, tcfg):
        return parallel.batch_sharding(mesh, tcfg.rules, tcfg.batch_size)

    def per_step(self, spec, tcfg) -> int:
        return tcfg.batch_size * tcfg.seq_len

    def from_record(self, record: dict):
        return config_lib.model_config_from_dict(record)


# ----------------------------------------------------------------------------- continuous data

def data_info(tcfg, options) -> tuple[tuple[int, ...], int]:
    """(shape of one example's x, number of labels) of tcfg's continuous data set, from its tfds
    builder's features (nothing is built or read)."""
    features = continuous.continuous_builder(tcfg.dataset, tcfg.data_dir or None, **_sizes(tcfg, options)).info.features
    return tuple(int(n) for n in features["x"].shape), int(features["label"].num_classes)


def _sizes(tcfg, options) -> dict:
    return {} if tcfg.dataset == "digits" else options.data_sizes()


class _Continuous(Family):
    """Shared by the families on `jaxgen.data.continuous` data: batches {"x": float32 laid out by
    `layout`, "label": int32 [B]} from `continuous.ArrayBatches` (its epoch permutations are the
    token pipeline's: pure in (seed, step)); params replicated (small nets)."""

    unit = "samples"
    unread_keys = ("tokenizer", "mask_token", "data_files", "max_files", "seq_len")
    x_ndim = 2  # of a batch's x

    @abc.abstractmethod
    def layout(self, spec, x):
        """[N, ...] examples as the loss takes them."""

    @abc.abstractmethod
    def x_shape(self, spec) -> tuple[int, ...]:
        """One example's x as the loss takes it."""

    def num_classes(self, spec) -> int:
        return int(getattr(spec, "num_classes", 0) or 0)

    def param_shardings(self, spec, mesh, rules: str):
        return replicated_shardings(self.init, spec, mesh)

    def prepare(self, spec, tcfg, tokenizer, have_data: bool):
        if tokenizer is not None:
            raise ConfigError(f"objective {tcfg.objective} trains on continuous data and takes no tokenizer; "
                              "drop tokenizer=")
        return None

    def data(self, spec, tcfg, prepared):
        sizes = _sizes(tcfg, objectives.options_of(tcfg))

        def split(name):
            arrays = continuous.load_continuous(tcfg.dataset, name, data_dir=tcfg.data_dir, **sizes)
            return {"x": self.layout(spec, arrays["x"]), "label": arrays["label"]}
        return continuous.ArrayBatches(split("train"), tcfg.batch_size, tcfg.seed), split("validation")

    def check_data(self, spec, tcfg, batches, validation) -> None:
        self._check_rows(spec, tcfg, batches.at(0), "train batch 0")
        if validation is not None:
            self._check_rows(spec, tcfg, validation, "validation data")

    def _check_rows(self, spec, tcfg, rows, what: str) -> None:
        """x of the model's shape and finite; labels inside the model's classes when it reads them."""
        if not isinstance(rows, dict) or not {"x", "label"} <= set(rows):
            raise JaxgenError(f"the {what} is not a continuous batch {{'x', 'label'}} (got "
                              f"{sorted(rows) if isinstance(rows, dict) else type(rows).__name__}); objective "
                              f"{tcfg.objective} trains on jaxgen.data.continuous data sets")
        x = np.asarray(rows["x"])
        if x.shape[1:] != self.x_shape(spec):
            raise JaxgenError(f"the {what} has x of shape {x.shape[1:]} per example but the model takes "
                              f"{self.x_shape(spec)}; build the model description from this data "
                              "(jaxgen.training.families.for_run(None, tcfg))")
        if not np.isfinite(x).all():
            raise JaxgenError(f"the {what} holds non-finite values of x; fix the data set")
        classes = self.num_classes(spec)
        if classes:
            labels = np.asarray(rows["label"])
            if len(labels) != len(x) or len(labels) and (labels.min() < 0 or labels.max() >= classes):
                raise JaxgenError(f"the {what} needs a label in [0, {classes}) per example for a class-conditional "
                                  "model; fix the data or train with class_conditional=false")

    def batch_sharding(self, spec, mesh, tcfg):
        shard = lambda ndim: parallel.batch_sharding(mesh, tcfg.rules, tcfg.batch_size, ndim)
        return {"x": shard(self.x_ndim), "label": shard(1)}

    def per_step(self, spec, tcfg) -> int:
        return tcfg.batch_size


class Flow(_Continuous):
    """Flow matching of a velocity net (`jaxgen.flow.nets`): NetSpec from the objective's options
    (hidden, depth, class_conditional) and the data (dim, classes); x flattened to [B, D]."""

    name = "flow"
    what = "a velocity net (flow matching)"
    # measured: weight decay 0.1 halves the toy's progress (KL 0.22 vs 0.11 at 4000 steps, batch 256)
    train_defaults = {"weight_decay": 0.0}

    def owns(self, spec) -> bool:
        return isinstance(spec, nets.NetSpec)

    def spec(self, cfg, tcfg):
        options = objectives.options_of(tcfg)
        shape, classes = data_info(tcfg, options)
        spec = options.net_spec(math.prod(shape), classes)
        if cfg is not None and cfg != spec:
            raise ConfigError(f"objective {tcfg.objective} builds its velocity net from its options and the data: "
                              f"{spec}, not {cfg}; pass cfg=None, or set hidden=, depth=, class_conditional=")
        return spec

    def init(self, spec, key):
        return nets.init(key, spec)

    def layout(self, spec, x):
        return np.asarray(x, np.float32).reshape(len(x), -1)

    def x_shape(self, spec) -> tuple[int, ...]:
        return (spec.dim,)

    def from_record(self, record: dict):
        return nets.NetSpec(**record)


PATCH = 2  # continuous AR cuts images into PATCH x PATCH tokens (digits: 16 tokens of 4 pixels)


def tokens_of(shape: tuple[int, ...]) -> tuple[int, int]:
    """(seq_len, token_dim) of continuous AR over examples of `shape`: an image [H, W, C] is cut
    into PATCH x PATCH patches (row-major), a vector [D] into D tokens of one value."""
    if len(shape) == 1:
        return shape[0], 1
    h, w, c = shape
    if h % PATCH or w % PATCH:
        raise ConfigError(f"images of shape {shape} do not cut into {PATCH}x{PATCH} patches")
    return (h // PATCH) * (w // PATCH), PATCH * PATCH * c


def to_tokens(x):
    """[N, L, D] tokens of examples x [N, ...] (see `tokens_of`)."""
    x = np.asarray(x, np.float32)
    if x.ndim == 2:
        return x[..., None]
    n, h, w, c = x.shape
    patches = x.reshape(n, h // PATCH, PATCH, w // PATCH, PATCH, c).transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(n, (h // PATCH) * (w // PATCH), PATCH * PATCH * c)


class ContinuousAR(_Continuous):
    """Continuous-token AR (`jaxgen.flow.continuous_ar`): ContinuousARSpec(backbone = the run's
    ModelConfig, seq_len and token_dim of the data cut into tokens, the options' knobs); x as
    tokens [B, L, D]. The backbone's params are placed by the run's rules, the rest replicated."""

    name = "continuous_ar"
    what = "a continuous-token AR model"
    reads_model_config = True
    unread_keys = _Continuous.unread_keys + vocab.VOCAB_FIELDS + ("tie_embeddings",)  # the spec sets them
    x_ndim = 3

    def owns(self, spec) -> bool:
        return isinstance(spec, car.ContinuousARSpec)

    def spec(self, cfg, tcfg):
        if not isinstance(cfg, (config_lib.ModelConfig, car.ContinuousARSpec)):
            raise ConfigError(f"objective {tcfg.objective} needs the backbone's ModelConfig, not {type(cfg).__name__}")
        options = objectives.options_of(tcfg)
        shape, classes = data_info(tcfg, options)
        spec = options.spec(getattr(cfg, "backbone", cfg), *tokens_of(shape), classes)
        if isinstance(cfg, car.ContinuousARSpec) and cfg != spec:
            raise ConfigError(f"objective {tcfg.objective} builds its model from the backbone, its options and the "
                              f"data: {spec}, not {cfg}; pass the backbone's ModelConfig")
        return spec

    def init(self, spec, key):
        return car.init(key, spec)

    def param_shardings(self, spec, mesh, rules: str):
        shardings = replicated_shardings(self.init, spec, mesh)
        return dict(shardings, backbone=parallel.param_shardings(spec.model_cfg, mesh, rules))

    def layout(self, spec, x):
        return to_tokens(x)

    def x_shape(self, spec) -> tuple[int, ...]:
        return (spec.seq_len, spec.token_dim)

    def from_record(self, record: dict):
        return car.ContinuousARSpec(**dict(record, backbone=config_lib.model_config_from_dict(record["backbone"])))


register(LanguageModel())
register(Flow())
register(ContinuousAR())
