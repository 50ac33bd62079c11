"""Argument validation shared by the samplers: each raises a JaxgenError (a ValueError) that
names the bad value and the fix.

One helper per rule, called by every sampler's `generate` before its jitted call, so a bad
argument fails before anything compiles. Samplers may themselves be called inside a user's
`jit`: a check that reads a value skips it when the value is a tracer (shapes are always known,
so shape checks still apply)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import JaxgenError
from jaxgen.model import check_tokens


def concrete(value) -> bool:
    """Whether `value` can be read now (not a tracer of an enclosing jit)."""
    return not isinstance(value, jax.core.Tracer)


def as_prompt(prompt):
    """`prompt` as an int32 [batch, length] array, refusing a 1-D, empty or non-integer one (the
    shape checks apply to tracers too)."""
    shape = np.shape(prompt)
    if len(shape) != 2:
        hint = "; for one prompt pass prompt[None] (or [ids])" if len(shape) == 1 else ""
        raise JaxgenError(f"prompt must be a [batch, length] array of token ids, got shape {shape}{hint}")
    if shape[0] == 0:
        raise JaxgenError(f"prompt has shape {shape}: a batch of 0 prompts; pass at least one row")
    if shape[1] == 0:
        raise JaxgenError(f"prompt has shape {shape}: empty prompts; every sampler needs at least one prompt token "
                          "(e.g. the BOS id)")
    dtype = getattr(prompt, "dtype", None)
    dtype = np.asarray(prompt).dtype if dtype is None else np.dtype(dtype)
    if not np.issubdtype(dtype, np.integer):
        raise JaxgenError(f"prompt must hold integer token ids, got dtype {dtype}")
    return jnp.asarray(prompt, jnp.int32)


def gen_length_of(gen_length, max_new_tokens, default: int = 128) -> int:
    """The one output length of a sampler that also takes Hugging Face's `max_new_tokens` name:
    passing both is refused."""
    if max_new_tokens is not None:
        if gen_length is not None:
            raise JaxgenError(f"gen_length={gen_length} and max_new_tokens={max_new_tokens} are one option under "
                              "two names; pass only gen_length")
        return max_new_tokens
    return default if gen_length is None else gen_length


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
        real = np.ones(np.shape(prompt), bool) if prompt_lengths is None else (
            np.arange(np.shape(prompt)[1])[None, :] < np.asarray(prompt_lengths)[:, None])
        if isinstance(prompt, jax.Array) and len(prompt.sharding.device_set) > 1:  # sharded: no host copy
            has_mask = bool(jax.jit(lambda p: jnp.any((p == cfg.mask_id) & real))(prompt))
        else:
            has_mask = np.any((np.asarray(prompt) == cfg.mask_id) & real)
        if has_mask:
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
    if threshold is not None and concrete(threshold) and not 0.0 < float(threshold) <= 1.0:
        raise JaxgenError(f"{name}={threshold} must lie in (0, 1]")


def check_temperature(value, name: str = "temperature"):
    """A sampling temperature (or Dream's `alg_temp`): a finite number >= 0 (0 = greedy)."""
    if not concrete(value):
        return
    try:
        ok = bool(np.isfinite(float(value)) and float(value) >= 0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise JaxgenError(f"{name}={value} must be a finite number >= 0 (0 = greedy)")


def check_top_p(top_p):
    """The nucleus mass: None (no filter) or a number in (0, 1] (1 = no filter)."""
    if top_p is not None and concrete(top_p) and not 0.0 < float(top_p) <= 1.0:
        raise JaxgenError(f"top_p={top_p} must lie in (0, 1] (1 = no nucleus filter)")


def check_top_k(top_k, off=0):
    """The number of candidates kept: an integer; `off` (0, or None in Dream's samplers) means no
    filter, so top_k >= 0 (or None / >= 1)."""
    if top_k is None:
        if off is None:
            return
        raise JaxgenError(f"top_k=None; pass an integer (top_k={off} = no top-k filter)")
    if not concrete(top_k):
        return
    value = np.asarray(top_k)
    if value.ndim or not np.issubdtype(value.dtype, np.integer):
        raise JaxgenError(f"top_k={top_k!r} must be an integer")
    if int(value) < (1 if off is None else 0):
        raise JaxgenError(f"top_k={top_k} must be " + ("positive (or None for no top-k filter)" if off is None
                                                       else "an integer >= 0 (0 = no top-k filter)"))


def check_filters_need_sampling(temperature, top_k=0, top_p=1.0):
    """top-k / top-p change nothing in a sampler whose temperature-0 step takes the plain argmax;
    asking for them there is refused rather than dropped."""
    if not (concrete(temperature) and concrete(top_k) and concrete(top_p)) or float(temperature) != 0:
        return
    given = [f"{n}={v}" for n, v, off in (("top_k", top_k, 0), ("top_p", top_p, 1.0)) if v not in (None, off)]
    if given:
        raise JaxgenError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} only when sampling: at "
                          "temperature=0 decoding is greedy (argmax); pass temperature > 0 or drop "
                          + ("them" if len(given) > 1 else "it"))


def check_not_given(why: str, **values):
    """Options that do not apply (`why` says when they would) must not be passed: each value
    must be None (False for a switch)."""
    given = [f"{n}={v!r}" if isinstance(v, (bool, int, float, str)) else n
             for n, v in values.items() if v is not None and v is not False]
    if given:
        raise JaxgenError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply {why}")


def check_nonnegative(**values):
    """Each named (concrete) value must be >= 0."""
    bad = {k: v for k, v in values.items() if concrete(v) and not float(v) >= 0}
    if bad:
        raise JaxgenError(", ".join(f"{k}={v}" for k, v in bad.items()) + " must be >= 0")


def check_positive(**values):
    """Each named value must be a positive integer."""
    bad = {k: v for k, v in values.items() if concrete(v) and int(v) <= 0}
    if bad:
        raise JaxgenError(", ".join(f"{k}={v}" for k, v in values.items()) + " must be positive")


def with_mask_id(cfg, mask_id):
    """The config with `mask_id` overridden (validated against the vocabulary)."""
    if mask_id is None:
        return cfg
    if not 0 <= int(mask_id) < cfg.vocab_size:
        raise JaxgenError(f"mask_id={mask_id} is outside the vocabulary [0, {cfg.vocab_size})")
    return dataclasses.replace(cfg, mask_id=int(mask_id))
