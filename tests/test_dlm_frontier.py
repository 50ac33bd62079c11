"""experiments/dlm_frontier.py runs end to end on tiny settings (numbers printed, never asserted)."""
import importlib.util
import json
import pathlib

import pytest

from helpers import TINY_RUN

NAMES = ["AR greedy", "LLaDA", "Fast-dLLM threshold 0.9 + dual", "Learn2PD filter 0.9",
         "Dream entropy (2 tokens/step)", "NBDiff threshold 0.9", "WeDLM streaming (entropy 0.4)"]
BASELINES = ["Dream entropy (1 token/step)", "NBDiff (1 token/step)", "WeDLM AR greedy"]  # run with the above


@pytest.mark.slow
def test_frontier_writes_json_and_plot(tmp_path, data_dir):
    path = pathlib.Path(__file__).parents[1] / "experiments" / "dlm_frontier.py"
    spec = importlib.util.spec_from_file_location("dlm_frontier", path)
    frontier = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(frontier)
    out = tmp_path / "frontier"
    # one prompt row: its "rows decoded alone" pass reuses the batched run's compilation; the models
    # and the filter's rollouts have the shapes of tests/training's runs, whose compilations they reuse
    frontier.run(out_dir=out, steps=2, adapt_steps=2, gen_length=8, block=8, batch=1, prompt_len=8, repeats=1,
                 progress=False, data_dir=data_dir, only=NAMES, overrides=TINY_RUN + ["filter_rollouts=8"])
    result = json.loads((out / "frontier.json").read_text())
    rows = result["rows"]
    assert {(g["decoder"], g["field"]) for g in result["goals"]} == {
        ("Fast-dLLM threshold 0.9 + dual", "speedup_vs_baseline"),
        ("Fast-dLLM threshold 0.9 + dual", "bpb_change_vs_baseline")}  # only goals whose decoder ran
    assert sorted(r["decoder"] for r in rows) == sorted(NAMES + BASELINES)
    assert all(r["agreement"] is not None for r in rows if r["baseline"])
    assert (out / "learn2pd" / "filter.json").exists()
    assert all((out / m / "run_config.json").exists() for m in ("nbdiff", "dream", "wedlm"))
    assert all(r["nfe"] > 0 and r["tokens_per_s"] > 0 and r["bits_per_byte"] > 0 for r in rows)
    assert all(0 < r["row_tokens_per_nfe"] <= 8 for r in rows)  # each row decoded alone: 1..gen_length NFE
    by_name = {r["decoder"]: r for r in rows}
    one_per_step = ["AR greedy", "LLaDA", "Dream entropy (1 token/step)", "NBDiff (1 token/step)", "WeDLM AR greedy"]
    assert [by_name[n]["nfe"] for n in one_per_step] == [8] * 5 and by_name["Dream entropy (2 tokens/step)"]["nfe"] == 4
    assert all(r["row_tokens_per_nfe"] == r["tokens_per_nfe"] == 8 / r["nfe"] for r in rows)  # one row: the same
    assert all(r["speedup_vs_baseline"] > 0 for r in rows if r["baseline"])
    assert (out / "frontier.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="unknown decoder"):
        frontier.select_decoders(frontier.decoders(8, 8), ["LLaDA", "no such decoder"])


def load_frontier():
    path = pathlib.Path(__file__).parents[1] / "experiments" / "dlm_frontier.py"
    spec = importlib.util.spec_from_file_location("dlm_frontier", path)
    frontier = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(frontier)
    return frontier


def test_eos_fill_rows_count_tokens_through_the_first_eos_only():
    """EoTP decoders fill after a committed EOS: their speed and quality count each row's tokens
    through its first generated EOS (the prompt's EOS and the fill are not counted); others count all."""
    import numpy as np
    frontier = load_frontier()
    assert set(frontier.EOS_FILL) <= set(frontier.decoders(8, 8))
    eos, P = 9, 2
    tokens = np.array([[eos, 1, 5, 6, eos, eos, eos, eos],   # EOS at generated index 2: 3 counted
                       [1, 2, 5, 6, 7, 8, 5, 6],             # no EOS: all 6
                       [1, 2, eos, eos, eos, eos, eos, eos]])  # EOS first: 1
    fill = frontier.counted_lengths(tokens, P, eos, fills_after_eos=True)
    assert fill.tolist() == [3, 6, 1]
    assert frontier.counted_lengths(tokens, P, eos, fills_after_eos=False).tolist() == [6, 6, 6]
    # 4-grams over the counted tokens only: row 1 has 3 distinct of 3, the others none to count
    assert frontier.distinct_4grams(tokens, P, fill) == np.mean([0.0, 1.0, 0.0])
    assert frontier.distinct_4grams(tokens, P) < frontier.distinct_4grams(tokens[1:2], P)


def test_bits_per_byte_scores_only_the_counted_tokens(tiny_cfg, tiny_params):
    import numpy as np
    frontier = load_frontier()
    tokens = np.random.RandomState(0).randint(0, 256, (2, 12))
    lengths = np.array([3, 8])
    changed = tokens.copy()
    changed[0, 4 + 3:] = 7  # after row 0's counted tokens (prompt 4)
    score = lambda t, n=lengths: frontier.ar_bits_per_byte(tiny_params, tiny_cfg, t, 4, n)  # noqa: E731
    assert score(changed) == score(tokens) != score(changed, None)
    nll = np.asarray(frontier._continuation_nll(tiny_params, tiny_cfg, tokens, prompt_len=4))
    np.testing.assert_allclose(score(tokens), np.concatenate([nll[0, :3], nll[1]]).mean() / np.log(2), rtol=1e-6)
