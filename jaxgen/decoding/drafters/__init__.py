"""Drafters for speculative decoding (the contract: `base.Drafter`) and their registry.

`get(name_or_drafter, **options)` returns a Drafter: a registered name builds one with
`options` (e.g. `get("prompt_lookup", max_matching_ngram_size=3)`); a Drafter instance passes
through. Drafters that need params have no name and come from Python: a draft model
(`model_drafter(draft_params, draft_cfg)`) or a block-diffusion model
(`block_diffusion_drafter(draft_params, draft_cfg)`); `register(name, factory)` adds a user's.
"""
from __future__ import annotations

from typing import Callable

from jaxgen.decoding.drafters import jacobi, recycling
from jaxgen.decoding.drafters.base import ChainDrafter, Drafter, check_parents  # noqa: F401
from jaxgen.decoding.drafters.diffusion import BlockDiffusionDrafter, block_diffusion_drafter  # noqa: F401
from jaxgen.decoding.drafters.lookup import PromptLookup
from jaxgen.decoding.drafters.model import ModelDrafter, model_drafter  # noqa: F401
from jaxgen.errors import JaxgenError

_REGISTRY: dict[str, Callable[..., Drafter]] = {"prompt_lookup": PromptLookup, "token_recycling": recycling.make,
                                                "jacobi": jacobi.make}


def register(name: str, factory: Callable[..., Drafter]) -> None:
    """Register `factory(**options) -> Drafter` under `name` (again with the same factory: no-op)."""
    if name in _REGISTRY and _REGISTRY[name] is not factory:
        raise JaxgenError(f"drafter {name!r} is already registered; pick another name")
    _REGISTRY[name] = factory


def names() -> tuple[str, ...]:
    """The registered drafter names."""
    return tuple(_REGISTRY)


def get(name_or_drafter, **options) -> Drafter:
    """A Drafter from a registered name (built with `options`) or a Drafter instance."""
    if isinstance(name_or_drafter, Drafter):
        if options:
            raise JaxgenError(f"drafter options {sorted(options)} apply to a drafter given by name; this one is "
                              "already built: pass its options to its constructor")
        return name_or_drafter
    if not isinstance(name_or_drafter, str):
        raise JaxgenError(f"drafter={name_or_drafter!r} must be a drafter name ({', '.join(names())}) or a "
                          "jaxgen.decoding.drafters.Drafter (e.g. model_drafter(draft_params, draft_cfg))")
    if name_or_drafter not in _REGISTRY:
        raise JaxgenError(f"unknown drafter {name_or_drafter!r}; use one of {', '.join(names())} (or pass a "
                          "Drafter, e.g. model_drafter(draft_params, draft_cfg))")
    try:
        return _REGISTRY[name_or_drafter](**options)
    except TypeError as e:
        raise JaxgenError(f"drafter {name_or_drafter!r}: bad options {options} ({e})") from None
