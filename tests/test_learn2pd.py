"""Learn2PD: the learned commit filter and End-of-Text Prediction against a NumPy reference of
the LLaDA loop, the oracle trajectories against a literal port, and the filter's training run."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import np_llama
from jaxgen import cli
from jaxgen.errors import JaxgenError
from jaxgen.samplers import learn2pd, masked_diffusion
from test_fast_dllm import PROMPT, softmax

EOS = 257


def np_filter_accept(filt, conf, masked, tau):
    f = {k: np.asarray(v, np.float64) for k, v in filt.items()}
    feats = np.where(masked, conf, 1.0)
    logits = np.maximum(feats @ f["w1"] + f["b1"], 0) @ f["w2"] + f["b2"]
    return 1 / (1 + np.exp(-logits)) >= tau


def llada_reference(params, cfg, prompt, gen_length, block_length, *, filt=None, tau=0.5, eotp=False):
    """LLaDA low-confidence decoding, one token per step unless a filter accepts more; with EoTP,
    MASKs after the first generated EOS become EOS and clean blocks are skipped. (tokens, nfe)"""
    B, P = prompt.shape
    T = P + gen_length
    x = np.concatenate([prompt, np.full((B, gen_length), cfg.mask_id)], 1)
    nfe = 0
    for s in range(P, T, block_length):
        e = s + block_length
        while (x[:, s:e] == cfg.mask_id).any():
            logits, _ = np_llama.forward(params, cfg, x, np.broadcast_to(np.arange(T), (B, T)))
            nfe += 1
            z = logits[:, s:e].copy()
            z[..., cfg.mask_id] = -np.inf
            p = softmax(z)
            x0, conf = p.argmax(-1), p.max(-1)
            masked = x[:, s:e] == cfg.mask_id
            take = np.zeros_like(masked)
            for r in range(B):
                if masked[r].any():
                    take[r, np.argmax(np.where(masked[r], conf[r], -np.inf))] = True
            if filt is not None:
                take |= np_filter_accept(filt, conf, masked, tau)
            x[:, s:e] = np.where(take & masked, x0, x[:, s:e])
            if eotp:
                for r in range(B):
                    eos = np.nonzero(x[r, P:] == EOS)[0]
                    if len(eos):
                        tail = x[r, P + eos[0] + 1:]
                        tail[tail == cfg.mask_id] = EOS
    return x, nfe


def random_filter(block_length, seed, bias):
    filt = learn2pd.init_filter(block_length, jax.random.key(seed))
    return dict(filt, b2=filt["b2"] + bias)


@pytest.fixture(scope="module")
def eos_params(tiny_params):
    """The tiny model with EOS made likely, so decodes end early at different places per row."""
    head = tiny_params["lm_head"]
    return dict(tiny_params, lm_head=head.at[:, EOS].set(head[:, EOS] + 0.9 * head.max(axis=1)))


def test_filter_that_rejects_everything_is_llada_one_token_per_step(tiny_cfg, tiny_params):
    filt = random_filter(8, 0, -1e4)
    out = masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=16, steps=16,
                                    block_length=8, commit_filter=filt)
    base = masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=16, steps=16,
                                     block_length=8)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(base.tokens))
    assert int(out.nfe) == int(base.nfe) == 16


@pytest.mark.parametrize("seed,bias,tau,eotp", [(1, 0.0, 0.5, False), (2, 0.5, 0.6, False), (3, 0.0, 0.5, True)])
def test_filter_and_eotp_match_reference(tiny_cfg, tiny_params, eos_params, seed, bias, tau, eotp):
    params = eos_params if eotp else tiny_params
    filt = random_filter(8, seed, bias)
    out = masked_diffusion.generate(params, tiny_cfg, PROMPT, jax.random.key(0), gen_length=24, steps=24,
                                    block_length=8, commit_filter=filt, filter_threshold=tau, eotp=eotp)
    ref, nfe = llada_reference(params, tiny_cfg, PROMPT, 24, 8, filt=filt, tau=tau, eotp=eotp)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert int(out.nfe) == nfe < 24  # the filter commits several tokens on some steps


def test_eotp_stops_after_end_of_text(tiny_cfg, eos_params):
    kw = dict(gen_length=32, steps=32, block_length=8)
    base = masked_diffusion.generate(eos_params, tiny_cfg, PROMPT, jax.random.key(0), **kw)
    out = masked_diffusion.generate(eos_params, tiny_cfg, PROMPT, jax.random.key(0), eotp=True, **kw)
    ref, nfe = llada_reference(eos_params, tiny_cfg, PROMPT, 32, 8, eotp=True)
    toks = np.asarray(out.tokens)
    np.testing.assert_array_equal(toks, ref)
    assert int(out.nfe) == nfe < int(base.nfe) == 32
    for row in toks[:, PROMPT.shape[1]:]:
        first = np.nonzero(row == EOS)[0][0]
        later_blocks = row[(first // 8 + 1) * 8:]  # tokens of the EOS block committed earlier stay
        assert first < 24 and (later_blocks == EOS).all() and len(later_blocks) >= 8


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
    f, lab, v = learn2pd.oracle_trajectories(tiny_params, tiny_cfg, jnp.asarray(PROMPT), jnp.asarray(reference),
                                             block_length=8)
    rf, rl, rv = oracle_reference(tiny_params, tiny_cfg, PROMPT, reference, 8)
    np.testing.assert_array_equal(np.asarray(v), rv)
    np.testing.assert_array_equal(np.asarray(lab), rl)
    np.testing.assert_allclose(np.where(rv, np.asarray(f), 0), np.where(rv, rf, 0), atol=1e-4)
    assert rl.sum() > 0 and (rv & ~rl).sum() > 0


def test_bad_filter_inputs(tiny_cfg, tiny_params):
    kw = dict(gen_length=16, steps=16, block_length=8)
    with pytest.raises(JaxgenError, match="separate commit rules"):
        masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), threshold=0.9,
                                  commit_filter=random_filter(8, 0, 0.0), **kw)
    with pytest.raises(JaxgenError, match="blocks of 4"):
        masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0),
                                  commit_filter=random_filter(4, 0, 0.0), **kw)
    with pytest.raises(JaxgenError, match="filter_threshold"):
        masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), filter_threshold=1.5,
                                  commit_filter=random_filter(8, 0, 0.0), **kw)
    with pytest.raises(JaxgenError, match="low_confidence"):
        masked_diffusion.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), remasking="random",
                                  commit_filter=random_filter(8, 0, 0.0), **kw)


def test_train_filter_from_the_cli(tmp_path, data_dir, capsys):
    """`jaxgen train --objective learn2pd init_from=RUN`: reference + oracle rollouts of a
    masked-diffusion run, the fitted filter saved atomically, loaded back and decoding."""
    small = ["hidden_size=32", "num_layers=1", "num_heads=2", "num_kv_heads=1", "head_dim=16", "mlp_dim=64",
             "seq_len=48", "batch_size=4", "max_files=20", f"data_dir={data_dir}", "progress=false"]
    base = tmp_path / "md"
    assert cli.main(["train", "--objective", "masked_diffusion", "--steps", "30", "--out", str(base)] + small) == 0
    out = tmp_path / "filter"
    assert cli.main(["train", "--objective", "learn2pd", "--steps", "200", "--out", str(out), f"init_from={base}",
                     "filter_gen_length=16", "filter_block_length=8", "filter_rollouts=6", "lr=0.01"] + small) == 0
    record = json.loads((out / "filter.json").read_text())
    m = record["metrics"]
    assert record["block_length"] == 8 and m["fit_bce"] < m["first_bce"] and 0 <= m["test_precision"] <= 1
    assert m["val_bce"] <= m["first_bce"] + 1.0 and 0 <= m["best_step"] < 200 and np.isfinite(m["test_bce"])
    filt = learn2pd.load_filter(out)
    from jaxgen import runs
    cfg, _, params = runs.load_run(base)
    prompt = jnp.asarray(PROMPT)
    got = masked_diffusion.generate(params, cfg, prompt, jax.random.key(0), gen_length=16, steps=16, block_length=8,
                                    commit_filter=filt)
    assert (np.asarray(got.tokens) != cfg.mask_id).all() and 1 <= int(got.nfe) <= 16
    assert "filter" in capsys.readouterr().out
    with pytest.raises(JaxgenError, match="no Learn2PD filter"):
        learn2pd.load_filter(base)


def test_fit_filter_stops_early_on_the_held_out_rollouts():
    """Fit labels that contradict the held-out ones: the held-out BCE soon rises, and early
    stopping hands back the params of its lowest point; with agreeing labels it trains on."""
    rng = np.random.RandomState(0)
    feats = jnp.asarray(rng.uniform(size=(64, 8)), jnp.float32)
    labels = feats > 0.5
    valid = jnp.ones((64, 8), bool)
    init = learn2pd.init_filter(8, jax.random.key(1))
    kw = dict(steps=50, lr=0.05, weight_decay=0.01)
    kept, _, val_losses, best = learn2pd.fit_filter(init, (feats, ~labels, valid), (feats, labels, valid), **kw)
    val_losses = np.asarray(val_losses)
    assert int(best) < 10 and val_losses[-1] > val_losses[best] == val_losses.min()
    np.testing.assert_allclose(learn2pd.bce_loss(kept, feats, labels, valid), val_losses[best], rtol=1e-6)
    fitted, losses, val_losses, best = learn2pd.fit_filter(init, (feats, labels, valid), (feats, labels, valid), **kw)
    assert int(best) == 49 and float(val_losses[best]) < float(val_losses[0]) and losses[-1] < losses[0]


def test_records_split_by_whole_rollouts():
    records = jnp.repeat(jnp.arange(20), 3)[:, None]  # 20 rollouts of 3 step records
    fit, val, test = learn2pd.split_by_rollout((records,), 20)
    ids = [set(np.asarray(part[0])[:, 0].tolist()) for part in (fit, val, test)]
    assert ids == [set(range(16)), {16, 17}, {18, 19}]
    with pytest.raises(JaxgenError, match="filter_rollouts=2"):
        learn2pd.split_by_rollout((records[:6],), 2)
