"""Run folders: run_config.json (written at start, read back), the latest params, and starting
one run from another's weights.

run_config.json holds {"model": the model description as its family records it (a ModelConfig's
fields for language models, a NetSpec's for flow matching), "train": the TrainConfig}; the
family follows from the train config's objective (`families.of_objective`)."""
from __future__ import annotations

import dataclasses
import json
import pathlib

import jax

from jaxgen import config as config_lib
from jaxgen import parallel
from jaxgen.errors import CheckpointError, read_json
from jaxgen.objectives.settings import migrate_legacy
from jaxgen.training import families
from jaxgen.training.checkpoint import Checkpointer
from jaxgen.training.state import init_state, make_optimizer, state_from_params, state_shardings


def run_record(cfg, tcfg) -> dict:
    """The JSON record of a run: model description and train config (objective options as a mapping)."""
    train = dataclasses.asdict(tcfg)
    train["data_files"] = list(tcfg.data_files)
    train["objective_options"] = dict(tcfg.objective_options)
    return {"model": families.of_spec(cfg).to_record(cfg), "train": train}


def model_of_record(record: dict, where) -> tuple:
    """(family, model description) of a run_config.json record."""
    family = families.of_objective(record["train"].get("objective", "ar"))
    try:
        return family, family.from_record(record["model"])
    except (TypeError, KeyError) as e:
        raise CheckpointError(f"{where} records a {record['train'].get('objective')} run whose model "
                              f"{record['model']} is no {family.name} model description ({e}); fix it or use "
                              "--fresh") from None


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
        family, theirs = model_of_record(previous, path)
        if family is not families.of_spec(cfg):
            raise CheckpointError(f"{out} holds a {previous['train'].get('objective')} run ({family.what}); "
                                  f"objective {tcfg.objective} trains {families.of_spec(cfg).what}: use another "
                                  "--out or --fresh")
        before = family.to_record(theirs)  # fields added since take their defaults
        if before != record["model"]:
            diff = {k: (before.get(k), v) for k, v in record["model"].items() if before.get(k) != v}
            raise CheckpointError(f"{out} holds a run with a different model config {diff}; use another --out "
                                  "or --fresh")
    if not parallel.is_main():  # every process checks; the main one writes
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def read_record(out_dir) -> dict:
    """The run_config.json record of a `jaxgen train` output folder."""
    record_path = pathlib.Path(out_dir) / "run_config.json"
    if not record_path.exists():
        raise CheckpointError(f"{out_dir} has no run_config.json; pass the --out folder of a jaxgen train run")
    return read_json(record_path, CheckpointError, "the run folder is damaged")


def load_run(out_dir, mesh=None, rules: str | None = None, *, family: str | None = "lm"):
    """(model description, train cfg, params) of the latest checkpoint in a `jaxgen train` output
    folder, on one device, or with a `mesh` restored straight into their shardings by `rules`
    (default: the run's). `family` is the kind of run expected: "lm" (a ModelConfig, the default),
    "flow" (a velocity net's NetSpec: sample with `objectives.flow.velocity_fn` and
    `jaxgen.flow.solve`), ... or None for any."""
    out = pathlib.Path(out_dir)
    record_path = out / "run_config.json"
    record = read_record(out)
    tcfg = train_config_from_record(record["train"])
    found, cfg = model_of_record(record, record_path)
    if family is not None and found.name != family:
        raise CheckpointError(f"{out} holds a {tcfg.objective} run ({found.what}, family {found.name!r}), not "
                              f"{families.get(family).what}; load it with jaxgen.training.runs.load_run(path, "
                              f"family={found.name!r})" + (" and sample it with jaxgen.flow.solve "
                                                          "(jaxgen.objectives.flow.velocity_fn)"
                                                          if found.name == "flow" else ""))
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
    src_cfg, _, params = load_run(run_dir, mesh=mesh, rules=rules, family=families.of_spec(cfg).name)
    if src_cfg != cfg:
        diff = {k: (getattr(src_cfg, k), getattr(cfg, k)) for k in dataclasses.asdict(cfg)
                if getattr(src_cfg, k) != getattr(cfg, k)}
        raise CheckpointError(f"init_from={run_dir!s} holds a model with another config {diff} (theirs, ours); "
                              "train with the same model keys")
    return params


def init_state_from_run(cfg, optimizer, run_dir, shardings):
    """Step 0 with the latest params of another run and a fresh optimizer (see `params_from_run`)."""
    return state_from_params(params_from_run(cfg, run_dir), optimizer, shardings)
