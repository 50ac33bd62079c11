"""Learn2PD filter fitting: the oracle trajectories against a literal port, early stopping,
the rollout split, and `jaxgen train --objective learn2pd` end to end."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import np_llama
from helpers import TINY_RUN
from jaxgen import cli
from jaxgen.cli.train import FILTER_FIT_READS
from jaxgen.errors import JaxgenError
from jaxgen.samplers import learn2pd, masked_diffusion
from jaxgen.training import filter_fit, runs

PROMPT = np.array([[256, 10, 20, 30, 40], [256, 50, 60, 70, 80]], np.int32)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def oracle_reference(params, cfg, prompt, reference, block_length):
    B, P = prompt.shape
    T = reference.shape[1]
    x = np.concatenate([prompt, np.full((B, T - P), cfg.mask_id)], 1)
    feats, labels, valid = [], [], []
    for s in range(P, T, block_length):
        e = s + block_length
        for _ in range(block_length):
            logits, _ = np_llama.forward(params, cfg, x, np.broadcast_to(np.arange(T), (B, T)))
            z = logits[:, s:e].copy()
            z[..., cfg.mask_id] = -np.inf
            p = softmax(z)
            x0, conf = p.argmax(-1), p.max(-1)
            masked = x[:, s:e] == cfg.mask_id
            correct = masked & (x0 == reference[:, s:e])
            feats.append(np.where(masked, conf, 1.0))
            labels.append(correct)
            valid.append(masked)
            for r in range(B):
                if correct[r].any():
                    x[r, s:e][correct[r]] = reference[r, s:e][correct[r]]
                elif masked[r].any():
                    j = np.argmax(np.where(masked[r], conf[r], -np.inf))
                    x[r, s + j] = reference[r, s + j]
    return tuple(np.stack(a, 1) for a in (feats, labels, valid))


def test_oracle_trajectories_match_reference(tiny_cfg, tiny_params):
    rng = np.random.RandomState(0)
    reference = np.concatenate([PROMPT, rng.randint(0, 256, (2, 16))], 1)
    base = np.asarray(masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=16,
                                                steps=16, block_length=8).tokens)
    reference[:, 5::2] = base[:, 5::2]  # half the targets are the model's own (reachable) predictions
    f, lab, v = filter_fit.oracle_trajectories(tiny_params, tiny_cfg, jnp.asarray(PROMPT), jnp.asarray(reference),
                                               block_length=8)
    rf, rl, rv = oracle_reference(tiny_params, tiny_cfg, PROMPT, reference, 8)
    np.testing.assert_array_equal(np.asarray(v), rv)
    np.testing.assert_array_equal(np.asarray(lab), rl)
    np.testing.assert_allclose(np.where(rv, np.asarray(f), 0), np.where(rv, rf, 0), atol=1e-4)
    assert rl.sum() > 0 and (rv & ~rl).sum() > 0


def test_train_filter_from_the_cli(tmp_path, data_dir, capsys):
    """`jaxgen train --objective learn2pd init_from=RUN`: reference + oracle rollouts of a
    masked-diffusion run, the fitted filter saved atomically, loaded back and decoding."""
    small = TINY_RUN + [f"data_dir={data_dir}", "progress=false"]  # the demo's model: its compiled train step
    base = tmp_path / "md"
    assert cli.main(["train", "--objective", "masked_diffusion", "--steps", "2", "--out", str(base)] + small) == 0
    out = tmp_path / "filter"
    # 8 rollouts in two equal batches of 4 rows: one compiled reference decode and oracle (the shapes
    # and fitting steps of tests/test_dlm_frontier.py's filter, which reuses their compilations)
    assert cli.main(["train", "--objective", "learn2pd", "--steps", "1000", "--out", str(out), f"init_from={base}",
                     "filter_gen_length=8", "filter_block_length=8", "filter_rollouts=8", "lr=0.01"]
                    + [o for o in small if o.split("=")[0] in FILTER_FIT_READS]) == 0
    record = json.loads((out / "filter.json").read_text())
    m = record["metrics"]
    assert record["block_length"] == 8 and m["fit_bce"] < m["first_bce"] and 0 <= m["test_precision"] <= 1
    assert m["val_bce"] <= m["first_bce"] + 1.0 and 0 <= m["best_step"] < 1000 and np.isfinite(m["test_bce"])
    filt = learn2pd.load_filter(out)
    cfg, _, params = runs.load_run(base)
    prompt = jnp.asarray(PROMPT)
    got = masked_diffusion.generate(params, cfg, prompt, jax.random.key(0), gen_length=16, steps=16, block_length=8,
                                    commit_filter=filt)
    assert (np.asarray(got.tokens) != cfg.mask_id).all() and 1 <= int(got.nfe) <= 16
    assert "filter" in capsys.readouterr().out
    assert cli.main(["sample", "--run", str(base), "--sampler", "masked_diffusion", "--filter", str(out), "--threshold",
                     "0.9", "--eotp", "--cache", "dual", "--gen-length", "16", "--block-length", "8"]) == 0
    assert "nfe=" in capsys.readouterr().out
    with pytest.raises(JaxgenError, match="no Learn2PD filter"):
        learn2pd.load_filter(base)
    capsys.readouterr()
    assert cli.main(["train", "--objective", "learn2pd", "--out", str(out), f"init_from={base}", "hidden_size=32",
                     "eval_batches=1"]) != 0  # the model is init_from's: model keys are refused, not dropped
    assert "does not read hidden_size, eval_batches" in capsys.readouterr().err


def test_fit_filter_stops_early_on_the_held_out_rollouts():
    """Fit labels that contradict the held-out ones: the held-out BCE soon rises, and early
    stopping hands back the params of its lowest point; with agreeing labels it trains on."""
    rng = np.random.RandomState(0)
    feats = jnp.asarray(rng.uniform(size=(64, 8)), jnp.float32)
    labels = feats > 0.5
    valid = jnp.ones((64, 8), bool)
    init = learn2pd.init_filter(8, jax.random.key(1))
    kw = dict(steps=50, lr=0.05, weight_decay=0.01)
    kept, _, val_losses, best = filter_fit.fit_filter(init, (feats, ~labels, valid), (feats, labels, valid), **kw)
    val_losses = np.asarray(val_losses)
    assert int(best) < 10 and val_losses[-1] > val_losses[best] == val_losses.min()
    np.testing.assert_allclose(filter_fit.bce_loss(kept, feats, labels, valid), val_losses[best], rtol=1e-6)
    fitted, losses, val_losses, best = filter_fit.fit_filter(init, (feats, labels, valid), (feats, labels, valid), **kw)
    assert int(best) == 49 and float(val_losses[best]) < float(val_losses[0]) and losses[-1] < losses[0]


def test_records_split_by_whole_rollouts():
    records = jnp.repeat(jnp.arange(20), 3)[:, None]  # 20 rollouts of 3 step records
    fit, val, test = filter_fit.split_by_rollout((records,), 20)
    ids = [set(np.asarray(part[0])[:, 0].tolist()) for part in (fit, val, test)]
    assert ids == [set(range(16)), {16, 17}, {18, 19}]
    with pytest.raises(JaxgenError, match="filter_rollouts=2"):
        filter_fit.split_by_rollout((records[:6],), 2)
