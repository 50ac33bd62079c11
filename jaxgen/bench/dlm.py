"""`jaxgen bench dlm`: diffusion-LM decoding, side by side in one run on the same weights.

1. jaxgen's LLaDA sampler against a plain PyTorch loop with LLaDA's semantics (ML-GSAI/LLaDA
   `generate.py`: fixed steps per block, low-confidence remasking, greedy) on the equivalent
   `transformers` Llama run with full attention; greedy tokens are checked identical.
2. Each Fast-dLLM mode (threshold, prefix cache, dual cache, threshold + dual cache) and
   dKV-Cache-Decode against
   jaxgen's own no-cache LLaDA run: tokens/s, NFE, tokens per NFE, and agreement of the tokens
   with the no-cache run (the caches are approximate by design).

Times are medians of `repeats` alternating rounds after a warm-up call (compile time reported
separately).
"""
from __future__ import annotations

import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import hf
from jaxgen.bench.ar import build_hf_llama
from jaxgen.bench.timing import alternate, block, median, timed
from jaxgen.samplers import masked_diffusion

MODES = {  # name -> extra sampler arguments (the baseline is LLaDA with steps = gen_length)
    "threshold 0.9": dict(threshold=0.9),
    "prefix cache": dict(cache="prefix"),
    "dual cache": dict(cache="dual"),
    "dKV decode (reload 4)": dict(cache="dkv_decode", cache_reloading_step=4),
    "threshold 0.9 + dual cache": dict(threshold=0.9, cache="dual"),
}


def torch_llada(model, prompt, *, gen_length, steps, block_length, mask_id):
    """LLaDA's greedy low-confidence loop in PyTorch (full attention via an all-zero additive
    4D mask); the mask token is never proposed, as in jaxgen."""
    import torch
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long)
    x[:, :P] = torch.as_tensor(prompt)
    full = torch.zeros(B, 1, x.shape[1], x.shape[1])
    num_blocks = gen_length // block_length
    spb = steps // num_blocks
    counts = np.full(spb, block_length // spb)
    counts[: block_length % spb] += 1
    with torch.no_grad():
        for b in range(num_blocks):
            end = P + (b + 1) * block_length
            for i in range(spb):
                masked = x == mask_id
                logits = model(x, attention_mask=full).logits
                logits[..., mask_id] = -torch.inf
                x0 = logits.argmax(-1)
                p = torch.softmax(logits.double(), -1).gather(-1, x0[..., None])[..., 0]
                p[:, end:] = -torch.inf
                conf = torch.where(masked, p, -torch.inf)
                x0 = torch.where(masked, x0, x)
                for r in range(B):
                    idx = torch.topk(conf[r], int(counts[i])).indices
                    x[r, idx] = x0[r, idx]
    return x.numpy()


def run(prompt_len=32, gen_length=256, block_length=32, steps=None, batch=1, repeats=3, threads=None) -> dict:
    import torch
    if threads:
        torch.set_num_threads(threads)
    steps = steps or gen_length
    hf_model = build_hf_llama()
    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        cfg, params = hf.load(d)
    mask_id = cfg.vocab_size - 1
    prompt = np.random.RandomState(0).randint(3, mask_id, (batch, prompt_len))
    kw = dict(gen_length=gen_length, steps=steps, block_length=block_length, mask_id=mask_id)

    def jaxgen_run(**extra):
        def fn():
            out = masked_diffusion.generate(params, cfg, jnp.asarray(prompt), jax.random.key(0), **kw, **extra)
            return block(out.tokens), int(out.nfe)
        return fn

    def torch_run():
        return torch_llada(hf_model, prompt, **kw)

    baseline = jaxgen_run()
    (base_tokens, base_nfe), base_compile = timed(baseline)
    base_tokens = np.asarray(base_tokens)
    identical = bool(np.array_equal(base_tokens, torch_run()))
    results = {"model": "llama hidden=256 layers=4 heads=4 vocab=4096 fp32", "prompt_len": prompt_len,
               "gen_length": gen_length, "block_length": block_length, "steps": steps, "batch": batch,
               "repeats": repeats, "torch_identical": identical}
    times = alternate({"torch": torch_run, "jaxgen": baseline}, repeats)
    new_tokens = batch * gen_length
    results["llada"] = {"torch_tokens_per_s": new_tokens / median(times["torch"]),
                        "jaxgen_tokens_per_s": new_tokens / median(times["jaxgen"]),
                        "speedup": median(times["torch"]) / median(times["jaxgen"]),
                        "nfe": base_nfe, "jaxgen_first_call_s": base_compile}

    fns = {name: jaxgen_run(**extra) for name, extra in MODES.items()}
    outputs, compile_s = {}, {}
    for name, fn in fns.items():
        (toks, nfe), compile_s[name] = timed(fn)
        outputs[name] = (np.asarray(toks), nfe)
    times = alternate({"no cache": baseline, **fns}, repeats)
    base_s = median(times["no cache"])
    rows = [{"mode": "LLaDA (no cache)", "nfe": base_nfe, "tokens_per_nfe": new_tokens / base_nfe / batch,
             "tokens_per_s": new_tokens / base_s, "speedup": 1.0, "agreement": 1.0}]
    for name in MODES:
        toks, nfe = outputs[name]
        rows.append({"mode": name, "nfe": nfe, "tokens_per_nfe": new_tokens / nfe / batch,
                     "tokens_per_s": new_tokens / median(times[name]), "speedup": base_s / median(times[name]),
                     "agreement": float(np.mean(toks[:, prompt_len:] == base_tokens[:, prompt_len:])),
                     "first_call_s": compile_s[name]})
    results["modes"] = rows
    return results


def report(r: dict) -> str:
    l = r["llada"]
    lines = [f"Diffusion-LM decode: {r['model']}, prompt {r['prompt_len']}, gen {r['gen_length']}, block "
             f"{r['block_length']}, steps {r['steps']}, batch {r['batch']}, median of {r['repeats']}",
             f"LLaDA greedy: PyTorch loop {l['torch_tokens_per_s']:.1f} tok/s, jaxgen {l['jaxgen_tokens_per_s']:.1f} "
             f"tok/s, {l['speedup']:.2f}x; tokens identical: {r['torch_identical']}; "
             f"jaxgen first call {l['jaxgen_first_call_s']:.1f} s",
             f"{'mode':<28} {'NFE':>5} {'tok/NFE':>8} {'tok/s':>8} {'vs no cache':>12} {'agreement':>10}"]
    for m in r["modes"]:
        lines.append(f"{m['mode']:<28} {m['nfe']:>5} {m['tokens_per_nfe']:>8.2f} {m['tokens_per_s']:>8.1f} "
                     f"{m['speedup']:>11.2f}x {100 * m['agreement']:>9.1f}%")
    return "\n".join(lines)


def main(args) -> None:
    results = run(prompt_len=args.prompt_len, gen_length=args.gen_length, block_length=args.block_length,
                  steps=args.steps or None, batch=args.batch, repeats=args.repeats or 3)
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
