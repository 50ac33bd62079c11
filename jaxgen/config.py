"""Frozen, hashable configs, named presets and `key=value` overrides.

Configs are static arguments to jitted functions, so they are frozen dataclasses; anything a
user can misspell (a preset, an override key, a value) fails here with a message naming it.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Sequence

from jaxgen.errors import ConfigError

ROPE_TYPES = {  # rope_type -> the RopeScaling fields it requires (the others it reads are optional)
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
}
_ROPE_OPTIONAL = {"yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")}
_ROPE_INT_FIELDS = ("original_max_position_embeddings",)
_ROPE_BOOL_FIELDS = ("truncate",)


@dataclasses.dataclass(frozen=True, repr=False)
class RopeScaling:
    """RoPE frequency scaling, as Hugging Face's `rope_scaling` / `rope_parameters` (the math is
    `jaxgen.layers.rope_inv_freq`). Unused fields stay None.

    default: plain RoPE. linear: frequencies / factor. llama3 (Llama 3.1/3.2): low frequencies /
    factor, high ones kept, a smooth ramp between (low/high_freq_factor over
    original_max_position_embeddings). yarn: per-frequency blend of interpolation and extrapolation
    (beta_fast/beta_slow ramp), cos/sin scaled by attention_factor (default 0.1 ln(factor) + 1, or
    from mscale/mscale_all_dim). dynamic (NTK): theta grows with the sequence length
    s = max(positions) + 1 of each forward call once s > original_max_position_embeddings (for
    checkpoints: max_position_embeddings), as transformers does for a fresh model; see
    `jaxgen.layers.rope_inv_freq`.
    """

    rope_type: str = "default"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_scaling type {self.rope_type!r} is unknown; supported: {', '.join(ROPE_TYPES)}")
        allowed = ROPE_TYPES[self.rope_type] + _ROPE_OPTIONAL.get(self.rope_type, ())
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "rope_type" or value is None:
                continue
            if f.name not in allowed:
                raise ConfigError(f"rope_scaling field {f.name}={value!r} is not used by rope_type="
                                  f"{self.rope_type!r} (it reads {', '.join(allowed) or 'no fields'})")
            if f.name in _ROPE_BOOL_FIELDS:
                if not isinstance(value, bool):
                    raise ConfigError(f"rope_scaling {f.name}={value!r} must be true or false")
                continue
            try:
                value = int(value) if f.name in _ROPE_INT_FIELDS else float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"rope_scaling {f.name}={value!r} must be a number") from None
            object.__setattr__(self, f.name, value)
        missing = [name for name in ROPE_TYPES[self.rope_type]
                   if getattr(self, name) is None and name != "original_max_position_embeddings"]
        if missing:
            raise ConfigError(f"rope_scaling type {self.rope_type!r} needs {', '.join(missing)}")
        if self.factor is not None and self.factor <= 0:
            raise ConfigError(f"rope_scaling factor={self.factor} must be positive")
        if self.original_max_position_embeddings is not None and self.original_max_position_embeddings <= 0:
            raise ConfigError(f"rope_scaling original_max_position_embeddings="
                              f"{self.original_max_position_embeddings} must be positive")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ConfigError(f"llama3 rope_scaling needs high_freq_factor ({self.high_freq_factor}) > "
                              f"low_freq_factor ({self.low_freq_factor})")

    def __repr__(self):
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                           if getattr(self, f.name) is not None)
        return f"RopeScaling({fields})"

    @classmethod
    def parse(cls, value) -> "RopeScaling":
        """A RopeScaling from itself, None (plain RoPE), a mapping of its fields, or text: a JSON
        object or `name=value` pairs, e.g. `rope_type=linear,factor=2` (a bare type name also works)."""
        if isinstance(value, cls):
            return value
        if value is None:
            return cls()
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                import json
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"rope_scaling={value!r} is not valid JSON: {e}") from None
            else:
                value = {}
                for part in filter(None, (p.strip() for p in text.split(","))):
                    name, sep, item = part.partition("=")
                    if not sep:
                        name, item = "rope_type", part
                    name, item = name.strip(), item.strip()
                    value[name] = (item.lower() in ("1", "true", "yes", "on") if name in _ROPE_BOOL_FIELDS
                                   else None if item.lower() == "none" else item)
        if not isinstance(value, Mapping):
            raise ConfigError(f"rope_scaling={value!r}; pass a RopeScaling, a mapping of its fields or "
                              "'rope_type=linear,factor=2'")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(f"unknown rope_scaling fields {unknown}; fields: {', '.join(sorted(names))}")
        return cls(**value)


ATTENTION_IMPLS = ("auto", "xla", "pallas", "cudnn", "splash")  # served by jaxgen.attention.attention


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
    rope_scaling: RopeScaling = RopeScaling()  # a mapping / "rope_type=linear,factor=2" is accepted too
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
    attention_impl: str = "auto"  # auto | xla | pallas | cudnn | splash (jaxgen.attention)

    def __post_init__(self):
        rope = RopeScaling.parse(self.rope_scaling)
        if "original_max_position_embeddings" in ROPE_TYPES[rope.rope_type] and \
                rope.original_max_position_embeddings is None:  # as transformers: the model's own length
            rope = dataclasses.replace(rope, original_max_position_embeddings=int(self.max_seq_len))
        object.__setattr__(self, "rope_scaling", rope)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "mlp_dim", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}; "
                "grouped-query attention needs num_heads = k * num_kv_heads")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl={self.attention_impl!r}; use one of {', '.join(ATTENTION_IMPLS)}")
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
    tokenizer: str = "bytes"  # bytes | path to a tokenizer.json (the model's vocabulary and special ids follow it)
    mask_token: str = ""  # the tokenizer's token to use as [MASK]; "" = its <|mask|>, <mask>, [MASK], ...
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
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "log_every", "eval_every", "ckpt_every",
                     "keep_checkpoints", "eval_batches", "warmup_steps", "seed", "max_files"):
            value, least = getattr(self, name), 0 if name in ("warmup_steps", "seed", "max_files") else 1
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ConfigError(f"TrainConfig.{name}={value!r} must be an integer >= {least}")
        for name, low, high, closed, example in _TRAIN_RANGES:
            _check_range(name, getattr(self, name), low, high, closed, example)
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")


# TrainConfig's real-valued knobs: (field, low, high, (low included, high included), an example)
_TRAIN_RANGES = (("lr", 0.0, math.inf, (False, False), "3e-3"), ("min_lr_ratio", 0.0, 1.0, (True, True), "0.1"),
                 ("weight_decay", 0.0, math.inf, (True, False), "0.1"), ("b1", 0.0, 1.0, (True, False), "0.9"),
                 ("b2", 0.0, 1.0, (True, False), "0.95"), ("grad_clip", 0.0, math.inf, (False, False), "1.0"))


def _check_range(name: str, value, low: float, high: float, closed: tuple[bool, bool], example: str) -> None:
    """A finite number in the interval (low, high), with ends included as `closed` says."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if closed[0] else value > low) and (value <= high if closed[1] else value < high)
    if not ok:
        interval = f"{'[' if closed[0] else '('}{low:g}, {high:g}{']' if closed[1] else ')'}"
        raise ConfigError(f"TrainConfig.{name}={value!r} must be a finite number in {interval} (e.g. {name}={example})")


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


# Llama 3.2 1B's and Llama 3.1 8B's rope_scaling (their config.json files).
LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

# Presets: model + training defaults. `tiny` runs in seconds per step on 2 CPU cores; the large
# ones are the shapes people train on accelerators (bf16 compute, remat, fsdp+tp rules). A preset
# fixes the backbone, not the vocabulary: every preset trains with the byte tokenizer unless told
# otherwise, so its vocab_size and special ids are the byte tokenizer's, and `jaxgen train
# tokenizer=<tokenizer.json>` takes them from that tokenizer instead (a Llama 3 tokenizer.json
# gives vocab 128256, BOS 128000, EOS 128001; see jaxgen.training.vocab.model_for_tokenizer).
PRESETS: dict[str, tuple[ModelConfig, TrainConfig]] = {
    "tiny": (_model(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384,
                    max_seq_len=512),
             TrainConfig(seq_len=128, batch_size=16, steps=200, lr=3e-3)),
    "small": (_model(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=64, mlp_dim=768,
                     max_seq_len=1024),
              TrainConfig(seq_len=256, batch_size=32, steps=2000, lr=2e-3)),
    "base-125m": (_model(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
                         head_dim=64, mlp_dim=2048, max_seq_len=2048, dtype="bfloat16", remat="dots"),
                  TrainConfig(seq_len=1024, batch_size=256, steps=50000, lr=6e-4, warmup_steps=2000,
                              rules="fsdp")),
    "llama-1b": (_model(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                        head_dim=64, mlp_dim=8192, max_seq_len=4096, rope_theta=500000.0, tie_embeddings=True,
                        rope_scaling=RopeScaling(factor=32.0, **LLAMA3_ROPE),
                        dtype="bfloat16", remat="full"),
                 TrainConfig(seq_len=2048, batch_size=512, steps=100000, lr=3e-4, warmup_steps=2000,
                             rules="fsdp+tp")),
    "llama-8b-pod": (_model(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                            head_dim=128, mlp_dim=14336, max_seq_len=8192, rope_theta=500000.0,
                            rope_scaling=RopeScaling(factor=8.0, **LLAMA3_ROPE),
                            dtype="bfloat16", remat="full"),
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
