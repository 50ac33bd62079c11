"""Small shared builders for tests."""
import numpy as np

from jaxgen import config, objectives
from jaxgen.data import Batches

TINY_MODEL = config.ModelConfig(vocab_size=260, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                head_dim=8, mlp_dim=64, max_seq_len=128)


def tiny_train(**kw):
    """A tiny TrainConfig; `kw` may set TrainConfig fields and the objective's options."""
    base = config.TrainConfig(seq_len=16, batch_size=8, steps=6, lr=1e-2, warmup_steps=2, log_every=2, eval_every=3,
                              ckpt_every=2, progress=False, eval_batches=2)
    return objectives.configure(base, **kw)


def synthetic_batches(tcfg, rows=64, seed=0):
    data = np.random.RandomState(seed).randint(0, 256, (rows, tcfg.seq_len)).astype(np.int32)
    return Batches(data, tcfg.batch_size, tcfg.seed), data[:16]
