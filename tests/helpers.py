"""Small shared builders for tests."""
import dataclasses
import types

import numpy as np

import np_llama
from jaxgen import config, objectives
from jaxgen.data import Batches

TINY_MODEL = config.ModelConfig(vocab_size=260, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                head_dim=8, mlp_dim=64, max_seq_len=128)

# key=value overrides (on the tiny preset) of the end-to-end tests (cli, demo, frontier, Learn2PD
# filter fitting): one tiny model and corpus, so that their runs of equal configs share compiled
# train steps (the train loop shares them within a process)
TINY_RUN = ["hidden_size=32", "num_layers=1", "num_heads=2", "num_kv_heads=1", "head_dim=8", "mlp_dim=64",
            "seq_len=32", "batch_size=4", "max_files=30", "eval_batches=1"]


def tiny_train(**kw):
    """A tiny TrainConfig; `kw` may set TrainConfig fields and the objective's options."""
    base = config.TrainConfig(seq_len=16, batch_size=8, steps=6, lr=1e-2, warmup_steps=2, log_every=2, eval_every=3,
                              ckpt_every=2, progress=False, eval_batches=2)
    return objectives.configure(base, **kw)


def synthetic_batches(tcfg, rows=64, seed=0):
    data = np.random.RandomState(seed).randint(0, 256, (rows, tcfg.seq_len)).astype(np.int32)
    return Batches(data, tcfg.batch_size, tcfg.seed), data[:16]


def np_logits(params, cfg, tokens_BL, positions_BL=None, mask_LL=None):
    """Raw float64 logits [B, L, V] of the independent NumPy Llama (`np_llama`): full attention,
    or the boolean `mask_LL` ([L, L] or [B, L, L]; query row, key row) over the fed tokens; RoPE
    at `positions_BL` (default 0..L-1). Unlike `np_llama.forward`, the mask token's logit is kept:
    the model is given one extra zero output column as its mask token, dropped here."""
    tokens = np.asarray(tokens_BL)
    B, L = tokens.shape
    head = np.asarray(params["embed"]).T if cfg.tie_embeddings else np.asarray(params["lm_head"])
    head = np.concatenate([head.astype(np.float64), np.zeros((head.shape[0], 1))], 1)
    np_cfg = types.SimpleNamespace(**dict(dataclasses.asdict(cfg), tie_embeddings=False, mask_id=head.shape[1] - 1))
    positions = np.broadcast_to(np.arange(L), (B, L)) if positions_BL is None else np.asarray(positions_BL)
    mask = None if mask_LL is None else np.broadcast_to(np.asarray(mask_LL, bool), (B, L, L))
    logits, _ = np_llama.forward(dict(params, lm_head=head), np_cfg, tokens, positions, mask_BLS=mask)
    return logits[..., :-1]


def np_log_softmax(logits):
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def causal_mask(length):
    return np.tril(np.ones((length, length), bool))
