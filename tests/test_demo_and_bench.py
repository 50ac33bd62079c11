"""The demo and the AR benchmark run end to end (tiny settings; timings are printed, never asserted)."""
import json

import numpy as np

from helpers import TINY_RUN
from jaxgen import demo
from jaxgen.bench import ar as bench_ar


def test_demo_writes_table_json_and_plot(tmp_path, data_dir):
    out = tmp_path / "demo"
    result = demo.run(out_dir=out, steps=2, gen_length=8, data_dir=data_dir, progress=False, overrides=TINY_RUN)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["paradigm"] for r in rows] == ["autoregressive", "masked_diffusion", "block_diffusion"]
    assert [r["nfe"] for r in rows[:2]] == [8, 8]  # AR: one forward per token; LLaDA: steps = gen_length
    assert all(r["nfe"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    for r in rows:  # byte tokenizer: one token per byte
        np.testing.assert_allclose(r["bits_per_byte"], r["eval_loss"] / np.log(2), rtol=1e-6)
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert "bits/byte" in result["table"]


def test_bench_ar_checks_greedy_identity():
    results = bench_ar.run(prompt_len=8, new_tokens=8, batches=(2,), repeats=1)
    row = results["rows"][0]
    assert row["greedy_identical"] is True
    assert row["hf_tokens_per_s"] > 0 and row["jaxgen_tokens_per_s"] > 0
    assert 0 < results["train"]["fraction_of_matmul_peak"] < 1.5
    assert "ratio" in bench_ar.report(results)
