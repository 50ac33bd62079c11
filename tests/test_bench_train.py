"""`jaxgen bench train` on CPU: a toy preset and shape through the CLI, the FLOP formula's terms
(checked against XLA's own count of a one-layer step), the peak table, and refused inputs."""
import json
import math

import pytest

from jaxgen import cli, layouts, parallel
from jaxgen.bench import train as bench_train

TOY = ["--preset", "tiny", "--batch", "2", "--seq-len", "32", "--steps", "1", "--repeats", "1",
       "num_layers=1", "hidden_size=64", "mlp_dim=128"]


def test_bench_train_reports_tokens_per_s_mfu_and_the_formula(tmp_path, capsys, monkeypatch):
    build = bench_train.build

    def build_or_fail(cfg, *args):  # a contender that fails to compile is reported, the others still run
        if cfg.attention_impl == "pallas":
            raise RuntimeError("kernel refused")
        return build(cfg, *args)
    monkeypatch.setattr(bench_train, "build", build_or_fail)
    out = tmp_path / "train.json"
    assert cli.main(["bench", "train", *TOY, "--attention-impl", "xla,pallas", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["platform"] == "cpu" and r["objective"] == "ar" and r["tokens_per_step"] == 2 * 32
    row, failed = r["rows"]
    assert failed == {"attention_impl": "pallas", "error": "RuntimeError: kernel refused"}
    assert row["attention_impl"] == "xla" and row["tokens_per_s"] > 0 and row["step_ms"] > 0
    assert math.isfinite(row["mfu"]) and row["mfu"] > 0 and math.isfinite(row["loss"])
    f = r["flops"]
    assert f["formula"] == bench_train.FORMULA and f["layout"] == "causal"
    assert f["P"] == f["P_head"] == 2 * 31 and f["A"] == 2 * 31 * 32 // 2  # causal over the 31 inputs
    assert f["per_step"] == sum(f["terms_per_step"].values()) and f["per_token"] == f["per_step"] / 64
    assert r["peak_source"].startswith("measured matmul peak")
    assert "MFU" in capsys.readouterr().out


def test_model_flops_match_xla_on_one_layer():
    """XLA counts a one-layer step of the full layout (elementwise ops and the optimizer too): our
    model FLOPs must be a bit below it, never above or far off."""
    cfg, tcfg = bench_train.configure("tiny", 2, 32, "masked_diffusion", ["num_layers=1"])
    compiled = bench_train.build(cfg, tcfg, parallel.make_mesh(""))[0]
    cost = compiled.cost_analysis()
    xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    ours = bench_train.model_flops(cfg, tcfg)["per_step"]
    assert 0.8 * xla < ours <= 1.02 * xla


def test_block_diffusion_forwards_both_streams_and_projects_one():
    cfg, tcfg = bench_train.configure("tiny", 2, 32, "block_diffusion", ["block_size=8"])
    f = bench_train.model_flops(cfg, tcfg)
    assert f["layout"] == "dual_stream(8)" and f["P"] == 2 * 2 * 32 and f["P_head"] == 2 * 32
    assert f["A"] == 2 * bench_train.visible_pairs(layouts.dual_stream(8), 64)


def test_visible_pairs_and_peak_table():
    assert bench_train.visible_pairs(layouts.causal(), 8) == 36
    assert bench_train.visible_pairs(layouts.full(), 8) == 64
    # dual stream, n = 4, block 2: noisy block sees itself (2) + clean blocks before it; clean is block-causal
    assert bench_train.visible_pairs(layouts.dual_stream(2), 8) == (2 * 2 + 2 * 4) + (2 * 2 + 2 * 4)
    assert bench_train.table_peak("NVIDIA H200") == ("NVIDIA H200 SXM", 989.0)
    assert bench_train.table_peak("NVIDIA H100 PCIe")[1] == 756.0
    assert bench_train.table_peak("TPU v5 lite")[1] == 197.0 and bench_train.table_peak("TPU v5")[1] == 459.0
    assert bench_train.table_peak("cpu") is None
    assert bench_train.choose_peak("gpu", "NVIDIA H200", "bfloat16", 1.0, 8)[0] == 989.0
    assert bench_train.choose_peak("gpu", "NVIDIA H200", "float32", 1.0, 8)[1].startswith("measured matmul peak")


@pytest.mark.parametrize("argv, named", [
    (["--preset", "huge-1t"], "huge-1t"),
    (["--batch", "0"], "--batch=0"),
    (["--seq-len", "-4"], "--seq-len=-4"),
    (["--objective", "tidar"], "tidar"),
    (["--attention-impl", "xla,flash"], "flash"),
    (["batch_size=4"], "--batch"),
    (["no_such_key=1"], "no_such_key"),
    (["--peak-tflops", "0"], "--peak-tflops=0"),
])
def test_bench_train_refuses_bad_input_by_name(argv, named, capsys):
    assert cli.main(["bench", "train", *argv]) == 2
    err = capsys.readouterr().err
    assert "error" in err and named in err


def test_other_benches_refuse_train_only_flags(capsys):
    assert cli.main(["bench", "attention", "--preset", "tiny"]) == 2
    assert "--preset" in capsys.readouterr().err
