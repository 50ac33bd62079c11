"""Sharding: rules fail early with clear errors; 1 device and an 8-device CPU mesh give the same run."""
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


SCRIPT = textwrap.dedent("""
    import json, sys, jax, numpy as np
    sys.path.insert(0, "tests")
    from helpers import TINY_MODEL, synthetic_batches, tiny_train
    from jaxgen import parallel
    from jaxgen.training import loop
    assert jax.device_count() == 8
    out = {}
    for name, mesh_spec, rules, devices in [("one", "", "fsdp", jax.devices()[:1]),
                                            ("eight", "data=2,fsdp=2,tensor=2", "fsdp+tp", jax.devices())]:
        tcfg = tiny_train(steps=3, rules=rules, mesh=mesh_spec, objective="masked_diffusion")
        batches, val = synthetic_batches(tcfg)
        mesh = parallel.make_mesh(mesh_spec, devices)
        r = loop.train(TINY_MODEL, tcfg, sys.argv[1] + "/" + name, batches=batches, val_rows=val, mesh=mesh)
        wq = r["state"].params["layers"]["wq"]
        out[name] = {"losses": [m["loss"] for m in loop.read_metrics(r["metrics_path"])],
                     "eval": r["eval_loss"], "wq_devices": len(wq.sharding.device_set),
                     "params": [np.asarray(x).tolist() for x in jax.tree.leaves(r["state"].params)][:3]}
    print(json.dumps(out))
""")


def test_one_device_and_eight_device_mesh_agree(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["one"]["losses"], out["eight"]["losses"], rtol=1e-5)
    np.testing.assert_allclose(out["one"]["eval"], out["eight"]["eval"], rtol=1e-5)
    assert out["one"]["wq_devices"] == 1 and out["eight"]["wq_devices"] == 8
    for a, b in zip(out["one"]["params"], out["eight"]["params"]):
        np.testing.assert_allclose(a, b, atol=1e-5)
