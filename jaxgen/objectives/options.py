"""Options dataclasses: each objective's knobs, checked once when a run is configured.

An objective module defines a frozen dataclass of its knobs (subclassing `Options`, and the
`DiffusionOptions` / `BlockOptions` mixins where they apply) and registers it with its loss. The
dataclass says which loss keyword arguments the knobs become (`loss_kwargs`), how they change
over training (`at_step`: block-size curricula) and what they need of the run (`check_train`).
"""
from __future__ import annotations

import dataclasses
import math

from jaxgen.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of every objective's options: field types follow their defaults (ints pass for floats)."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value, default = getattr(self, field.name), field.default
            same_kind = isinstance(value, type(default)) and isinstance(value, bool) == isinstance(default, bool)
            if default is None or same_kind:
                continue
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, field.name, float(value))
                continue
            kind = type(default).__name__
            raise ConfigError(f"{field.name}={value!r} must be {'an' if kind == 'int' else 'a'} {kind} "
                              f"(e.g. {field.name}={default!r})")

    def loss_kwargs(self) -> dict:
        """Keyword arguments of the objective's loss."""
        return {}

    def at_step(self, step: int) -> "Options":
        """The options of training step `step` (0-based); a curriculum changes them over steps."""
        del step
        return self

    def log_fields(self) -> dict:
        """Extra fields for metrics.jsonl (e.g. the current curriculum block size)."""
        return {}

    def check_train(self, tcfg) -> None:
        """Refuse a TrainConfig these options cannot train with (e.g. seq_len vs block size)."""
        del tcfg


@dataclasses.dataclass(frozen=True)
class DiffusionOptions(Options):
    """Masked-diffusion time sampling: t = eps + (1 - eps) u, u antithetic across the batch (MDLM)."""

    sampling_eps: float = 1e-3
    antithetic: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.sampling_eps <= 1.0:
            raise ConfigError(f"sampling_eps={self.sampling_eps} must be in (0, 1] (the smallest diffusion time)")

    def loss_kwargs(self) -> dict:
        return dict(super().loss_kwargs(), eps=self.sampling_eps, antithetic=self.antithetic)


@dataclasses.dataclass(frozen=True)
class LaViDaOptions(DiffusionOptions):
    """LaViDa (complementary masking, prefix-LM prompt). A batch without a `prompt_mask` (plain
    text) gets one: each row's prompt is its first n tokens, n uniform in 1 .. max_prompt_fraction
    * length, so prefix-LM training happens on any corpus."""

    max_prompt_fraction: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.max_prompt_fraction < 1.0:
            raise ConfigError(f"max_prompt_fraction={self.max_prompt_fraction} must be in (0, 1) (the longest "
                              "random prompt, as a fraction of the row; e.g. 0.5)")

    def loss_kwargs(self) -> dict:
        return dict(super().loss_kwargs(), max_prompt_fraction=self.max_prompt_fraction)


@dataclasses.dataclass(frozen=True)
class BlockOptions(Options):
    """Block objectives: the block size, grown 1, 2, 4, ... block_size over `curriculum_steps`
    (NBDiff's curriculum from AR; 0 = no curriculum)."""

    block_size: int = 4
    curriculum_steps: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.block_size <= 0:
            raise ConfigError(f"block_size={self.block_size} must be a positive integer")
        if self.curriculum_steps < 0:
            raise ConfigError(f"curriculum_steps={self.curriculum_steps} must be >= 0 (0 = no curriculum)")

    def loss_kwargs(self) -> dict:
        return dict(super().loss_kwargs(), block_size=self.block_size)

    def at_step(self, step: int) -> "BlockOptions":
        return dataclasses.replace(self, block_size=block_size_at(self.block_size, self.curriculum_steps, step))

    def log_fields(self) -> dict:
        return {"block_size": self.block_size} if self.curriculum_steps else {}

    def check_train(self, tcfg) -> None:
        super().check_train(tcfg)
        for size in curriculum_block_sizes(self.block_size, self.curriculum_steps):
            if tcfg.seq_len % size:
                raise ConfigError(f"seq_len={tcfg.seq_len} is not a multiple of block size {size} "
                                  f"(block_size={self.block_size}, curriculum_steps={self.curriculum_steps}); "
                                  "pick a seq_len every stage divides")


def curriculum_block_sizes(block_size: int, curriculum_steps: int) -> tuple[int, ...]:
    """The block sizes a run goes through: 1, 2, 4, ... then block_size (just block_size without
    a curriculum). NBDiff grows the block from 1 (AR) to the target."""
    if not curriculum_steps:
        return (block_size,)
    sizes = [1]
    while sizes[-1] * 2 < block_size:
        sizes.append(sizes[-1] * 2)
    return tuple(sizes) + ((block_size,) if block_size > 1 else ())


def block_size_at(block_size: int, curriculum_steps: int, step: int) -> int:
    """The block size of training step `step` (0-based): equal stages over curriculum_steps, then
    the target."""
    sizes = curriculum_block_sizes(block_size, curriculum_steps)
    if step >= curriculum_steps:
        return sizes[-1]
    return sizes[step * len(sizes) // curriculum_steps]


def check_weight(name: str, value: float) -> None:
    """A loss weight: finite and >= 0."""
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name}={value} must be a finite number >= 0")


@dataclasses.dataclass(frozen=True)
class AuxARBlockOptions(BlockOptions, DiffusionOptions):
    """Block size (and curriculum), the diffusion time sampler and the auxiliary AR loss weight
    (NBDiff, WeDLM)."""

    aux_ar_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        check_weight("aux_ar_weight", self.aux_ar_weight)

    def loss_kwargs(self) -> dict:
        return dict(super().loss_kwargs(), aux_ar_weight=self.aux_ar_weight)
