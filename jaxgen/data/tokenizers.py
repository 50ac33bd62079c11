"""Tokenizers: a byte-level default (256 bytes + BOS/EOS/PAD/MASK) and HF `tokenizer.json`."""
from __future__ import annotations

import pathlib

import numpy as np

from jaxgen.errors import JaxgenError


MASK_NAMES = ("<|mask|>", "<mask>", "<|MASK|>", "[MASK]", "<|mdm_mask|>")  # looked up as the [MASK] token


class ByteTokenizer:
    """UTF-8 bytes 0..255, then BOS=256, EOS=257, PAD=258, MASK=259 (vocab 260)."""

    vocab_size = 260
    bos_id, eos_id, pad_id, mask_id = 256, 257, 258, 259
    name = "bytes"
    SPECIAL = {"<bos>": 256, "<eos>": 257, "<pad>": 258, "<mask>": 259}

    def token_id(self, token: str) -> int | None:
        """The id of a special token by name (<bos>, <eos>, <pad>, <mask>), else None."""
        return self.SPECIAL.get(token)

    def token(self, token_id: int) -> str | None:
        """The name of an id: a special token's name, a byte as repr, None outside the vocabulary."""
        names = {v: k for k, v in self.SPECIAL.items()}
        return names.get(token_id, repr(bytes([token_id])) if 0 <= token_id < 256 else None)

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a special token (never produced by encoding text)."""
        return token_id in self.SPECIAL.values()

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8", errors="replace") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).ravel()
        data = bytes(int(i) for i in ids if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    def bytes_per_token(self, text: str) -> float:
        return 1.0


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json, with its special tokens looked up by name."""

    def __init__(self, path):
        from tokenizers import Tokenizer
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise JaxgenError(f"no tokenizer.json at {path}; pass the file or the checkpoint folder holding it")
        self._tok = Tokenizer.from_file(str(path))
        self.name = str(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)

        def find(*names):
            return next((vocab[n] for n in names if n in vocab), None)

        self.bos_id = find("<|begin_of_text|>", "<s>", "<bos>", "<|endoftext|>")
        self.eos_id = find("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "<|im_end|>")
        self.pad_id = find("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")
        self.mask_id = find(*MASK_NAMES)
        self._special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def token_id(self, token: str) -> int | None:
        """The id of `token` in the vocabulary (added tokens included), else None."""
        return self._tok.token_to_id(token)

    def token(self, token_id: int) -> str | None:
        """The token string of an id, None outside the vocabulary."""
        return self._tok.id_to_token(int(token_id))

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a special added token (e.g. <|mask|>, a reserved token), not a text piece."""
        return int(token_id) in self._special

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).ravel()], skip_special_tokens=True)

    def bytes_per_token(self, text: str) -> float:
        return len(text.encode("utf-8")) / max(1, len(self.encode(text)))


def get_tokenizer(name_or_path: str = "bytes"):
    if name_or_path in ("bytes", "", None):
        return ByteTokenizer()
    return HFTokenizer(name_or_path)
