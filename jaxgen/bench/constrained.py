"""`jaxgen bench constrained`: what a grammar mask costs per decoding step, against the same
sampler unconstrained, on the same weights and prompts (greedy).

Model: a trained run (`--run`) or a random-weight `small` preset. Constraints (byte tokenizer,
llguidance back end): a small JSON schema (a record with bounded strings, an integer range and a
bounded list) and a regex (a method header). Samplers: `ar.generate` and
`block_diffusion.generate` (SDAR semantics: block 4, 4 denoising steps, dynamic threshold 0.9).

A constrained row stops at EOS once its grammar is complete, so a constrained call makes the
forwards of its longest row (S), at most `new_tokens`. For AR the unconstrained contender runs
gen_length = S: the same number of forwards (its cache has S slots after the prompt instead of
`new_tokens`: attention over a few more masked slots, negligible next to the weights at these
sizes). Block diffusion runs both at `new_tokens`.

Per (sampler, batch, constraint): median ms per forward of each contender over `repeats`
alternating rounds (after a warm-up call); the mask's overhead in % of the sampler's own
unconstrained forward and in % of the unconstrained AR forward at that batch (the issue's goal:
<= 10%); ms per generated token; the host-side mask fill alone (llguidance, replayed on the
outputs: `constraints.mask_fill_seconds`) and all the time inside the host calls per forward
(`constraints.last_stats()`); the validity rate of the outputs, checked
independently (json + jsonschema, Python `re`).
"""
from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import constraints, data
from jaxgen import model as model_lib
from jaxgen.bench import spec
from jaxgen.bench.flow import _add, alternate_settled
from jaxgen.bench.timing import block, median, timed
from jaxgen.errors import JaxgenError
from jaxgen.samplers import ar, block_diffusion

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "version", "tags"],
          "properties": {"name": {"type": "string", "pattern": "^[a-z_]{1,12}$"},
                         "version": {"type": "integer", "minimum": 0, "maximum": 999},
                         "tags": {"type": "array", "maxItems": 3,
                                  "items": {"type": "string", "pattern": "^[a-z]{1,8}$"}}}}
REGEX = r"def [a-z_][a-z0-9_]{0,15}\(self(, [a-z_][a-z0-9_]{0,11}){0,3}\):"
SAMPLERS = ("ar", "block_diffusion")
KINDS = ("json_schema", "regex")
DEVICE_MASK_SAMPLERS = ("ar", "speculative")  # the samplers that use a constraint's device automaton
BLOCK_DIFFUSION = dict(block_length=4, denoising_steps=4, remasking="low_confidence_dynamic", threshold=0.9)


def make_constraint(kind: str, tokenizer, masks: str = "auto"):
    build = constraints.json_schema if kind == "json_schema" else constraints.regex
    return build(SCHEMA if kind == "json_schema" else REGEX, tokenizer, masks=masks)


def mask_paths(sampler: str, kind: str, tokenizer) -> list:
    """The constraint once per mask path the sampler can take: the device automaton (where the
    constraint has one and the sampler uses it) and llguidance's host matchers."""
    auto = make_constraint(kind, tokenizer)
    if sampler in DEVICE_MASK_SAMPLERS and auto.automaton is not None:
        return [auto, make_constraint(kind, tokenizer, masks="host")]
    return [auto]


def is_valid(kind: str, text: str) -> bool:
    """An independent check of one output: JSON that the schema validates, or a full regex match."""
    if kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    import jsonschema
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def sampler_call(sampler: str, params, cfg, prompt, gen_length: int, constraint=None):
    """A function running the sampler once (blocked) -> its output."""
    kw = {} if constraint is None else dict(constraint=constraint, on_incomplete="return")
    key = jax.random.key(0)
    if sampler == "ar":
        return lambda: block(ar.generate(params, cfg, prompt, key, gen_length=gen_length, **kw))
    return lambda: block(block_diffusion.generate(params, cfg, prompt, key, gen_length=gen_length,
                                                  **BLOCK_DIFFUSION, **kw))


def generated_rows(out, prompt_len: int, eos_id: int) -> list[list[int]]:
    """Each row's generated ids before its first EOS."""
    rows = []
    for row in np.asarray(out.tokens)[:, prompt_len:].tolist():
        rows.append(row[: row.index(eos_id)] if eos_id in row else row)
    return rows


def measure(sampler: str, params, cfg, prompt, kind: str, constraint, new_tokens: int, repeats: int,
            settle: float) -> dict:
    """One row: both contenders timed alternately, overhead, validity and the host mask fill."""
    tokenizer = constraint.tokenizer
    constrained = sampler_call(sampler, params, cfg, prompt, new_tokens, constraint)
    out, _ = timed(constrained)  # warm-up (compiles; one program for every constraint: the session id is traced)
    gen_length = int(out.nfe) if sampler == "ar" else new_tokens  # AR: the forwards the constrained call made
    calls = {"unconstrained": sampler_call(sampler, params, cfg, prompt, gen_length), "constrained": constrained}
    free, _ = timed(calls["unconstrained"])  # warm-up
    times = alternate_settled({name: (lambda: None, call) for name, call in calls.items()}, repeats, settle)
    on_device = sampler in DEVICE_MASK_SAMPLERS and constraint.automaton is not None
    constrained()
    # the host path's session of that call: host calls, seconds in them (device masks open none)
    stats = constraints.Stats() if on_device else constraints.last_stats()
    rows = generated_rows(out, prompt.shape[1], tokenizer.eos_id)
    nfe = {"unconstrained": int(free.nfe), "constrained": int(out.nfe)}
    ms_fwd = {name: 1e3 * median(times[name]) / nfe[name] for name in calls}
    return {"sampler": sampler, "batch": prompt.shape[0], "constraint": kind, "gen_length": new_tokens,
            "masks": "device" if on_device else "host",
            "nfe_unconstrained": nfe["unconstrained"], "nfe_constrained": nfe["constrained"],
            "ms_per_forward_unconstrained": ms_fwd["unconstrained"],
            "ms_per_forward_constrained": ms_fwd["constrained"],
            "overhead_pct": 100 * (ms_fwd["constrained"] / ms_fwd["unconstrained"] - 1),
            "host_calls": stats.calls, "host_ms_per_forward": 1e3 * stats.host_seconds / nfe["constrained"],
            "ms_per_token_constrained": 1e3 * median(times["constrained"]) / max(len(r) + 1 for r in rows),
            "mask_fill_us": 1e6 * constraints.mask_fill_seconds(constraint, rows, cfg.vocab_size),
            "valid_rate": float(np.mean([is_valid(kind, tokenizer.decode(r)) for r in rows])),
            "sampler_valid_rate": float(np.mean(np.asarray(out.valid))),
            "sample": tokenizer.decode(rows[0])}


def with_ar_reference(rows: list) -> list:
    """Add each row's mask overhead in % of the unconstrained AR forward at its batch."""
    ar_step = {}
    for r in rows:
        if r["sampler"] == "ar":
            ar_step.setdefault(r["batch"], []).append(r["ms_per_forward_unconstrained"])
    for r in rows:
        step = median(ar_step[r["batch"]]) if r["batch"] in ar_step else None
        extra = r["ms_per_forward_constrained"] - r["ms_per_forward_unconstrained"]
        r["overhead_vs_ar_step_pct"] = None if step is None else 100 * extra / step
    return rows


def run(run_dir: str | None = None, prompt_len: int = 64, new_tokens: int = 64, batches=(1, 8), repeats: int = 5,
        samplers=SAMPLERS, kinds=KINDS, prompt_texts=None, model=None, settle: float = 0.05) -> dict:
    """Measure every sampler x batch x constraint kind (module docstring). `model`: (cfg, params)
    instead of the run / random small preset; `prompt_texts`: instead of the held-out code files."""
    for given, known in ((samplers, SAMPLERS), (kinds, KINDS)):
        if set(given) - set(known):
            raise JaxgenError(f"unknown {sorted(set(given) - set(known))}; choose from {', '.join(known)}")
    cfg, params = model or (spec.load_run_params(run_dir) if run_dir else spec.random_model("small"))
    fast = jax.jit(model_lib.decode_params)(params)
    tokenizer = data.get_tokenizer("bytes")
    if cfg.vocab_size != tokenizer.vocab_size:
        raise JaxgenError(f"the model's vocabulary ({cfg.vocab_size}) is not the byte tokenizer's; this bench "
                          "builds its constraints for the byte tokenizer")
    prompts = spec.windows(prompt_texts or spec.code_texts(), max(batches), prompt_len)
    rows = []
    for sampler in samplers:
        for batch in batches:
            for kind in kinds:
                for constraint in mask_paths(sampler, kind, tokenizer):
                    rows.append(measure(sampler, fast, cfg, jnp.asarray(prompts[:batch]), kind, constraint,
                                        new_tokens, repeats, settle))
    return {"model": f"{run_dir or 'random small'}: {spec.describe(cfg, params)}", "prompt_len": prompt_len,
            "new_tokens": new_tokens, "repeats": repeats, "block_diffusion": BLOCK_DIFFUSION,
            "rows": with_ar_reference(rows)}


def report(results: dict) -> str:
    pct = lambda x: "-" if x is None else f"{x:+.1f}%"
    lines = [f"Constrained decoding, {results['model']}; prompt {results['prompt_len']} bytes, "
             f"at most {results['new_tokens']} new tokens, greedy, median of {results['repeats']}",
             f"{'sampler':15} {'batch':>5} {'constraint':11} {'masks':6} {'fwd':>4} {'ms/fwd free':>11} {'ms/fwd mask':>11} "
             f"{'overhead':>9} {'vs AR step':>10} {'host ms':>8} {'ms/token':>9} {'fill us':>8} {'valid':>6}"]
    for r in results["rows"]:
        lines.append(f"{r['sampler']:15} {r['batch']:>5} {r['constraint']:11} {r['masks']:6} {r['nfe_constrained']:>4} "
                     f"{r['ms_per_forward_unconstrained']:11.3f} {r['ms_per_forward_constrained']:11.3f} "
                     f"{pct(r['overhead_pct']):>9} {pct(r['overhead_vs_ar_step_pct']):>10} "
                     f"{r['host_ms_per_forward']:8.3f} "
                     f"{r['ms_per_token_constrained']:9.3f} {r['mask_fill_us']:8.1f} {r['valid_rate']:6.0%}")
    lines.append("masks: device = the constraint's token automaton inside the jitted loop (no host call), host = "
                 "llguidance matchers through one host call per step; "
                 "overhead: constrained / unconstrained ms per forward of the same sampler - 1; vs AR step: the "
                 "extra ms per forward in % of the unconstrained AR forward at that batch (goal <= 10%); host ms: "
                 "time inside the host calls (matchers, fills) per forward, the rest of the extra is the round trip "
                 "and the mask on device; ms/token: "
                 "constrained call / tokens of its longest row (EOS included); fill us: llguidance mask fill per row "
                 "and step, host only; valid: outputs passing json+jsonschema / re.fullmatch")
    for r in results["rows"]:
        if r["batch"] == min(x["batch"] for x in results["rows"]):
            lines.append(f"  sample {r['sampler']} {r['constraint']}: {r['sample'][:90]!r}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    _add(parser, "--run", help="spec, constrained: a jaxgen train folder (the target; default: random weights)")
    _add(parser, "--samplers", default=",".join(SAMPLERS), help=f"constrained only: from {', '.join(SAMPLERS)}")


def main(args) -> None:
    get = lambda name, default: default if getattr(args, name, None) is None else getattr(args, name)
    results = run(run_dir=get("run", None), prompt_len=get("prompt_len", 64), new_tokens=get("new_tokens", 64),
                  batches=tuple(int(b) for b in str(get("batches", "1,8")).split(",")), repeats=get("repeats", 5),
                  samplers=tuple(get("samplers", ",".join(SAMPLERS)).split(",")))
    print(report(results))
    if get("json", None):
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
