"""Run folders: run_config.json (written at start, read back), the latest params, and starting
one run from another's weights."""
from __future__ import annotations

import dataclasses
import json
import pathlib

import jax

from jaxgen import config as config_lib
from jaxgen import parallel
from jaxgen.errors import CheckpointError, read_json
from jaxgen.objectives.settings import migrate_legacy
from jaxgen.training.checkpoint import Checkpointer
from jaxgen.training.state import init_state, make_optimizer, state_from_params, state_shardings


def run_record(cfg, tcfg) -> dict:
    """The JSON record of a run: model and train configs (objective options as a mapping)."""
    train = dataclasses.asdict(tcfg)
    train["data_files"] = list(tcfg.data_files)
    train["objective_options"] = dict(tcfg.objective_options)
    return {"model": dataclasses.asdict(cfg), "train": train}


def train_config_from_record(train: dict) -> config_lib.TrainConfig:
    """A TrainConfig from run_config.json's "train" (old records, with the objective knobs at the
    top level, are migrated into objective_options)."""
    train = migrate_legacy(train)
    return config_lib.TrainConfig(**dict(train, data_files=tuple(train.get("data_files", ()))))


def write_run_config(out: pathlib.Path, cfg, tcfg, extensions=()) -> None:
    """Record the run in out/run_config.json (atomically), with the run's step extensions if any
    (see `guards.check_resume`); refuse a folder holding a run of another model config."""
    path = out / "run_config.json"
    record = dict(run_record(cfg, tcfg), **({"extensions": list(extensions)} if extensions else {}))
    if path.exists():
        previous = read_json(path, CheckpointError, "fix it or start over with --fresh")
        before = dataclasses.asdict(config_lib.model_config_from_dict(previous["model"]))  # fields added since
        if before != record["model"]:                                                     # take their defaults
            diff = {k: (before.get(k), v) for k, v in record["model"].items() if before.get(k) != v}
            raise CheckpointError(f"{out} holds a run with a different model config {diff}; use another --out "
                                  "or --fresh")
    if not parallel.is_main():  # every process checks; the main one writes
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def load_run(out_dir, mesh=None, rules: str | None = None):
    """(model cfg, train cfg, params) of the latest checkpoint in a `jaxgen train` output folder,
    on one device, or with a `mesh` restored straight into their shardings by `rules` (default:
    the run's)."""
    out = pathlib.Path(out_dir)
    record_path = out / "run_config.json"
    if not record_path.exists():
        raise CheckpointError(f"{out} has no run_config.json; pass the --out folder of a jaxgen train run")
    record = read_json(record_path, CheckpointError, "the run folder is damaged")
    cfg = config_lib.model_config_from_dict(record["model"])
    tcfg = train_config_from_record(record["train"])
    ckpt = Checkpointer(out / "checkpoints", keep=tcfg.keep_checkpoints)
    step = ckpt.latest_step()
    if step is None:
        raise CheckpointError(f"{out / 'checkpoints'} holds no checkpoint yet")
    optimizer, _ = make_optimizer(tcfg)
    abstract = jax.eval_shape(lambda k: init_state(cfg, optimizer, k, None), jax.random.key(0))
    if mesh is not None:
        shardings = state_shardings(cfg, dataclasses.replace(tcfg, rules=rules or tcfg.rules), mesh, optimizer)
    else:  # one device (whatever the topology the run was saved from)
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    state = ckpt.restore(step, abstract)
    ckpt.close()
    return cfg, tcfg, state.params


def params_from_run(cfg, run_dir, mesh=None, rules: str | None = None):
    """The latest params of another run (e.g. AR weights adapted to diffusion), whose model config
    must equal `cfg`; with a `mesh`, restored straight into `rules`' shardings (multi-host)."""
    src_cfg, _, params = load_run(run_dir, mesh=mesh, rules=rules)
    if src_cfg != cfg:
        diff = {k: (getattr(src_cfg, k), getattr(cfg, k)) for k in dataclasses.asdict(cfg)
                if getattr(src_cfg, k) != getattr(cfg, k)}
        raise CheckpointError(f"init_from={run_dir!s} holds a model with another config {diff} (theirs, ours); "
                              "train with the same model keys")
    return params


def init_state_from_run(cfg, optimizer, run_dir, shardings):
    """Step 0 with the latest params of another run and a fresh optimizer (see `params_from_run`)."""
    return state_from_params(params_from_run(cfg, run_dir), optimizer, shardings)
