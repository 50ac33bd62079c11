"""`jaxgen bench spec`: speculative decoding against plain AR and against Hugging Face's assisted
generation, in one process, on the same weights.

Target and draft: trained runs (`--run`, `--draft-run`: `jaxgen train` folders) or, by default,
random-weight models built here (the `small` preset and a draft of hidden 128, 4 layers), so the
bench runs on a fresh machine. Two prompt sets of `prompt_len` bytes (byte tokenizer):

- code: windows of the python_stdlib corpus's *validation* files (never trained on), which
  repeat names and idioms: what prompt lookup and token recycling feed on;
- prose: windows of IDLE's change log, `idlelib/NEWS.txt` in the installed standard library
  (English text, not a .py file, so not in the training corpus): few n-grams to copy.

Contenders, all greedy, exactly `new_tokens` new tokens (no EOS stop): jaxgen `ar.generate`;
`speculative.generate` with each drafter (`prompt_lookup`, `token_recycling`, `jacobi`, `model`
= the draft model); HF `generate` plain greedy (the HF baseline), with `prompt_lookup_num_tokens`
and with `assistant_model=draft` (HF's defaults: 20 assistant tokens, confidence 0.4) on the same
weights saved as a HF Llama (torch fp32; threads pinned to the fastest of 1 and all cores,
picked per set and batch). HF assisted generation is batch 1 only.

At batch B a run decodes every prompt of the set in groups of B rows (batch 1: one prompt at a
time), so each batch size sees the same prompts. Reported per (set, batch, contender): median
tokens/s over `repeats` alternating rounds (after a warm-up call that also compiles), tokens per
target forward (new tokens / target forwards, prefill included: 1.0 for AR; HF forwards are
counted by a hook on the target), ms per decoding step (call time / target forwards), greedy
agreement with jaxgen AR (rows identical), and the ratios. `forward_costs` times one cached
target forward of each drafter's chunk (root + draft nodes) against a 1-token one, and a
draft-model step: where the time goes, and the ceiling on what verifying k tokens per forward
can buy on this machine.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import sysconfig
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import cache as cache_lib
from jaxgen import config, hf, layouts
from jaxgen import model as model_lib
from jaxgen.bench.flow import _add, alternate_settled
from jaxgen.bench.timing import block, median, timed
from jaxgen.errors import JaxgenError
from jaxgen.samplers import ar

DRAFTERS = ("prompt_lookup", "token_recycling", "jacobi", "model")
DRAFT_OVERRIDES = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32, mlp_dim=384)
PROSE_FILE = "idlelib/NEWS.txt"
AR, HF_GREEDY, HF_LOOKUP, HF_ASSISTED = "jaxgen ar", "hf greedy", "hf prompt_lookup", "hf assisted"


@dataclasses.dataclass(frozen=True)
class Models:
    """Target and draft: configs, stacked params (HF export, sizes) and decode-form params (decoding)."""

    cfg: config.ModelConfig
    params: dict
    fast: dict
    draft_cfg: config.ModelConfig
    draft_params: dict
    draft_fast: dict
    source: str

    @classmethod
    def of(cls, cfg, params, draft_cfg, draft_params, source: str = "") -> "Models":
        if draft_cfg.vocab_size != cfg.vocab_size:
            raise JaxgenError(f"the draft's vocabulary ({draft_cfg.vocab_size}) differs from the target's "
                              f"({cfg.vocab_size}); train the draft with the target's tokenizer")
        decode = jax.jit(model_lib.decode_params)
        return cls(cfg, params, decode(params), draft_cfg, draft_params, decode(draft_params), source)


# ---------------------------------------------------------------- models

def load_run_params(run_dir) -> tuple[config.ModelConfig, dict]:
    """(model config, stacked params) of the latest checkpoint of a `jaxgen train` folder (as
    `jaxgen sample --run` loads it; `model.decode_params` gives the fast decode form)."""
    from jaxgen.training import runs
    cfg, _, params = runs.load_run(run_dir)
    return cfg, params


def random_model(preset: str = "small", seed: int = 0, **overrides) -> tuple[config.ModelConfig, dict]:
    """A random-weight model of a preset (with model-field overrides)."""
    cfg = dataclasses.replace(config.preset(preset)[0], **overrides)
    return cfg, model_lib.init(cfg, jax.random.key(seed))


def build_models(run: str | None = None, draft_run: str | None = None, preset: str = "small",
                 draft_overrides: dict | None = None) -> Models:
    """Trained runs where given, else random models (the preset, and a draft of `draft_overrides`)."""
    cfg, params = load_run_params(run) if run else random_model(preset, seed=0)
    draft_overrides = DRAFT_OVERRIDES if draft_overrides is None else draft_overrides
    draft_cfg, draft_params = (load_run_params(draft_run) if draft_run
                               else random_model(preset, seed=1, **draft_overrides))
    source = f"target {run or f'random {preset}'}, draft {draft_run or 'random'}"
    return Models.of(cfg, params, draft_cfg, draft_params, source)


def describe(cfg, params) -> str:
    """The model's shape and parameter count, one line."""
    return (f"hidden {cfg.hidden_size}, {cfg.num_layers} layers, mlp {cfg.mlp_dim}, vocab {cfg.vocab_size}: "
            f"{model_lib.num_params(params) / 1e6:.2f}M params")


# ---------------------------------------------------------------- prompts

def windows(texts, count: int, length: int) -> np.ndarray:
    """[count, length] byte windows, each starting at a line start, spread evenly over the texts
    (every window lies inside one text; texts shorter than `length` are skipped)."""
    data = [t.encode("utf-8", errors="replace") for t in texts]
    starts = [(i, s) for i, d in enumerate(data) for s in _line_starts(d) if s + length <= len(d)]
    if len(starts) < count:
        raise JaxgenError(f"only {len(starts)} windows of {length} bytes in the prompt texts; use a shorter "
                          "--prompt-len")
    picks = np.linspace(0, len(starts) - 1, count).round().astype(int)
    return np.stack([np.frombuffer(data[i][s:s + length], np.uint8) for i, s in (starts[p] for p in picks)]
                    ).astype(np.int32)


def _line_starts(data: bytes) -> list[int]:
    return [0] + [i + 1 for i, b in enumerate(data) if b == 10 and i + 1 < len(data)]


def code_texts() -> list[str]:
    """The python_stdlib corpus's validation files (held out of training), in a fixed order."""
    from jaxgen import data
    return sorted(data.load_texts("python_stdlib", "validation"))


def prose_texts() -> list[str]:
    """IDLE's change log from the installed standard library: English prose, no .py file."""
    path = pathlib.Path(sysconfig.get_paths()["stdlib"]) / PROSE_FILE
    if not path.exists():
        raise JaxgenError(f"{path} is missing (the prose prompt set); pass prompt_sets= to run()")
    return [path.read_text(encoding="utf-8", errors="replace")]


# ---------------------------------------------------------------- contenders
# each is prompt [B, P] int32 -> (tokens [B, P + N] numpy, target forwards summed over the rows,
#                                  target forwards of the call: the slowest row's)

def jaxgen_ar(params, cfg, new_tokens: int):
    def call(prompt):
        out = ar.generate(params, cfg, jnp.asarray(prompt), jax.random.key(0), max_new_tokens=new_tokens)
        return np.asarray(block(out.tokens)), len(prompt) * int(out.nfe), int(out.nfe)
    return call


def parse_drafter(text: str) -> tuple[str, dict]:
    """("token_recycling", {"max_width": 2}) from "token_recycling:max_width=2" (values: int, else str)."""
    name, *items = text.split(":")
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise JaxgenError(f"drafter option {item!r} in {text!r} is not key=value "
                              "(e.g. token_recycling:max_width=2)")
        options[key] = int(value) if value.lstrip("-").isdigit() else value
    if name not in DRAFTERS:
        raise JaxgenError(f"unknown drafter {name!r} in {text!r}; choose from {', '.join(DRAFTERS)}")
    if name == "model" and options:
        raise JaxgenError(f"the model drafter takes no options ({text!r}); its draft length is --num-draft")
    return name, options


def drafter_object(text: str, models: Models):
    """The `drafter=` argument of `speculative.generate` for a drafter spec ("name[:key=value...]")."""
    from jaxgen.decoding import drafters
    name, options = parse_drafter(text)
    if name == "model":
        return drafters.model_drafter(models.draft_fast, models.draft_cfg)
    return drafters.get(name, **options)


def jaxgen_spec(params, cfg, new_tokens: int, drafter, num_draft: int):
    from jaxgen.samplers import speculative

    def call(prompt):
        out = speculative.generate(params, cfg, jnp.asarray(prompt), jax.random.key(0), new_tokens, drafter,
                                   num_draft=num_draft)
        return np.asarray(block(out.tokens)), len(prompt) * new_tokens / float(out.accepted), int(out.nfe)
    return call


def to_hf(cfg, params, directory):
    """The weights as a `transformers` Llama (fp32, eval mode), generating exactly max_new_tokens."""
    import torch
    import transformers
    transformers.logging.set_verbosity_error()  # no per-call deprecation notes in the bench's output
    transformers.logging.disable_progress_bar()
    hf.save(directory, cfg, params, family="llama")
    model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    gen = model.generation_config
    gen.eos_token_id, gen.bos_token_id, gen.pad_token_id = None, None, cfg.pad_id if cfg.pad_id is not None else 0
    return model


@contextlib.contextmanager
def counting_forwards(model):
    """A one-item list counting the model's forward calls while inside."""
    count = [0]
    handle = model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        yield count
    finally:
        handle.remove()


def hf_generate(model, new_tokens: int, **kwargs):
    import torch

    def call(prompt):
        ids = torch.as_tensor(prompt, dtype=torch.long)
        with torch.no_grad(), counting_forwards(model) as count:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, **kwargs)
        return out.numpy(), len(prompt) * count[0], count[0]
    return call


def contenders(models: Models, hf_target, hf_draft, batch: int, new_tokens: int, drafters, num_draft: int,
               hf_lookup_tokens: int) -> dict:
    """name -> call for one batch size (HF's assisted generation is batch 1 only)."""
    calls = {AR: jaxgen_ar(models.fast, models.cfg, new_tokens)}
    for name in drafters:
        calls[f"jaxgen {name}"] = jaxgen_spec(models.fast, models.cfg, new_tokens, drafter_object(name, models),
                                              num_draft)
    if hf_target is not None:
        calls[HF_GREEDY] = hf_generate(hf_target, new_tokens)
        if batch == 1:
            calls[HF_LOOKUP] = hf_generate(hf_target, new_tokens, prompt_lookup_num_tokens=hf_lookup_tokens)
            calls[HF_ASSISTED] = hf_generate(hf_target, new_tokens, assistant_model=hf_draft)
    return calls


# ---------------------------------------------------------------- measuring

def over_groups(call, prompts: np.ndarray, batch: int):
    """A function decoding all prompts in groups of `batch` rows -> (tokens [n, P + N], target
    forwards summed over the rows, target forwards of the calls)."""
    def run_all():
        outs = [call(prompts[i:i + batch]) for i in range(0, len(prompts), batch)]
        return np.concatenate([o[0] for o in outs]), sum(o[1] for o in outs), sum(o[2] for o in outs)
    return run_all


def measure(calls: dict, prompts: np.ndarray, batch: int, new_tokens: int, repeats: int, settle: float) -> list:
    """One row per contender: tokens/s (median), tokens per target forward, ms per decoding step
    (one target forward and its drafting: call time / target forwards), rows equal to jaxgen AR."""
    runs = {name: over_groups(call, prompts, batch) for name, call in calls.items()}
    first = {name: timed(fn) for name, fn in runs.items()}  # warm-up: compiles; outputs for the checks
    times = alternate_settled({name: (lambda: None, fn) for name, fn in runs.items()}, repeats, settle)
    reference = first[AR][0][0]
    rows = []
    for name, ((tokens, row_forwards, forwards), first_s) in first.items():
        seconds = median(times[name])
        rows.append({"method": name, "batch": batch, "tokens_per_s": len(prompts) * new_tokens / seconds,
                     "seconds": seconds, "first_call_s": first_s, "ms_per_step": 1e3 * seconds / forwards,
                     "tokens_per_forward": len(prompts) * new_tokens / row_forwards,
                     "greedy_rows_equal": int(np.all(tokens == reference, axis=1).sum()),
                     "rows": len(prompts)})
    return with_ratios(rows)


def with_ratios(rows: list) -> list:
    """Add vs_ar (jaxgen rows / jaxgen AR), vs_hf_lookup (jaxgen rows / HF prompt lookup) and
    vs_hf_greedy (HF rows and jaxgen AR / HF greedy)."""
    tps = {r["method"]: r["tokens_per_s"] for r in rows}
    for r in rows:
        ours = r["method"].startswith("jaxgen")
        r["vs_ar"] = r["tokens_per_s"] / tps[AR] if ours else None
        r["vs_hf_lookup"] = r["tokens_per_s"] / tps[HF_LOOKUP] if ours and HF_LOOKUP in tps else None
        r["vs_hf_greedy"] = (r["tokens_per_s"] / tps[HF_GREEDY] if HF_GREEDY in tps
                             and (not ours or r["method"] == AR) else None)
    return rows


def forward_costs(models: Models, prompt_len: int, batches, chunks, repeats: int = 30) -> list:
    """Median ms of one cached forward (after a `prompt_len` prefill) of the target for each chunk
    length, and of the draft model for a 1-token chunk, per batch size."""
    rows = []
    for batch in batches:
        for who, params, cfg, sizes in (("target", models.fast, models.cfg, chunks),
                                        ("draft", models.draft_fast, models.draft_cfg, (1,))):
            step, cache = _cached_step(params, cfg, batch, prompt_len, max(sizes))
            for size in sizes:
                tokens = jnp.ones((batch, size), jnp.int32)
                block(step(params, cache, tokens))
                times = [timed(lambda: block(step(params, cache, tokens)))[1] for _ in range(repeats)]
                rows.append({"model": who, "batch": batch, "chunk": size, "ms": 1e3 * median(times)})
    return rows


def _cached_step(params, cfg, batch: int, prompt_len: int, max_chunk: int):
    """(jitted one-chunk forward over a prefilled cache -> logits, the prefilled cache)."""
    cache = cache_lib.init_cache(cfg, batch, prompt_len + max_chunk, per_layer=model_lib.is_decode_form(params))
    _, cache = jax.jit(lambda p, c, t: model_lib.forward(p, cfg, t, layout=layouts.causal(), cache=c))(
        params, cache, jnp.ones((batch, prompt_len), jnp.int32))
    step = jax.jit(lambda p, c, t: model_lib.forward(p, cfg, t, layout=layouts.causal(), cache=c)[0])
    return step, cache


# ---------------------------------------------------------------- the bench

def run(run_dir: str | None = None, draft_run: str | None = None, prompt_len: int = 128, new_tokens: int = 128,
        batches=(1, 8), repeats: int = 5, drafters=DRAFTERS, num_draft: int = 4, hf_lookup_tokens: int = 10,
        torch_threads=None, hf_peer: bool = True, prompt_sets: dict | None = None, models: Models | None = None,
        settle: float = 0.05, cost_repeats: int = 30) -> dict:
    """Measure every contender on every prompt set and batch size (see the module docstring).
    `prompt_sets`: name -> texts (default: code and prose as above); `models` overrides the runs;
    `torch_threads`: the thread counts HF may run at (default 1 and all cores; the fastest now wins)."""
    for text in drafters:
        parse_drafter(text)  # fail before any work
    models = models or build_models(run_dir, draft_run)
    texts = prompt_sets or {"code": code_texts(), "prose": prose_texts()}
    count = max(batches)
    if any(count % b for b in batches):
        raise JaxgenError(f"batches {batches}: each must divide the largest ({count}), the number of prompts")
    threads = tuple(torch_threads or sorted({1, os.cpu_count() or 1}))
    results = {"source": models.source, "target": describe(models.cfg, models.params),
               "draft": describe(models.draft_cfg, models.draft_params), "prompt_len": prompt_len,
               "new_tokens": new_tokens, "prompts_per_set": count, "repeats": repeats, "num_draft": num_draft,
               "hf_lookup_tokens": hf_lookup_tokens, "torch_thread_choices": list(threads), "rows": []}
    with tempfile.TemporaryDirectory() as d:
        hf_target = to_hf(models.cfg, models.params, f"{d}/target") if hf_peer else None
        hf_draft = to_hf(models.draft_cfg, models.draft_params, f"{d}/draft") if hf_peer else None
        for set_name, set_texts in texts.items():
            prompts = windows(set_texts, count, prompt_len)
            for batch in batches:
                hf_threads = pin_fastest_torch_threads(hf_generate(hf_target, new_tokens), prompts[:batch],
                                                       threads) if hf_peer else None
                calls = contenders(models, hf_target, hf_draft, batch, new_tokens, drafters, num_draft,
                                   hf_lookup_tokens)
                for row in measure(calls, prompts, batch, new_tokens, repeats, settle):
                    hf_row = row["method"].startswith("hf")
                    results["rows"].append({"prompts": set_name, **row,
                                            "torch_threads": hf_threads if hf_row else None})
    chunks = sorted({1, num_draft + 1} | {chunk_length(text, models, num_draft) for text in drafters})
    results["chunks"] = {text: chunk_length(text, models, num_draft) for text in drafters}
    results["forward_costs"] = forward_costs(models, prompt_len, batches, chunks, cost_repeats) if cost_repeats else []
    return results


def pin_fastest_torch_threads(call, prompt, candidates, trials: int = 2) -> int:
    """Set torch to the thread count at which `call(prompt)` runs fastest now, and return it. On
    cores shared with other jobs more threads can be far slower (measured here: HF greedy 10x
    slower at 2 threads than at 1 on 2 busy cores), so the peer gets its best setting."""
    import torch
    best = {}
    for n in candidates:
        torch.set_num_threads(n)
        call(prompt)
        best[n] = min(timed(lambda: call(prompt))[1] for _ in range(trials))
    torch.set_num_threads(min(best, key=best.get))
    return torch.get_num_threads()


def chunk_length(text: str, models: Models, num_draft: int) -> int:
    """Tokens one verify forward feeds with this drafter: the root and its draft nodes."""
    from jaxgen.samplers import speculative
    return len(speculative.configured_drafter(drafter_object(text, models), num_draft, None, models.cfg).parents) + 1


def report(results: dict) -> str:
    fmt = lambda x: "-" if x is None else f"{x:.2f}x"
    width = max(24, *(len(r["method"]) for r in results["rows"]))
    lines = [f"Speculative decoding: {results['source']}",
             f"target: {results['target']}; draft: {results['draft']}",
             f"greedy, prompt {results['prompt_len']} bytes, {results['new_tokens']} new tokens, "
             f"{results['prompts_per_set']} prompts per set, num_draft {results['num_draft']}, HF prompt lookup "
             f"{results['hf_lookup_tokens']} tokens; median of {results['repeats']}",
             f"{'prompts':7} {'batch':>5} {'method':{width}} {'tok/s':>7} {'tok/fwd':>7} {'ms/step':>7} {'=AR':>5} "
             f"{'vs AR':>6} {'vs HF PL':>8} {'vs HF':>7} {'1st s':>6}"]
    for r in results["rows"]:
        lines.append(f"{r['prompts']:7} {r['batch']:>5} {r['method']:{width}} {r['tokens_per_s']:7.0f} "
                     f"{r['tokens_per_forward']:7.2f} {r['ms_per_step']:7.2f} "
                     f"{r['greedy_rows_equal']:>2}/{r['rows']:<2} "
                     f"{fmt(r['vs_ar']):>6} {fmt(r['vs_hf_lookup']):>8} {fmt(r['vs_hf_greedy']):>7} "
                     f"{r['first_call_s']:6.1f}")
    lines.append("vs AR: / jaxgen ar; vs HF PL: / hf prompt_lookup (batch 1); vs HF: / hf greedy; =AR: rows whose "
                 "greedy tokens equal jaxgen ar's; tok/fwd: new tokens per target forward; ms/step: call time / "
                 "target forwards (one forward with its drafting and verification)")
    threads = {(r["prompts"], r["batch"]): r["torch_threads"] for r in results["rows"] if r["torch_threads"]}
    if threads:
        lines.append(f"HF torch threads (fastest of {results['torch_thread_choices']}, picked per set and batch): "
                     + ", ".join(f"{p} b{b}: {n}" for (p, b), n in threads.items()))
    lines.append("tokens per verify forward (root + draft nodes): "
                 + ", ".join(f"{name} {n}" for name, n in results["chunks"].items()))
    if results["forward_costs"]:
        lines.append("one cached forward after the prompt (ms, median): "
                     + "; ".join(f"{c['model']} b{c['batch']} chunk {c['chunk']}: {c['ms']:.2f}"
                                 for c in results["forward_costs"]))
    return "\n".join(lines)


def mismatches(results: dict) -> list[str]:
    """The jaxgen contenders whose greedy tokens differ from jaxgen AR's on some row."""
    return [f"{r['prompts']} batch {r['batch']} {r['method']}: {r['rows'] - r['greedy_rows_equal']} rows"
            for r in results["rows"] if r["method"].startswith("jaxgen") and r["greedy_rows_equal"] < r["rows"]]


def add_arguments(parser) -> None:
    _add(parser, "--run", help="spec, constrained: a jaxgen train folder (the target; default: random weights)")
    _add(parser, "--draft-run", help="spec only: the draft model's jaxgen train folder (default: random weights)")
    _add(parser, "--drafters", default=",".join(DRAFTERS), help="spec only: comma-separated, from "
         f"{', '.join(DRAFTERS)} (model = the draft model), each with optional drafter options, e.g. "
         "token_recycling:max_width=2:max_depth=3 or jacobi:level=3:window=4:guess=4")
    _add(parser, "--num-draft", type=int, default=4, help="spec only: draft tokens per step")
    _add(parser, "--hf-lookup-tokens", type=int, default=10, help="spec only: HF prompt_lookup_num_tokens")


def main(args) -> None:
    get = lambda name, default: default if getattr(args, name, None) is None else getattr(args, name)
    results = run(run_dir=get("run", None), draft_run=get("draft_run", None), prompt_len=get("prompt_len", 128),
                  new_tokens=get("new_tokens", 128),
                  batches=tuple(int(b) for b in str(get("batches", "1,8")).split(",")),
                  repeats=get("repeats", 5), drafters=tuple(get("drafters", ",".join(DRAFTERS)).split(",")),
                  num_draft=get("num_draft", 4), hf_lookup_tokens=get("hf_lookup_tokens", 10))
    print(report(results))
    bad = mismatches(results)
    print("greedy outputs equal jaxgen AR for every drafter" if not bad else "MISMATCH vs jaxgen AR: " + "; ".join(bad))
    if get("json", None):
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
