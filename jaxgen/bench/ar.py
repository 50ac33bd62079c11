"""`jaxgen bench ar`: jaxgen's AR sampler against Hugging Face `generate` on the same weights.

Builds a random-weight `transformers` Llama, saves it, loads it with `jaxgen.hf.load`, checks
greedy outputs are identical, then times both alternately (median of `repeats` after warm-up;
jaxgen's compile time is reported on its own). Also reports training tokens/s of a preset and
its fraction of the measured matmul throughput.
"""
from __future__ import annotations

import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import config, hf, parallel
from jaxgen import model as model_lib
from jaxgen.bench.timing import alternate, block, matmul_gflops, median, timed
from jaxgen.samplers import ar
from jaxgen.training import loop
from jaxgen.training.state import init_state, make_optimizer, state_shardings


def build_hf_llama(hidden=256, layers=4, heads=4, vocab=4096, seed=0):
    import torch
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=heads,
                                   intermediate_size=4 * hidden, max_position_embeddings=512,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def run(prompt_len=32, new_tokens=128, batches=(1, 8), repeats=5, threads: int | None = None,
        train_preset: str = "tiny") -> dict:
    import torch
    if threads:
        torch.set_num_threads(threads)
    hf_model = build_hf_llama()
    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        cfg, params = hf.load(d, form="decode")  # the fast form (see model.decode_params)
    results = {"model": "llama hidden=256 layers=4 heads=4 vocab=4096 fp32", "prompt_len": prompt_len,
               "new_tokens": new_tokens, "repeats": repeats, "rows": []}
    for batch in batches:
        prompt = np.random.RandomState(batch).randint(3, cfg.vocab_size, (batch, prompt_len))

        def run_hf():
            with torch.no_grad():
                return hf_model.generate(torch.tensor(prompt), max_new_tokens=new_tokens, do_sample=False,
                                         attention_mask=torch.ones(batch, prompt_len, dtype=torch.long))

        def run_jax():
            return block(ar.generate(params, cfg, jnp.asarray(prompt), jax.random.key(0),
                                     max_new_tokens=new_tokens).tokens)

        ours, compile_s = timed(run_jax)
        theirs = run_hf().numpy()
        identical = bool(np.array_equal(np.asarray(ours), theirs))
        times = alternate({"hf": run_hf, "jaxgen": run_jax}, repeats)
        hf_tps = batch * new_tokens / median(times["hf"])
        jax_tps = batch * new_tokens / median(times["jaxgen"])
        results["rows"].append({"batch": batch, "greedy_identical": identical, "hf_tokens_per_s": hf_tps,
                                "jaxgen_tokens_per_s": jax_tps, "speedup": jax_tps / hf_tps,
                                "jaxgen_first_call_s": compile_s})
    results["train"] = train_throughput(train_preset)
    return results


def train_throughput(preset_name: str, steps: int = 10) -> dict:
    """Tokens/s of the jitted train step of a preset (random batches) and its share of matmul peak."""
    cfg, tcfg = config.preset(preset_name)
    mesh = parallel.make_mesh("")
    opt, _ = make_optimizer(tcfg)
    shard = state_shardings(cfg, tcfg, mesh, opt)
    state = init_state(cfg, opt, jax.random.key(0), shard)
    bshard = parallel.batch_sharding(mesh, tcfg.rules, tcfg.batch_size)
    step = loop.make_train_step(cfg, tcfg, opt, shard, bshard)
    batch = parallel.put_batch({"tokens": np.random.RandomState(0).randint(0, 256, (tcfg.batch_size, tcfg.seq_len))},
                               bshard)
    state, m = step(state, batch, jax.random.key(1))
    block(m["loss"])
    times = []
    for i in range(steps):
        (state, m), dt = timed(lambda: block(step(state, batch, jax.random.key(i))))
        times.append(dt)
    tokens = tcfg.batch_size * tcfg.seq_len
    tps = tokens / median(times)
    # the embedding lookup is no matmul; a tied embedding is still used once, as the output head
    n_matmul = model_lib.num_params(state.params) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size)
    attn_flops = 12 * cfg.num_layers * tcfg.seq_len * cfg.num_heads * cfg.head_dim  # fwd+bwd QK^T and PV per token
    flops_per_token = 6 * n_matmul + attn_flops
    peak = matmul_gflops()
    achieved = tps * flops_per_token / 1e9
    return {"preset": preset_name, "tokens_per_s": tps, "model_gflops": achieved, "matmul_gflops": peak,
            "fraction_of_matmul_peak": achieved / peak}


def report(results: dict) -> str:
    lines = [f"AR decode: {results['model']}, prompt {results['prompt_len']}, {results['new_tokens']} new tokens, "
             f"median of {results['repeats']}",
             f"{'batch':>5} {'identical':>9} {'HF tok/s':>10} {'jaxgen tok/s':>13} {'ratio':>7} {'jaxgen 1st call s':>18}"]
    for r in results["rows"]:
        lines.append(f"{r['batch']:>5} {str(r['greedy_identical']):>9} {r['hf_tokens_per_s']:>10.0f} "
                     f"{r['jaxgen_tokens_per_s']:>13.0f} {r['speedup']:>6.2f}x {r['jaxgen_first_call_s']:>18.2f}")
    t = results["train"]
    lines.append(f"train ({t['preset']}): {t['tokens_per_s']:.0f} tokens/s = {t['model_gflops']:.1f} GFLOP/s, "
                 f"{100 * t['fraction_of_matmul_peak']:.1f}% of the measured {t['matmul_gflops']:.0f} GFLOP/s "
                 "1024^3 matmul")
    return "\n".join(lines)


def main(args) -> None:
    results = run(prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                  batches=tuple(int(b) for b in args.batches.split(",")), repeats=args.repeats or 5)
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
