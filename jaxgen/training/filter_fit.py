"""Fitting the Learn2PD commit filter (arXiv 2509.25188) to a masked-diffusion run.

Decisions (the paper's code is not public; spec §6.1 is 2nd-hand):
- Training data come from the oracle ("extremely greedy parallel") decode: starting from the
  prompt, each step commits every masked position of the block whose argmax equals the reference
  token, or, when none does, the most confident one with its reference token, so the canvas
  always stays on the reference. Labels: argmax == reference, on masked positions.
- The reference is the model's own LLaDA decode (low_confidence, one token per step, same
  blocks), so a perfect filter reproduces it exactly while skipping settled steps.
- Fitting: full-batch AdamW (`TrainConfig.lr`, `weight_decay`, `steps`) with early stopping on
  10% of the rollouts; another 10% give the reported test BCE, precision and recall.

The filter itself (forward, commit rule, `load_filter`) is decoding code: `jaxgen.samplers.learn2pd`.
"""
from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgen import data, layouts, objectives
from jaxgen.decoding.processors import forbid_mask_token
from jaxgen.decoding.propose import NEG_INF
from jaxgen.errors import ConfigError, JaxgenError
from jaxgen.model import forward
from jaxgen.objectives.learn2pd import Learn2PDOptions
from jaxgen.samplers import masked_diffusion
from jaxgen.samplers.learn2pd import filter_features, filter_logits, init_filter
from jaxgen.training import runs, vocab
from jaxgen.training.checkpoint import Checkpointer


@functools.partial(jax.jit, static_argnames=("cfg", "block_length"))
def oracle_trajectories(params, cfg, prompt, reference, *, block_length: int):
    """Features, labels and validity [B, S, K] of the oracle decode towards `reference` [B, P + N]
    (S = N steps at most: one block's steps are padded to K, invalid after the block is clean)."""
    B, P = prompt.shape
    N = reference.shape[1] - P
    num_blocks = N // block_length
    x = jnp.concatenate([prompt, jnp.full((B, N), cfg.mask_id, jnp.int32)], axis=1)

    def step(x, start):
        logits, _ = forward(params, cfg, x, layout=layouts.full(), out_rows=(start, block_length))
        probs = jax.nn.softmax(forbid_mask_token(logits, cfg).astype(jnp.float32), axis=-1)
        x0 = jnp.argmax(probs, axis=-1).astype(jnp.int32)
        conf = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
        block = jax.lax.dynamic_slice_in_dim(x, start, block_length, axis=1)
        target = jax.lax.dynamic_slice_in_dim(reference, start, block_length, axis=1)
        masked = block == cfg.mask_id
        correct = masked & (x0 == target)
        fallback = jax.nn.one_hot(jnp.argmax(jnp.where(masked, conf, NEG_INF), -1), block_length, dtype=bool)
        take = correct | (masked & fallback & ~jnp.any(correct, axis=-1, keepdims=True))
        valid = masked & jnp.any(masked, axis=-1, keepdims=True)
        x = jax.lax.dynamic_update_slice_in_dim(x, jnp.where(take, target, block), start, axis=1)
        return x, (filter_features(conf, masked), correct, valid)

    def block_steps(x, b):
        start = P + b * block_length
        return jax.lax.scan(lambda x, _: step(x, start), x, None, length=block_length)

    _, (feats, labels, valid) = jax.lax.scan(block_steps, x, jnp.arange(num_blocks))
    to_BSK = lambda a: jnp.moveaxis(a.reshape((num_blocks * block_length,) + a.shape[2:]), 0, 1)
    return to_BSK(feats), to_BSK(labels), to_BSK(valid)


def bce_loss(filter_params, feats, labels, valid):
    logits = filter_logits(filter_params, feats)
    per = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32))
    return jnp.sum(per * valid) / jnp.maximum(valid.sum(), 1)


@functools.partial(jax.jit, static_argnames=("steps",))
def fit_filter(filter_params, fit, val, *, steps: int, lr: float, weight_decay: float = 0.0):
    """Full-batch AdamW on the masked BCE of `fit` = (feats, labels, valid), keeping the params
    of the step with the lowest BCE on `val` (early stopping: the filter sees only a few hundred
    trajectories and overfits them otherwise). Returns (params, fit losses, val losses, best step)."""
    opt = optax.adamw(lr, weight_decay=weight_decay)

    def one(carry, i):
        p, s, best, best_val, best_i = carry
        val_loss = bce_loss(p, *val)
        better = val_loss < best_val
        best = jax.tree.map(lambda b, q: jnp.where(better, q, b), best, p)
        best_val, best_i = jnp.where(better, val_loss, best_val), jnp.where(better, i, best_i)
        value, grads = jax.value_and_grad(bce_loss)(p, *fit)
        updates, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, updates), s, best, best_val, best_i), (value, val_loss)

    init = (filter_params, opt.init(filter_params), filter_params, jnp.float32(jnp.inf), jnp.int32(0))
    (_, _, best, _, best_i), (losses, val_losses) = jax.lax.scan(one, init, jnp.arange(steps))
    return best, losses, val_losses, best_i


def filter_accuracy(filter_params, feats, labels, valid, tau: float = 0.5) -> dict:
    """Precision of accepted positions (what costs quality) and recall (what saves steps)."""
    accept = (jax.nn.sigmoid(filter_logits(filter_params, feats)) >= tau) & valid
    true_pos = jnp.sum(accept & labels)
    return {"precision": float(true_pos / jnp.maximum(accept.sum(), 1)),
            "recall": float(true_pos / jnp.maximum((labels & valid).sum(), 1)),
            "positive_rate": float((labels & valid).sum() / jnp.maximum(valid.sum(), 1))}


def collect_rollouts(params, cfg, batches, *, gen: int, block: int, prompt_len: int, rollouts: int,
                     batch_size: int, progress: bool = False):
    """(feats, labels, valid) [R * S, K] step records of `rollouts` corpus rows: each row's prompt
    decoded by LLaDA (the reference) and then by the oracle towards that reference."""
    feats, labels, valid = [], [], []
    done = 0
    while done < rollouts:
        rows = np.asarray(batches.at(done // batch_size)["tokens"])[:, :prompt_len][: rollouts - done]
        prompt = jnp.asarray(rows, jnp.int32)
        reference = masked_diffusion.generate(params, cfg, prompt, jax.random.key(0), gen_length=gen, steps=gen,
                                              block_length=block).tokens
        f, lab, v = oracle_trajectories(params, cfg, prompt, reference, block_length=block)
        feats.append(f.reshape(-1, block)), labels.append(lab.reshape(-1, block)), valid.append(v.reshape(-1, block))
        done += len(rows)
        if progress:
            print(f"learn2pd: {done}/{rollouts} rollouts", flush=True)
    return tuple(jnp.concatenate(a) for a in (feats, labels, valid))


def train_filter(tcfg, out_dir, *, progress: bool = True) -> dict:
    """`jaxgen train --objective learn2pd init_from=RUN`: roll out the reference and oracle
    decodes of RUN's model on corpus rows, fit the filter, save it (orbax, atomic) to out_dir."""
    opts = objectives.options_of(tcfg)
    if not isinstance(opts, Learn2PDOptions):
        raise ConfigError(f"objective={tcfg.objective!r}: train_filter fits the learn2pd objective's filter")
    cfg, _, params = runs.load_run(tcfg.init_from)
    if cfg.mask_id is None:
        raise JaxgenError(f"init_from={tcfg.init_from} has no mask_id; Learn2PD serves masked-diffusion models")
    gen, block = opts.filter_gen_length, opts.filter_block_length
    batches, _ = data.corpus(tcfg, data.get_tokenizer(tcfg.tokenizer))
    vocab.check_rows(cfg, tcfg, batches.rows, f"corpus (for init_from={tcfg.init_from}'s model)")
    feats, labels, valid = collect_rollouts(params, cfg, batches, gen=gen, block=block, prompt_len=tcfg.seq_len - gen,
                                            rollouts=opts.filter_rollouts, batch_size=tcfg.batch_size,
                                            progress=progress)
    fit, val, test = split_by_rollout((feats, labels, valid), opts.filter_rollouts)
    filt = init_filter(block, jax.random.key(tcfg.seed))
    filt, losses, val_losses, best = fit_filter(filt, fit, val, steps=tcfg.steps, lr=tcfg.lr,
                                                weight_decay=tcfg.weight_decay)
    metrics = {"first_bce": float(losses[0]), "fit_bce": float(bce_loss(filt, *fit)),
               "val_bce": float(val_losses[best]), "best_step": int(best), "test_bce": float(bce_loss(filt, *test)),
               **{f"test_{k}": v for k, v in filter_accuracy(filt, *test).items()},
               "records": int(len(feats)), "rollouts": opts.filter_rollouts, "steps": tcfg.steps}
    save_filter(out_dir, filt, {"block_length": block, "base_run": str(tcfg.init_from), "metrics": metrics})
    return {"filter": filt, "metrics": metrics}


def split_by_rollout(arrays, rollouts: int):
    """(fit, val, test) record sets: 80/10/10% of the rollouts (at least one each), whole
    rollouts only, so held-out records never share a trajectory with the fitted ones."""
    if rollouts < 3:
        raise JaxgenError(f"filter_rollouts={rollouts}: need at least 3 (fit, early-stopping and test rollouts)")
    per = len(arrays[0]) // rollouts
    held = max(1, rollouts // 10) * per
    cut = lambda a: (a[: -2 * held], a[-2 * held: -held], a[-held:])
    parts = [cut(a) for a in arrays]
    return tuple(tuple(p[i] for p in parts) for i in range(3))


def save_filter(out_dir, filter_params, record: dict) -> None:
    """filter/ (orbax step 0) and filter.json (block length, metrics), as `learn2pd.load_filter` reads them."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(out / "filter", keep=1)
    ckpt.save(0, filter_params)
    ckpt.close()
    tmp = out / "filter.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out / "filter.json")


