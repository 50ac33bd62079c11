"""tfds builders for corpora that exist offline on every machine.

- `python_stdlib`: the installed Python's standard-library sources (a real code corpus; test
  suites and site-packages excluded). Split by a stable hash of the file path: ~5% validation.
- `text_files`: any text files the user names; each file is cut into 64-line chunks and every
  20th chunk goes to validation. The config name is a hash of the paths and their sizes, so a
  changed file list builds a new dataset instead of reusing a stale one.

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
        for path in stdlib_files(self.builder_config.max_files):
            rel = str(path.relative_to(root))
            if (_stable_bucket(rel) == 0) == validation:
                yield rel, {"text": path.read_text(encoding="utf-8", errors="replace"), "path": rel}


@dataclasses.dataclass
class TextFilesConfig(tfds.core.BuilderConfig):
    files: tuple[str, ...] = ()
    chunk_lines: int = 64


class TextFiles(_TextCorpus):
    """User-named text files, chunked by lines."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [TextFilesConfig(name="empty")]

    def _generate_examples(self, validation: bool):
        n = 0
        for name in self.builder_config.files:
            lines = pathlib.Path(name).read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
            step = self.builder_config.chunk_lines
            for i in range(0, len(lines), step):
                if (n % VALIDATION_EVERY == VALIDATION_EVERY - 1) == validation:
                    yield f"{name}:{i}", {"text": "".join(lines[i:i + step]), "path": name}
                n += 1


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
    return TextFiles(config=config, data_dir=data_dir or default_data_dir(), file_format="array_record")


def stdlib_builder(max_files: int = 0, data_dir: str | None = None) -> PythonStdlib:
    config = "all" if not max_files else StdlibConfig(name=f"first{max_files}", max_files=max_files)
    return PythonStdlib(config=config, data_dir=data_dir or default_data_dir(), file_format="array_record")
