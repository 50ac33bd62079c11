"""The resumable train loop: a pure jitted train_step with shardings, eval, metrics, checkpoints.

One loop for every paradigm: what a run trains (the model description `cfg`, its init and
shardings, its data and checks, what run_config.json records) comes from the objective's family
(`families`: a language model on token rows, a velocity net on continuous data, ...); the loss
is the objective's `loss(params, cfg, batch, key)`.

The loop is deterministic in (seed, step): batch `step` comes from `batches.at(step)` and the
step's key is fold_in(train_key, step), so a stopped and resumed run ends bit-for-bit where an
uninterrupted run ends. A curriculum (the objective's `options.at_step`) compiles one step per
stage. Compiled functions are shared by the `train` calls of one process that agree on what they
depend on (model config, optimizer, objective, mesh): a run resumed, repeated or restarted
`--fresh` in the same process compiles nothing again.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxgen import config as config_lib
from jaxgen import objectives, parallel
from jaxgen.training import families
from jaxgen.training.checkpoint import Checkpointer
from jaxgen.training.guards import NonFinite, check_resume, extension_note
from jaxgen.training.runs import params_from_run, write_run_config
from jaxgen.training.state import TrainState, init_state, make_optimizer, state_from_params, state_shardings


# TrainConfig fields that steer only the loop, its data and its files, never a compiled function
_LOOP_ONLY = ("dataset", "data_files", "data_dir", "tokenizer", "mask_token", "max_files", "seed", "log_every",
              "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints", "init_from", "progress")
_NOT_INIT = ("objective", "objective_options", "batch_size", "grad_accum", "seq_len")  # nor the init's
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(config_lib.TrainConfig)}
_COMPILED: collections.OrderedDict = collections.OrderedDict()
_COMPILED_MAX = 32


def _step_key(tcfg):
    """tcfg with the loop-only fields at their defaults, and its objective's loss function (names
    can be registered again): equal keys compile the same train step."""
    return dataclasses.replace(tcfg, **{f: _DEFAULTS[f] for f in _LOOP_ONLY}), objectives.get(tcfg.objective).loss


def _init_key(tcfg):
    """What the initial state depends on: the optimizer and sharding fields of tcfg."""
    return dataclasses.replace(tcfg, **{f: _DEFAULTS[f] for f in _LOOP_ONLY + _NOT_INIT})


def _shared(key, build):
    """The jitted function under `key`, built once per process (the last _COMPILED_MAX are kept), so
    that train calls agreeing on key reuse its compilation."""
    if key not in _COMPILED:
        _COMPILED[key] = build()
        while len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
    _COMPILED.move_to_end(key)
    return _COMPILED[key]


def make_train_step(cfg, tcfg, optimizer, shardings, batch_shard, loss_fn=None):
    """jit(step)(state, batch, key) -> (state, metrics), with gradient accumulation over
    `tcfg.grad_accum` micro-batches; `loss_fn` defaults to tcfg's objective loss. `cfg` is the
    model description the loss receives; `batch_shard` one sharding or a tree matching the batch."""
    loss_fn = loss_fn or objectives.loss_for(tcfg)
    accum = tcfg.grad_accum

    def micro_grads(params, batch, key):
        (_, metrics), grads = jax.value_and_grad(lambda p: loss_fn(p, cfg, batch, key), has_aux=True)(params)
        return grads, metrics

    def step(state, batch, key):
        if accum == 1:
            grads, metrics = micro_grads(state.params, batch, key)
        else:
            micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

            def body(acc, xs):
                i, mb = xs
                g, m = micro_grads(state.params, mb, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, acc, (g, m)), None

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(micro_grads, state.params,
                                                                 jax.tree.map(lambda x: x[0], micro), key))
            (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
            grads = jax.tree.map(lambda g: g / accum, grads)
            metrics = {k: (v if k == "tokens" else v / accum) for k, v in metrics.items()}
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    rep = parallel.replicated(jax.tree.leaves(batch_shard)[0].mesh)  # one sharding, or one per batch leaf
    return jax.jit(step, in_shardings=(shardings, batch_shard, rep), out_shardings=(shardings, rep),
                   donate_argnums=(0,))


def make_eval_step(cfg, tcfg):
    """jit(eval)(params, batch, key) -> metrics of tcfg's objective (final options, no curriculum);
    one per (model config, objective, options) in a process."""
    def build():
        loss_fn = objectives.loss_for(tcfg)
        return jax.jit(lambda params, batch, key: loss_fn(params, cfg, batch, key)[1])
    return _shared(("eval", cfg, objectives.get(tcfg.objective).loss, tcfg.objective_options), build)


def _val_batch(val_rows, start: int, bs: int) -> dict:
    """Validation rows [start, start + bs) as a batch (repeated to bs when too few): token rows
    [N, L] become {"tokens": ...}; a mapping of arrays (continuous data) is sliced leaf by leaf."""
    def take(rows):
        rows = rows[start:start + bs]
        return np.resize(rows, (bs,) + rows.shape[1:]) if len(rows) < bs else rows
    if isinstance(val_rows, dict):
        return {k: take(v) for k, v in val_rows.items()}
    return {"tokens": take(val_rows)}


def _num_rows(val_rows) -> int:
    return len(next(iter(val_rows.values()))) if isinstance(val_rows, dict) else len(val_rows)


def evaluate(eval_step, params, val_rows, tcfg, batch_shard) -> float:
    """Mean loss over `eval_batches` fixed validation batches with fixed keys (comparable across
    runs); `val_rows` is token rows [N, L] or a mapping of [N, ...] arrays (continuous data)."""
    bs = tcfg.batch_size
    n = min(tcfg.eval_batches, max(1, _num_rows(val_rows) // bs))
    losses = []
    for i in range(n):
        batch = parallel.put_batch(_val_batch(val_rows, i * bs, bs), batch_shard)
        losses.append(float(eval_step(params, batch, jax.random.key(10_000 + i))["loss"]))
    return float(np.mean(losses))


def _truncate_metrics(path: pathlib.Path, last_step: int):
    """Drop metrics logged after `last_step` (a resumed run logs them again); main process only."""
    if not path.exists() or not parallel.is_main():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def _prepare_out(out: pathlib.Path, fresh: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if fresh and parallel.is_main():
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        (out / "run_config.json").unlink(missing_ok=True)
    parallel.barrier("jaxgen.train: out prepared")  # others look for checkpoints after the deletions


def _start_state(cfg, tcfg, out, ckpt, optimizer, shardings, init_key, mesh):
    """The latest checkpoint in `out` (metrics after it dropped), else `init_from`'s params, else init."""
    latest = ckpt.latest_step()
    _truncate_metrics(out / "metrics.jsonl", latest or 0)  # records after it (all, when starting over)
    if latest is not None:
        abstract = jax.eval_shape(lambda k: init_state(cfg, optimizer, k, shardings), init_key)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        return ckpt.restore(latest, abstract)
    if tcfg.init_from:
        params = params_from_run(cfg, tcfg.init_from, mesh=mesh, rules=tcfg.rules)
        start = _shared(("from_params", cfg, _init_key(tcfg), mesh),
                        lambda: jax.jit(lambda p: state_from_params(p, optimizer, None), out_shardings=shardings))
        return start(params)
    init = _shared(("init", cfg, _init_key(tcfg), mesh),
                   lambda: jax.jit(lambda k: init_state(cfg, optimizer, k, None), out_shardings=shardings))
    return init(init_key)


def train(cfg, tcfg, out_dir, *, batches=None, val_rows=None, tokenizer=None, mesh=None, fresh: bool = False,
          extend: bool = False, stop_after: int | None = None, desc: str | None = None) -> dict:
    """Train (or resume) into `out_dir`. Returns {"state", "eval_loss", "metrics_path", "out",
    f"{unit}_per_step"} (unit: "tokens" for language models, "samples" for continuous data).

    `cfg` is the model description of the objective's family (`families`): a ModelConfig for
    language models; None builds it for families that derive it from the objective's options and
    the data (flow matching's velocity net). `batches` / `val_rows` default to the family's data
    for tcfg (the tfds corpus; a continuous data set). A folder holding checkpoints resumes only
    under the train config it was started with (`guards.check_resume`): `fresh` discards it,
    `extend` lets a grown `steps` continue it. A language model's config must agree with the
    tokenizer (`vocab.check_model`; `vocab.model_for_tokenizer` derives one) and the corpus ids
    with the model. A non-finite loss stops the run with an error before it is checkpointed.
    `stop_after` ends the loop early at that step (after checkpointing), as an interruption would.
    """
    options = objectives.options_of(tcfg)  # refuse bad objective options before touching out_dir
    family, cfg = families.for_run(cfg, tcfg)
    prepared = family.prepare(cfg, tcfg, tokenizer, have_data=batches is not None)
    out = pathlib.Path(out_dir)
    _prepare_out(out, fresh)
    extensions, extension = check_resume(out, tcfg, extend=extend)
    write_run_config(out, cfg, tcfg, extensions)
    if batches is None:
        batches, val_rows = family.data(cfg, tcfg, prepared)
    family.check_data(cfg, tcfg, batches, val_rows)
    mesh = mesh or parallel.make_mesh(tcfg.mesh)
    optimizer, schedule = make_optimizer(tcfg)
    shardings = state_shardings(cfg, tcfg, mesh, optimizer)
    batch_shard = family.batch_sharding(cfg, mesh, tcfg)
    init_key, train_key = jax.random.split(jax.random.key(tcfg.seed))
    ckpt = Checkpointer(out / "checkpoints", keep=tcfg.keep_checkpoints)
    try:
        state = _start_state(cfg, tcfg, out, ckpt, optimizer, shardings, init_key, mesh)
    except BaseException:  # a checkpoint that cannot be restored: release orbax's manager before raising
        ckpt.close()
        raise
    if extension and parallel.is_main():
        print(extension_note(out, extension, schedule), flush=True)

    def train_step(state, batch, key, stage):  # one compiled step per curriculum stage
        step_fn = _shared(("step", cfg, _step_key(tcfg), stage, mesh),
                          lambda: make_train_step(cfg, tcfg, optimizer, shardings, batch_shard,
                                                  objectives.loss_for(tcfg, stage)))
        return step_fn(state, batch, key)

    eval_step = make_eval_step(cfg, tcfg)
    start, end = int(state.step), tcfg.steps if stop_after is None else min(tcfg.steps, stop_after)
    guard, last_saved = NonFinite(start), start or None  # a nonzero start step is a restored checkpoint
    metrics_path = out / "metrics.jsonl"
    per_step, throughput = family.per_step(cfg, tcfg), f"{family.unit}_per_s"
    eval_loss = None
    bar = tqdm(total=tcfg.steps, initial=start, disable=not (tcfg.progress and parallel.is_main()),
               desc=desc or tcfg.objective, dynamic_ncols=True, leave=False)
    t_last, steps_since = time.perf_counter(), 0
    with open(metrics_path if parallel.is_main() else os.devnull, "a") as log:  # main process writes
        for step in range(start, end):
            stage = options.at_step(step)
            batch = parallel.put_batch(batches.at(step), batch_shard)
            state, metrics = train_step(state, batch, jax.random.fold_in(train_key, step), stage)
            guard.update(metrics)
            steps_since += 1
            done = step + 1
            is_last = done == tcfg.steps
            if done % tcfg.log_every == 0 or is_last or done == end:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - t_last
                record = {"step": done, "loss": metrics["loss"], "lr": float(schedule(done - 1)),
                          "grad_norm": metrics["grad_norm"], throughput: steps_since * per_step / elapsed,
                          **stage.log_fields()}
                if val_rows is not None and (done % tcfg.eval_every == 0 or is_last):
                    eval_loss = record["eval_loss"] = evaluate(eval_step, state.params, val_rows, tcfg, batch_shard)
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                t_last, steps_since = time.perf_counter(), 0
            save = done % tcfg.ckpt_every == 0 or is_last or done == end
            if (save or done % tcfg.log_every == 0) and not guard.finite(done):
                bar.close()
                ckpt.close()
                raise guard.error(done, tcfg, last_saved, float(metrics["loss"]))
            if save:
                ckpt.save(done, state)
                last_saved = done
            bar.update(1)
    bar.close()
    ckpt.close()
    return {"state": state, "eval_loss": eval_loss, "metrics_path": metrics_path, "out": out,
            f"{family.unit}_per_step": per_step}


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl file."""
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def bits_per_byte(loss_nats_per_token: float, bytes_per_token: float = 1.0) -> float:
    return loss_nats_per_token / math.log(2) / bytes_per_token
