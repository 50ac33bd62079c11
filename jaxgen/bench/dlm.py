"""`jaxgen bench dlm`: diffusion-LM decoding, side by side in one run on the same weights.

1. jaxgen's LLaDA sampler against two plain PyTorch loops with LLaDA's semantics (ML-GSAI/LLaDA
   `generate.py`: fixed steps per block, low-confidence remasking, greedy) on the equivalent
   `transformers` Llama run with full attention; greedy tokens are checked identical for both.
   "As written" is the reference's own recipe: the LM head on every canvas row and a float64
   softmax over all of them, although only the current block's rows can be committed. "Equal
   work" does what jaxgen does: the whole canvas through the transformer, the LM head and a
   float32 softmax on the block's rows only. The first ratio is what a LLaDA user moving to
   jaxgen sees; the second is the like-for-like comparison of the two frameworks.
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


def torch_llada(model, prompt, *, gen_length, steps, block_length, mask_id, equal_work: bool = False):
    """LLaDA's greedy low-confidence loop in PyTorch (full attention via an all-zero additive
    4D mask); the mask token is never proposed, as in jaxgen. As written (`equal_work=False`):
    logits of every row and a float64 softmax, as LLaDA's `generate.py`; `equal_work=True`: the
    LM head and a float32 softmax on the current block's rows only (jaxgen's work)."""
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
            start, end = P + b * block_length, P + (b + 1) * block_length
            for i in range(spb):
                if equal_work:
                    hidden = model.model(input_ids=x, attention_mask=full).last_hidden_state
                    logits = model.lm_head(hidden[:, start:end])
                    window, probs_dtype = x[:, start:end], torch.float32
                else:
                    logits = model(x, attention_mask=full).logits
                    window, probs_dtype = x, torch.float64
                logits[..., mask_id] = -torch.inf
                x0 = logits.argmax(-1)
                p = torch.softmax(logits.to(probs_dtype), -1).gather(-1, x0[..., None])[..., 0]
                if not equal_work:
                    p[:, end:] = -torch.inf
                masked = window == mask_id
                conf = torch.where(masked, p, -torch.inf)
                x0 = torch.where(masked, x0, window)
                offset = start if equal_work else 0
                for r in range(B):
                    idx = torch.topk(conf[r], int(counts[i])).indices
                    x[r, idx + offset] = x0[r, idx]
    return x.numpy()


def run(prompt_len=32, gen_length=256, block_length=32, steps=None, batch=1, repeats=3, threads=None, modes=None,
        model_size=None) -> dict:
    """modes: the cache modes to compare with no cache (default MODES); model_size: build_hf_llama's
    hidden/layers/heads/vocab (default hidden=256 layers=4 heads=4 vocab=4096)."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    steps = steps or gen_length
    modes = MODES if modes is None else modes
    size = {**dict(hidden=256, layers=4, heads=4, vocab=4096), **(model_size or {})}
    hf_model = build_hf_llama(**size)
    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        cfg, params = hf.load(d, form="decode")  # the fast form (see model.decode_params)
    mask_id = cfg.vocab_size - 1
    prompt = np.random.RandomState(0).randint(3, mask_id, (batch, prompt_len))
    kw = dict(gen_length=gen_length, steps=steps, block_length=block_length, mask_id=mask_id)

    def jaxgen_run(**extra):
        def fn():
            out = masked_diffusion.generate(params, cfg, jnp.asarray(prompt), jax.random.key(0), **kw, **extra)
            return block(out.tokens), int(out.nfe)
        return fn

    def torch_run(equal_work):
        return lambda: torch_llada(hf_model, prompt, **kw, equal_work=equal_work)

    loops = {"as written": torch_run(False), "equal work": torch_run(True)}
    baseline = jaxgen_run()
    (base_tokens, base_nfe), base_compile = timed(baseline)
    base_tokens = np.asarray(base_tokens)
    identical = {name: bool(np.array_equal(base_tokens, fn())) for name, fn in loops.items()}
    results = {"model": "llama " + " ".join(f"{k}={v}" for k, v in size.items()) + " fp32",
               "prompt_len": prompt_len, "gen_length": gen_length, "block_length": block_length, "steps": steps,
               "batch": batch, "repeats": repeats}
    times = alternate({**loops, "jaxgen": baseline}, repeats)
    new_tokens = batch * gen_length
    jax_s = median(times["jaxgen"])
    results["llada"] = {"jaxgen_tokens_per_s": new_tokens / jax_s, "nfe": base_nfe, "jaxgen_first_call_s": base_compile,
                        "torch": {name: {"tokens_per_s": new_tokens / median(times[name]),
                                         "jaxgen_speedup": median(times[name]) / jax_s,
                                         "tokens_identical": identical[name]} for name in loops}}

    fns = {name: jaxgen_run(**extra) for name, extra in modes.items()}
    outputs, compile_s = {}, {}
    for name, fn in fns.items():
        (toks, nfe), compile_s[name] = timed(fn)
        outputs[name] = (np.asarray(toks), nfe)
    times = alternate({"no cache": baseline, **fns}, repeats)
    base_s = median(times["no cache"])
    rows = [{"mode": "LLaDA (no cache)", "nfe": base_nfe, "tokens_per_nfe": new_tokens / base_nfe / batch,
             "tokens_per_s": new_tokens / base_s, "speedup": 1.0, "agreement": 1.0}]
    for name in modes:
        toks, nfe = outputs[name]
        rows.append({"mode": name, "nfe": nfe, "tokens_per_nfe": new_tokens / nfe / batch,
                     "tokens_per_s": new_tokens / median(times[name]), "speedup": base_s / median(times[name]),
                     "agreement": float(np.mean(toks[:, prompt_len:] == base_tokens[:, prompt_len:])),
                     "first_call_s": compile_s[name]})
    results["modes"] = rows
    return results


LOOP_LABELS = {  # how each PyTorch loop's work differs from jaxgen's (which computes the block's logits only)
    "as written": "LLaDA's generate.py, LM head on all {rows} rows, float64 softmax",
    "equal work": "LM head on the block's {block} rows, float32 softmax (as jaxgen)",
}


def report(r: dict) -> str:
    l = r["llada"]
    labels = {name: f"{name}: " + text.format(rows=r["prompt_len"] + r["gen_length"], block=r["block_length"])
              for name, text in LOOP_LABELS.items()}
    width = max(len(t) for t in labels.values())
    lines = [f"Diffusion-LM decode: {r['model']}, prompt {r['prompt_len']}, gen {r['gen_length']}, block "
             f"{r['block_length']}, steps {r['steps']}, batch {r['batch']}, median of {r['repeats']}",
             f"LLaDA greedy: jaxgen {l['jaxgen_tokens_per_s']:.1f} tok/s (first call {l['jaxgen_first_call_s']:.1f} s) "
             f"vs two PyTorch loops with LLaDA's semantics:",
             f"  {'PyTorch loop':<{width}} {'tok/s':>8} {'jaxgen speedup':>15} {'tokens identical':>17}"]
    for name, t in l["torch"].items():
        lines.append(f"  {labels[name]:<{width}} {t['tokens_per_s']:>8.1f} {t['jaxgen_speedup']:>14.2f}x "
                     f"{str(t['tokens_identical']):>17}")
    lines.append(f"{'mode':<28} {'NFE':>5} {'tok/NFE':>8} {'tok/s':>8} {'vs no cache':>12} {'agreement':>10}")
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
