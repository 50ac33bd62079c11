"""Smoke tests of `jaxgen bench spec` and `jaxgen bench constrained`: tiny random models, one
repeat, a few tokens; the report's structure and the greedy-match check (timings never asserted)."""
import jax
import numpy as np
import pytest

from jaxgen import config, model
from jaxgen.bench import constrained, spec

# confident random predictions (init_std 0.5): greedy has no near-ties between chunked and 1-token forwards
TINY = config.ModelConfig(vocab_size=260, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                          mlp_dim=64, max_seq_len=256, init_std=0.5)
DRAFT = config.ModelConfig(vocab_size=260, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                           mlp_dim=64, max_seq_len=256, init_std=0.5)
CODE = ["def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n"
        "    return a * b\n"]


def numpy_params(cfg, seed: int) -> dict:
    """Random params of `model.init`'s shapes, drawn by NumPy (model.init compiles a program per shape)."""
    rng = np.random.default_rng(seed)
    draw = lambda path, shape: (np.ones(shape) if str(path[-1]).endswith("norm']")
                                else cfg.init_std * rng.standard_normal(shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, model.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


@pytest.fixture(scope="module")
def tiny_models():
    return spec.Models.of(TINY, numpy_params(TINY, 0), DRAFT, numpy_params(DRAFT, 1), "tiny random")


def test_bench_spec_reports_every_contender_and_greedy_matches(tiny_models):
    """Two drafters (a train-free one and the draft model) and no forward-cost table keep the
    compile time of the test small."""
    results = spec.run(models=tiny_models, prompt_len=16, new_tokens=8, batches=(1,), repeats=1,
                       drafters=("prompt_lookup", "model"), prompt_sets={"code": CODE}, cost_repeats=0)
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"jaxgen ar", "jaxgen prompt_lookup", "jaxgen model", "hf greedy", "hf prompt_lookup",
                         "hf assisted"}
    assert spec.mismatches(results) == []
    assert all(r["greedy_rows_equal"] == r["rows"] == 1 for r in rows.values())  # HF greedy too: same weights
    assert all(r["tokens_per_s"] > 0 and r["tokens_per_forward"] >= 1.0 for r in rows.values())
    assert rows["jaxgen ar"]["tokens_per_forward"] == 1.0 and rows["jaxgen ar"]["vs_ar"] == 1.0
    assert rows["jaxgen prompt_lookup"]["vs_hf_lookup"] > 0 and rows["hf prompt_lookup"]["vs_hf_greedy"] > 0
    assert results["chunks"] == {"prompt_lookup": 5, "model": 5}  # root + num_draft nodes
    text = spec.report(results)
    assert "jaxgen model" in text and "vs HF PL" in text and "HF torch threads" in text


def test_bench_constrained_reports_overhead_and_validity():
    """The JSON schema on both samplers, AR on both mask paths (the regex runs the same code; its
    checker is tested apart)."""
    results = constrained.run(model=(TINY, numpy_params(TINY, 0)), prompt_len=8, new_tokens=96,
                              batches=(1,), repeats=1, kinds=("json_schema",), prompt_texts=CODE)
    rows = results["rows"]
    assert [(r["sampler"], r["constraint"], r["masks"]) for r in rows] == [
        ("ar", "json_schema", "device"), ("ar", "json_schema", "host"), ("block_diffusion", "json_schema", "host")]
    assert all(r["valid_rate"] == 1.0 and r["sampler_valid_rate"] == 1.0 for r in rows)
    assert all(r["ms_per_forward_constrained"] > 0 and r["overhead_vs_ar_step_pct"] is not None
               and (r["host_calls"] > 0 and r["host_ms_per_forward"] > 0) == (r["masks"] == "host") for r in rows)
    assert "vs AR step" in constrained.report(results)
    assert constrained.is_valid("regex", "def run(self, x):") and not constrained.is_valid("regex", "def run(x):")
    assert not constrained.is_valid("json_schema", '{"name": "a", "version": 1000, "tags": []}')
