"""The demo and the benchmarks run end to end (tiny settings; timings are printed, never asserted),
and the demo's step-by-step view of the diffusion decoders is the samplers' own run."""
import json

import jax
import numpy as np

from helpers import TINY_RUN
from jaxgen import demo, viz
from jaxgen.bench import ar as bench_ar
from jaxgen.bench import dlm as bench_dlm
from jaxgen.decoding import loop
from jaxgen.samplers import block_diffusion, masked_diffusion
from jaxgen.training import vocab


def test_demo_writes_table_json_and_plots(tmp_path, data_dir):
    out = tmp_path / "demo"
    result = demo.run(out_dir=out, steps=2, gen_length=8, data_dir=data_dir, progress=False, overrides=TINY_RUN,
                      bpe_vocab=0, trace_length=8)
    saved = json.loads((out / "results.json").read_text())
    rows = saved["rows"]
    assert [r["paradigm"] for r in rows] == ["autoregressive", "masked_diffusion", "block_diffusion"]
    assert [r["nfe"] for r in rows[:2]] == [8, 8]  # AR: one forward per token; LLaDA: steps = gen_length
    assert all(r["nfe"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    for r in rows:  # byte tokenizer: one token per byte
        np.testing.assert_allclose(r["bits_per_byte"], r["eval_loss"] / np.log(2), rtol=1e-6)
        assert r["prompts"] == list(demo.PROMPTS)  # ragged rows (prompts of 22 and 25 bytes): each its own
    assert saved["sampling"] == {"temperature": 0.8, "top_p": 0.9}
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert (out / "unmasking_order.png").stat().st_size > 1000
    assert "bits/byte" in result["table"] and "temperature 0.8" in result["table"]
    mask_id = 259
    assert sorted(saved["traces"]) == sorted(result["traces"]) == ["block_diffusion", "masked_diffusion"]
    for name, t in result["traces"].items():
        frames = np.asarray(t["frames"])  # [steps, generated positions]
        assert not (frames[-1] == mask_id).any() and frames[-1].tolist() == t["tokens"]
        steps = np.asarray(t["commit_steps"])  # every generated position, committed once, at a recorded step
        assert steps.shape == (frames.shape[1],) and steps.min() >= 1 and steps.max() <= len(frames)
        for s, canvas in enumerate(frames, 1):  # a position is MASK exactly until its commit step
            np.testing.assert_array_equal(canvas == mask_id, steps > s)
        assert len(t["table"]) == len(frames) + 2  # header, the all-MASK start, one line per step
        assert t["table"][-1].endswith("".join(t["texts"])) and viz.MASK_GLYPH not in t["table"][-1]
    assert sorted(result["traces"]["masked_diffusion"]["commit_steps"]) == list(range(1, 9))  # 8 steps, 1 each


def test_recorded_canvases_are_the_samplers_own_run(tiny_cfg, tiny_params):
    """record_canvases adds a host copy of the canvas per step and nothing else: same tokens as a
    plain call (sampling, same key), the last frame is the output, and it stops recording on exit."""
    prompt = np.random.RandomState(0).randint(0, 256, (2, 5))
    calls = {
        masked_diffusion: lambda: masked_diffusion.generate(tiny_params, tiny_cfg, prompt, jax.random.key(3),
                                                            gen_length=8, steps=4, block_length=4, temperature=1.0),
        block_diffusion: lambda: block_diffusion.generate(tiny_params, tiny_cfg, prompt, jax.random.key(3),
                                                          gen_length=8, block_length=4, temperature=1.0, top_p=0.9),
    }
    for module, call in calls.items():
        plain = np.asarray(call().tokens)
        with viz.record_canvases() as frames:
            recorded = call()
        assert not loop._OBSERVERS  # recording stops on exit
        np.testing.assert_array_equal(np.asarray(recorded.tokens), plain)
        np.testing.assert_array_equal(frames[-1].tokens[:, :plain.shape[1]], plain)
        assert [f.step for f in frames] == list(range(1, len(frames) + 1)) and frames[-1].nfe == int(recorded.nfe)
        count = len(frames)
        call()
        assert len(frames) == count  # outside the block: the plain program again


def test_bpe_tokenizer_fits_the_model_and_ragged_prompts(tmp_path):
    texts = [f"def f{i}(x):\n    return x + {i}\n\n\nclass C{i}:\n    pass\n" for i in range(200)]
    tok = demo.fit_bpe(texts, 300, tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (0, 1, 2, 3) and tok.vocab_size == 300
    assert tok.decode(tok.encode(texts[7])) == texts[7]
    assert len(tok.encode("    return x")) < len("    return x") / 2  # merges: far fewer tokens than bytes
    from jaxgen import config, objectives
    model_cfg, train_cfg = config.preset("tiny")
    cfg = vocab.model_for_tokenizer(model_cfg, objectives.configure(train_cfg, objective="masked_diffusion"), tok)
    assert (cfg.vocab_size, cfg.mask_id) == (300, 3)
    prompt, lengths = demo.prompt_batch(tok)
    assert [tok.decode(r[:n]) for r, n in zip(np.asarray(prompt), lengths)] == list(demo.PROMPTS)
    assert (np.asarray(prompt)[:, 0] == tok.bos_id).all()


def test_viz_commit_steps_and_table():
    tok = demo.data.get_tokenizer("bytes")
    M = tok.mask_id
    canvases = np.array([[M, 104, M], [M, 104, 105], [33, 104, 105]])
    assert viz.commit_steps(canvases, M).tolist() == [3, 1, 2]
    assert viz.commit_steps(canvases[:2], M).tolist() == [-1, 1, 2]  # still MASK at the end
    frames = [viz.Frame(i, i, c[None]) for i, c in enumerate(canvases, 1)]
    table = viz.step_table(frames, canvases, tok, M)
    assert table[1].endswith("░░░") and table[2].endswith("░h░") and table[-1].endswith("!hi")
    assert [line.split()[2] for line in table[2:]] == ["1", "1", "1"]  # tokens committed per step
    assert viz.token_text(tok, ord(" "), M) == "·" and viz.token_text(tok, 7, M) == viz.UNPRINTABLE


def test_bench_ar_checks_greedy_identity():
    results = bench_ar.run(prompt_len=8, new_tokens=8, batches=(2,), repeats=1)
    row = results["rows"][0]
    assert row["greedy_identical"] is True
    assert row["hf_tokens_per_s"] > 0 and row["jaxgen_tokens_per_s"] > 0
    assert 0 < results["train"]["fraction_of_matmul_peak"] < 1.5
    assert "ratio" in bench_ar.report(results)


def test_bench_dlm_reports_the_as_written_and_the_equal_work_loop():
    """Both PyTorch loops decode LLaDA's tokens; the report names which ratio is which."""
    results = bench_dlm.run(prompt_len=8, gen_length=16, block_length=8, repeats=1, modes={},
                            model_size=dict(hidden=64, layers=2, vocab=512))
    loops = results["llada"]["torch"]
    assert sorted(loops) == ["as written", "equal work"]
    assert all(t["tokens_identical"] is True and t["tokens_per_s"] > 0 and t["jaxgen_speedup"] > 0
               for t in loops.values())
    text = bench_dlm.report(results)
    assert "as written: LLaDA's generate.py, LM head on all 24 rows, float64 softmax" in text
    assert "equal work: LM head on the block's 8 rows, float32 softmax (as jaxgen)" in text
    assert "jaxgen speedup" in text
