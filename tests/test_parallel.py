"""Sharding: rules fail early with clear errors; 1 device and an 8-device CPU mesh give the same run
and the same samples (direct calls on global arrays, and `jaxgen sample --mesh`)."""
import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from helpers import TINY_MODEL
from jaxgen import parallel
from jaxgen.errors import ShardingError


class FakeMesh:
    def __init__(self, **shape):
        self.shape = {"data": 1, "fsdp": 1, "tensor": 1} | shape


def test_parse_mesh():
    assert parallel.parse_mesh("data=2,fsdp=2,tensor=2", 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert parallel.parse_mesh("", 4) == {"data": 4, "fsdp": 1, "tensor": 1}
    with pytest.raises(ShardingError, match="8 devices but 4"):
        parallel.parse_mesh("data=2,fsdp=4", 4)
    with pytest.raises(ShardingError, match="unknown mesh axis 'model'"):
        parallel.parse_mesh("model=2", 2)
    with pytest.raises(ShardingError, match="not axis=size"):
        parallel.parse_mesh("data:2", 2)


def test_spec_errors_name_the_problem():
    rules = parallel.get_rules("fsdp+tp")
    spec = parallel.spec_for(("embed", "heads", "head_dim"), (32, 4, 8), FakeMesh(fsdp=2, tensor=2), rules, "wq")
    assert tuple(spec) == ("fsdp", "tensor", None)
    with pytest.raises(ShardingError, match="wk: dimension 1 \\(kv_heads\\) has size 2, not divisible by 4"):
        parallel.spec_for(("embed", "kv_heads"), (32, 2), FakeMesh(tensor=4), rules, "wk")
    with pytest.raises(ShardingError, match="both map to mesh axis 'tensor'"):
        parallel.spec_for(("heads", "mlp"), (4, 8), FakeMesh(tensor=2), rules, "w")
    with pytest.raises(ShardingError, match="unknown sharding rules"):
        parallel.get_rules("zero3")


def test_batch_must_divide():
    """A batch splits over data x fsdp (its rows, never its columns); tensor replicates it. The
    placed array's per-device shards are checked on 8 devices in `sample_on_mesh`."""
    rules = parallel.get_rules("fsdp+tp")
    spec = parallel.spec_for(("batch", None), (8, 16), FakeMesh(data=2, fsdp=2, tensor=2), rules, "batch")
    assert tuple(spec) == (("data", "fsdp"), None)
    assert tuple(parallel.spec_for(("batch", None), (8, 16), FakeMesh(tensor=8), rules, "batch")) == (None, None)
    with pytest.raises(ShardingError, match="batch"):
        parallel.spec_for(("batch", None), (6, 16), FakeMesh(data=4), parallel.get_rules("dp"), "batch")


def run_on_eight_devices(script, *argv):
    """Start `script` in a subprocess that sees 8 CPU devices (the device count is fixed at start-up)."""
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()  # conftest's too
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-c", script, *map(str, argv)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def meanwhile(proc, fn, *args, timeout=600):
    """fn(*args) here while `proc` runs, then the JSON `proc` printed last (killed if either fails)."""
    try:
        here = fn(*args)
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    return here, json.loads(stdout.strip().splitlines()[-1])


def train_on_mesh(out, mesh_spec, rules, devices):
    """A 3-step masked-diffusion run on `devices`: its losses, eval loss, where wq lives, first params."""
    import jax

    from helpers import synthetic_batches, tiny_train
    from jaxgen.training import loop
    tcfg = tiny_train(steps=3, rules=rules, mesh=mesh_spec, objective="masked_diffusion")
    batches, val = synthetic_batches(tcfg)
    r = loop.train(TINY_MODEL, tcfg, out, batches=batches, val_rows=val, mesh=parallel.make_mesh(mesh_spec, devices))
    return {"losses": [m["loss"] for m in loop.read_metrics(r["metrics_path"])], "eval": r["eval_loss"],
            "wq_devices": len(r["state"].params["layers"]["wq"].sharding.device_set),
            "params": [np.asarray(x).tolist() for x in jax.tree.leaves(r["state"].params)][:3]}


SCRIPT = textwrap.dedent("""
    import json, sys, jax
    sys.path.insert(0, "tests")
    from test_parallel import train_on_mesh
    assert jax.device_count() == 8
    print(json.dumps(train_on_mesh(sys.argv[1], "data=2,fsdp=2,tensor=2", "fsdp+tp", jax.devices())))
""")


def test_one_device_and_eight_device_mesh_agree(tmp_path):
    """The 8-device run goes to a subprocess (the device count is fixed at start-up); the 1-device
    run trains here meanwhile."""
    one, eight = meanwhile(run_on_eight_devices(SCRIPT, tmp_path / "eight"), train_on_mesh, tmp_path / "one", "",
                           "fsdp", jax.devices()[:1])
    np.testing.assert_allclose(one["losses"], eight["losses"], rtol=1e-5)
    np.testing.assert_allclose(one["eval"], eight["eval"], rtol=1e-5)
    assert one["wq_devices"] == 1 and eight["wq_devices"] == 8
    for a, b in zip(one["params"], eight["params"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


# `jaxgen sample` flags per sampler; the direct calls take the same keywords, so that the CLI
# reuses their compilations
SAMPLE_FLAGS = {"ar": ["--gen-length", "8"],
                "masked_diffusion": ["--gen-length", "8", "--block-length", "4"],
                "block_diffusion": ["--gen-length", "8", "--block-length", "4"]}


def sample_on_mesh(hf_dir, mesh_spec=None, rules="fsdp+tp", batch=4):
    """Greedy tokens of ar, masked_diffusion and block_diffusion from the HF checkpoint `hf_dir`
    (direct calls on params and prompt placed as global arrays on the mesh, or on one device when
    mesh_spec is None), the text `jaxgen sample` prints for the same flags, and where things live."""
    import jax

    from jaxgen import cli, data, hf
    from jaxgen.cli import sample
    from jaxgen.samplers import registry
    cfg, params = hf.load(hf_dir)
    tokenizer = data.get_tokenizer("bytes")
    prompt = np.asarray([[tokenizer.bos_id, *tokenizer.encode("def ")]] * batch, np.int32)
    mesh_flags = [] if mesh_spec is None else ["--mesh", mesh_spec, "--rules", rules]
    result = {"tokens": {}, "printed": {}, "token_devices": {}}
    if mesh_spec is not None:
        mesh = parallel.make_mesh(mesh_spec)
        params = parallel.put_global(params, parallel.param_shardings(cfg, mesh, rules))
        prompt = parallel.put_global(prompt, parallel.batch_sharding(mesh, rules, batch))
        result["prompt_shards"] = sorted((s.index[0].start, s.index[0].stop, s.data.shape[0])
                                         for s in prompt.addressable_shards)
        result["wq_devices"] = len(params["layers"]["wq"].sharding.device_set)
        result["errors"] = []  # a sharded prompt is checked where it lives, with the same messages
        for name, bad_id in (("ar", cfg.vocab_size), ("block_diffusion", cfg.mask_id)):
            bad = np.array(prompt)
            bad[batch - 1, 1] = bad_id
            bad = parallel.put_global(bad, prompt.sharding)
            try:
                registry.get(name)(params, cfg, bad, jax.random.key(0), **({"gen_length": 8, "block_length": 4}
                                                                           if name != "ar" else {}))
            except Exception as e:  # noqa: BLE001 (the message is compared in the test)
                result["errors"].append(f"{type(e).__name__}: {e}")
        err = io.StringIO()  # a batch that does not split over data x fsdp is refused
        with contextlib.redirect_stderr(err):
            assert cli.main(["sample", "--hf", hf_dir, "--batch", "2", *mesh_flags]) == 2
        result["batch_error"] = err.getvalue()
    for name, flags in SAMPLE_FLAGS.items():
        argv = ["sample", "--hf", hf_dir, "--sampler", name, "--batch", str(batch), *flags, *mesh_flags]
        out = registry.get(name)(params, cfg, prompt, jax.random.key(0),
                                 **sample.sampler_kwargs(cli.build_parser().parse_args(argv)))
        result["tokens"][name] = np.asarray(out.tokens).tolist()
        result["token_devices"][name] = len(out.tokens.sharding.device_set)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert cli.main(argv) == 0
        result["printed"][name] = printed.getvalue()
    return result


SAMPLE_SCRIPT = textwrap.dedent("""
    import json, sys, jax
    sys.path.insert(0, "tests")
    from test_parallel import sample_on_mesh
    assert jax.device_count() == 8
    print(json.dumps(sample_on_mesh(sys.argv[1], "data=2,fsdp=2,tensor=2")))
""")


def test_samplers_on_an_eight_device_mesh_match_one_device(tmp_path):
    """ar, masked_diffusion and block_diffusion give the same greedy tokens with fsdp+tp params and a
    batch-sharded prompt on 8 devices as on one; so does `jaxgen sample --mesh ... --rules fsdp+tp`."""
    import jax

    from jaxgen import hf, model
    hf_dir = tmp_path / "hf"
    cfg = dataclasses.replace(TINY_MODEL, init_std=0.5)  # confident predictions: no near-ties
    hf.save(hf_dir, cfg, model.init(cfg, jax.random.key(0)))
    one, eight = meanwhile(run_on_eight_devices(SAMPLE_SCRIPT, hf_dir), sample_on_mesh, str(hf_dir))
    assert eight["wq_devices"] == 8
    assert eight["prompt_shards"] == sorted([[i, i + 1, 1] for i in range(4)] * 2)  # 4 rows x 2 tensor copies
    assert eight["errors"] == ["JaxgenError: prompt holds token id 260 outside the vocabulary [0, 260); re-tokenize "
                               "with this model's tokenizer", "JaxgenError: the prompt contains the mask token id "
                               "259; prompts must be clean tokens"]
    assert "--batch=2 must split evenly over the mesh's batch axes: batch: dimension 0 (batch) has size 2, not " \
           "divisible by 4" in eight["batch_error"]
    for name in SAMPLE_FLAGS:
        assert eight["token_devices"][name] > 1, name
        assert eight["tokens"][name] == one["tokens"][name], name
        assert eight["printed"][name] == one["printed"][name], name
        assert "nfe=" in one["printed"][name]


def test_sample_mesh_flags_fail_clearly(capsys):
    from jaxgen import cli
    assert cli.main(["sample", "--rules", "tp"]) == 2
    assert "--rules shards the params on a mesh; pass --mesh too" in capsys.readouterr().err
    assert cli.main(["sample", "--mesh", "data=3"]) == 2
    assert "has 3 devices but 1 are available" in capsys.readouterr().err
