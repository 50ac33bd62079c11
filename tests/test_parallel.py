"""Sharding: rules fail early with clear errors; 1 device and an 8-device CPU mesh give the same run."""
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
    mesh = parallel.make_mesh("")
    assert parallel.batch_sharding(mesh, "dp", 8) is not None
    with pytest.raises(ShardingError, match="batch"):
        parallel.spec_for(("batch", None), (6, 16), FakeMesh(data=4), parallel.get_rules("dp"), "batch")


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
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path / "eight")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        one = train_on_mesh(tmp_path / "one", "", "fsdp", jax.devices()[:1])
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    eight = json.loads(stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(one["losses"], eight["losses"], rtol=1e-5)
    np.testing.assert_allclose(one["eval"], eight["eval"], rtol=1e-5)
    assert one["wq_devices"] == 1 and eight["wq_devices"] == 8
    for a, b in zip(one["params"], eight["params"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
