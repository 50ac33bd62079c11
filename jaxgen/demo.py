"""`jaxgen demo`: the three paradigms end to end on an offline corpus, in a few CPU minutes.

Builds the standard-library corpus through tfds, fits a small byte-level BPE tokenizer on it
(`bpe_vocab` tokens; 0 = the byte tokenizer), trains a tiny AR, masked-diffusion and
block-diffusion model, and samples a continuation of each prompt from each (temperature /
top-p sampling by default; temperature=0 is greedy, which at this scale falls into runs of
whitespace). Prints one table (eval loss, bits per byte, NFE, tokens/s) with the samples, then
shows each diffusion decoder at work on one prompt: the canvas after every denoising step, and
unmasking_order.png (the step at which each position was committed). Writes results.json,
loss_curves.png and unmasking_order.png to the output folder.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import config, data, objectives, viz
from jaxgen.data import pipeline
from jaxgen.samplers import ar, block_diffusion, masked_diffusion
from jaxgen.training import loop, vocab

PROMPTS = ("import os\nimport sys\n", "def main(argv=None):\n", "class Error(Exception):\n")
TRACE_PROMPT = 1  # the prompt whose decoding is shown step by step

BLOCK = 4  # block diffusion's block size (training and decoding)
PARADIGMS = {
    "autoregressive": dict(objective="ar"),
    "masked_diffusion": dict(objective="masked_diffusion"),
    "block_diffusion": dict(objective="block_diffusion", block_size=BLOCK),
}
DECODERS = {  # how each paradigm's samples are decoded (see `sampler`)
    "autoregressive": "one token per forward, KV cache",
    "masked_diffusion": "LLaDA: blocks of 16 left to right, inside a block the most confident MASK first, "
                        "one token per forward",
    "block_diffusion": f"SDAR: blocks of {BLOCK} left to right with a KV cache, inside a block every MASK above "
                       "0.9 confidence (at least the most confident) per forward",
}
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<mask>")  # what jaxgen's HFTokenizer looks up by name


def fit_bpe(texts, vocab_size: int, path: pathlib.Path):
    """A byte-level BPE tokenizer.json of `vocab_size` tokens (SPECIAL_TOKENS first) fitted on
    `texts` (seconds, offline), loaded back as a jaxgen tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return data.get_tokenizer(str(path))


def prompt_batch(tokenizer):
    """(prompt [B, P] right-padded, per-row lengths or None when all are equal): BOS + each prompt."""
    rows = [[tokenizer.bos_id] + list(tokenizer.encode(text)) for text in PROMPTS]
    lengths = np.asarray([len(r) for r in rows], np.int32)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    batch = np.full((len(rows), lengths.max()), pad, np.int32)
    for i, r in enumerate(rows):
        batch[i, :len(r)] = r
    return jnp.asarray(batch), (None if (lengths == lengths.max()).all() else lengths)


def sampler(paradigm, params, cfg, prompt, key, *, gen_length: int, temperature: float, top_p: float,
            prompt_lengths=None):
    """A no-argument call of the paradigm's sampler. Masked diffusion (LLaDA) has no top-p: it
    samples at `temperature` only."""
    filters = dict(top_p=top_p) if temperature > 0 else {}
    if paradigm == "autoregressive":
        return lambda: ar.generate(params, cfg, prompt, key, gen_length=gen_length, temperature=temperature,
                                   prompt_lengths=prompt_lengths, **filters)
    if paradigm == "masked_diffusion":
        return lambda: masked_diffusion.generate(params, cfg, prompt, key, gen_length=gen_length, steps=gen_length,
                                                 block_length=min(16, gen_length), temperature=temperature,
                                                 prompt_lengths=prompt_lengths)
    return lambda: block_diffusion.generate(params, cfg, prompt, key, gen_length=gen_length, block_length=BLOCK,
                                            denoising_steps=BLOCK, remasking="low_confidence_dynamic", threshold=0.9,
                                            temperature=temperature, prompt_lengths=prompt_lengths, **filters)


def run(out_dir="out/demo", steps: int = 500, preset: str = "tiny", gen_length: int = 64, overrides=(),
        data_dir: str = "", progress: bool = True, bpe_vocab: int = 1024, temperature: float = 0.8,
        top_p: float = 0.9, trace_length: int = 32) -> dict:
    """Train, sample and report (see the module docstring). bpe_vocab: the size of the BPE
    tokenizer fitted on the corpus; 0, or a `tokenizer=PATH` override, uses the TrainConfig's
    tokenizer (bytes by default) instead. temperature 0 decodes greedily (top_p then unused).
    trace_length: tokens of the step-by-step decode of the diffusion models (0: none)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_model, base_train = config.preset(preset)
    base_train = dataclasses.replace(base_train, steps=steps, eval_every=max(steps // 3, 1), log_every=10,
                                     ckpt_every=steps, data_dir=data_dir, progress=progress)
    config_overrides, option_overrides = objectives.split_overrides(overrides)  # options: per paradigm below
    objectives.check_options_read(option_overrides, [p["objective"] for p in PARADIGMS.values()])
    base_model, base_train = objectives.apply_overrides(base_model, base_train, config_overrides)
    print("building the python_stdlib corpus (tfds, offline)...", flush=True)
    kw = dict(data_files=base_train.data_files, data_dir=base_train.data_dir, max_files=base_train.max_files)
    if bpe_vocab and base_train.tokenizer in ("bytes", ""):
        t0 = time.perf_counter()
        tokenizer = fit_bpe(pipeline.load_texts(base_train.dataset, "train", **kw), bpe_vocab, out / "tokenizer.json")
        base_train = dataclasses.replace(base_train, tokenizer=str(out / "tokenizer.json"))
        print(f"  fitted a {bpe_vocab}-token byte-level BPE tokenizer in {time.perf_counter() - t0:.1f} s")
    else:
        tokenizer = data.get_tokenizer(base_train.tokenizer)
    base_model = vocab.model_for_tokenizer(base_model, base_train, tokenizer)
    batches, val_rows = data.corpus(base_train, tokenizer)
    bytes_per_token = tokenizer.bytes_per_token("".join(pipeline.load_texts(base_train.dataset, "validation", **kw)))
    print(f"  {len(batches.rows)} train rows, {len(val_rows)} validation rows of {base_train.seq_len} tokens "
          f"({bytes_per_token:.2f} bytes per token)", flush=True)
    prompt, lengths = prompt_batch(tokenizer)
    row_len = lengths if lengths is not None else np.full(len(PROMPTS), prompt.shape[1])
    sampling = dict(temperature=temperature, top_p=top_p)
    rows, curves, traces = [], {}, {}
    for name, kw_obj in PARADIGMS.items():
        _, tcfg = objectives.apply_overrides(base_model, objectives.configure(base_train, **kw_obj),
                                             objectives.overrides_for(option_overrides, kw_obj["objective"]))
        t0 = time.perf_counter()
        result = loop.train(base_model, tcfg, out / name, batches=batches, val_rows=val_rows, tokenizer=tokenizer,
                            desc=name, fresh=True)
        train_s = time.perf_counter() - t0
        curves[name] = loop.read_metrics(result["metrics_path"])
        params = result["state"].params
        gen = sampler(name, params, base_model, prompt, jax.random.key(0), gen_length=gen_length,
                      prompt_lengths=lengths, **sampling)
        t0 = time.perf_counter()
        outp = jax.block_until_ready(gen())
        first_s = time.perf_counter() - t0
        times = []
        for _ in range(3):
            t = time.perf_counter()
            jax.block_until_ready(gen())
            times.append(time.perf_counter() - t)
        tokens = np.asarray(outp.tokens)
        eval_loss = result["eval_loss"]
        rows.append({"paradigm": name, "eval_loss": eval_loss,
                     "bits_per_byte": loop.bits_per_byte(eval_loss, bytes_per_token),
                     "nfe": int(outp.nfe), "tokens_per_s": len(PROMPTS) * gen_length / float(np.median(times)),
                     "train_seconds": train_s, "sampler_first_call_s": first_s,
                     "prompts": [tokenizer.decode(r[:n]) for r, n in zip(tokens, row_len)],
                     "samples": [tokenizer.decode(r[n:n + gen_length]) for r, n in zip(tokens, row_len)]})
        if name != "autoregressive" and trace_length:
            traces[name] = trace(name, params, base_model, tokenizer, trace_length, **sampling)
    table = format_table(rows, sampling)
    print(table)
    for name, t in traces.items():
        print(f"\n--- {name}, step by step ({DECODERS[name]}): {t['setting']} ---")
        print("\n".join(t["table"]))
    (out / "results.json").write_text(json.dumps({
        "rows": rows, "steps": steps, "preset": preset, "gen_length": gen_length, "sampling": sampling,
        "tokenizer": tokenizer.name, "bytes_per_token": bytes_per_token,
        "traces": {k: {f: v for f, v in t.items() if f != "table"} for k, t in traces.items()}}, indent=2))
    plot_curves(curves, out / "loss_curves.png", preset)
    written = [out / "results.json", out / "loss_curves.png"]
    if traces:
        viz.plot_unmasking({k: dict(commit_steps=t["commit_steps"], texts=t["texts"], title=t["setting"])
                            for k, t in traces.items()}, out / "unmasking_order.png")
        written.append(out / "unmasking_order.png")
    print(f"wrote {', '.join(map(str, written))}")
    return {"rows": rows, "table": table, "traces": traces}


def trace(name, params, cfg, tokenizer, gen_length: int, *, temperature: float, top_p: float) -> dict:
    """Decode TRACE_PROMPT alone with the paradigm's sampler, recording the canvas after every
    step (`viz.record_canvases`): the step table, each position's commit step, the final tokens.
    Block diffusion decodes whole blocks, so its length is cut to end on a block boundary (no
    step then commits a position past the returned tokens)."""
    text = PROMPTS[TRACE_PROMPT]
    prompt = jnp.asarray([[tokenizer.bos_id] + list(tokenizer.encode(text))], jnp.int32)
    P = prompt.shape[1]
    if name == "block_diffusion":
        gen_length -= (P + gen_length) % BLOCK
    gen = sampler(name, params, cfg, prompt, jax.random.key(1), gen_length=gen_length, temperature=temperature,
                  top_p=top_p)
    with viz.record_canvases() as frames:
        out = jax.block_until_ready(gen())
    canvases = viz.generated(frames, 0, P, gen_length)
    tokens = np.asarray(out.tokens)[0, P:P + gen_length]
    setting = f"{text!r} + {gen_length} tokens, {len(frames)} steps, NFE {int(out.nfe)}"
    return {"setting": setting, "prompt": text, "tokens": tokens.tolist(), "nfe": int(out.nfe),
            "frames": canvases.tolist(), "frame_nfe": [f.nfe for f in frames],
            "commit_steps": viz.commit_steps(canvases, cfg.mask_id).tolist(),
            "texts": [viz.token_text(tokenizer, int(t), cfg.mask_id) for t in tokens],
            "table": viz.step_table(frames, canvases, tokenizer, cfg.mask_id)}


def sampling_text(paradigm: str, temperature: float, top_p: float) -> str:
    if temperature == 0:
        return "greedy"
    if paradigm == "masked_diffusion":
        return f"temperature {temperature} (LLaDA's sampler has no top-p)"
    return f"temperature {temperature}, top-p {top_p}"


def format_table(rows, sampling) -> str:
    lines = ["", f"{'paradigm':<18} {'eval loss':>9} {'bits/byte':>9} {'NFE':>5} {'tokens/s':>9}",
             "-" * 54]
    for r in rows:
        bpb = "n/a" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.3f}"
        lines.append(f"{r['paradigm']:<18} {r['eval_loss']:>9.3f} {bpb:>9} {r['nfe']:>5} {r['tokens_per_s']:>9.0f}")
    lines += ["(eval loss in nats per token; diffusion losses are ELBO bounds: their bits/byte are upper bounds.",
              " Per step, the diffusion objectives learn more slowly than next-token prediction: after a few",
              " hundred steps their samples are still rough; --steps trains longer.)"]
    for r in rows:
        lines.append(f"\n--- {r['paradigm']} samples ({DECODERS[r['paradigm']]}; "
                     f"{sampling_text(r['paradigm'], **sampling)}) ---")
        for p, s in zip(r["prompts"], r["samples"]):
            lines += [p + s, "~" * 40]
    return "\n".join(lines)


def plot_curves(curves: dict, path, preset: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    top = 0.0
    for name, records in curves.items():
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=f"{name} (train)")
        top = max([top] + [r["loss"] for r in records])
        ev = [r for r in records if "eval_loss" in r]
        if ev:
            ax.scatter([r["step"] for r in ev], [r["eval_loss"] for r in ev], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token; diffusion: ELBO)")
    ax.set_ylim(0, 1.05 * top if top > 0 else 1)
    ax.legend()
    ax.set_title(f"jaxgen demo: python_stdlib, {preset} preset")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
