"""tfds builders for corpora that exist offline on every machine.

- `python_stdlib`: the installed Python's standard-library sources (a real code corpus; test
  suites and site-packages excluded). Split by a stable hash of the file path: ~5% validation.
- `text_files`: any text files the user names; each file is cut into 64-line chunks and every
  20th chunk goes to validation (with fewer than 20 chunks, the last one; a corpus of one chunk
  is cut into two halves first). The config name is a hash of the paths and their sizes, so a
  changed file list builds a new dataset instead of reusing a stale one.

Both splits always hold at least one example: a corpus too small for that is refused up front
with a message, never left to tfds's "No examples were yielded".

Both write array_record shards, read back with `as_data_source()` without TensorFlow.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import sysconfig

import tensorflow_datasets as tfds

from jaxgen.errors import JaxgenError

VALIDATION_EVERY = 20


def default_data_dir() -> str:
    return os.environ.get("JAXGEN_DATA_DIR", os.path.expanduser("~/.cache/jaxgen/tfds"))


def _stable_bucket(name: str) -> int:
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % VALIDATION_EVERY


def stdlib_files(max_files: int = 0) -> list[pathlib.Path]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    return files[:max_files] if max_files else files


class _TextCorpus(tfds.core.GeneratorBasedBuilder):
    """Shared shape of our local corpora: {"text", "path"} examples, train/validation splits.
    Abstract (no _generate_examples), so tfds does not register it as a data set."""

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                     features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                                                          "path": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(False), "validation": self._generate_examples(True)}


@dataclasses.dataclass
class StdlibConfig(tfds.core.BuilderConfig):
    max_files: int = 0


class PythonStdlib(_TextCorpus):
    """The installed Python standard library's .py sources."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [StdlibConfig(name="all", max_files=0)]

    def _generate_examples(self, validation: bool):
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        names = [str(path.relative_to(root)) for path in stdlib_files(self.builder_config.max_files)]
        held_out = _stdlib_validation(names)
        for rel in names:
            if (rel in held_out) == validation:
                yield rel, {"text": (root / rel).read_text(encoding="utf-8", errors="replace"), "path": rel}


def _stdlib_validation(names) -> set[str]:
    """The validation files: hash bucket 0, or the last file when no file falls in it (few files)."""
    held_out = {n for n in names if _stable_bucket(n) == 0}
    return held_out or set(names[-1:])


@dataclasses.dataclass
class TextFilesConfig(tfds.core.BuilderConfig):
    files: tuple[str, ...] = ()
    chunk_lines: int = 64


class TextFiles(_TextCorpus):
    """User-named text files, chunked by lines."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [TextFilesConfig(name="empty")]

    def _generate_examples(self, validation: bool):
        chunks = text_chunks(self.builder_config.files, self.builder_config.chunk_lines)
        held_out = validation_chunks(len(chunks))
        for n, (key, text, name) in enumerate(chunks):
            if (n in held_out) == validation:
                yield key, {"text": text, "path": name}


def text_chunks(files, chunk_lines: int) -> list[tuple[str, str, str]]:
    """(key, text, file) of each chunk of `chunk_lines` lines of the files, in order; a corpus that
    makes a single chunk is cut into two halves (so that validation can hold one)."""
    texts = [(name, pathlib.Path(name).read_text(encoding="utf-8", errors="replace").splitlines(keepends=True))
             for name in files]
    total = sum(len(lines) for _, lines in texts)
    if sum(-(-len(lines) // chunk_lines) for _, lines in texts) == 1:
        chunk_lines = -(-total // 2)
    return [(f"{name}:{i}", "".join(lines[i:i + chunk_lines]), name)
            for name, lines in texts for i in range(0, len(lines), chunk_lines)]


def validation_chunks(n: int) -> set[int]:
    """Indices of the validation chunks among n: every VALIDATION_EVERY-th, or the last one when
    there are fewer than VALIDATION_EVERY."""
    if n < VALIDATION_EVERY:
        return {n - 1}
    return {i for i in range(n) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1}


def text_files_builder(files, data_dir: str | None = None) -> TextFiles:
    if not files:
        raise JaxgenError("dataset=text_files needs data_files=path1,path2,...")
    resolved = []
    for f in files:
        p = pathlib.Path(f).expanduser().resolve()
        if not p.is_file():
            raise JaxgenError(f"data file {f!r} does not exist or is not a file")
        resolved.append(p)
    digest = hashlib.sha1("|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in resolved).encode())
    config = TextFilesConfig(name=f"f{digest.hexdigest()[:12]}", files=tuple(map(str, resolved)))
    chunks = text_chunks(config.files, config.chunk_lines)
    if len(chunks) < 2:
        what = "is empty" if not chunks else "has a single line"
        raise JaxgenError(f"the text_files corpus {[str(f) for f in files]} {what}: too small for a train and a "
                          "validation split; add text or more data_files")
    return TextFiles(config=config, data_dir=data_dir or default_data_dir(), file_format="array_record")


def stdlib_builder(max_files: int = 0, data_dir: str | None = None) -> PythonStdlib:
    if max_files == 1:
        raise JaxgenError("max_files=1: python_stdlib needs at least 2 files (a train and a validation split)")
    config = "all" if not max_files else StdlibConfig(name=f"first{max_files}", max_files=max_files)
    return PythonStdlib(config=config, data_dir=data_dir or default_data_dir(), file_format="array_record")
