"""The sampler registry: name -> `generate`, and the scalar keyword options each `generate`
takes, read from its signature (so the CLI's flags follow the samplers without a table), also
as a frozen options dataclass per sampler (`options_class`), as the objective registry has.

A keyword alias (a second name a generate keeps for one option, e.g. ar's `max_new_tokens` for
`gen_length`) is declared at registration and left out of the options: one flag per option."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from typing import Any, Callable

from jaxgen.errors import ConfigError
from jaxgen.samplers import ar, block_diffusion, dream, lavida, masked_diffusion, nbdiff, speculative, tidar, wedlm

SCALARS = {"bool": bool, "int": int, "float": float, "str": str}
POSITIONAL = ("params", "cfg", "prompt", "key")  # every generate's leading arguments

_REGISTRY: dict[str, Callable] = {}
_ALIASES: dict[str, dict[str, str]] = {}  # sampler -> {alias keyword: the option it names}


@dataclasses.dataclass(frozen=True)
class Option:
    """One keyword option of a generate: its scalar type, default, and whether None is allowed."""

    name: str
    type: type
    default: Any
    optional: bool


def register(name: str, generate: Callable, aliases: dict[str, str] | None = None) -> None:
    """Register `generate(params, cfg, prompt, key, **options)` under `name`; `aliases` maps
    keywords that are second names of an option ({"max_new_tokens": "gen_length"}) to it."""
    if name in _REGISTRY and _REGISTRY[name] is not generate:
        raise ValueError(f"sampler {name!r} is already registered; pick another name")
    keywords = inspect.signature(generate).parameters
    for alias, target in (aliases or {}).items():
        if alias not in keywords or target not in keywords:
            raise ValueError(f"sampler {name!r}: alias {alias!r} -> {target!r} names a keyword generate lacks")
    _REGISTRY[name] = generate
    _ALIASES[name] = dict(aliases or {})


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
        if (param.name in POSITIONAL or param.name in _ALIASES[name]
                or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD)):
            continue
        option = _option(param)
        if option is not None:
            found[param.name] = option
    return found


def accepts(name: str, keyword: str) -> bool:
    """Whether sampler `name`'s generate takes `keyword` (scalar or not, an alias included)."""
    return keyword in inspect.signature(get(name)).parameters


def aliases(name: str) -> dict[str, str]:
    """Sampler `name`'s keyword aliases: {alias: the option it names}."""
    get(name)
    return dict(_ALIASES[name])


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """Base of the generated options classes: each field is a scalar option of one sampler's
    generate with its default; values are type-checked (ints pass for floats; None only where the
    option allows it)."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            option, value = field.metadata["option"], getattr(self, field.name)
            if value is None and option.optional:
                continue
            if option.type is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, field.name, float(value))
                continue
            if not isinstance(value, option.type) or isinstance(value, bool) != (option.type is bool):
                kind = option.type.__name__
                raise ConfigError(f"{field.name}={value!r} must be {'an' if kind == 'int' else 'a'} {kind}"
                                  + (" or None" if option.optional else "") + f" (default {option.default!r})")

    def kwargs(self) -> dict:
        """The options that differ from their defaults, as generate's keyword arguments (an option
        left at its default is not passed, so generate can tell what was asked for)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}


def options_class(name: str) -> type:
    """A frozen dataclass of sampler `name`'s scalar options (fields and defaults from its generate
    signature, aliases left out), e.g. `options_class("dream")(steps=8, alg="entropy").kwargs()`."""
    return _options_class(name, get(name))


@functools.cache
def _options_class(name: str, generate: Callable) -> type:
    del generate  # part of the cache key only: a name registered again gets a new class
    fields = [(o.name, o.type | None if o.optional else o.type, dataclasses.field(default=o.default,
                                                                               metadata={"option": o}))
              for o in options(name).values()]
    title = "".join(part.title() for part in name.split("_"))
    return dataclasses.make_dataclass(f"{title}Options", fields, bases=(SamplerOptions,), frozen=True,
                                      namespace={"__doc__": f"The scalar options of the {name!r} sampler."})


for _name, _module in (("ar", ar), ("masked_diffusion", masked_diffusion), ("block_diffusion", block_diffusion),
                       ("dream", dream), ("lavida", lavida), ("nbdiff", nbdiff), ("wedlm", wedlm), ("tidar", tidar),
                       ("speculative", speculative)):
    register(_name, _module.generate, getattr(_module, "KEYWORD_ALIASES", None))
