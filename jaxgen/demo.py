"""`jaxgen demo`: the three paradigms end to end on an offline corpus, in a few CPU minutes.

Builds the standard-library corpus through tfds, trains a tiny AR, masked-diffusion and
block-diffusion model on it, samples from each, and prints one table (eval loss, bits per byte,
NFE, tokens/s) with decoded samples. Writes results.json and loss_curves.png to the output folder.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import config, data, objectives
from jaxgen.training import loop
from jaxgen.samplers import ar, block_diffusion, masked_diffusion

PROMPTS = ("import os\nimport sys\n", "def main(argv=None):\n")

PARADIGMS = {
    "autoregressive": dict(objective="ar"),
    "masked_diffusion": dict(objective="masked_diffusion"),
    "block_diffusion": dict(objective="block_diffusion", block_size=4),
}


def _prompt_batch(tokenizer, width: int):
    """Equal-length prompt rows: each prompt's last tokens, with BOS in front when it fits."""
    rows = [[tokenizer.bos_id] + list(tokenizer.encode(text)) for text in PROMPTS]
    width = min(width, *(len(r) for r in rows))
    return np.asarray([r[len(r) - width:] for r in rows], np.int32)


def sample(paradigm, params, cfg, prompt, gen_length: int):
    key = jax.random.key(0)
    if paradigm == "autoregressive":
        return lambda: ar.generate(params, cfg, prompt, key, max_new_tokens=gen_length)
    if paradigm == "masked_diffusion":
        return lambda: masked_diffusion.generate(params, cfg, prompt, key, gen_length=gen_length, steps=gen_length,
                                                 block_length=min(16, gen_length))
    return lambda: block_diffusion.generate(params, cfg, prompt, key, gen_length=gen_length, block_length=4,
                                            denoising_steps=4, remasking="low_confidence_dynamic", threshold=0.9)


def run(out_dir="out/demo", steps: int = 300, preset: str = "tiny", gen_length: int = 64, overrides=(),
        data_dir: str = "", progress: bool = True) -> dict:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_model, base_train = config.preset(preset)
    base_train = dataclasses.replace(base_train, steps=steps, eval_every=max(steps // 3, 1), log_every=10,
                                     ckpt_every=max(steps // 2, 1), data_dir=data_dir, progress=progress)
    config_overrides, option_overrides = objectives.split_overrides(overrides)  # options: per paradigm below
    base_model, base_train = objectives.apply_overrides(base_model, base_train, config_overrides)
    tokenizer = data.get_tokenizer(base_train.tokenizer)
    print(f"building the python_stdlib corpus (tfds, offline) and packing rows of {base_train.seq_len} tokens...")
    batches, val_rows = data.corpus(base_train, tokenizer)
    print(f"  {len(batches.rows)} train rows, {len(val_rows)} validation rows")
    prompt = jnp.asarray(_prompt_batch(tokenizer, 24))
    rows, curves = [], {}
    for name, kw in PARADIGMS.items():
        _, tcfg = objectives.apply_overrides(base_model, objectives.configure(base_train, **kw),
                                             objectives.overrides_for(option_overrides, kw["objective"]))
        t0 = time.perf_counter()
        result = loop.train(base_model, tcfg, out / name, batches=batches, val_rows=val_rows, desc=name, fresh=True)
        train_s = time.perf_counter() - t0
        curves[name] = loop.read_metrics(result["metrics_path"])
        params = result["state"].params
        gen = sample(name, params, base_model, prompt, gen_length)
        first = jax.block_until_ready(gen())
        times = []
        for _ in range(3):
            t = time.perf_counter()
            outp = jax.block_until_ready(gen())
            times.append(time.perf_counter() - t)
        new_tokens = prompt.shape[0] * gen_length
        eval_loss = result["eval_loss"]
        rows.append({"paradigm": name, "eval_loss": eval_loss,
                     "bits_per_byte": loop.bits_per_byte(eval_loss) if tokenizer.name == "bytes" else None,
                     "nfe": int(first.nfe), "tokens_per_s": new_tokens / float(np.median(times)),
                     "train_seconds": train_s,
                     "samples": [tokenizer.decode(r[prompt.shape[1]:]) for r in np.asarray(outp.tokens)],
                     "prompts": [tokenizer.decode(r) for r in np.asarray(prompt)]})
    table = format_table(rows)
    print(table)
    (out / "results.json").write_text(json.dumps({"rows": rows, "steps": steps, "preset": preset,
                                                  "gen_length": gen_length}, indent=2))
    plot_curves(curves, out / "loss_curves.png")
    print(f"wrote {out / 'results.json'} and {out / 'loss_curves.png'}")
    return {"rows": rows, "table": table}


def format_table(rows) -> str:
    lines = ["", f"{'paradigm':<18} {'eval loss':>9} {'bits/byte':>9} {'NFE':>5} {'tokens/s':>9}",
             "-" * 54]
    for r in rows:
        bpb = "n/a" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.3f}"
        lines.append(f"{r['paradigm']:<18} {r['eval_loss']:>9.3f} {bpb:>9} {r['nfe']:>5} {r['tokens_per_s']:>9.0f}")
    lines.append("(diffusion losses are ELBO bounds: their bits/byte are upper bounds)")
    for r in rows:
        lines.append(f"\n--- {r['paradigm']} samples ---")
        for p, s in zip(r["prompts"], r["samples"]):
            lines.append(repr(p + s))
    return "\n".join(lines)


def plot_curves(curves: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, records in curves.items():
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=f"{name} (train)")
        ev = [r for r in records if "eval_loss" in r]
        if ev:
            ax.scatter([r["step"] for r in ev], [r["eval_loss"] for r in ev], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token; diffusion: ELBO)")
    ax.set_ylim(0, math.log(260) * 1.6)
    ax.legend()
    ax.set_title("jaxgen demo: python_stdlib, tiny preset")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
