"""Flow matching through the one train loop: `jaxgen train --objective flow_matching` on offline
continuous data (tfds toys, digits) writes orbax checkpoints and metrics, resumes bit for bit,
loads back to sample with `jaxgen.flow.solve`, and refuses bad input by name.

Tiny nets, a 2,000-point toy set and one shared config, so runs reuse compiled steps."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxgen import cli, config, flow, objectives
from jaxgen.data import continuous
from jaxgen.errors import CheckpointError
from jaxgen.flow import guidance, metrics, nets
from jaxgen.objectives.flow import velocity_fn
from jaxgen.training import families, loop, runs

NET = ["hidden=64", "depth=2", "batch_size=256", "lr=1e-2", "warmup_steps=5", "eval_batches=2", "progress=false"]
TOY = NET + ["num_train=2000", "num_validation=500"]  # a small toy set builds in a second


def flow_config(data_dir, dataset, **kw):
    """The TrainConfig `jaxgen train --objective flow_matching` builds (tiny preset) from NET, the
    toy sizes of TOY unless dataset is digits, and `kw`."""
    overrides = (NET if dataset == "digits" else TOY) + [f"data_dir={data_dir}", f"dataset={dataset}"]
    overrides += ["objective=flow_matching"] + [f"{k}={v}" for k, v in kw.items()]
    return objectives.apply_overrides(*config.preset("tiny"), overrides)[1]


def assert_same_tree(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_cli_trains_flow_matching_and_the_run_samples(tmp_path, data_dir, capsys):
    out = str(tmp_path / "run")
    args = ["train", "--objective", "flow_matching", "--steps", "30", "--out", out, "dataset=eight_gaussians",
            f"data_dir={data_dir}", "log_every=1", "eval_every=10", "ckpt_every=10", *TOY]
    assert cli.main(args) == 0
    assert "family='flow'" in capsys.readouterr().out
    records = loop.read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))
    assert all(r["samples_per_s"] > 0 and "tokens_per_s" not in r for r in records)
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-5:]) < losses[0] - 1.5  # from ~5 (a zero velocity) to ~3
    assert [r["step"] for r in records if "eval_loss" in r] == [10, 20, 30]
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()) == [10, 20, 30]
    record = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert record["model"]["dim"] == 2 and record["model"]["hidden"] == 64 and record["train"]["dataset"] == \
        "eight_gaussians"
    assert record["train"]["weight_decay"] == 0.0  # the flow family's default (decay slows flow matching)

    # --extend continues it; another net shape without --fresh is refused, naming --fresh
    assert cli.main(args[:4] + ["35"] + args[5:] + ["--extend"]) == 0
    assert "step 35" in capsys.readouterr().out
    assert cli.main(args[:4] + ["35"] + args[5:] + ["hidden=32"]) == 2
    assert "pass --fresh" in capsys.readouterr().err

    # back from the folder: a NetSpec and params; samples land on the eight modes' circle
    spec, tcfg, params = runs.load_run(out, family="flow")
    assert spec == nets.NetSpec(dim=2, hidden=64, depth=2) and tcfg.steps == 35
    x0 = jax.random.normal(jax.random.key(1), (1000, 2))
    x1 = flow.solve(velocity_fn(params, spec, objectives.options_of(tcfg)), x0, method="midpoint", step_size=0.05)
    data = continuous.toy("eight_gaussians").sample(jax.random.key(2), 1000)
    assert float(metrics.mmd2(x1, data)) < 0.2 * float(metrics.mmd2(x0, data))
    assert cli.main(["eval", "--run", out, "--batches", "1"]) == 0
    assert "flow_matching eval loss" in capsys.readouterr().out
    # jaxgen sample draws from it (saved .npy + .png); token-sampler flags are refused by name
    samples = tmp_path / "s" / "moons.npy"
    assert cli.main(["sample", "--run", out, "--batch", "64", "--steps", "8", "--out", str(samples)]) == 0
    assert np.load(samples).shape == (64, 2) and samples.with_suffix(".png").exists()
    assert cli.main(["sample", "--run", out, "--top-k", "3"]) == 2
    assert "--top-k: a run on continuous data samples with" in capsys.readouterr().err
    assert cli.main(["sample", "--run", out, "--label", "1"]) == 2
    assert "--label=1: this run's model is not class-conditional" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="family='flow'"):
        runs.load_run(out)


def moons_config(data_dir, **kw):
    """Class-conditional moons (label dropout), 2 micro-batches, 8 steps logged one by one."""
    return flow_config(data_dir, "moons", class_conditional="true", steps=8, grad_accum=2, log_every=1, eval_every=4,
                       ckpt_every=4, **kw)


@pytest.fixture(scope="module")
def moons(tmp_path_factory, data_dir):
    """(tcfg, result) of one uninterrupted moons_config run on one device."""
    tcfg = moons_config(data_dir)
    return tcfg, loop.train(None, tcfg, tmp_path_factory.mktemp("moons") / "full")


def test_stop_and_resume_is_bit_for_bit(tmp_path, moons):
    """A run interrupted after step 5 and resumed ends where an uninterrupted one ends, logging
    every step once."""
    tcfg, full = moons
    assert full["state"].params["label"].shape == (3, 64)  # two moons + the null label
    loop.train(None, tcfg, tmp_path / "split", stop_after=5)
    resumed = loop.train(None, tcfg, tmp_path / "split")
    assert_same_tree(full["state"], resumed["state"])
    m_full = loop.read_metrics(full["metrics_path"])
    m_split = loop.read_metrics(resumed["metrics_path"])
    assert [r["step"] for r in m_split] == list(range(1, 9))
    for a, b in zip(m_full, m_split):
        assert (a["loss"], a.get("eval_loss")) == (b["loss"], b.get("eval_loss"))


MESH_SCRIPT = """
import json, sys, jax
sys.path.insert(0, "tests/training")
from test_flow_training import moons_config
from jaxgen.training import loop
assert jax.device_count() == 8
tcfg = moons_config(sys.argv[2], mesh="data=2,fsdp=2,tensor=2", rules="fsdp+tp")
result = loop.train(None, tcfg, sys.argv[1])
print(json.dumps({"losses": [r["loss"] for r in loop.read_metrics(result["metrics_path"])],
                  "eval": result["eval_loss"], "label": jax.device_get(result["state"].params["label"]).tolist()}))
"""


def test_one_device_and_an_eight_device_mesh_agree(tmp_path, data_dir, moons):
    """The moons run on 8 CPU devices (a subprocess: {"x", "label"} batches sharded leaf by leaf
    over data x fsdp, 2 micro-batches) gives the one-device run's losses and params."""
    import os
    import subprocess
    import sys
    _, one = moons
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()  # conftest's too
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    done = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(tmp_path / "eight"), data_dir], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    eight = json.loads(done.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose([r["loss"] for r in loop.read_metrics(one["metrics_path"])], eight["losses"], rtol=1e-5)
    np.testing.assert_allclose(one["eval_loss"], eight["eval"], rtol=1e-5)
    np.testing.assert_allclose(one["state"].params["label"], eight["label"], atol=1e-6)


def test_digits_class_conditional(tmp_path, data_dir):
    """Digits: a 64-d velocity net with 10 labels (+ null), predicting x under a logit-normal t; its
    guided field (classifier-free guidance) samples images of the right shape."""
    tcfg = flow_config(data_dir, "digits", class_conditional="true", param="x", time_sampler="logit_normal", steps=3,
                       log_every=1, eval_every=3, ckpt_every=3)
    result = loop.train(None, tcfg, tmp_path / "digits")
    records = loop.read_metrics(result["metrics_path"])
    assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
    assert np.isfinite(result["eval_loss"])
    spec, _, params = runs.load_run(tmp_path / "digits", family="flow")
    assert (spec.dim, spec.num_classes) == (64, 10)
    options = objectives.options_of(tcfg)
    labels = np.arange(4, dtype=np.int32)
    field = guidance.guide(lambda x, t, y: velocity_fn(params, spec, options, y)(x, t), labels, spec.null_label, 1.0)
    images = flow.solve(field, jax.random.normal(jax.random.key(0), (4, 64)), time_grid=(0.0, 0.9), step_size=0.3)
    assert images.shape == (4, 64) and np.isfinite(images).all()


@pytest.mark.parametrize("extra,message", [
    ([], "dataset='python_stdlib' is not a continuous data set; use dataset= one of digits, checkerboard, "
         "eight_gaussians, gmm, moons"),
    (["dataset=spiral"], "dataset='spiral' is not a continuous data set"),
    (["dataset=moons", "param=z"], "param='z'; use one of v, x, eps"),
    (["dataset=moons", "scheduler=linear"], "scheduler='linear'; use one of cond_ot, vp, linear_vp, cosine"),
    (["dataset=moons", "time_sampler=beta"], "time_sampler='beta'; use one of uniform, logit_normal, shifted"),
    (["dataset=moons", "hidden=0"], "hidden=0 must be a positive integer"),
    (["dataset=moons", "label_drop=1"], "label_drop=1.0 must be in [0, 1)"),
    (["dataset=moons", "depth=two"], "depth='two' is not a int"),
    (["dataset=moons", "hidden_size=64", "tokenizer=x.json"], "does not read hidden_size, tokenizer"),
    (["dataset=digits", "num_train=100"], "digits has fixed splits"),
    (["dataset=moons", "block_size=4"], "flow_matching options: num_train"),
])
def test_bad_input_gives_clear_errors(extra, message, tmp_path, capsys):
    argv = ["train", "--objective", "flow_matching", "--out", str(tmp_path / "o"), *extra]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before touching the folder


def test_families_dispatch_and_refuse_a_mix(tmp_path, data_dir):
    """The objective picks the family; a spec of another family, or an LM run into a flow folder, is refused."""
    tcfg = flow_config(data_dir, "gmm", steps=1)
    family, spec = families.for_run(None, tcfg)
    assert family.name == "flow" and families.of_spec(spec) is family and spec.dim == 2
    assert families.of_spec(config.ModelConfig()).name == "lm"
    with pytest.raises(ValueError, match="builds its velocity net from its options"):
        families.for_run(dataclasses.replace(spec, hidden=8), tcfg)
    with pytest.raises(ValueError, match="trains a language model: pass its ModelConfig, not NetSpec"):
        families.for_run(spec, objectives.configure(tcfg, objective="ar", dataset="python_stdlib"))
    loop.train(None, tcfg, tmp_path / "r", stop_after=0)
    lm = objectives.configure(config.TrainConfig(), objective="ar")
    with pytest.raises(CheckpointError, match="holds a flow_matching run .* objective ar trains a language model"):
        loop.train(config.ModelConfig(), lm, tmp_path / "r", batches=object(), tokenizer=None)


def test_a_diverging_run_stops_before_its_checkpoint(tmp_path, data_dir):
    """The NonFinite guard covers continuous runs: points at 1e20 square to inf in float32."""
    tcfg = flow_config(data_dir, "gmm", steps=1)
    huge = continuous.ArrayBatches({"x": np.full((256, 2), 1e20, np.float32), "label": np.zeros(256, np.int32)}, 256)
    with pytest.raises(ValueError, match="training diverged"):
        loop.train(None, tcfg, tmp_path / "r", batches=huge)
    assert not list((tmp_path / "r" / "checkpoints").iterdir())


def test_continuous_ar_trains_through_the_same_loop(tmp_path, data_dir, capsys):
    """continuous_ar: the backbone from the model keys, the toy cut into 2 tokens of 1 value."""
    out = tmp_path / "car"
    argv = ["train", "--objective", "continuous_ar", "--steps", "2", "--out", str(out), "dataset=moons",
            f"data_dir={data_dir}", "num_train=2000", "num_validation=500", "batch_size=8", "hidden_size=32",
            "num_layers=1", "num_heads=2", "num_kv_heads=1", "head_dim=8", "mlp_dim=64", "head_hidden=32",
            "head_depth=1", "eval_batches=1", "progress=false"]
    assert cli.main(argv) == 0
    assert "family='continuous_ar'" in capsys.readouterr().out
    spec, _, params = runs.load_run(out, family="continuous_ar")
    assert (spec.seq_len, spec.token_dim, spec.order, spec.backbone.hidden_size) == (2, 1, "causal", 32)
    assert set(params) >= {"backbone", "in", "head"}
    assert all(np.isfinite(r["loss"]) for r in loop.read_metrics(out / "metrics.jsonl"))
    assert cli.main(argv[:-1] + ["vocab_size=300", "progress=false"]) == 2  # the spec sets the vocabulary
    assert "does not read vocab_size" in capsys.readouterr().err
    assert cli.main(argv + ["block_size=3"]) == 2  # checked against the data's 2 tokens
    assert "seq_len=2 is not a multiple of block_size=3" in capsys.readouterr().err
    samples = tmp_path / "car.npy"
    assert cli.main(["sample", "--run", str(out), "--batch", "5", "--steps", "4", "--out", str(samples)]) == 0
    assert np.load(samples).shape == (5, 2) and np.isfinite(np.load(samples)).all()


def test_continuous_ar_tokens_round_trip_to_images():
    from jaxgen.cli.sample_continuous import from_tokens
    from jaxgen.training import families
    images = np.random.RandomState(0).randn(3, 8, 8, 1).astype(np.float32)
    np.testing.assert_array_equal(from_tokens(families.to_tokens(images), (8, 8, 1)), images)
    points = np.random.RandomState(1).randn(3, 2).astype(np.float32)
    np.testing.assert_array_equal(from_tokens(families.to_tokens(points), (2,)), points)
