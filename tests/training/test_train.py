"""Training loop: metrics, keep-N checkpoints, bit-for-bit resume, strict handling of bad checkpoints."""
import json

import jax
import numpy as np
import pytest

from helpers import TINY_MODEL, synthetic_batches, tiny_train
from jaxgen import objectives
from jaxgen.training import loop, runs
from jaxgen.errors import CheckpointError, ConfigError


def run(out, tcfg, **kw):
    batches, val = synthetic_batches(tcfg)
    return loop.train(TINY_MODEL, tcfg, out, batches=batches, val_rows=val, **kw)


@pytest.mark.parametrize("objective", ["ar", "block_diffusion"])
def test_stop_and_resume_is_bit_for_bit(tmp_path, objective):
    tcfg = tiny_train(objective=objective, grad_accum=2)
    full = run(tmp_path / "full", tcfg)["state"]
    run(tmp_path / "split", tcfg, stop_after=3)  # interrupted after step 3 (checkpoint at 3)
    resumed = run(tmp_path / "split", tcfg)["state"]
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    m_full = loop.read_metrics(tmp_path / "full" / "metrics.jsonl")
    m_split = loop.read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["loss"] for r in m_full] == [r["loss"] for r in m_split if r["step"] in {x["step"] for x in m_full}]
    assert m_split[-1]["step"] == 6 and "eval_loss" in m_split[-1]
    steps = sorted(int(p.name) for p in (tmp_path / "split" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 4, 6]  # keep_checkpoints=3


def test_loss_decreases_and_run_loads_back(tmp_path):
    tcfg = tiny_train(steps=20, log_every=5, lr=1e-2)
    batches, _ = synthetic_batches(tcfg, rows=8)  # memorisable
    result = loop.train(TINY_MODEL, tcfg, tmp_path / "r", batches=batches, val_rows=batches.rows)
    losses = [r["loss"] for r in loop.read_metrics(result["metrics_path"])]
    assert losses[-1] < losses[0] - 0.5
    cfg, tc, params = runs.load_run(tmp_path / "r")
    assert cfg == TINY_MODEL and tc == tcfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(result["state"].params)):
        np.testing.assert_array_equal(a, b)


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    a = run(tmp_path / "a", tiny_train(steps=2, grad_accum=1))["state"].params
    b = run(tmp_path / "b", tiny_train(steps=2, grad_accum=4))["state"].params
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=2e-5)


def test_corrupt_or_partial_checkpoint_never_restarts_silently(tmp_path):
    tcfg = tiny_train(steps=4)
    run(tmp_path / "r", tcfg)
    ckpt = tmp_path / "r" / "checkpoints"
    for f in (ckpt / "4").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "array" in str(f) or f.suffix == ".ocdbt":
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot restore checkpoint step 4"):
        run(tmp_path / "r", tiny_train(steps=6))
    # a folder with leftovers but no complete step
    partial = tmp_path / "p" / "checkpoints"
    partial.mkdir(parents=True)
    (partial / "5.orbax-checkpoint-tmp-123").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        run(tmp_path / "p", tcfg)
    # --fresh is the explicit way out
    assert run(tmp_path / "p", tcfg, fresh=True)["state"].step == 4


def test_model_config_change_is_refused(tmp_path):
    import dataclasses
    tcfg = tiny_train(steps=2)
    run(tmp_path / "r", tcfg)
    batches, val = synthetic_batches(tcfg)
    with pytest.raises(CheckpointError, match="different model config"):
        loop.train(dataclasses.replace(TINY_MODEL, hidden_size=64), tcfg, tmp_path / "r", batches=batches)


def test_metrics_file_is_jsonl(tmp_path):
    run(tmp_path / "r", tiny_train(steps=3, log_every=2))
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [2, 3]
    assert all({"step", "loss", "lr", "grad_norm"} <= set(r) for r in records)


def test_block_curriculum_stages_and_bit_for_bit_resume(tmp_path):
    """NBDiff's curriculum: block 1 (AR), 2, then 4 over curriculum_steps; one compiled step per
    stage, and a run stopped inside a stage resumes exactly."""
    tcfg = tiny_train(objective="nbdiff", block_size=4, curriculum_steps=4)
    assert [objectives.options_of(tcfg).at_step(s).block_size for s in range(6)] == [1, 1, 2, 4, 4, 4]
    full = run(tmp_path / "full", tcfg)["state"]
    run(tmp_path / "split", tcfg, stop_after=3)
    resumed = run(tmp_path / "split", tcfg)["state"]
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    logged = {r["step"]: r["block_size"] for r in loop.read_metrics(tmp_path / "full" / "metrics.jsonl")}
    assert logged == {2: 1, 4: 4, 6: 4}
    with pytest.raises(ConfigError, match="not a multiple of block size 4"):  # stage 4 does not divide 18
        tiny_train(objective="nbdiff", seq_len=18, block_size=6, curriculum_steps=4)


def test_init_from_another_run(tmp_path):
    """AR -> diffusion adaptation: step 0 holds the AR run's params, with a fresh optimizer."""
    import dataclasses as dc
    src = run(tmp_path / "ar", tiny_train(objective="ar", steps=2))["state"]
    tcfg = tiny_train(objective="nbdiff", init_from=str(tmp_path / "ar"))
    start = run(tmp_path / "nb", tcfg, stop_after=0)["state"]
    assert int(start.step) == 0
    for a, b in zip(jax.tree.leaves(src.params), jax.tree.leaves(start.params)):
        np.testing.assert_array_equal(a, b)
    batches, val = synthetic_batches(tcfg)
    with pytest.raises(CheckpointError, match="another config"):
        loop.train(dc.replace(TINY_MODEL, mlp_dim=32), tcfg, tmp_path / "other", batches=batches, val_rows=val)
