"""Reading and writing checkpoint folders: `load` (shard by shard, tensor by tensor; the stacked
or the decode form) and `save` (atomic: a temporary folder beside the target, renamed into place)."""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np

from jaxgen.config import ModelConfig
from jaxgen.errors import HFFormatError, JaxgenError, read_json
from jaxgen.hf.config import config_from_hf, config_to_hf, family_of
from jaxgen.hf.tensors import (_llada_tensor_name, _llama_tensor_name_to_llada, check_shapes, fuse_layer,
                               globals_from_hf, layer_from_hf, params_to_hf, stacked_from_hf)

FORMS = ("stacked", "decode")


class _Shards:
    """The tensors of a folder's *.safetensors shards under their Llama names, each read from the
    file only when asked for (so a load holds one tensor, not the checkpoint, on the host)."""

    def __init__(self, path: pathlib.Path, llada: bool):
        from safetensors import safe_open
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise HFFormatError(f"no *.safetensors files in {path}; convert .bin checkpoints to safetensors first")
        index = path / "model.safetensors.index.json"
        if index.exists():
            needed = set(read_json(index, HFFormatError, "re-download the checkpoint")["weight_map"].values())
            missing = sorted(needed - {f.name for f in files})
            if missing:
                raise HFFormatError(f"{path} is incomplete: shards {missing} named in the index are missing")
        self._files = contextlib.ExitStack()
        self._where = {}  # name -> (file, open file, the file's own name for the tensor)
        try:
            for f in files:
                try:
                    handle = self._files.enter_context(safe_open(str(f), framework="np"))
                    keys = handle.keys()
                except Exception as e:  # safetensors raises its own error types for truncated files
                    raise _corrupt(f, e) from None
                for k in keys:
                    self._where[_llada_tensor_name(k) if llada else k] = (f, handle, k)
        except BaseException:
            self._files.close()
            raise
        # LLaDA's names -> the Llama names the rest reads; the file's own names stay for the messages
        self.source_names = {n: k for n, (_, _, k) in self._where.items()} if llada else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._files.close()

    def shapes(self) -> dict[str, tuple]:
        return {n: tuple(h.get_slice(k).get_shape()) for n, (_, h, k) in self._where.items()}

    def get(self, name: str) -> np.ndarray:
        """One tensor, as float32 (torch layout)."""
        f, handle, k = self._where[name]
        try:
            a = handle.get_tensor(k)
        except Exception as e:
            raise _corrupt(f, e) from None
        return np.asarray(a, np.float32)


def _corrupt(f: pathlib.Path, e: Exception) -> HFFormatError:
    return HFFormatError(f"cannot read {f}: {e}; the shard is corrupt or partially downloaded")


def load(path, dtype: str = "float32", form: str = "stacked") -> tuple[ModelConfig, dict]:
    """Load (cfg, params) from an HF directory with config.json and *.safetensors.

    form="stacked": the training form (layers stacked on a leading axis). form="decode": the
    form of `jaxgen.model.decode_params` (a list of per-layer dicts with fused "wqkv"/"w_gate_up"),
    exactly equal to `decode_params(load(path)[1])` but built layer by layer on the host and put
    on the device one layer at a time, so the device never holds the stacked copy too: peak
    device memory is about 1x the weights instead of 2x.
    """
    import jax
    import jax.numpy as jnp
    if form not in FORMS:
        raise JaxgenError(f"form={form!r} is not a params form; choose 'stacked' (layers on a leading axis, "
                          "as trained) or 'decode' (jaxgen.model.decode_params' per-layer fused form)")
    path = pathlib.Path(path)
    if not path.is_dir():
        raise HFFormatError(f"{path} is not a directory; pass a Hugging Face checkpoint folder")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise HFFormatError(f"{path} has no config.json; it is not a Hugging Face checkpoint")
    hf = read_json(cfg_file, HFFormatError, "fix or re-download the checkpoint's config.json")
    cfg = config_from_hf(hf, param_dtype=dtype)
    put = lambda a: jnp.asarray(a, dtype=dtype)  # noqa: E731
    with _Shards(path, llada=family_of(hf) == "llada") as shards:
        check_shapes(shards.shapes(), cfg, shards.get, shards.source_names)
        if form == "stacked":
            return cfg, jax.tree.map(put, stacked_from_hf(shards.get, cfg))
        rest = {k: put(v) for k, v in globals_from_hf(shards.get, cfg).items()}
        layers = [{k: put(v) for k, v in fuse_layer(layer_from_hf(shards.get, cfg, i)).items()}
                  for i in range(cfg.num_layers)]
    return cfg, {"embed": rest.pop("embed"), "layers": layers, **rest}


def _is_checkpoint_file(name: str) -> bool:
    """A file `save` replaces (the rest of a folder, e.g. tokenizer files, is carried over)."""
    return (name == "config.json" or name.endswith((".safetensors", ".index.json"))
            or name.startswith("pytorch_model") and name.endswith(".bin"))


def _fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a directory
        pass
    finally:
        os.close(fd)


def save(path, cfg: ModelConfig, params: dict, family: str | None = None) -> None:
    """Write config.json + model.safetensors, atomically: the checkpoint is written into a fresh
    temporary folder beside `path` (with any non-checkpoint files already at `path`, such as a
    tokenizer), synced, and renamed into place; a previous checkpoint is renamed aside first and
    deleted last. A save that fails or is interrupted leaves the old checkpoint at `path` (or, if the
    process dies between the two renames, under `.<name>.old-*` beside it) and only a
    `.<name>.saving-*` folder to delete, never a half-written checkpoint at `path`."""
    from safetensors.numpy import save_file
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise HFFormatError(f"{path} exists and is not a directory; hf.save writes a checkpoint folder")
    hf = config_to_hf(cfg, family)
    tensors = params_to_hf(params, cfg)
    if hf["model_type"] == "llada":
        tensors = {_llama_tensor_name_to_llada(k): v for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.saving-", dir=path.parent))
    try:
        if path.exists():
            for f in path.iterdir():
                if not _is_checkpoint_file(f.name):
                    (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        for f in ("model.safetensors", "config.json"):
            _fsync(tmp / f)
        if path.exists():  # mkdtemp makes the folder private (0700); keep the old folder's mode instead
            shutil.copymode(path, tmp)
        else:
            os.chmod(tmp, 0o755)
        old = None
        if path.exists():
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent)) / path.name
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(path.parent)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)
