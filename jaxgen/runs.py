"""Reading finished (or running) training runs back: configs and the latest params."""
from __future__ import annotations

import json
import pathlib

import jax

from jaxgen import config as config_lib
from jaxgen.checkpoint import Checkpointer
from jaxgen.errors import CheckpointError


def load_run(out_dir):
    """(model cfg, train cfg, params) of the latest checkpoint in a `jaxgen train` output folder."""
    from jaxgen import train
    out = pathlib.Path(out_dir)
    record_path = out / "run_config.json"
    if not record_path.exists():
        raise CheckpointError(f"{out} has no run_config.json; pass the --out folder of a jaxgen train run")
    record = json.loads(record_path.read_text())
    cfg = config_lib.model_config_from_dict(record["model"])
    train_kw = dict(record["train"], data_files=tuple(record["train"]["data_files"]))
    tcfg = config_lib.TrainConfig(**train_kw)
    ckpt = Checkpointer(out / "checkpoints", keep=tcfg.keep_checkpoints)
    step = ckpt.latest_step()
    if step is None:
        raise CheckpointError(f"{out / 'checkpoints'} holds no checkpoint yet")
    optimizer, _ = train.make_optimizer(tcfg)
    abstract = jax.eval_shape(lambda k: train.init_state(cfg, optimizer, k, None), jax.random.key(0))
    state = ckpt.restore(step, abstract)
    ckpt.close()
    return cfg, tcfg, state.params
