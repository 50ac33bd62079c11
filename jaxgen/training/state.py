"""The train state (step, params, optimizer state), its optimizer and its shardings.

`cfg` is the run's model description (a ModelConfig, a velocity net's NetSpec, ...): its family
(`families.of_spec`) says how to initialise and place the params."""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxgen import parallel
from jaxgen.training import families

NO_DECAY = ("norm", "bq", "bk", "bv", "['b']")  # norms and biases (LM names; a velocity net's "b")


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
    family = families.of_spec(cfg)
    p_shard = family.param_shardings(cfg, mesh, tcfg.rules)
    abstract_params = jax.eval_shape(lambda: family.init(cfg, jax.random.key(0)))
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    rep = parallel.replicated(mesh)
    opt_shard = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, p_shard,
                                      transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=p_shard, opt_state=opt_shard)


def state_from_params(params, optimizer, shardings) -> TrainState:
    """Step 0 over `params` with a fresh optimizer state (laid out by `shardings` when given)."""
    build = lambda params: TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params))
    return jax.jit(build, out_shardings=shardings)(params) if shardings is not None else build(params)


def init_state(cfg, optimizer, key, shardings) -> TrainState:
    """Step 0 of a fresh run: params from its family's init (`model.init(cfg, key)` for a ModelConfig)."""
    init = families.of_spec(cfg).init

    def build(key):
        params = init(cfg, key)
        return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params))
    return jax.jit(build, out_shardings=shardings)(key) if shardings is not None else build(key)
