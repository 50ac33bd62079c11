"""The model's vocabulary follows the run's tokenizer; the corpus stays inside it.

A run trains on token ids from `TrainConfig.tokenizer`, so the model config must agree with that
tokenizer: at least its vocabulary, its BOS/EOS/PAD ids (packing writes them), and a [MASK] id
that the data never holds (a mask id that is an ordinary text token silently corrupts masked
objectives). `model_for_tokenizer` derives such a config (what `jaxgen train` runs), and
`check_model` / `check_rows` refuse a config or a corpus that breaks the agreement.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxgen import objectives
from jaxgen.data.tokenizers import MASK_NAMES
from jaxgen.errors import ConfigError, JaxgenError
from jaxgen.objectives.registry import MODEL

SPECIAL_IDS = ("bos_id", "eos_id", "pad_id")
VOCAB_FIELDS = ("vocab_size", "mask_id") + SPECIAL_IDS


def needs_mask(tcfg) -> bool:
    """Whether tcfg's objective feeds [MASK] tokens to the model (all but plain AR; AR with MEAP does)."""
    if tcfg.objective == "ar":
        return getattr(objectives.options_of(tcfg), "meap_ratio", 0.0) > 0
    return objectives.get(tcfg.objective).trains == MODEL


def _mask_fixes(tokenizer, vocab: int) -> str:
    return (f"add a mask token to the tokenizer (e.g. tokenizer.add_special_tokens(['<|mask|>']) and save it), "
            f"name an unused special token of it with mask_token=<token>, or give the model an extra id with "
            f"mask_id={vocab} vocab_size={vocab + 1}")


def _mask_id(cfg, tcfg, tokenizer, vocab: int, explicit) -> int | None:
    """The [MASK] id: the explicit mask_id, else mask_token's id, else the tokenizer's mask token."""
    if "mask_id" in explicit:
        return cfg.mask_id
    if tcfg.mask_token:
        found = tokenizer.token_id(tcfg.mask_token)
        if found is None:
            raise ConfigError(f"mask_token={tcfg.mask_token!r} is not a token of tokenizer {tokenizer.name}; "
                              f"{_mask_fixes(tokenizer, vocab)}")
        return found
    if tokenizer.mask_id is None and needs_mask(tcfg):
        raise ConfigError(f"tokenizer {tokenizer.name} has no mask token (looked for {', '.join(MASK_NAMES)}) and "
                          f"objective={tcfg.objective} needs one: {_mask_fixes(tokenizer, vocab)}")
    return tokenizer.mask_id


def model_for_tokenizer(cfg, tcfg, tokenizer, explicit=()):
    """`cfg` with the vocabulary and special ids of `tokenizer`: vocab_size = its vocabulary, BOS /
    EOS / PAD = its special tokens, MASK = `tcfg.mask_token` or its mask token (None for plain AR
    when it has none). `explicit` names ModelConfig fields the user set (vocab_size: a larger,
    padded vocabulary; mask_id: an extra id or a reserved special token); they are kept if valid."""
    vocab = tokenizer.vocab_size
    if "vocab_size" in explicit:
        if cfg.vocab_size < vocab:
            raise ConfigError(f"vocab_size={cfg.vocab_size} is smaller than the vocabulary of tokenizer "
                              f"{tokenizer.name} ({vocab} tokens); drop vocab_size= or set it >= {vocab}")
        vocab = cfg.vocab_size
    ids = {}
    for name in SPECIAL_IDS:
        theirs, ours = getattr(tokenizer, name), getattr(cfg, name)
        if name in explicit and theirs is not None and ours != theirs:
            raise ConfigError(f"{name}={ours} but tokenizer {tokenizer.name} has {name}={theirs} "
                              f"({tokenizer.token(theirs)!r}); drop {name}= (the model takes the tokenizer's)")
        ids[name] = theirs if theirs is not None or name not in explicit else ours
    ids["mask_id"] = _mask_id(cfg, tcfg, tokenizer, vocab, explicit)
    try:
        new = dataclasses.replace(cfg, vocab_size=vocab, **ids)
    except ConfigError as e:
        raise ConfigError(f"{e} (tokenizer {tokenizer.name}, vocabulary {tokenizer.vocab_size})") from None
    check_model(new, tcfg, tokenizer)
    return new


def check_model(cfg, tcfg, tokenizer) -> None:
    """Refuse a model config that disagrees with the run's tokenizer (see the module docstring)."""
    fix = ("derive the model config with jaxgen.training.vocab.model_for_tokenizer(cfg, tcfg, tokenizer) "
           "(jaxgen train does)")
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"vocab_size={cfg.vocab_size} is smaller than the vocabulary of tokenizer "
                          f"{tokenizer.name} ({tokenizer.vocab_size} tokens); {fix}")
    for name in SPECIAL_IDS:
        theirs = getattr(tokenizer, name)
        if theirs is not None and getattr(cfg, name) != theirs:
            raise ConfigError(f"{name}={getattr(cfg, name)} but tokenizer {tokenizer.name} writes {theirs} "
                              f"({tokenizer.token(theirs)!r}); {fix}")
    mask = cfg.mask_id
    if mask is None:
        if needs_mask(tcfg):
            raise ConfigError(f"objective={tcfg.objective} needs a mask_id; "
                              f"{_mask_fixes(tokenizer, tokenizer.vocab_size)}")
        return
    if mask in {getattr(cfg, name) for name in SPECIAL_IDS}:
        raise ConfigError(f"mask_id={mask} is also the model's BOS, EOS or PAD id; "
                          f"{_mask_fixes(tokenizer, tokenizer.vocab_size)}")
    if mask < tokenizer.vocab_size and not tokenizer.is_special(mask):
        raise ConfigError(f"mask_id={mask} is the ordinary token {tokenizer.token(mask)!r} of tokenizer "
                          f"{tokenizer.name}, which text encodes to; {_mask_fixes(tokenizer, tokenizer.vocab_size)}")


def check_rows(cfg, tcfg, rows, what: str = "corpus") -> None:
    """Refuse token rows with ids outside the model's vocabulary, or holding the [MASK] id of a
    masked objective (both train on garbage: NaN losses or a corrupted mask)."""
    rows = np.asarray(rows)
    if rows.size == 0:
        return
    low, high = int(rows.min()), int(rows.max())
    if low < 0 or high >= cfg.vocab_size:
        bad = low if low < 0 else high
        raise JaxgenError(f"the {what} holds token id {bad}, outside the model's vocabulary [0, {cfg.vocab_size}) "
                          f"(tokenizer={tcfg.tokenizer}); the model config must follow the tokenizer: "
                          "jaxgen.training.vocab.model_for_tokenizer (jaxgen train does)")
    if cfg.mask_id is not None and needs_mask(tcfg):
        count = int(np.count_nonzero(rows == cfg.mask_id))
        if count:
            raise JaxgenError(f"the {what} holds the mask id {cfg.mask_id} {count} times (tokenizer="
                              f"{tcfg.tokenizer}); objective={tcfg.objective} would mistake those tokens for "
                              "masks: use a mask_id the data never holds (a special token, or an extra id "
                              "mask_id=V vocab_size=V+1)")
