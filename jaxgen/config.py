"""Frozen, hashable configs, named presets and `key=value` overrides.

Configs are static arguments to jitted functions, so they are frozen dataclasses; anything a
user can misspell (a preset, an override key, a value) fails here with a message naming it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from jaxgen.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The Llama-family backbone (Llama, Qwen2 = +qkv bias, Qwen3 = +qk-norm)."""

    vocab_size: int = 260
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 32
    mlp_dim: int = 384
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    remat: str = "none"  # none | full | dots
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"
    init_std: float = 0.02
    mask_id: int | None = 259  # the diffusion [MASK] token; None for pure AR checkpoints
    bos_id: int | None = 256
    eos_id: int | None = 257
    pad_id: int | None = 258
    attention_impl: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "mlp_dim", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}; "
                "grouped-query attention needs num_heads = k * num_kv_heads")
        if self.remat not in ("none", "full", "dots"):
            raise ConfigError(f"remat={self.remat!r}; use one of 'none', 'full', 'dots'")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"{name}={getattr(self, name)!r}; use 'float32', 'bfloat16' or 'float16'")
        for name in ("mask_id", "bos_id", "eos_id", "pad_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size}); "
                                  f"set {name}=None or a valid id")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run: objective, data, optimizer, schedule, checkpoints, mesh.

    Each objective's own knobs (block size, loss weights, ...) live in `objective_options`, a
    sorted tuple of (name, value) pairs (a mapping is accepted and sorted); `jaxgen.objectives`
    validates them against that objective's options dataclass and sets them from key=value.
    """

    objective: str = "ar"  # a name in jaxgen.objectives.names()
    objective_options: tuple[tuple[str, Any], ...] = ()  # e.g. (("block_size", 8),); see jaxgen.objectives
    dataset: str = "python_stdlib"  # python_stdlib | text_files | any tfds name
    data_files: tuple[str, ...] = ()  # for dataset=text_files
    data_dir: str = ""  # tfds data_dir; "" = ~/.cache/jaxgen/tfds
    tokenizer: str = "bytes"  # bytes | path to a tokenizer.json
    max_files: int = 0  # python_stdlib: 0 = all files
    seq_len: int = 128
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 200
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    ckpt_every: int = 100
    keep_checkpoints: int = 3
    mesh: str = ""  # e.g. "data=2,fsdp=2,tensor=2"; "" = all devices on data
    rules: str = "fsdp"  # dp | fsdp | tp | fsdp+tp
    init_from: str = ""  # a jaxgen train folder whose latest params start this run (AR -> dLM adaptation)
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.objective, str) or not self.objective:
            raise ConfigError(f"objective={self.objective!r} must be an objective name (jaxgen.objectives.names())")
        object.__setattr__(self, "objective_options", normalize_options(self.objective_options))
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "log_every", "ckpt_every", "keep_checkpoints",
                     "eval_batches"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r} must be a positive integer")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")


OPTION_TYPES = (bool, int, float, str, type(None))  # what an objective option may hold (JSON round trip)


def normalize_options(options) -> tuple[tuple[str, Any], ...]:
    """(name, value) pairs sorted by name, from a mapping or pairs: the hashable form
    `TrainConfig.objective_options` keeps (and run_config.json stores as a mapping)."""
    items = list(options.items()) if isinstance(options, Mapping) else list(options)
    pairs = {}
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise ConfigError(f"objective_options entry {item!r} is not a (name, value) pair; pass a mapping "
                              "such as {'block_size': 8}")
        name, value = item
        if not isinstance(value, OPTION_TYPES):
            raise ConfigError(f"objective option {name}={value!r} must be a bool, int, float, str or None")
        if name in pairs:
            raise ConfigError(f"objective option {name!r} is given twice in objective_options")
        pairs[name] = value
    return tuple(sorted(pairs.items()))


def _model(**kw) -> ModelConfig:
    return ModelConfig(**kw)


# Presets: model + training defaults. `tiny` runs in seconds per step on 2 CPU cores; the large
# ones are the shapes people train on accelerators (bf16 compute, remat, fsdp+tp rules).
PRESETS: dict[str, tuple[ModelConfig, TrainConfig]] = {
    "tiny": (_model(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384,
                    max_seq_len=512),
             TrainConfig(seq_len=128, batch_size=16, steps=200, lr=3e-3)),
    "small": (_model(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=64, mlp_dim=768,
                     max_seq_len=1024),
              TrainConfig(seq_len=256, batch_size=32, steps=2000, lr=2e-3)),
    "base-125m": (_model(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
                         head_dim=64, mlp_dim=2048, max_seq_len=2048, dtype="bfloat16", remat="dots",
                         mask_id=31999, bos_id=1, eos_id=2, pad_id=0),
                  TrainConfig(seq_len=1024, batch_size=256, steps=50000, lr=6e-4, warmup_steps=2000,
                              rules="fsdp")),
    "llama-1b": (_model(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                        head_dim=64, mlp_dim=8192, max_seq_len=4096, rope_theta=500000.0, tie_embeddings=True,
                        dtype="bfloat16", remat="full", mask_id=128255, bos_id=128000, eos_id=128001,
                        pad_id=128004),
                 TrainConfig(seq_len=2048, batch_size=512, steps=100000, lr=3e-4, warmup_steps=2000,
                             rules="fsdp+tp")),
    "llama-8b-pod": (_model(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                            head_dim=128, mlp_dim=14336, max_seq_len=8192, rope_theta=500000.0,
                            dtype="bfloat16", remat="full", mask_id=128255, bos_id=128000, eos_id=128001,
                            pad_id=128004),
                     TrainConfig(seq_len=4096, batch_size=1024, steps=200000, lr=3e-4, warmup_steps=2000,
                                 rules="fsdp+tp")),
}


def preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    """The (model, train) config pair of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def parse_value(text: str, current: Any, key: str):
    """`text` parsed as the type of `current` (the value it replaces): bool, tuple, int, float, str."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r} is not a boolean; use true or false")
    if isinstance(current, tuple):
        return tuple(part for part in text.split(",") if part)
    if text.lower() == "none":
        return None
    try:
        if isinstance(current, int) or current is None and text.lstrip("-").isdigit():
            return int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError:
        raise ConfigError(f"{key}={text!r} is not a {type(current).__name__}") from None
    return text


def apply_overrides(model_cfg: ModelConfig, train_cfg: TrainConfig,
                    overrides: Sequence[str] | Mapping[str, Any] = ()) -> tuple[ModelConfig, TrainConfig]:
    """Apply `key=value` strings (or a mapping) to whichever config owns the key."""
    items = override_items(overrides)
    model_kw, train_kw = {}, {}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in items:
        key = key.removeprefix("model.").removeprefix("train.")
        if key in model_fields:
            target, cfg = model_kw, model_cfg
        elif key in train_fields:
            target, cfg = train_kw, train_cfg
        else:
            raise ConfigError(f"unknown config key {key!r}; model keys: {', '.join(sorted(model_fields))}; "
                              f"train keys: {', '.join(sorted(train_fields))}")
        target[key] = parse_value(value, getattr(cfg, key), key) if isinstance(value, str) else value
    return dataclasses.replace(model_cfg, **model_kw), dataclasses.replace(train_cfg, **train_kw)


def override_items(overrides: Sequence[str] | Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(key, value) pairs of `key=value` strings (or of a mapping), in order."""
    return list(overrides.items()) if isinstance(overrides, Mapping) else [_split(o) for o in overrides]


def _split(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. hidden_size=256)")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def model_config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(d) - fields
    if unknown:
        raise ConfigError(f"unknown ModelConfig keys {sorted(unknown)}")
    return ModelConfig(**d)
