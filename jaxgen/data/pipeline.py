"""From a corpus to fixed-shape training batches: tokenize, pack, split, batch by step.

Packing joins documents as BOS + tokens + EOS and cuts the stream into rows of `seq_len`.
`Batches.at(step)` is a pure function of (seed, step): epochs are permutations drawn from
the seed, so a resumed run reads exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxgen.data import builders
from jaxgen.errors import JaxgenError

SPLITS = ("train", "validation")


def load_texts(dataset: str, split: str, *, data_files=(), data_dir: str = "", max_files: int = 0) -> list[str]:
    """Texts of one split; builds the local tfds data set on first use."""
    if split not in SPLITS:
        raise JaxgenError(f"split={split!r}; use 'train' or 'validation'")
    if dataset == "python_stdlib":
        builder = builders.stdlib_builder(max_files, data_dir or None)
    elif dataset == "text_files":
        builder = builders.text_files_builder(data_files, data_dir or None)
    else:
        return _standard_tfds_texts(dataset, split, data_dir or None)
    builder.download_and_prepare()
    source = builder.as_data_source()[split]
    return [_text(source[i]["text"]) for i in range(len(source))]


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _standard_tfds_texts(name: str, split: str, data_dir):
    """A standard tfds data set by name (needs a network the first time it is built)."""
    import tensorflow_datasets as tfds
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except Exception as e:
        raise JaxgenError(f"unknown dataset {name!r} ({e}); use python_stdlib, text_files or a tfds name") from None
    builder.download_and_prepare()
    splits = builder.info.splits
    tfds_split = split if split in splits else ("test" if split == "validation" and "test" in splits else None)
    if tfds_split is None:
        raise JaxgenError(f"dataset {name!r} has no {split!r} split (it has {sorted(splits)})")
    source = builder.as_data_source()[tfds_split]
    keys = [k for k, f in builder.info.features.items() if type(f).__name__ == "Text"]
    if not keys:
        raise JaxgenError(f"dataset {name!r} has no text feature")
    return [_text(source[i][keys[0]]) for i in range(len(source))]


def pack(texts, tokenizer, seq_len: int, what: str = "corpus") -> np.ndarray:
    """[N, seq_len] int32 rows of BOS doc EOS BOS doc EOS ... (the ragged tail is dropped);
    `what` names the texts in errors (e.g. "the validation split")."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    pieces = [np.concatenate([np.asarray(bos, np.int32), tokenizer.encode(t), np.asarray(eos, np.int32)])
              for t in texts if t]
    if not pieces:
        raise JaxgenError(f"the {what} is empty")
    stream = np.concatenate(pieces)
    rows = len(stream) // seq_len
    if rows == 0:
        raise JaxgenError(f"the {what} has {len(stream)} tokens, fewer than one row of seq_len={seq_len}; "
                          "use more data or a shorter seq_len")
    return stream[: rows * seq_len].reshape(rows, seq_len)


@dataclasses.dataclass
class Batches:
    """Deterministic batches over packed rows: batch `step` = rows of a seeded epoch permutation."""

    rows: np.ndarray
    batch_size: int
    seed: int = 0

    def __post_init__(self):
        if len(self.rows) < self.batch_size:
            raise JaxgenError(f"only {len(self.rows)} packed rows for batch_size={self.batch_size}; "
                              "use more data, a smaller batch or a shorter seq_len")

    def at(self, step: int) -> dict:
        n = len(self.rows)
        first = step * self.batch_size
        idx = []
        while len(idx) < self.batch_size:
            epoch, offset = divmod(first + len(idx), n)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            take = min(self.batch_size - len(idx), n - offset)
            idx.extend(perm[offset: offset + take])
        return {"tokens": self.rows[np.asarray(idx)]}


def corpus(tcfg, tokenizer):
    """(train Batches, validation rows) for a TrainConfig."""
    kw = dict(data_files=tcfg.data_files, data_dir=tcfg.data_dir, max_files=tcfg.max_files)
    train_rows = pack(load_texts(tcfg.dataset, "train", **kw), tokenizer, tcfg.seq_len, f"{tcfg.dataset} train split")
    val_rows = pack(load_texts(tcfg.dataset, "validation", **kw), tokenizer, tcfg.seq_len,
                    f"{tcfg.dataset} validation split")
    return Batches(train_rows, tcfg.batch_size, tcfg.seed), val_rows
