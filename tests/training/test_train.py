"""Training loop: metrics, keep-N checkpoints, bit-for-bit resume, strict handling of bad checkpoints.

The tests share one uninterrupted reference run per objective (`reference`) and train their own
runs with its config, so every run reuses its compiled step (the loop shares compilations within
a process)."""
import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from helpers import TINY_MODEL, synthetic_batches, tiny_train
from jaxgen import objectives
from jaxgen.training import loop, runs
from jaxgen.errors import CheckpointError, ConfigError

REF = dict(grad_accum=4)  # the reference config: 6 steps of 4 micro-batches, checkpoints at 2, 4, 6


def run(out, tcfg, evaluate=True, **kw):
    batches, val = synthetic_batches(tcfg)
    return loop.train(TINY_MODEL, tcfg, out, batches=batches, val_rows=val if evaluate else None, **kw)


def assert_same_tree(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """objective -> (tcfg, out folder, final state) of one uninterrupted run, trained on first use.
    Tests that change a folder copy it first."""
    done = {}

    def get(objective="ar"):
        if objective not in done:
            tcfg = tiny_train(objective=objective, **REF)
            out = tmp_path_factory.mktemp(f"reference_{objective}")
            done[objective] = (tcfg, out, run(out, tcfg)["state"])
        return done[objective]
    return get


@pytest.mark.parametrize("objective", ["ar", "block_diffusion"])
def test_stop_and_resume_is_bit_for_bit(tmp_path, reference, objective):
    tcfg, full_dir, full = reference(objective)
    run(tmp_path / "split", tcfg, stop_after=3)  # interrupted after step 3 (checkpoint at 3)
    resumed = run(tmp_path / "split", tcfg)["state"]
    assert_same_tree(full, resumed)
    m_full = loop.read_metrics(full_dir / "metrics.jsonl")
    m_split = loop.read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in m_split] == [2, 3, 4, 6]  # step 3 logged at the interruption, nothing twice
    assert [r["loss"] for r in m_full] == [r["loss"] for r in m_split if r["step"] in {x["step"] for x in m_full}]
    assert m_split[-1]["step"] == 6 and "eval_loss" in m_split[-1]
    steps = sorted(int(p.name) for p in (tmp_path / "split" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 4, 6]  # keep_checkpoints=3


def test_loss_decreases_and_run_loads_back(tmp_path, reference):
    tcfg = dataclasses.replace(reference()[0], log_every=1)
    batches, _ = synthetic_batches(tcfg, rows=8)  # memorisable: one batch
    result = loop.train(TINY_MODEL, tcfg, tmp_path / "r", batches=batches, val_rows=batches.rows)
    losses = [r["loss"] for r in loop.read_metrics(result["metrics_path"])]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5
    cfg, tc, params = runs.load_run(tmp_path / "r")
    assert cfg == TINY_MODEL and tc == tcfg
    assert_same_tree(params, result["state"].params)


def test_grad_accumulation_matches_one_big_batch(tmp_path, reference):
    tcfg, _, accumulated = reference()  # 4 micro-batches
    one = run(tmp_path / "one", dataclasses.replace(tcfg, grad_accum=1))["state"]
    assert tcfg.grad_accum == 4 and int(one.step) == int(accumulated.step) == 6
    for x, y in zip(jax.tree.leaves(one.params), jax.tree.leaves(accumulated.params), strict=True):
        np.testing.assert_allclose(x, y, atol=2e-5)


def test_corrupt_or_partial_checkpoint_never_restarts_silently(tmp_path, reference):
    tcfg, ref_dir, ref_state = reference()
    shutil.copytree(ref_dir, tmp_path / "r")
    ckpt = tmp_path / "r" / "checkpoints"
    for f in (ckpt / "6").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "array" in str(f) or f.suffix == ".ocdbt":
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot restore checkpoint step 6"):
        run(tmp_path / "r", tcfg)
    # a folder with leftovers but no complete step
    partial = tmp_path / "p" / "checkpoints"
    partial.mkdir(parents=True)
    (partial / "5.orbax-checkpoint-tmp-123").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        run(tmp_path / "p", tcfg)
    # --fresh is the explicit way out: a run from scratch, equal to the reference
    fresh = run(tmp_path / "p", tcfg, fresh=True)["state"]
    assert int(fresh.step) == 6
    assert_same_tree(fresh, ref_state)


def test_model_config_change_is_refused(tmp_path, reference):
    tcfg, ref_dir, _ = reference()
    shutil.copytree(ref_dir, tmp_path / "r")
    batches, _ = synthetic_batches(tcfg)
    with pytest.raises(CheckpointError, match="different model config"):
        loop.train(dataclasses.replace(TINY_MODEL, hidden_size=64), tcfg, tmp_path / "r", batches=batches)


def test_metrics_file_is_jsonl(tmp_path, reference):
    run(tmp_path / "r", dataclasses.replace(reference()[0], log_every=4))  # 6 steps: the last is logged too
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [4, 6]
    assert all({"step", "loss", "lr", "grad_norm"} <= set(r) for r in records)


def test_block_curriculum_stages_and_bit_for_bit_resume(tmp_path):
    """NBDiff's curriculum: block 1 (AR), 2, then 4 over curriculum_steps; one compiled step per
    stage, and a run stopped inside a stage resumes exactly."""
    tcfg = tiny_train(objective="nbdiff", block_size=4, curriculum_steps=4)
    assert [objectives.options_of(tcfg).at_step(s).block_size for s in range(6)] == [1, 1, 2, 4, 4, 4]
    full = run(tmp_path / "full", tcfg, evaluate=False)["state"]  # (no eval: one compile less)
    run(tmp_path / "split", tcfg, evaluate=False, stop_after=3)
    resumed = run(tmp_path / "split", tcfg, evaluate=False)["state"]
    assert_same_tree(full, resumed)
    logged = {r["step"]: r["block_size"] for r in loop.read_metrics(tmp_path / "full" / "metrics.jsonl")}
    assert logged == {2: 1, 4: 4, 6: 4}
    with pytest.raises(ConfigError, match="not a multiple of block size 4"):  # stage 4 does not divide 18
        tiny_train(objective="nbdiff", seq_len=18, block_size=6, curriculum_steps=4)


def test_init_from_another_run(tmp_path, reference):
    """AR -> diffusion adaptation: step 0 holds the AR run's params, with a fresh optimizer."""
    _, ar_dir, src = reference("ar")
    tcfg = tiny_train(objective="nbdiff", init_from=str(ar_dir))
    start = run(tmp_path / "nb", tcfg, stop_after=0)["state"]
    assert int(start.step) == 0
    assert_same_tree(src.params, start.params)
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(start.opt_state))  # fresh moments and counts
    batches, val = synthetic_batches(tcfg)
    with pytest.raises(CheckpointError, match="another config"):
        loop.train(dataclasses.replace(TINY_MODEL, mlp_dim=32), tcfg, tmp_path / "other", batches=batches,
                   val_rows=val)
