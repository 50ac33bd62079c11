"""Training: TrainState, a pure jitted train_step with shardings, and the resumable loop.

The loop is deterministic in (seed, step): batch `step` comes from `Batches.at(step)` and the
step's key is fold_in(train_key, step), so a stopped and resumed run ends bit-for-bit where an
uninterrupted run ends.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgen import config as config_lib
from jaxgen import model, objectives, parallel
from jaxgen.checkpoint import Checkpointer
from jaxgen.errors import CheckpointError

NO_DECAY = ("norm", "bq", "bk", "bv")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def make_optimizer(tcfg):
    """AdamW with linear warmup then cosine decay to min_lr_ratio * lr; no decay on norms/biases."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, tcfg.lr, warmup_steps=min(tcfg.warmup_steps, max(tcfg.steps - 1, 0)),
        decay_steps=max(tcfg.steps, tcfg.warmup_steps + 1), end_value=tcfg.lr * tcfg.min_lr_ratio)

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not any(s in jax.tree_util.keystr(path[-1:]) for s in NO_DECAY), params)

    return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip),
                       optax.adamw(schedule, b1=tcfg.b1, b2=tcfg.b2, weight_decay=tcfg.weight_decay,
                                   mask=decay_mask)), schedule


def state_shardings(cfg, tcfg, mesh, optimizer):
    """Shardings for every leaf of TrainState: params by the rules, moments like their params."""
    p_shard = parallel.param_shardings(cfg, mesh, tcfg.rules)
    abstract_params = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    rep = parallel.replicated(mesh)
    opt_shard = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, p_shard,
                                      transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=p_shard, opt_state=opt_shard)


def init_state(cfg, optimizer, key, shardings) -> TrainState:
    def build(key):
        params = model.init(cfg, key)
        return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params))
    return jax.jit(build, out_shardings=shardings)(key) if shardings is not None else build(key)


def init_state_from_run(cfg, optimizer, run_dir, shardings) -> TrainState:
    """Step 0 with the latest params of another run (e.g. AR weights adapted to diffusion) and a
    fresh optimizer. The model configs must agree."""
    from jaxgen import runs
    src_cfg, _, params = runs.load_run(run_dir)
    if src_cfg != cfg:
        diff = {k: (getattr(src_cfg, k), getattr(cfg, k)) for k in dataclasses.asdict(cfg)
                if getattr(src_cfg, k) != getattr(cfg, k)}
        raise CheckpointError(f"init_from={run_dir!s} holds a model with another config {diff} (theirs, ours); "
                              "train with the same model keys")
    build = lambda params: TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params))
    return jax.jit(build, out_shardings=shardings)(params) if shardings is not None else build(params)


def make_train_step(cfg, tcfg, optimizer, shardings, batch_shard, block_size: int | None = None):
    loss_fn = objectives.for_train_config(tcfg, block_size)
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

    rep = parallel.replicated(batch_shard.mesh)
    return jax.jit(step, in_shardings=(shardings, batch_shard, rep), out_shardings=(shardings, rep),
                   donate_argnums=(0,))


def make_eval_step(cfg, tcfg):
    loss_fn = objectives.for_train_config(tcfg)
    return jax.jit(lambda params, batch, key: loss_fn(params, cfg, batch, key)[1])


def evaluate(eval_step, params, val_rows, tcfg, batch_shard) -> float:
    """Mean loss over `eval_batches` fixed validation batches with fixed keys (comparable across runs)."""
    bs = tcfg.batch_size
    n = min(tcfg.eval_batches, max(1, len(val_rows) // bs))
    losses = []
    for i in range(n):
        rows = val_rows[i * bs:(i + 1) * bs]
        if len(rows) < bs:
            rows = np.resize(rows, (bs,) + rows.shape[1:])
        batch = parallel.put_batch({"tokens": rows}, batch_shard)
        losses.append(float(eval_step(params, batch, jax.random.key(10_000 + i))["loss"]))
    return float(np.mean(losses))


def _truncate_metrics(path: pathlib.Path, last_step: int):
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def _check_same_run(out: pathlib.Path, cfg, tcfg):
    """Refuse to resume a checkpoint written for another model config."""
    path = out / "run_config.json"
    record = {"model": dataclasses.asdict(cfg), "train": dataclasses.asdict(tcfg)}
    record["train"]["data_files"] = list(record["train"]["data_files"])
    if path.exists():
        previous = json.loads(path.read_text())
        if previous["model"] != record["model"]:
            diff = {k: (previous["model"].get(k), v) for k, v in record["model"].items() if previous["model"].get(k) != v}
            raise CheckpointError(f"{out} holds a run with a different model config {diff}; use another --out "
                                  "or --fresh")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def train(cfg, tcfg, out_dir, *, batches=None, val_rows=None, tokenizer=None, mesh=None, fresh: bool = False,
          stop_after: int | None = None, desc: str | None = None) -> dict:
    """Train (or resume) into `out_dir`. Returns {"state", "eval_loss", "metrics_path", ...}.

    `stop_after` ends the loop early at that step (after checkpointing), as an interruption would.
    """
    from jaxgen import data as data_lib
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fresh:
        import shutil
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        (out / "run_config.json").unlink(missing_ok=True)
    _check_same_run(out, cfg, tcfg)
    if batches is None:
        tokenizer = tokenizer or data_lib.get_tokenizer(tcfg.tokenizer)
        batches, val_rows = data_lib.corpus(tcfg, tokenizer)
    mesh = mesh or parallel.make_mesh(tcfg.mesh)
    optimizer, schedule = make_optimizer(tcfg)
    shardings = state_shardings(cfg, tcfg, mesh, optimizer)
    batch_shard = parallel.batch_sharding(mesh, tcfg.rules, tcfg.batch_size)
    init_key, train_key = jax.random.split(jax.random.key(tcfg.seed))

    ckpt = Checkpointer(out / "checkpoints", keep=tcfg.keep_checkpoints)
    latest = ckpt.latest_step()
    abstract = jax.eval_shape(lambda k: init_state(cfg, optimizer, k, shardings), init_key)
    if latest is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        state = ckpt.restore(latest, abstract)
        _truncate_metrics(out / "metrics.jsonl", latest)
    elif tcfg.init_from:
        state = init_state_from_run(cfg, optimizer, tcfg.init_from, shardings)
    else:
        state = init_state(cfg, optimizer, init_key, shardings)
    start = int(state.step)
    stage_steps = {}  # block size -> compiled train step (one per curriculum stage)

    def train_step(state, batch, key, step):
        size = config_lib.block_size_at(tcfg, step)
        if size not in stage_steps:
            stage_steps[size] = make_train_step(cfg, tcfg, optimizer, shardings, batch_shard, size)
        return stage_steps[size](state, batch, key)
    eval_step = make_eval_step(cfg, tcfg)
    end = tcfg.steps if stop_after is None else min(tcfg.steps, stop_after)

    metrics_path = out / "metrics.jsonl"
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    eval_loss = None
    bar = _progress(start, tcfg.steps, tcfg.progress, desc or tcfg.objective)
    t_last, steps_since = time.perf_counter(), 0
    with open(metrics_path, "a") as log:
        for step in range(start, end):
            batch = parallel.put_batch(batches.at(step), batch_shard)
            state, metrics = train_step(state, batch, jax.random.fold_in(train_key, step), step)
            steps_since += 1
            done = step + 1
            is_last = done == tcfg.steps
            if done % tcfg.log_every == 0 or is_last or done == end:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - t_last
                record = {"step": done, "loss": metrics["loss"], "lr": float(schedule(done - 1)),
                          "grad_norm": metrics["grad_norm"], "tokens_per_s": steps_since * tokens_per_step / elapsed}
                if tcfg.curriculum_steps:
                    record["block_size"] = config_lib.block_size_at(tcfg, step)
                if val_rows is not None and (done % tcfg.eval_every == 0 or is_last):
                    eval_loss = evaluate(eval_step, state.params, val_rows, tcfg, batch_shard)
                    record["eval_loss"] = eval_loss
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                t_last, steps_since = time.perf_counter(), 0
            if done % tcfg.ckpt_every == 0 or is_last or done == end:
                ckpt.save(done, state)
            bar.update(1)
    bar.close()
    ckpt.close()
    return {"state": state, "eval_loss": eval_loss, "metrics_path": metrics_path, "out": out,
            "tokens_per_step": tokens_per_step}


def _progress(start, total, enabled, desc):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, disable=not enabled, desc=desc, dynamic_ncols=True, leave=False)


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def bits_per_byte(loss_nats_per_token: float, bytes_per_token: float = 1.0) -> float:
    return loss_nats_per_token / math.log(2) / bytes_per_token
