"""The sampler registry: name -> `generate`, and the scalar keyword options each `generate`
takes, read from its signature (so the CLI's flags follow the samplers without a table)."""
from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, Callable

from jaxgen.errors import ConfigError
from jaxgen.samplers import ar, block_diffusion, dream, lavida, masked_diffusion, nbdiff, tidar, wedlm

SCALARS = {"bool": bool, "int": int, "float": float, "str": str}
POSITIONAL = ("params", "cfg", "prompt", "key")  # every generate's leading arguments

_REGISTRY: dict[str, Callable] = {}


@dataclasses.dataclass(frozen=True)
class Option:
    """One keyword option of a generate: its scalar type, default, and whether None is allowed."""

    name: str
    type: type
    default: Any
    optional: bool


def register(name: str, generate: Callable) -> None:
    """Register `generate(params, cfg, prompt, key, **options)` under `name`."""
    if name in _REGISTRY and _REGISTRY[name] is not generate:
        raise ValueError(f"sampler {name!r} is already registered; pick another name")
    _REGISTRY[name] = generate


def get(name: str) -> Callable:
    """The generate registered as `name`; a ConfigError listing the known names otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown sampler {name!r}; use one of {', '.join(names())}")
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def _annotation_types(annotation) -> list:
    """The types an annotation names: "float | None" -> [float, None]; unknown names -> object."""
    if isinstance(annotation, str):
        parts = [p.strip() for p in annotation.replace("Optional[", "").rstrip("]").split("|")]
        return [None if p == "None" else SCALARS.get(p, object) for p in parts]
    if annotation is inspect.Parameter.empty:
        return []
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return [None if a is type(None) else a for a in typing.get_args(annotation)]
    return [annotation]


def _option(param: inspect.Parameter) -> Option | None:
    """`param` as an Option when its type is one scalar (bool, int, float, str), else None."""
    named = _annotation_types(param.annotation)
    default = param.default
    if default is inspect.Parameter.empty:
        return None
    scalars = [t for t in named if t is not None]
    kind = type(default) if default is not None else (scalars[0] if len(scalars) == 1 else None)
    if kind not in SCALARS.values() or any(t not in (kind, None) and not (kind is float and t is int)
                                           for t in named):
        return None
    return Option(param.name, kind, default, default is None or None in named)


def options(name: str) -> dict[str, Option]:
    """The scalar keyword options of sampler `name`'s generate, in signature order."""
    params = list(inspect.signature(get(name)).parameters.values())
    found = {}
    for param in params:
        if param.name in POSITIONAL or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        option = _option(param)
        if option is not None:
            found[param.name] = option
    return found


def accepts(name: str, keyword: str) -> bool:
    """Whether sampler `name`'s generate takes `keyword` (scalar or not)."""
    return keyword in inspect.signature(get(name)).parameters


for _name, _module in (("ar", ar), ("masked_diffusion", masked_diffusion), ("block_diffusion", block_diffusion),
                       ("dream", dream), ("lavida", lavida), ("nbdiff", nbdiff), ("wedlm", wedlm), ("tidar", tidar)):
    register(_name, _module.generate)
