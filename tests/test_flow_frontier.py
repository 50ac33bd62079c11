"""experiments/flow_frontier.py runs end to end at its tiny preset: every section in the JSON with
finite numbers, every PNG written (numbers printed, never judged: the models train for seconds).
The digits continuous-AR part is off at that preset; its data helpers are checked on their own."""
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

PATH = pathlib.Path(__file__).parents[1] / "experiments" / "flow_frontier.py"
# The tiny run is compile-bound (its models train for seconds; nearly all of its CPU time is XLA
# compiling ~160 small programs), so the test runs the script in a subprocess whose XLA CPU backend
# skips LLVM's optimisation passes: the same programs and code paths, compiled with ~1/3 less CPU
# (on top of conftest's flags, which the subprocess inherits: about half the compile time again).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def load_frontier():
    spec = importlib.util.spec_from_file_location("flow_frontier", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def numbers(tree):
    """Every int / float leaf of a JSON tree (bools and None skipped)."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


@pytest.mark.slow
def test_frontier_writes_every_section_and_plot(tmp_path, data_dir):
    """The script's command line (`main`) at the tiny preset, every section."""
    frontier = load_frontier()
    out = tmp_path / "flow"
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip())
    done = subprocess.run([sys.executable, str(PATH), "--preset", "tiny", "--out", str(out), "--data-dir", data_dir,
                           "--no-progress"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wall time" in done.stdout and "flow_frontier.json" in done.stdout  # the table, then what it wrote
    result = json.loads((out / "flow_frontier.json").read_text())
    s = result["sections"]
    assert set(s) == set(frontier.SECTIONS)
    values = numbers(s)
    assert values and all(math.isfinite(v) for v in values)
    toy = s["toy"]["rows"]
    assert [(r["solver"], r["nfe"]) for r in toy][:2] == [("euler", 2), ("euler", 4)] and toy[2]["solver"] == "dopri5"
    for r in toy:  # the measured NFE of a fixed grid is steps x evaluations per step, for both solves
        if r["solver"] != "dopri5":
            assert r["nfe"] == r["nll_nfe"] == r["steps"] * frontier.EVALS[r["solver"]]
    assert all(k in r for r in toy for k in ("nll_per_dim", "kl", "mmd2", "sliced_w2"))
    assert s["convergence"]["steps"] == [20, 40] and isinstance(s["convergence"]["met"], bool)
    assert s["digits"]["calibration"]["fd_train_vs_val"] > 0 and s["digits"]["guidance"]
    variants = {r["variant"]: r for r in s["variants"]["rows"]}
    exact = [r for n, r in variants.items() if n.startswith(("flow", "source", "block", "VeC"))]  # density known
    assert len(variants) == 7 and len(exact) == 4 and all("kl" in r for r in exact)
    assert all("fd_digits" in r for r in variants.values() if r["data"] == "digits")
    assert [r["head"] for r in s["car"]["toy"]["rows"]] == ["flow", "gaussian"]
    for png in ("toy_fm_nll_vs_nfe", "toy_fm_samples", "digits_fm_samples", "variants_toy_samples",
                "variants_digits_samples", "car_toy_samples"):
        assert (out / f"{png}.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="unknown section"):
        frontier.run(out_dir=out, preset="tiny", only=["toy", "nope"])


def test_tokens_dequantization_and_solver_plan():
    """from_tokens inverts families.to_tokens; Dequantized batches add U(0, 1/8) noise that depends
    on (seed, step) only; solver_plan keeps the NFEs a method reaches in whole steps."""
    from jaxgen.data import continuous
    from jaxgen.training import families
    frontier = load_frontier()
    x = np.random.RandomState(0).rand(5, 8, 8, 1).astype(np.float32)
    np.testing.assert_array_equal(frontier.from_tokens(families.to_tokens(x)), x.reshape(5, 64))
    base = continuous.ArrayBatches({"x": families.to_tokens(x), "label": np.zeros(5, np.int32)}, 2)
    batches = frontier.Dequantized(base, frontier.PIXEL_STEP)
    a, b = batches.at(3), batches.at(3)
    np.testing.assert_array_equal(a["x"], b["x"])
    noise = a["x"] - base.at(3)["x"]
    assert noise.min() >= 0 and noise.max() < frontier.PIXEL_STEP and not np.array_equal(a["x"], batches.at(4)["x"])
    assert frontier.solver_plan(("euler", "rk4", "dopri5"), (1, 2, 4)) == [
        ("euler", 1, 1), ("euler", 2, 2), ("euler", 4, 4), ("rk4", 4, 1), ("dopri5", None, None)]
    assert frontier.solver_plan(("midpoint",), (1, 2)) == [("midpoint", 2, 1)]
