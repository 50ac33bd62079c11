"""Objective options in a TrainConfig: resolve, set from key=value, migrate old run records.

`TrainConfig.objective_options` holds only the knobs that differ from the objective's defaults
(sorted (name, value) pairs), so two configs that train the same thing compare equal. Setting a
different objective starts from that objective's defaults.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from jaxgen import config as config_lib
from jaxgen.errors import ConfigError
from jaxgen.objectives.options import Options
from jaxgen.objectives.registry import get, names

# Keys that sat at the top level of TrainConfig before the registry (old run_config.json files),
# and the option each became where it was renamed.
LEGACY_KEYS = ("block_size", "tidar_alpha", "aux_ar_weight", "curriculum_steps", "position_mask_beta",
               "filter_gen_length", "filter_block_length", "filter_rollouts", "antithetic", "sampling_eps",
               "meap_ratio")
RENAMED = {"tidar_alpha": "alpha"}

_MODEL_KEYS = frozenset(f.name for f in dataclasses.fields(config_lib.ModelConfig))
_TRAIN_KEYS = frozenset(f.name for f in dataclasses.fields(config_lib.TrainConfig)) - {"objective_options"}


def _option_key(objective: str, key: str) -> str | None:
    """`key` as an option name of `objective` (old names renamed), or None if it is not one."""
    fields = get(objective).option_names()
    key = RENAMED.get(key, key) if RENAMED.get(key) in fields else key
    return key if key in fields else None


def build_options(objective: str, values: Mapping[str, Any] = ()) -> Options:
    """`objective`'s options dataclass from `values` (validated; unknown keys name the valid ones)."""
    spec = get(objective)
    kwargs = {}
    for key, value in dict(values).items():
        name = _option_key(objective, key)
        if name is None:
            raise ConfigError(f"objective {objective!r} has no option {key!r}; its options: "
                              f"{', '.join(spec.option_names()) or '(none)'}")
        kwargs[name] = value
    return spec.Options(**kwargs)


def canonical(options: Options) -> tuple[tuple[str, Any], ...]:
    """The options that differ from their defaults, as TrainConfig.objective_options stores them."""
    defaults = type(options)()
    return config_lib.normalize_options({f.name: getattr(options, f.name) for f in dataclasses.fields(options)
                                         if getattr(options, f.name) != getattr(defaults, f.name)})


def options_of(tcfg) -> Options:
    """The validated options of `tcfg`'s objective, checked against the run (seq_len, ...)."""
    options = build_options(tcfg.objective, dict(tcfg.objective_options))
    options.check_train(tcfg)
    return options


def loss_for(tcfg, options: Options | None = None):
    """`tcfg`'s loss(params, cfg, batch, key) with its options (or `options`, e.g. a curriculum
    stage from `options.at_step(step)`) bound."""
    return get(tcfg.objective).bind(options if options is not None else options_of(tcfg))


def configure(tcfg, **kwargs):
    """`tcfg` with TrainConfig fields and objective options set from one set of keywords, e.g.
    `configure(tcfg, objective="nbdiff", block_size=8, steps=300)`; values are typed, not strings."""
    objective = kwargs.get("objective", tcfg.objective)
    generic = {k: v for k, v in kwargs.items() if k in _TRAIN_KEYS}
    current = dict(tcfg.objective_options) if objective == tcfg.objective else {}
    values = dict(current, **{k: v for k, v in kwargs.items() if k not in _TRAIN_KEYS})
    new = dataclasses.replace(tcfg, objective_options=(), **generic)
    options = build_options(objective, values)
    options.check_train(new)
    return dataclasses.replace(new, objective_options=canonical(options))


def _strip(key: str) -> str:
    return key.removeprefix("model.").removeprefix("train.")


def apply_overrides(model_cfg, tcfg, overrides: Sequence[str] | Mapping[str, Any] = ()):
    """`config.apply_overrides` that also sets the objective's options: `key=value` strings (or a
    mapping) go to the model config, the train config or the objective's options, whichever owns
    the key. An unknown key's error lists all three."""
    items = [(_strip(k), v) for k, v in config_lib.override_items(overrides)]
    objective = next((v for k, v in reversed(items) if k == "objective"), tcfg.objective)
    get(objective)
    config_items = [(k, v) for k, v in items if k in _MODEL_KEYS or k in _TRAIN_KEYS]
    option_items = [(k, v) for k, v in items if k not in _MODEL_KEYS and k not in _TRAIN_KEYS]
    for key, _ in option_items:
        if _option_key(objective, key) is None:
            raise ConfigError(f"unknown config key {key!r}; {objective} options: "
                              f"{', '.join(get(objective).option_names()) or '(none)'}; model keys: "
                              f"{', '.join(sorted(_MODEL_KEYS))}; train keys: {', '.join(sorted(_TRAIN_KEYS))}")
    new_model, new_train = config_lib.apply_overrides(model_cfg, tcfg, dict(config_items))
    defaults = build_options(objective, dict(tcfg.objective_options) if objective == tcfg.objective else {})
    values = {}
    for key, value in option_items:
        name = _option_key(objective, key)
        values[name] = config_lib.parse_value(value, getattr(defaults, name), key) if isinstance(value, str) else value
    return new_model, configure(dataclasses.replace(new_train, objective=tcfg.objective), objective=objective,
                                **values)


def _is_option(key: str) -> bool:
    """Whether `key` is an option of some registered objective (and no config field)."""
    return key not in _MODEL_KEYS and key not in _TRAIN_KEYS and any(_option_key(n, key) for n in names())


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(config overrides, objective-option overrides) of `key=value` strings, for commands that
    train several objectives from one list (unknown keys go with the config ones, to be refused)."""
    keys = [_strip(config_lib.override_items([text])[0][0]) for text in overrides]
    return ([t for t, k in zip(overrides, keys) if not _is_option(k)],
            [t for t, k in zip(overrides, keys) if _is_option(k)])


def check_options_read(option_overrides: Sequence[str], objectives: Sequence[str]) -> None:
    """Refuse option overrides that none of `objectives` (those a command trains) reads, rather
    than drop them: e.g. `hidden=3` (a flow_matching option) given to the demo."""
    keys = [_strip(config_lib.override_items([text])[0][0]) for text in option_overrides]
    unread = [k for k in keys if not any(_option_key(n, k) for n in objectives)]
    if unread:
        raise ConfigError(f"{', '.join(unread)}: no objective this command trains ({', '.join(sorted(objectives))}) "
                          "reads these options; drop them")


def overrides_for(overrides: Sequence[str], objective: str) -> list[str]:
    """The `key=value` strings that apply to `objective`: drops the options of other objectives."""
    return [t for t in overrides
            if not _is_option(k := _strip(config_lib.override_items([t])[0][0])) or _option_key(objective, k)]


def migrate_legacy(train: Mapping[str, Any]) -> dict:
    """A run_config.json "train" record with the knobs at top level (before the registry) in
    today's form: knobs the objective has move into objective_options (when not the default),
    the others are dropped (they never affected that objective)."""
    train = dict(train)
    legacy = {k: train.pop(k) for k in LEGACY_KEYS if k in train}
    if not legacy:
        return train
    objective = train.get("objective", "ar")
    options = dict(train.get("objective_options") or {})
    for key, value in legacy.items():
        name = _option_key(objective, key)
        if name is not None and name not in options:
            options[name] = value
    train["objective_options"] = canonical(build_options(objective, options))
    return train
