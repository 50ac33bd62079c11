"""Continuous-data objectives: flow matching of a velocity net, and continuous-token AR.

Both train on `jaxgen.data.continuous` data sets (the 2-D toys, the 8x8 digits) through the
train loop's "flow" and "continuous_ar" families (`jaxgen.training.families`), which build the
model description (`cfg` below) from these options and the data, and hand the loss batches
{"x": float32, "label": int32}: x [B, D] for flow matching, [B, L, D] tokens for continuous AR.

    jaxgen train --objective flow_matching dataset=moons hidden=128 depth=3
    jaxgen train --objective flow_matching dataset=digits class_conditional=true param=x
    jaxgen train --objective continuous_ar dataset=digits order=mar   (backbone: the model keys)

The two share the names of what they share: `class_conditional`, `label_drop` (the label
dropout that trains the unconditional field of classifier-free guidance) and `time_sampler`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxgen.data import continuous
from jaxgen.errors import ConfigError
from jaxgen.flow import continuous_ar as car
from jaxgen.flow import losses, nets, paths, schedulers
from jaxgen.objectives.options import Options
from jaxgen.objectives.registry import register

PARAM_ALIASES = {"epsilon": "eps", "velocity": "v"}


@dataclasses.dataclass(frozen=True)
class ContinuousOptions(Options):
    """What both continuous objectives read: the data set's toy sizes (digits has fixed splits)
    and whether the model sees the class label (digit, toy component / moon / cell)."""

    num_train: int = continuous.TOY_SIZES[0]
    num_validation: int = continuous.TOY_SIZES[1]
    data_seed: int = 0
    class_conditional: bool = False

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_train", "num_validation"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive number of toy points")

    def data_sizes(self) -> dict:
        """Keyword arguments of `continuous.load_continuous` (toys only)."""
        return dict(num_train=self.num_train, num_validation=self.num_validation, data_seed=self.data_seed)

    def check_train(self, tcfg) -> None:
        super().check_train(tcfg)
        names = continuous.dataset_names()
        if tcfg.dataset not in names:
            raise ConfigError(f"objective {tcfg.objective} trains on continuous data, and dataset={tcfg.dataset!r} "
                              f"is not a continuous data set; use dataset= one of {', '.join(names)} "
                              "(token data sets train the language-model objectives)")
        default = ContinuousOptions()
        if tcfg.dataset == "digits" and self.data_sizes() != default.data_sizes():
            raise ConfigError("num_train, num_validation and data_seed size the toy data sets; digits has fixed "
                              "splits (1438 train, 359 validation images): drop them")


def _choice(name: str, value: str, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{name}={value!r}; use one of {', '.join(valid)}")


@dataclasses.dataclass(frozen=True)
class FlowMatchingOptions(ContinuousOptions):
    """The velocity net's shape (hidden, depth), what it predicts (param: v velocity, x data, eps
    noise; loss_space: where the error is measured, "" = param's own), the path's scheduler, the
    training-time sampler of t, and the class-label dropout that trains the unconditional field
    classifier-free guidance needs (class_conditional runs only)."""

    hidden: int = 256
    depth: int = 3
    param: str = "v"
    loss_space: str = ""
    scheduler: str = "cond_ot"
    time_sampler: str = "uniform"
    label_drop: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "param", PARAM_ALIASES.get(self.param, self.param))
        object.__setattr__(self, "loss_space", PARAM_ALIASES.get(self.loss_space, self.loss_space))
        for name in ("hidden", "depth"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer (the velocity net's "
                                  f"{'width' if name == 'hidden' else 'number of residual blocks'})")
        _choice("param", self.param, paths.PARAMS)
        if self.loss_space:
            _choice("loss_space", self.loss_space, paths.PARAMS)
        _choice("scheduler", self.scheduler, tuple(n for n in schedulers.SCHEDULERS if n != "polynomial"))
        _choice("time_sampler", self.time_sampler, tuple(losses.T_SAMPLERS))
        if not 0.0 <= self.label_drop < 1.0:
            raise ConfigError(f"label_drop={self.label_drop} must be in [0, 1) (the fraction of labels replaced "
                              "by the null label, for classifier-free guidance; e.g. 0.1)")

    def loss_kwargs(self) -> dict:
        return dict(super().loss_kwargs(), param=self.param, loss_space=self.loss_space, scheduler=self.scheduler,
                    time_sampler=self.time_sampler, label_drop=self.label_drop)

    def net_spec(self, dim: int, num_classes: int) -> nets.NetSpec:
        """The velocity net of a run on `dim`-dimensional data with `num_classes` labels."""
        return nets.NetSpec(dim=dim, hidden=self.hidden, depth=self.depth,
                            num_classes=num_classes if self.class_conditional else 0)


def drop_labels(key, label_B, null_label: int, rate: float):
    """Each label replaced by `null_label` with probability `rate` (classifier-free guidance)."""
    return jnp.where(jax.random.bernoulli(key, rate, label_B.shape), null_label, label_B)


def flow_matching_loss(params, cfg: nets.NetSpec, batch, key, *, param="v", loss_space="", scheduler="cond_ot",
                       time_sampler="uniform", label_drop=0.1):
    """Conditional flow matching (`jaxgen.flow.losses.cfm_loss`) of the velocity net `cfg` on
    batch["x"] [B, D]; a class-conditional net sees batch["label"], dropped at `label_drop`."""
    k_label, k_fm = jax.random.split(key)
    label_B = None
    if cfg.num_classes:
        label_B = drop_labels(k_label, batch["label"], cfg.null_label, label_drop)
    value = losses.cfm_loss(lambda x, t: nets.apply(params, cfg, x, t, label_B), batch["x"], k_fm,
                            scheduler=schedulers.get(scheduler), param=param, loss_space=loss_space or None,
                            sample_t=losses.t_sampler(time_sampler))
    return value, {"loss": value}


def velocity_fn(params, cfg: nets.NetSpec, options: FlowMatchingOptions, label_B=None):
    """velocity(x, t) of a trained net for `jaxgen.flow.solve`: its prediction (options.param)
    converted to a velocity on options.scheduler's path. (An x or eps prediction is singular
    where the path's sigma or alpha is 0: stop the solver short of that end.)"""
    scheduler = schedulers.get(options.scheduler)

    def velocity(x, t):
        pred = nets.apply(params, cfg, x, t, label_B)
        return paths.convert(scheduler, pred, x, t, src=options.param, dst="v")
    return velocity


# ----------------------------------------------------------------------------- continuous-token AR

_CAR = {f.name: f.default for f in dataclasses.fields(car.ContinuousARSpec)}  # its defaults, in one place
CAR_KNOBS = ("order", "block_size", "head_hidden", "head_depth", "head_time_dim", "head_batch_mul", "gaussian_head",
             "mask_ratio_min", "label_drop", "time_sampler")  # ContinuousARSpec fields set from the options


@dataclasses.dataclass(frozen=True)
class ContinuousAROptions(ContinuousOptions):
    """`jaxgen.flow.continuous_ar` over the data cut into tokens (digits: 16 tokens of 2x2 pixels;
    toys: 2 tokens of one coordinate): the ContinuousARSpec fields in CAR_KNOBS (order causal |
    mar | xar, the head's shape, ...; see that module). The backbone is the run's model config
    (the model keys); the spec checks what depends on the data (block_size vs seq_len, ...)."""

    order: str = _CAR["order"]
    block_size: int = _CAR["block_size"]
    head_hidden: int = _CAR["head_hidden"]
    head_depth: int = _CAR["head_depth"]
    head_time_dim: int = _CAR["head_time_dim"]
    head_batch_mul: int = _CAR["head_batch_mul"]
    gaussian_head: bool = _CAR["gaussian_head"]
    mask_ratio_min: float = _CAR["mask_ratio_min"]
    label_drop: float = _CAR["label_drop"]
    time_sampler: str = _CAR["time_sampler"]

    def __post_init__(self):
        super().__post_init__()
        _choice("order", self.order, car.ORDERS)
        _choice("time_sampler", self.time_sampler, tuple(losses.T_SAMPLERS))
        for name in ("block_size", "head_hidden", "head_depth", "head_time_dim", "head_batch_mul"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")
        if not 0.0 < self.mask_ratio_min <= 1.0:
            raise ConfigError(f"mask_ratio_min={self.mask_ratio_min} must be in (0, 1] (MAR uses 0.7)")
        if not 0.0 <= self.label_drop < 1.0:
            raise ConfigError(f"label_drop={self.label_drop} must be in [0, 1) (e.g. 0.1)")

    def spec(self, backbone, seq_len: int, token_dim: int, num_classes: int) -> car.ContinuousARSpec:
        """The model of a run over `seq_len` tokens of `token_dim` values with `num_classes` labels."""
        return car.ContinuousARSpec(backbone=backbone, token_dim=token_dim, seq_len=seq_len,
                                    num_classes=num_classes if self.class_conditional else 0,
                                    **{k: getattr(self, k) for k in CAR_KNOBS})


def continuous_ar_loss(params, cfg: car.ContinuousARSpec, batch, key):
    """`jaxgen.flow.continuous_ar.loss` on batch["x"] [B, L, D] (with batch["label"] when the
    spec is class-conditional; the loss drops labels at cfg.label_drop)."""
    return car.loss(params, cfg, batch["x"], key, label_B=batch["label"] if cfg.num_classes else None)


register("flow_matching", flow_matching_loss, FlowMatchingOptions, family="flow")
register("continuous_ar", continuous_ar_loss, ContinuousAROptions, family="continuous_ar")
