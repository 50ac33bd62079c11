"""The llguidance back end, imported only when a constraint is built: a jaxgen tokenizer as an
`LLTokenizer`, and grammar compilation with errors that carry llguidance's message.

Tokenizers: `ByteTokenizer` is handed over as a plain vocabulary (`TokenizerWrapper` over 256
one-byte tokens plus its four special tokens, marked special); `HFTokenizer` passes its
tokenizer.json text to `LLTokenizer` (llguidance reads the HF tokenizers JSON itself, no
transformers, no network). Either way the llguidance vocabulary has the tokenizer's ids.
"""
from __future__ import annotations

import json
import weakref

import numpy as np

from jaxgen.data.tokenizers import ByteTokenizer, HFTokenizer
from jaxgen.errors import JaxgenError

INSTALL_HINT = ("constrained decoding needs the llguidance package: pip install 'jaxgen[constraints]' "
                "(or pip install llguidance)")
TOKENIZER_HINT = "a jaxgen tokenizer: ByteTokenizer or HFTokenizer; get one with jaxgen.data.tokenizers.get_tokenizer"
SHOWN_CHARS = 300  # how much of an offending schema / pattern / grammar an error quotes


def llguidance():
    """The llguidance module, or a JaxgenError saying how to install it."""
    try:
        import llguidance as llg
    except ImportError:
        raise JaxgenError(INSTALL_HINT) from None
    return llg


class _ByteVocabulary:
    """ByteTokenizer in the shape `llguidance.TokenizerWrapper` reads."""

    def __init__(self, tok: ByteTokenizer):
        names = {v: k for k, v in tok.SPECIAL.items()}
        self.tokens = [bytes([i]) for i in range(256)] + [names[i].encode() for i in range(256, tok.vocab_size)]
        self.eos_token_id = tok.eos_id
        self.bos_token_id = tok.bos_id
        self.special_token_ids = sorted(tok.SPECIAL.values())

    def __call__(self, data: bytes) -> list[int]:
        return list(data)


_LL_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # HFTokenizer -> LLTokenizer
_BYTE_LL_TOKENIZER: list = []  # every ByteTokenizer has the same vocabulary: built once


def check_tokenizer(tokenizer):
    if not isinstance(tokenizer, (ByteTokenizer, HFTokenizer)):
        raise JaxgenError(f"constraints need {TOKENIZER_HINT} (got {type(tokenizer).__name__})")
    if tokenizer.eos_id is None:
        raise JaxgenError(f"the tokenizer {tokenizer.name} has no EOS token; constrained decoding ends every row "
                          "with EOS, so it needs one")


def ll_tokenizer(tokenizer):
    """The llguidance tokenizer of a jaxgen tokenizer (built once per tokenizer object)."""
    check_tokenizer(tokenizer)
    llg = llguidance()
    if isinstance(tokenizer, ByteTokenizer):
        if not _BYTE_LL_TOKENIZER:
            _BYTE_LL_TOKENIZER.append(llg.LLTokenizer(llg.TokenizerWrapper(_ByteVocabulary(tokenizer))))
        return _BYTE_LL_TOKENIZER[0]
    if tokenizer not in _LL_TOKENIZERS:
        _LL_TOKENIZERS[tokenizer] = llg.LLTokenizer(tokenizer._tok.to_str(), n_vocab=tokenizer.vocab_size,
                                                    eos_token=tokenizer.eos_id)
    return _LL_TOKENIZERS[tokenizer]


def allowed_words(tokenizer, words: int) -> np.ndarray:
    """int32 [words]: the bits of every id a constraint may ever allow, i.e. the tokenizer's
    non-special ids plus EOS (BOS, PAD, MASK, reserved tokens and ids past the tokenizer's
    vocabulary never)."""
    ok_V = np.zeros(words * 32, bool)
    ids = np.arange(tokenizer.vocab_size)
    ok_V[: tokenizer.vocab_size] = [not tokenizer.is_special(int(i)) for i in ids]
    ok_V[tokenizer.eos_id] = True
    return pack_bits(ok_V[None])[0]


def pack_bits(ok_BV) -> np.ndarray:
    """bool [..., 32 * W] -> int32 [..., W], bit v % 32 of word v // 32 (llguidance's layout)."""
    return np.packbits(np.asarray(ok_BV, bool), axis=-1, bitorder="little").view(np.int32)


def unpack_bits(mask_BW, vocab_size: int) -> np.ndarray:
    """int32 [..., W] -> bool [..., vocab_size]."""
    mask = np.ascontiguousarray(mask_BW, np.int32)
    return np.unpackbits(mask.view(np.uint8), axis=-1, bitorder="little")[..., :vocab_size].astype(bool)


def _shown(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + f"... ({len(text)} characters)"


def compile_grammar(kind: str, source, ll_tok) -> str:
    """The llguidance grammar of a JSON schema / regex / Lark grammar, validated against the
    tokenizer; a JaxgenError with llguidance's message and the offending source otherwise."""
    llg = llguidance()
    what = {"json_schema": "JSON schema", "regex": "regex", "grammar": "Lark grammar"}[kind]
    if kind == "json_schema":
        if not isinstance(source, (str, dict)):
            raise JaxgenError(f"json_schema takes a schema dict or its JSON text, got {type(source).__name__}")
        text = source if isinstance(source, str) else json.dumps(source)
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise JaxgenError(f"the JSON schema is not valid JSON ({e}); schema: {_shown(text)}") from None
        # compact JSON by default (no free whitespace, which an untrained model can emit forever);
        # a schema's own "x-guidance" options override this
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    else:
        if not isinstance(source, str):
            raise JaxgenError(f"{kind} takes a string, got {type(source).__name__}")
        text = source
        grammar = (llg.LLMatcher.grammar_from_regex if kind == "regex" else llg.LLMatcher.grammar_from_lark)(text)
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, ll_tok)
    if is_error:
        raise JaxgenError(f"the {what} does not compile: {messages[0].strip()}\n  {what}: {_shown(text)}")
    return grammar
