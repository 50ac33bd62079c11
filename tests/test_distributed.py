"""Multi-host for real on one machine: two processes joined by `jax.distributed.initialize` on
localhost (4 CPU devices each, CPU collectives through gloo) train on the 8-device global mesh
with `jaxgen train --distributed`, checkpoint, resume from the checkpoint and sample with
`jaxgen sample --distributed --mesh`; one process on one device trains and samples the same."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np

from helpers import TINY_RUN
from jaxgen import cli, data
from jaxgen.training import loop

# fsdp+tp on data=2,fsdp=2,tensor=2: 2 kv heads for the tensor axis; a batch of 4 rows over data x fsdp
MESH = ["--mesh", "data=2,fsdp=2,tensor=2", "--rules", "fsdp+tp"]
RUN = [*TINY_RUN, "num_kv_heads=2", "log_every=1", "eval_every=2", "ckpt_every=2", "progress=false"]
# 4 CPU devices per process; LLVM at -O0 compiles about twice as fast (losses agree to 1e-6); they
# extend (and override) conftest's flags in os.environ
XLA_FLAGS = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
SAMPLE = ["--sampler", "block_diffusion", "--gen-length", "8", "--block-length", "4", "--batch", "4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def worker_script(train_argv, sample_argv):
    """Train 4 steps (checkpoints at 2 and 4); drop the step-4 checkpoint and train again, which
    restores step 2 and redoes steps 3-4; then sample. All as the jaxgen command with --distributed
    (the later calls find jax already initialized)."""
    return textwrap.dedent(f"""
        import shutil, jax
        from jaxgen import cli, parallel
        train = {train_argv!r}
        assert cli.main(train) == 0
        assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
        if parallel.is_main():
            shutil.rmtree(train[train.index("--out") + 1] + "/checkpoints/4")
        parallel.barrier("step 4 dropped")
        assert cli.main(train) == 0
        print("SAMPLES", flush=True)
        assert cli.main({sample_argv!r}) == 0
    """)


def start_workers(script, port, logs):
    """Two processes of `script` joined through a coordinator at localhost:`port`; their output
    goes to files in `logs` (a full pipe would stall a process while this one trains)."""
    procs = []
    for i in range(2):
        env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {XLA_FLAGS}", JAX_PLATFORMS="cpu",
                   JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAXGEN_NUM_PROCESSES="2", JAXGEN_PROCESS_ID=str(i))
        with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=out, stderr=err))
    return procs


def finish(procs, logs, timeout=300):
    """Each process's stdout, once both ended well."""
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i}:\n{(logs / f'{i}.err').read_text()[-4000:]}"
    return [(logs / f"{i}.out").read_text() for i in range(2)]


def wait_for(text, path, procs, timeout=300):
    """Until `text` appears in the file at `path` (or a process ends)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and all(p.poll() is None for p in procs):
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.5)


def test_two_processes_train_resume_and_sample_like_one(tmp_path, data_dir, capsys):
    data.load_texts("python_stdlib", "train", data_dir=data_dir, max_files=30)  # built once, before both read it
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    train = ["train", "--objective", "ar", "--steps", "4", f"data_dir={data_dir}", *RUN]
    script = worker_script([*train, "--out", multi, "--distributed", *MESH],
                           ["sample", "--run", multi, "--distributed", *MESH, *SAMPLE])
    procs = start_workers(script, free_port(), tmp_path)
    try:
        assert cli.main([*train, "--out", single]) == 0  # one process, one device, meanwhile
        wait_for("SAMPLES", tmp_path / "0.out", procs)  # training done: the last checkpoint is written
        capsys.readouterr()
        # the 2-process checkpoint restores on one device and samples what the two processes print
        assert cli.main(["sample", "--run", multi, *SAMPLE]) == 0
        here = capsys.readouterr().out
    finally:
        outs = finish(procs, tmp_path)
    ours = loop.read_metrics(os.path.join(multi, "metrics.jsonl"))
    theirs = loop.read_metrics(os.path.join(single, "metrics.jsonl"))
    assert [m["step"] for m in ours] == [1, 2, 3, 4]  # by process 0 alone; 3 and 4 redone, not repeated
    np.testing.assert_allclose([m["loss"] for m in ours], [m["loss"] for m in theirs], rtol=1e-5)
    np.testing.assert_allclose(ours[-1]["eval_loss"], theirs[-1]["eval_loss"], rtol=1e-5)
    assert json.loads((tmp_path / "multi" / "run_config.json").read_text())["train"]["rules"] == "fsdp+tp"
    printed = [out.split("SAMPLES\n", 1)[1] for out in outs]
    assert printed[0] == here and "nfe=" in here
    assert printed[1] == ""  # process 1 prints nothing
