"""Argument validation shared by the samplers: each raises a JaxgenError (a ValueError) that
names the bad value and the fix."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxgen.errors import JaxgenError
from jaxgen.model import check_tokens


def check_prompt(prompt, cfg, total_len: int, *, diffusion: bool, prompt_lengths=None):
    """Validate ids and total length; diffusion prompts may not contain the mask token (outside
    the padding of a ragged batch)."""
    check_tokens(prompt, cfg, "prompt")
    if total_len > cfg.max_seq_len:
        raise JaxgenError(f"prompt + new tokens = {total_len} exceeds the model's max_seq_len={cfg.max_seq_len}; "
                          "shorten the prompt or ask for fewer tokens")
    if diffusion:
        if cfg.mask_id is None:
            raise JaxgenError("this model config has mask_id=None; diffusion sampling needs a mask token "
                              "(set mask_id in the config or pass mask_id=...)")
        if isinstance(prompt, jax.core.Tracer):
            return
        arr = np.asarray(prompt)
        real = np.ones(arr.shape, bool) if prompt_lengths is None else (
            np.arange(arr.shape[1])[None, :] < np.asarray(prompt_lengths)[:, None])
        if np.any((arr == cfg.mask_id) & real):
            raise JaxgenError(f"the prompt contains the mask token id {cfg.mask_id}; prompts must be clean tokens")


def check_prompt_lengths(prompt_lengths, prompt_shape):
    """Per-row prompt lengths of a right-padded [B, P] prompt: None, or B ints in [1, P]."""
    if prompt_lengths is None:
        return None
    if isinstance(prompt_lengths, jax.core.Tracer):
        raise JaxgenError("prompt_lengths must be concrete (a list or array), not a traced value")
    lengths = np.asarray(prompt_lengths)
    B, P = prompt_shape
    if lengths.shape != (B,) or not np.issubdtype(lengths.dtype, np.integer):
        raise JaxgenError(f"prompt_lengths must be {B} integers (one per prompt row), got shape {lengths.shape} "
                          f"and dtype {lengths.dtype}")
    if lengths.min() < 1 or lengths.max() > P:
        bad = int(lengths[(lengths < 1) | (lengths > P)][0])
        raise JaxgenError(f"prompt_lengths holds {bad}; each row's length must lie in [1, {P}] (the padded "
                          "prompt width)")
    return lengths.astype(np.int32)


def check_choice(name: str, value, choices):
    if value not in choices:
        raise JaxgenError(f"{name}={value!r}; use one of {', '.join(map(repr, choices))}")


def check_threshold(threshold, name: str = "threshold"):
    if threshold is not None and not 0.0 < float(threshold) <= 1.0:
        raise JaxgenError(f"{name}={threshold} must lie in (0, 1]")


def check_positive(**values):
    """Each named value must be a positive integer."""
    bad = {k: v for k, v in values.items() if int(v) <= 0}
    if bad:
        raise JaxgenError(", ".join(f"{k}={v}" for k, v in values.items()) + " must be positive")


def with_mask_id(cfg, mask_id):
    """The config with `mask_id` overridden (validated against the vocabulary)."""
    if mask_id is None:
        return cfg
    if not 0 <= int(mask_id) < cfg.vocab_size:
        raise JaxgenError(f"mask_id={mask_id} is outside the vocabulary [0, {cfg.vocab_size})")
    return dataclasses.replace(cfg, mask_id=int(mask_id))
