"""Learn2PD (arXiv 2509.25188): a learned commit filter for LLaDA decoding, and its training.

LLaDA keeps re-predicting tokens long after their prediction has settled. Learn2PD trains a
tiny filter f_phi to predict, at each step and position, whether the current argmax already
equals the token the reference decode ends with; the sampler then commits every masked position
the filter accepts (sigmoid(f) >= tau), plus the most confident one so each step makes progress
(`masked_diffusion.generate(commit_filter=..., filter_threshold=tau)`). End-of-Text Prediction
(`eotp=True` there) fills every MASK after a committed EOS with EOS and skips blocks left clean.

Decisions (the paper's code is not public; spec §6.1 is 2nd-hand):
- The filter is a 2-layer ReLU MLP from the block's confidence vector to one logit per block
  position (width = block length: 2 * (K*K + K) parameters, 2,112 at K = 32, the paper's ~2k).
  A masked position's feature is softmax(logits)[argmax]; a committed one's is 1.
- Training data come from the oracle ("extremely greedy parallel") decode: starting from the
  prompt, each step commits every masked position of the block whose argmax equals the reference
  token, or, when none does, the most confident one with its reference token, so the canvas
  always stays on the reference. Labels: argmax == reference, on masked positions.
- The reference is the model's own LLaDA decode (low_confidence, one token per step, same
  blocks), so a perfect filter reproduces it exactly while skipping settled steps.
- Fitting: full-batch AdamW (`TrainConfig.lr`, `weight_decay`, `steps`) with early stopping on
  10% of the rollouts; another 10% give the reported test BCE, precision and recall.
"""
from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgen import layouts
from jaxgen.checkpoint import Checkpointer
from jaxgen.errors import JaxgenError
from jaxgen.model import forward, unstack_layers
from jaxgen.samplers.common import NEG_INF, forbid_mask_token


def init_filter(block_length: int, key, hidden: int | None = None) -> dict:
    """Filter params {w1 [K, H], b1 [H], w2 [H, K], b2 [K]} (H defaults to K)."""
    hidden = hidden or block_length
    k1, k2 = jax.random.split(key)
    scale = lambda fan_in: 1.0 / np.sqrt(fan_in)
    return {"w1": jax.random.normal(k1, (block_length, hidden)) * scale(block_length), "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(k2, (hidden, block_length)) * scale(hidden), "b2": jnp.zeros(block_length)}


def filter_features(conf_BK, masked_BK):
    """The filter's input: the confidence of each masked position, 1 for committed ones."""
    return jnp.where(masked_BK, conf_BK, 1.0).astype(jnp.float32)


def filter_logits(filter_params, features_BK):
    hidden = jax.nn.relu(features_BK @ filter_params["w1"] + filter_params["b1"])
    return hidden @ filter_params["w2"] + filter_params["b2"]


def filter_commit(filter_params, conf_BK, masked_BK, tau):
    """Masked positions the filter accepts (sigmoid >= tau), plus the most confident masked one."""
    K = filter_params["w1"].shape[0]
    if conf_BK.shape[-1] != K:
        raise JaxgenError(f"the filter was trained for blocks of {K} tokens, not {conf_BK.shape[-1]}; "
                          f"decode with block_length={K}")
    accept = jax.nn.sigmoid(filter_logits(filter_params, filter_features(conf_BK, masked_BK))) >= tau
    best = jax.nn.one_hot(jnp.argmax(jnp.where(masked_BK, conf_BK, NEG_INF), -1), K, dtype=bool)
    return masked_BK & (accept | best)


@functools.partial(jax.jit, static_argnames=("cfg", "block_length"))
def oracle_trajectories(params, cfg, prompt, reference, *, block_length: int):
    """Features, labels and validity [B, S, K] of the oracle decode towards `reference` [B, P + N]
    (S = N steps at most: one block's steps are padded to K, invalid after the block is clean)."""
    params = unstack_layers(params)
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


def train_filter(tcfg, out_dir, *, progress: bool = True) -> dict:
    """`jaxgen train --objective learn2pd init_from=RUN`: roll out the reference and oracle
    decodes of RUN's model on corpus rows, fit the filter, save it (orbax, atomic) to out_dir."""
    from jaxgen import data, runs
    from jaxgen.samplers import masked_diffusion
    cfg, _, params = runs.load_run(tcfg.init_from)
    if cfg.mask_id is None:
        raise JaxgenError(f"init_from={tcfg.init_from} has no mask_id; Learn2PD serves masked-diffusion models")
    gen, block = tcfg.filter_gen_length, tcfg.filter_block_length
    prompt_len = tcfg.seq_len - gen
    tokenizer = data.get_tokenizer(tcfg.tokenizer)
    batches, _ = data.corpus(tcfg, tokenizer)
    feats, labels, valid = [], [], []
    done = 0
    while done < tcfg.filter_rollouts:
        rows = np.asarray(batches.at(done // tcfg.batch_size)["tokens"])[:, :prompt_len]
        rows = rows[: tcfg.filter_rollouts - done]
        prompt = jnp.asarray(rows, jnp.int32)
        reference = masked_diffusion.generate(params, cfg, prompt, jax.random.key(0), gen_length=gen, steps=gen,
                                              block_length=block).tokens
        f, lab, v = oracle_trajectories(params, cfg, prompt, reference, block_length=block)
        feats.append(f.reshape(-1, block)), labels.append(lab.reshape(-1, block)), valid.append(v.reshape(-1, block))
        done += len(rows)
        if progress:
            print(f"learn2pd: {done}/{tcfg.filter_rollouts} rollouts", flush=True)
    feats, labels, valid = (jnp.concatenate(a) for a in (feats, labels, valid))
    fit, val, test = split_by_rollout((feats, labels, valid), tcfg.filter_rollouts)
    filt = init_filter(block, jax.random.key(tcfg.seed))
    filt, losses, val_losses, best = fit_filter(filt, fit, val, steps=tcfg.steps, lr=tcfg.lr,
                                                weight_decay=tcfg.weight_decay)
    metrics = {"first_bce": float(losses[0]), "fit_bce": float(bce_loss(filt, *fit)),
               "val_bce": float(val_losses[best]), "best_step": int(best), "test_bce": float(bce_loss(filt, *test)),
               **{f"test_{k}": v for k, v in filter_accuracy(filt, *test).items()},
               "records": int(len(feats)), "rollouts": tcfg.filter_rollouts, "steps": tcfg.steps}
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
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(out / "filter", keep=1)
    ckpt.save(0, filter_params)
    ckpt.close()
    tmp = out / "filter.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out / "filter.json")


def load_filter(out_dir) -> dict:
    """The filter params saved by `train_filter` (pass to `masked_diffusion.generate(commit_filter=)`)."""
    out = pathlib.Path(out_dir)
    if not (out / "filter.json").exists():
        raise JaxgenError(f"{out} holds no Learn2PD filter (filter.json); train one with "
                          "`jaxgen train --objective learn2pd init_from=RUN --out DIR`")
    block = json.loads((out / "filter.json").read_text())["block_length"]
    ckpt = Checkpointer(out / "filter", keep=1)
    abstract = jax.eval_shape(lambda: init_filter(block, jax.random.key(0)))
    params = ckpt.restore(0, abstract)
    ckpt.close()
    return params
