"""The objective registry: name -> (loss, options dataclass). Each objective module registers
itself when imported (`jaxgen.objectives` imports them all), so a new paradigm is one file."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from jaxgen.errors import ConfigError
from jaxgen.objectives.options import Options

MODEL = "model"  # trains the language model through `loss`
FILTER = "filter"  # trains a decoding filter (Learn2PD): `jaxgen train` hands it to jaxgen.training.filter_fit
LM = "lm"  # the default family: the backbone language model on token batches


@dataclasses.dataclass(frozen=True)
class Objective:
    """A registered objective: `loss(params, cfg, batch, key, **options.loss_kwargs())`. `family`
    names what the train loop trains with it (`jaxgen.training.families`: the model, its data and
    checks); `cfg` is that family's static model description (a ModelConfig for "lm")."""

    name: str
    loss: Callable | None
    Options: type
    trains: str = MODEL
    family: str = LM

    def bind(self, options: Options) -> Callable:
        """The loss with its options bound: loss(params, cfg, batch, key) -> (value, metrics)."""
        if self.loss is None:
            raise ConfigError(f"objective {self.name!r} trains a {self.trains}, not the language model; "
                              f"`jaxgen train --objective {self.name}` dispatches it")
        return functools.partial(self.loss, **options.loss_kwargs())

    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.Options))


_REGISTRY: dict[str, Objective] = {}


def register(name: str, loss_fn: Callable | None, options_cls: type, *, trains: str = MODEL,
             family: str = LM) -> Objective:
    """Register objective `name`; `options_cls` is a frozen `Options` dataclass of its knobs;
    `family` a name in `jaxgen.training.families` (checked when a run starts)."""
    if not (isinstance(options_cls, type) and issubclass(options_cls, Options)
            and dataclasses.is_dataclass(options_cls) and options_cls.__dataclass_params__.frozen):
        raise TypeError(f"objective {name!r}: options must be a frozen dataclass subclassing Options, "
                        f"not {options_cls!r}")
    if trains not in (MODEL, FILTER):
        raise ValueError(f"objective {name!r}: trains={trains!r}; use {MODEL!r} or {FILTER!r}")
    previous = _REGISTRY.get(name)
    if previous is not None and previous.Options.__qualname__ != options_cls.__qualname__:
        raise ValueError(f"objective {name!r} is already registered (options {previous.Options.__qualname__}); "
                         "pick another name")
    if not isinstance(family, str) or not family:
        raise ValueError(f"objective {name!r}: family={family!r} must be a family name (jaxgen.training.families)")
    _REGISTRY[name] = Objective(name, loss_fn, options_cls, trains, family)
    return _REGISTRY[name]


def get(name: str) -> Objective:
    """The objective registered as `name`; a ConfigError listing the known names otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown objective {name!r}; use one of {', '.join(names())}")
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    """Registered objective names, sorted."""
    return tuple(sorted(_REGISTRY))
