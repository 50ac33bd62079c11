"""Speed vs quality of every diffusion-LM decoder in jaxgen, on models trained here.

Trains (or reloads from --out) small models on the offline python_stdlib corpus: an AR model
for --steps (the AR baseline and the quality judge), then one model per objective the decoders
need, each adapted from the AR weights (`init_from`) for --adapt-steps (default steps / 5), as
Dream, SDAR, NBDiff, Efficient-DLM, TiDAR and WeDLM are: masked diffusion (LLaDA, Fast-dLLM,
dKV-Cache, Learn2PD), Dream (shifted logits), block diffusion (SDAR, BD3-LM), TiDAR, NBDiff
(block-size curriculum from 1 plus the auxiliary AR loss), Efficient-DLM (position-dependent
masking) and WeDLM (causal MASK prediction). The Learn2PD filter is then fitted on oracle
rollouts of the masked-diffusion model.

For each decoder it measures NFE, tokens per NFE (of the batched run, whose loops run until
every row is done, and the mean over rows decoded one at a time, the papers' measure), tokens/s
(median of --repeats timed runs after one compile run), bits per byte of the generated
continuation under the AR model, its fraction of distinct 4-grams (bits/byte alone rewards
degenerate repeats such as runs of spaces), and token agreement with its baseline (LLaDA without
cache for the masked-diffusion decoders, the same model's static/one-token-per-step decode for
block decoders, greedy AR of the same model for TiDAR and WeDLM). Decoders with End-of-Text
Prediction (EOS_FILL) fill every position after a committed EOS with EOS without generating it:
their tokens/s, tokens per NFE, bits per byte and 4-grams count each row's tokens through its
first EOS only (the `tokens` column). Writes frontier.json and frontier.png (tokens/s against
bits/byte) to --out, and reports which of the issue's speed goals (GOALS) the decoders that ran
meet.

    python experiments/dlm_frontier.py                    # 2 CPU cores: minutes
    python experiments/dlm_frontier.py --preset small --steps 4000 --gen-length 256   # accelerators
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import config, data, model, objectives
from jaxgen.samplers import ar, block_diffusion, dream, learn2pd, masked_diffusion, nbdiff, tidar, wedlm
from jaxgen.training import filter_fit, loop

OBJECTIVES = {  # model name -> TrainConfig fields and objective options; every model but the AR one is adapted from the AR weights
    "ar": dict(objective="ar"),
    "masked_diffusion": dict(objective="masked_diffusion"),
    "block_diffusion": dict(objective="block_diffusion", block_size=4),
    "tidar": dict(objective="tidar", block_size=4),
    "nbdiff": dict(objective="nbdiff", block_size=8, curriculum="half"),
    "efficient_dlm": dict(objective="efficient_dlm", block_size=4, position_mask_beta=1.0),
    "dream": dict(objective="dream"),
    "wedlm": dict(objective="wedlm", block_size=16),
}
FILTER = "learn2pd"  # pseudo-model: the masked-diffusion params plus the Learn2PD filter fitted on them
# decoders with End-of-Text Prediction: every position after a committed EOS is filled with EOS,
# not generated, so their rows count each row's tokens through its first EOS only (speed and quality)
EOS_FILL = ("LLaDA + EoTP", "Learn2PD filter 0.9 + EoTP + dual")


def decoders(gen_length: int, block: int):
    """name -> (model, baseline name or None, sampler(params, cfg, prompt, key))."""
    md = dict(gen_length=gen_length, steps=gen_length, block_length=block)
    bd = dict(gen_length=gen_length, block_length=4, denoising_steps=4)
    mdg = lambda **kw: lambda p, c, x, k: masked_diffusion.generate(p, c, x, k, **md, **kw)
    bdg = lambda **kw: lambda p, c, x, k: block_diffusion.generate(p, c, x, k, **bd, **kw)
    l2pd = lambda **kw: lambda p, c, x, k: masked_diffusion.generate(p["lm"], c, x, k, **md, commit_filter=p["filter"],
                                                                      **kw)
    nbd = lambda **kw: lambda p, c, x, k: nbdiff.generate(p, c, x, k, gen_length=gen_length, block_length=8, **kw)
    drm = lambda steps, **kw: lambda p, c, x, k: dream.generate(p, c, x, k, gen_length=gen_length, steps=steps, **kw)
    wed = lambda **kw: lambda p, c, x, k: wedlm.generate(p, c, x, k, gen_length=gen_length, **kw)
    greedy = lambda p, c, x, k: ar.generate(p, c, x, k, max_new_tokens=gen_length)
    return {
        "AR greedy": ("ar", None, greedy),
        "LLaDA": ("masked_diffusion", None, mdg()),
        "Fast-dLLM threshold 0.9": ("masked_diffusion", "LLaDA", mdg(threshold=0.9)),
        "Fast-dLLM factor 1.0": ("masked_diffusion", "LLaDA", mdg(factor=1.0)),
        "Fast-dLLM prefix cache": ("masked_diffusion", "LLaDA", mdg(cache="prefix")),
        "Fast-dLLM dual cache": ("masked_diffusion", "LLaDA", mdg(cache="dual")),
        "Fast-dLLM threshold 0.9 + dual": ("masked_diffusion", "LLaDA", mdg(threshold=0.9, cache="dual")),
        "dKV decode (reload 4)": ("masked_diffusion", "LLaDA", mdg(cache="dkv_decode")),
        "dKV greedy (random, reload 2, window 4)": ("masked_diffusion", "LLaDA",
                                                    mdg(cache="dkv_greedy", remasking="random",
                                                        cache_reloading_step=2)),
        "LLaDA + EoTP": ("masked_diffusion", "LLaDA", mdg(eotp=True)),
        "Learn2PD filter 0.9": (FILTER, "LLaDA", l2pd(filter_threshold=0.9)),
        "Learn2PD filter 0.99": (FILTER, "LLaDA", l2pd(filter_threshold=0.99)),
        "Learn2PD filter 0.9 + EoTP + dual": (FILTER, "LLaDA", l2pd(filter_threshold=0.9, eotp=True, cache="dual")),
        "Dream entropy (1 token/step)": ("dream", None, drm(gen_length, alg="entropy")),
        "Dream entropy (2 tokens/step)": ("dream", "Dream entropy (1 token/step)", drm(gen_length // 2, alg="entropy")),
        "SDAR static": ("block_diffusion", None, bdg(remasking="low_confidence_static")),
        "SDAR dynamic 0.9": ("block_diffusion", "SDAR static", bdg(remasking="low_confidence_dynamic", threshold=0.9)),
        "SDAR dynamic 0.9 + fused block write": ("block_diffusion", "SDAR dynamic 0.9",
                                                bdg(remasking="low_confidence_dynamic", threshold=0.9,
                                                    fuse_block_write=True)),
        "BD3-LM first hitting (top-p 0.9)": ("block_diffusion", "SDAR static",
                                             bdg(remasking="first_hitting", temperature=1.0, top_p=0.9)),
        "Efficient-DLM static": ("efficient_dlm", None, bdg(remasking="low_confidence_static")),
        "Efficient-DLM dynamic 0.9": ("efficient_dlm", "Efficient-DLM static",
                                      bdg(remasking="low_confidence_dynamic", threshold=0.9)),
        "NBDiff (1 token/step)": ("nbdiff", None, nbd(alg="origin")),
        "NBDiff threshold 0.9": ("nbdiff", "NBDiff (1 token/step)", nbd(alg="confidence_threshold", threshold=0.9)),
        "TiDAR AR greedy": ("tidar", None, greedy),
        "TiDAR (draft 4)": ("tidar", "TiDAR AR greedy",
                            lambda p, c, x, k: tidar.generate(p, c, x, k, gen_length=gen_length, draft_length=4)),
        "WeDLM AR greedy": ("wedlm", None, greedy),
        "WeDLM 1 token/step": ("wedlm", "WeDLM AR greedy", wed(entropy_threshold=None)),
        "WeDLM streaming (entropy 0.4)": ("wedlm", "WeDLM AR greedy", wed()),
    }


GOALS = [  # issue 3's goals on the trained model: (decoder, row field, comparison, target)
    ("Fast-dLLM threshold 0.9 + dual", "speedup_vs_baseline", ">=", 5.0),  # tokens/s vs LLaDA
    ("Fast-dLLM threshold 0.9 + dual", "bpb_change_vs_baseline", "<=", 0.05),  # quality within 5%
    ("SDAR dynamic 0.9", "tokens_per_nfe", ">=", 2.0),
    ("SDAR dynamic 0.9 + fused block write", "tokens_per_nfe", ">=", 2.0),
    ("TiDAR (draft 4)", "tokens_per_nfe", ">=", 2.0),
]


def goal_report(rows) -> list[dict]:
    """Each goal whose decoder ran: its value, target and whether it is met."""
    by_name = {r["decoder"]: r for r in rows}
    report = []
    for decoder, field, op, target in GOALS:
        value = by_name.get(decoder, {}).get(field)
        if value is not None:
            met = value >= target if op == ">=" else value <= target
            report.append({"decoder": decoder, "field": field, "value": value, "goal": f"{op} {target}", "met": met})
    return report


def counted_lengths(tokens, prompt_len: int, eos_id, fills_after_eos: bool) -> np.ndarray:
    """[B] generated tokens each row counts: all of them, or, for a decoder that fills after EOS
    (EOS_FILL), those through the row's first generated EOS (the fill is not generated)."""
    gen = np.asarray(tokens)[:, prompt_len:]
    if not fills_after_eos or eos_id is None:
        return np.full(gen.shape[0], gen.shape[1])
    is_eos = gen == eos_id
    return np.where(is_eos.any(1), is_eos.argmax(1) + 1, gen.shape[1])


def distinct_4grams(tokens, prompt_len: int, lengths=None) -> float:
    """Mean over rows of the fraction of distinct 4-grams in the continuation (its first
    lengths[i] tokens): 1 for text without repeats, near 0 for degenerate runs (e.g. all spaces),
    which bits/byte alone rewards."""
    gen = np.asarray(tokens)[:, prompt_len:]
    lengths = np.full(gen.shape[0], gen.shape[1]) if lengths is None else lengths
    fractions = []
    for row, n in zip(gen, lengths):
        grams = [tuple(row[i:i + 4]) for i in range(int(n) - 3)]
        fractions.append(len(set(grams)) / max(1, len(grams)))
    return float(np.mean(fractions))


def select_decoders(table: dict, only) -> dict:
    """The decoders named in `only` (None: all) plus the baselines they are compared with."""
    if only is None:
        return table
    unknown = sorted(set(only) - set(table))
    if unknown:
        raise ValueError(f"unknown decoder(s) {unknown}; choose from {sorted(table)}")
    wanted = set(only)
    for name in only:
        while table[name][1] is not None:
            name = table[name][1]
            wanted.add(name)
    return {k: v for k, v in table.items() if k in wanted}


def ar_bits_per_byte(ar_params, cfg, tokens, prompt_len: int, lengths=None) -> float:
    """Mean bits per generated byte under the AR judge (byte tokenizer: one token, one byte), over
    each row's first lengths[i] generated tokens (default: all)."""
    nll = np.asarray(_continuation_nll(ar_params, cfg, jnp.asarray(tokens), prompt_len=prompt_len))
    lengths = np.full(nll.shape[0], nll.shape[1]) if lengths is None else np.asarray(lengths)
    counted = np.arange(nll.shape[1])[None, :] < lengths[:, None]
    return float(nll[counted].mean()) / math.log(2)


@functools.partial(jax.jit, static_argnames=("cfg", "prompt_len"))
def _continuation_nll(ar_params, cfg, tokens, *, prompt_len: int):
    """[B, N] NLL (nats) of each of tokens[:, prompt_len:] under the AR model (one compile per shape)."""
    logits, _ = model.forward(ar_params, cfg, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits[:, prompt_len - 1:], axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, prompt_len:, None], axis=-1)[..., 0]


def train_models(base_model, base_train, out: pathlib.Path, batches, val_rows, names, adapt_steps: int,
                 option_overrides=()):
    """Train (or reload) the AR model, then adapt each diffusion model from its weights."""
    params = {}
    for name in sorted(names, key=lambda n: n != "ar"):
        kw = dict(OBJECTIVES[name])
        if name != "ar":
            kw.update(init_from=str(out / "ar"), steps=adapt_steps)
        if kw.pop("curriculum", None):
            kw["curriculum_steps"] = max(1, kw.get("steps", base_train.steps) // 2)
        tcfg = objectives.configure(base_train, **kw)
        _, tcfg = objectives.apply_overrides(base_model, tcfg, objectives.overrides_for(option_overrides, kw["objective"]))
        tcfg = dataclasses.replace(tcfg, eval_every=tcfg.steps, ckpt_every=tcfg.steps)
        result = loop.train(base_model, tcfg, out / name, batches=batches, val_rows=val_rows, desc=name)
        params[name] = result["state"].params
    return params


def fit_filter(base_model, base_train, out: pathlib.Path, gen_length: int, block: int, progress: bool,
               option_overrides=()):
    """The Learn2PD filter for the masked-diffusion model (reloaded when --out already has it)."""
    path = out / FILTER
    if not (path / "filter.json").exists():
        tcfg = objectives.configure(base_train, objective="learn2pd", init_from=str(out / "masked_diffusion"),
                                    steps=1000, lr=1e-2, filter_gen_length=gen_length, filter_block_length=block)
        _, tcfg = objectives.apply_overrides(base_model, tcfg, objectives.overrides_for(option_overrides, "learn2pd"))
        filter_fit.train_filter(tcfg, path, progress=progress)
    return learn2pd.load_filter(path)


def mean_row_tokens_per_nfe(fn, prompt, count) -> float:
    """Tokens per NFE of each prompt row decoded alone (batch 1), averaged over rows; `count(tokens)`
    gives a decoded row's counted tokens ([1]). A batched run's loops go on until its slowest row
    is done, so its NFE is the worst row's."""
    per_row = []
    for i in range(prompt.shape[0]):
        out = fn(prompt[i:i + 1])
        per_row.append(float(count(out.tokens)[0]) / int(out.nfe))
    return float(np.mean(per_row))


def run(out_dir="out/dlm_frontier", preset="tiny", steps=400, gen_length=64, block=16, batch=4, prompt_len=32,
        repeats=3, only=None, progress=True, data_dir: str = "", overrides=(), adapt_steps: int = 0,
        row_nfe: bool = True) -> dict:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_model, base_train = config.preset(preset)
    base_train = dataclasses.replace(base_train, steps=steps, eval_every=steps, ckpt_every=steps, progress=progress,
                                     data_dir=data_dir)
    config_overrides, option_overrides = objectives.split_overrides(overrides)  # options: per model
    base_model, base_train = objectives.apply_overrides(base_model, base_train, config_overrides)
    tokenizer = data.get_tokenizer(base_train.tokenizer)
    batches, val_rows = data.corpus(base_train, tokenizer)
    table = select_decoders(decoders(gen_length, block), only)
    needed = {"ar"} | {m for m, _, _ in table.values()}
    needed |= {"masked_diffusion"} if FILTER in needed else set()
    objectives.check_options_read(option_overrides, sorted(needed))
    params = train_models(base_model, base_train, out, batches, val_rows, needed - {FILTER},
                          adapt_steps or max(1, steps // 5), option_overrides)
    if FILTER in needed:
        params[FILTER] = {"lm": params["masked_diffusion"],
                          "filter": fit_filter(base_model, base_train, out, gen_length, block, progress,
                                                     option_overrides)}
    prompt = jnp.asarray(np.asarray(val_rows[:batch, :prompt_len], np.int32))
    key = jax.random.key(0)
    rows, outputs = [], {}
    for name, (model_name, baseline, sampler) in table.items():
        fn = lambda x=prompt, s=sampler, m=model_name: s(params[m], base_model, x, key)  # samplers are jitted
        t = time.perf_counter()
        first = jax.block_until_ready(fn())
        compile_s = time.perf_counter() - t
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - t)
        toks = np.asarray(first.tokens)
        outputs[name] = toks
        nfe = int(first.nfe)
        count = functools.partial(counted_lengths, prompt_len=prompt_len, eos_id=base_model.eos_id,
                                  fills_after_eos=name in EOS_FILL)
        lengths = count(toks)
        row = {"decoder": name, "model": model_name, "nfe": nfe, "tokens_per_nfe": float(lengths.mean()) / nfe,
               "row_tokens_per_nfe": mean_row_tokens_per_nfe(fn, prompt, count) if row_nfe else None,
               "tokens_per_s": float(lengths.sum()) / float(np.median(times)), "first_call_s": compile_s,
               "counted_tokens_per_row": float(lengths.mean()),
               "bits_per_byte": ar_bits_per_byte(params["ar"], base_model, toks, prompt_len, lengths),
               "distinct_4grams": distinct_4grams(toks, prompt_len, lengths),
               "baseline": baseline,
               "agreement": (float(np.mean(toks[:, prompt_len:] == outputs[baseline][:, prompt_len:]))
                             if baseline in outputs else None),
               "sample": tokenizer.decode(toks[0, prompt_len:prompt_len + int(lengths[0])])}
        rows.append(row)
        if progress:
            print(format_row(row), flush=True)
    for r in rows:  # speed and quality relative to the baseline decoder
        base = next((b for b in rows if b["decoder"] == r["baseline"]), None)
        r["speedup_vs_baseline"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        r["bpb_change_vs_baseline"] = r["bits_per_byte"] / base["bits_per_byte"] - 1 if base else None
    result = {"preset": preset, "steps": steps, "adapt_steps": adapt_steps or max(1, steps // 5),
              "gen_length": gen_length, "block_length": block, "batch": batch,
              "prompt_len": prompt_len, "repeats": repeats, "row_nfe": row_nfe, "device": jax.devices()[0].device_kind,
              "rows": rows, "goals": goal_report(rows)}
    (out / "frontier.json").write_text(json.dumps(result, indent=2))
    plot(rows, out / "frontier.png")
    print(format_table(rows))
    for g in result["goals"]:
        print(f"goal {g['decoder']}: {g['field']} = {g['value']:.3f}, goal {g['goal']}: "
              f"{'met' if g['met'] else 'not met'}")
    print(f"wrote {out / 'frontier.json'} and {out / 'frontier.png'}")
    return result


def format_row_tokens_per_nfe(r) -> str:
    return "" if r["row_tokens_per_nfe"] is None else f"{r['row_tokens_per_nfe']:.2f}"


def format_row(r) -> str:
    agree = "" if r["agreement"] is None else f"{100 * r['agreement']:.0f}%"
    return (f"{r['decoder']:<42} NFE {r['nfe']:>4}  tokens {r['counted_tokens_per_row']:5.1f}  "
            f"tok/NFE {r['tokens_per_nfe']:5.2f} "
            f"(rows alone {format_row_tokens_per_nfe(r) or '-'})  "
            f"tok/s {r['tokens_per_s']:8.1f}  bpb {r['bits_per_byte']:.3f}  dist4 {r['distinct_4grams']:.2f}  "
            f"agree {agree}")


def format_table(rows) -> str:
    head = (f"{'decoder':<42} {'NFE':>4} {'tokens':>6} {'tok/NFE':>7} {'row':>5} {'tok/s':>8} {'x base':>6} {'bpb':>6} "
            f"{'d bpb':>6} {'dist4':>5} {'agree':>6}")
    lines = [head, "-" * len(head)]  # tokens: generated tokens counted per row (EoTP rows: through the first EOS)
    for r in rows:
        x = "" if r["speedup_vs_baseline"] is None else f"{r['speedup_vs_baseline']:.2f}"
        d = "" if r["bpb_change_vs_baseline"] is None else f"{100 * r['bpb_change_vs_baseline']:+.1f}%"
        a = "" if r["agreement"] is None else f"{100 * r['agreement']:.0f}%"
        lines.append(f"{r['decoder']:<42} {r['nfe']:>4} {r['counted_tokens_per_row']:>6.1f} "
                     f"{r['tokens_per_nfe']:>7.2f} "
                     f"{format_row_tokens_per_nfe(r):>5} {r['tokens_per_s']:>8.1f} "
                     f"{x:>6} {r['bits_per_byte']:>6.3f} {d:>6} {r['distinct_4grams']:>5.2f} {a:>6}")
    return "\n".join(lines)


def plot(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        ax.scatter(r["tokens_per_s"], r["bits_per_byte"])
        ax.annotate(r["decoder"], (r["tokens_per_s"], r["bits_per_byte"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("tokens/s (log)")
    ax.set_ylabel("bits per byte under the AR judge (lower = more likely text)")
    ax.set_title("jaxgen diffusion-LM decoders: speed vs quality")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/dlm_frontier")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=400, help="AR model steps")
    p.add_argument("--adapt-steps", type=int, default=0, help="steps adapting each diffusion model from the AR "
                   "weights (default: steps / 5)")
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--block-length", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--row-nfe", action=argparse.BooleanOptionalAction, default=True,
                   help="also decode each prompt row alone and report its mean tokens per NFE (one more compile "
                   "per decoder)")
    p.add_argument("--only", default="", help="comma-separated decoder names (default: all), run with their "
                   "baselines")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="model/train config overrides")
    a = p.parse_args(argv)
    only = [name.strip() for name in a.only.split(",") if name.strip()] or None
    run(a.out, a.preset, a.steps, a.gen_length, a.block_length, a.batch, a.prompt_len, a.repeats, only=only,
        overrides=a.overrides, adapt_steps=a.adapt_steps, row_nfe=a.row_nfe)


if __name__ == "__main__":
    main()
