"""Learn2PD (arXiv 2509.25188): a learned commit filter for LLaDA decoding.

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
- Fitting (oracle rollouts, labels, early stopping) is training code: `jaxgen.training.filter_fit`
  (`jaxgen train --objective learn2pd`). This module holds what decoding needs: the filter's
  forward, its commit rule and `load_filter`, which reads the saved params without the trainer.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxgen.decoding import rules
from jaxgen.errors import JaxgenError, read_json


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
    return (masked_BK & accept) | rules.best(conf_BK, masked_BK)


def load_filter(out_dir) -> dict:
    """The filter params saved by `jaxgen train --objective learn2pd` (pass them to
    `masked_diffusion.generate(commit_filter=)`): filter.json gives the block length, the orbax
    step 0 under filter/ the arrays."""
    out = pathlib.Path(out_dir)
    if not (out / "filter.json").exists():
        raise JaxgenError(f"{out} holds no Learn2PD filter (filter.json); train one with "
                          "`jaxgen train --objective learn2pd init_from=RUN --out DIR`")
    block = read_json(out / "filter.json", JaxgenError, "refit the filter")["block_length"]
    abstract = jax.eval_shape(lambda: init_filter(block, jax.random.key(0)))
    manager = ocp.CheckpointManager((out / "filter").absolute())
    try:
        return manager.restore(0, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax raises several types for missing / truncated files
        raise JaxgenError(f"cannot read the Learn2PD filter in {out / 'filter'}: {type(e).__name__}: {e}; "
                          "fit it again with `jaxgen train --objective learn2pd`") from None
    finally:
        manager.close()


def end_of_text_fill(x_BT, prompt_len, eos_id: int, mask_id: int):
    """Learn2PD's EoTP: every MASK after the first generated EOS of a row becomes EOS (`prompt_len`
    a scalar or one per row)."""
    T = x_BT.shape[1]
    pos = jnp.arange(T)
    is_eos = (x_BT == eos_id) & (pos >= jnp.reshape(jnp.asarray(prompt_len), (-1, 1)))
    first_eos_B = jnp.min(jnp.where(is_eos, pos, T), axis=1)
    return jnp.where((x_BT == mask_id) & (pos > first_eos_B[:, None]), eos_id, x_BT)
