"""`jaxgen bench train`: tokens/s and model-FLOPs utilisation (MFU) of training a preset.

It builds the train step `jaxgen train` runs (`training.loop.make_train_step` over the
objective's loss, `training.state` for the optimizer, state and shardings), random-inits the
preset (batch and length from the flags, other fields by key=value), feeds one synthetic batch of
random tokens (no data pipeline: the step alone is measured), compiles it ahead of time (compile
time reported apart), runs one warm-up round, then times `steps` back-to-back steps per round
(blocked at the end of the round), median of `repeats` rounds. Several attention
implementations (`ModelConfig.attention_impl`) run side by side, alternating rounds.

Model FLOPs per step (forward + backward = 3 x forward; the layout's visible pairs only):

    F = 3 * (2 * N_layers * P + 2 * E * V * P_head + 4 * n_layers * H * D * A)

N_layers: the matmul weights of all layers (q, k, v, o, gate, up, down); P: positions the
objective forwards per step (ar: B(L-1); masked_diffusion: BL; block_diffusion: 2BL, the
[x_t | x_0] streams); P_head: positions projected to the vocabulary (E * V, tied or not);
A: visible (query, key) pairs per step under the objective's layout (causal ~ BL^2/2, full BL^2,
dual_stream counted exactly from `Layout.kv_ranges`). Embedding lookups, norms, softmax, RoPE,
the optimizer and remat's recomputation are not counted (model FLOPs, not hardware FLOPs). Per
token: F / (B * L). (XLA's cost analysis of a 1-layer step agrees within a few percent for the full
layout; it is not reported, as it counts a scanned layer stack once.)
PaLM's dense-attention estimate 6 N + 12 n_layers H D L per token (N = N_layers + E * V) is
reported too, for comparison with published MFU figures.

MFU = F / step time / (peak per device * devices). Peak: a table of bf16 dense peaks keyed by
`device_kind` (used when the compute dtype is bf16 / fp16); otherwise (CPU, an unknown device, a
float32 model) a large matmul in the compute dtype measured in the same run ("measured matmul
peak"). On CPU the default is toy-sized and the XLA attention only: Pallas runs in interpret
mode there, a correctness run, not a speed measurement.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import config, layouts, objectives, parallel
from jaxgen import model as model_lib
from jaxgen.attention import IMPLS
from jaxgen.bench import peaks
from jaxgen.bench.timing import alternate, block, median, timed
from jaxgen.errors import ConfigError
from jaxgen.training import loop
from jaxgen.training.state import init_state, make_optimizer, state_shardings

FORMULA = "3 * (2 * N_layers * P + 2 * E * V * P_head + 4 * n_layers * H * D * A)"
WHERE = ("N_layers: matmul weights of all layers; P: positions forwarded per step; P_head: positions projected "
         "to the vocabulary; A: visible (query, key) pairs per step under the layout; 3 = forward + backward; "
         "per_token = per_step / (batch * seq_len)")
PALM_FORMULA = "6 * (N_layers + E * V) + 12 * n_layers * H * D * L"


DEFAULTS = {  # platform kind -> what a bare `jaxgen bench train` measures
    "cpu": dict(preset="tiny", batch=8, seq_len=128, steps=5, repeats=3, impls=("xla",), matmul_n=1024),
    "accelerator": dict(preset="base-125m", batch=8, seq_len=1024, steps=10, repeats=5, impls=("xla", "pallas"),
                        matmul_n=8192),
}
MATMUL = "matmul peak"  # the contender name of the measured matmul
OBJECTIVES = ("ar", "masked_diffusion", "block_diffusion")  # those whose forward shape FLOPs knows
_FLAG_KEYS = {"batch_size": "--batch", "seq_len": "--seq-len", "objective": "--objective",
              "attention_impl": "--attention-impl"}


def defaults(platform: str) -> dict:
    return DEFAULTS["cpu" if platform == "cpu" else "accelerator"]


def configure(preset: str, batch: int, seq_len: int, objective: str = "ar", overrides=()):
    """(ModelConfig, TrainConfig) of `preset` at this batch and length, `overrides` (key=value:
    model fields, train fields, objective options) applied; refuses what the flags own."""
    for flag, value, least in (("--batch", batch, 1), ("--seq-len", seq_len, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{flag}={value!r} must be an integer >= {least}")
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective={objective!r}: bench train counts FLOPs for {', '.join(OBJECTIVES)}")
    items = config.override_items(overrides)
    for key, _ in items:
        flag = _FLAG_KEYS.get(key.removeprefix("model.").removeprefix("train."))
        if flag:
            raise ConfigError(f"{key}=... is set by {flag} in jaxgen bench train; pass {flag} instead")
    cfg, tcfg = config.preset(preset)
    fixed = [("objective", objective), ("batch_size", batch), ("seq_len", seq_len), ("grad_accum", 1)]
    return objectives.apply_overrides(cfg, tcfg, dict(items + fixed))


def forward_shape(tcfg) -> tuple[layouts.Layout, int, int]:
    """(layout, positions forwarded per row, positions projected to the vocabulary per row) of the
    objective's forward pass (see each objective's loss)."""
    L = tcfg.seq_len
    if tcfg.objective == "ar":
        return layouts.causal(), L - 1, L - 1
    if tcfg.objective == "masked_diffusion":
        return layouts.full(), L, L
    if tcfg.objective == "block_diffusion":
        return layouts.dual_stream(objectives.options_of(tcfg).block_size), 2 * L, L
    raise ConfigError(f"objective={tcfg.objective!r}: bench train counts FLOPs for {', '.join(OBJECTIVES)}")


def visible_pairs(layout: layouts.Layout, length: int) -> int:
    """(query, key) pairs `layout` lets attend within one row of `length` positions (exact, O(length))."""
    q = np.arange(length)
    ranges = layout.kv_ranges(q, length if layout.two_stream else None, None, xp=np)
    return int(sum(np.clip(np.minimum(hi, length) - np.maximum(lo, 0), 0, None).sum() for lo, hi in ranges))


def layer_matmul_params(cfg) -> int:
    """Weights of all layers that multiply activations: those with an `embed` axis (norms, biases
    and qk-norm scales excluded)."""
    shapes, axes = model_lib.param_shapes(cfg)["layers"], model_lib.param_axes(cfg)["layers"]
    return sum(int(np.prod(shapes[name])) for name, ax in axes.items() if "embed" in ax)


def model_flops(cfg, tcfg) -> dict:
    """Model FLOPs of one train step by FORMULA, its terms, and per training token."""
    layout, fwd_len, head_len = forward_shape(tcfg)
    B, L = tcfg.batch_size, tcfg.seq_len
    n_layers, n_head = layer_matmul_params(cfg), cfg.hidden_size * cfg.vocab_size
    attn_width = cfg.num_layers * cfg.num_heads * cfg.head_dim
    pairs = B * visible_pairs(layout, fwd_len)
    terms = {"matmul": 3 * 2 * n_layers * B * fwd_len, "head": 3 * 2 * n_head * B * head_len,
             "attention": 3 * 4 * attn_width * pairs}
    step = sum(terms.values())
    return {"formula": FORMULA, "where": WHERE, "N_layers": n_layers, "E_times_V": n_head, "P": B * fwd_len,
            "P_head": B * head_len, "A": pairs, "layout": _layout_name(layout), "terms_per_step": terms,
            "per_step": step, "per_token": step / (B * L), "palm_formula": PALM_FORMULA,
            "palm_per_token": 6 * (n_layers + n_head) + 12 * attn_width * L}


def _layout_name(layout) -> str:
    return f"{layout.kind}({layout.block})" if layout.kind in ("block_causal", "dual_stream") else layout.kind


def table_peak(device_kind: str) -> tuple[str, float] | None:
    """(name, bf16 dense TFLOP/s) of a known accelerator, or None."""
    name, tflops = peaks.lookup(peaks.PEAK_TFLOPS, device_kind)
    return None if name is None else (name, tflops)


def matmul_runner(dtype: str, n: int, calls: int = 4):
    """(a no-argument callable running `calls` n x n x n matmuls in `dtype`, blocked; its FLOPs),
    compiled and warmed: the peak contender timed alongside the train steps."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda x: x @ x)
    block(f(a))
    return (lambda: block([f(a) for _ in range(calls)])), 2 * n ** 3 * calls


def choose_peak(platform: str, device_kind: str, dtype: str, measured: float, n: int,
                given: float | None = None) -> tuple[float, str]:
    """(peak TFLOP/s per device, where it comes from): --peak-tflops, else the table for a bf16/fp16
    model on a known accelerator, else the matmul measured in this run."""
    if given is not None:
        return given, "given (--peak-tflops)"
    known = table_peak(device_kind) if platform != "cpu" else None
    if known and dtype in ("bfloat16", "float16"):
        return known[1], f"table: {known[0]} bf16 dense"
    return measured, f"measured matmul peak ({n}^3 {dtype})"


def build(cfg, tcfg, mesh, seed: int = 0):
    """(compiled train step, initial state, batch, compile seconds): the jitted step of
    `jaxgen train`, compiled ahead of time on a random-token batch."""
    optimizer, _ = make_optimizer(tcfg)
    shardings = state_shardings(cfg, tcfg, mesh, optimizer)
    state = init_state(cfg, optimizer, jax.random.key(seed), shardings)
    batch_shard = parallel.batch_sharding(mesh, tcfg.rules, tcfg.batch_size)
    tokens = np.random.RandomState(seed).randint(0, cfg.vocab_size, (tcfg.batch_size, tcfg.seq_len), dtype=np.int32)
    batch = parallel.put_batch({"tokens": tokens}, batch_shard)
    step = loop.make_train_step(cfg, tcfg, optimizer, shardings, batch_shard)
    compiled, compile_s = timed(lambda: step.lower(state, batch, jax.random.key(0)).compile())
    return compiled, state, batch, compile_s


def runner(compiled, state, batch, steps: int):
    """A no-argument callable running `steps` train steps from the last state, blocked at the end;
    box["loss"] holds the latest loss."""
    keys = [jax.random.key(i) for i in range(steps)]
    box = {"state": state, "loss": None}

    def run():
        s, m = box["state"], None
        for k in keys:
            s, m = compiled(s, batch, k)
        block((s, m))
        box["state"], box["loss"] = s, m["loss"]
    return run, box


def run(preset: str | None = None, batch: int | None = None, seq_len: int | None = None, objective: str = "ar",
        impls=None, steps: int | None = None, repeats: int | None = None, overrides=(),
        peak_tflops: float | None = None) -> dict:
    """Measure the train step of `preset` per attention impl; None picks the platform's default."""
    platform = jax.default_backend()
    d = defaults(platform)
    steps, repeats = steps or d["steps"], repeats or d["repeats"]
    for flag, value in (("--steps", steps), ("--repeats", repeats)):
        if value < 1:
            raise ConfigError(f"{flag}={value} must be a positive integer")
    if peak_tflops is not None and not peak_tflops > 0:
        raise ConfigError(f"--peak-tflops={peak_tflops} must be a positive number (TFLOP/s per device)")
    impls = tuple(dict.fromkeys(impls or d["impls"]))
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        raise ConfigError(f"--attention-impl {','.join(bad)}: choose from {', '.join(IMPLS)} (comma-separated)")
    preset = d["preset"] if preset is None else preset
    cfg, tcfg = configure(preset, d["batch"] if batch is None else batch, d["seq_len"] if seq_len is None else seq_len,
                          objective, overrides)
    mesh = parallel.make_mesh(tcfg.mesh)
    flops = model_flops(cfg, tcfg)
    device = jax.devices()[0]
    n_dev = len(jax.devices())
    rows, calls, boxes = {}, {}, {}
    _progress(f"{preset} {tcfg.objective} batch {tcfg.batch_size} x {tcfg.seq_len} on "
              f"{device.device_kind}; compiling {', '.join(impls)}")
    for impl in impls:
        try:
            compiled, state, data, compile_s = build(dataclasses.replace(cfg, attention_impl=impl), tcfg, mesh)
            calls[impl], boxes[impl] = runner(compiled, state, data, steps)
            _, warm_s = timed(calls[impl])  # the first run pays one-time costs (autotuning, transfers)
        except Exception as e:  # noqa: BLE001 - one failing contender (e.g. a kernel) must not end the bench
            rows[impl] = {"attention_impl": impl, "error": f"{type(e).__name__}: {e}"[:500]}
            calls.pop(impl, None)
            _progress(f"{impl} failed: {rows[impl]['error']}")
            continue
        _progress(f"{impl}: compiled in {compile_s:.1f}s, warm-up round {warm_s:.2f}s")
        rows[impl] = {"attention_impl": impl, "compile_s": compile_s, "warmup_s": warm_s}
    matmul, matmul_flops = matmul_runner(cfg.dtype, d["matmul_n"])
    times = alternate(dict(calls, **{MATMUL: matmul}), repeats)  # the peak measured in the same rounds
    measured = matmul_flops / median(times.pop(MATMUL)) / 1e12
    peak, source = choose_peak(platform, device.device_kind, cfg.dtype, measured, d["matmul_n"], peak_tflops)
    tokens = tcfg.batch_size * tcfg.seq_len
    for impl, ts in times.items():
        step_s = median(ts) / steps
        achieved = flops["per_step"] / step_s / 1e12
        row = rows[impl]
        palm = flops["palm_per_token"] * tokens / step_s / 1e12
        row.update(step_ms=step_s * 1e3, tokens_per_s=tokens / step_s, achieved_tflops=achieved,
                   mfu=achieved / (peak * n_dev), mfu_palm=palm / (peak * n_dev), loss=float(boxes[impl]["loss"]))
    return {"platform": platform, "device": str(device), "device_kind": device.device_kind, "num_devices": n_dev,
            "preset": preset, "objective": tcfg.objective, "batch": tcfg.batch_size,
            "seq_len": tcfg.seq_len, "tokens_per_step": tokens, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
            "remat": cfg.remat, "params": sum(int(np.prod(s)) for s in jax.tree.leaves(
                model_lib.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))),
            "steps_per_round": steps, "repeats": repeats, "timing": "median over rounds of (round time / steps); "
            "compile and one warm-up round excluded; one fixed random-token batch, no data pipeline; the "
            "matmul peak timed in the same alternating rounds",
            "pallas_mode": "interpret (not a speed measurement)" if platform == "cpu" else "compiled",
            "flops": flops, "peak_tflops_per_device": peak, "peak_source": source,
            "measured_matmul_tflops": measured, "rows": list(rows.values())}


def _progress(text: str) -> None:
    """A line on stderr while the bench runs (a slot cut short by a timeout still shows how far it got)."""
    print(f"bench train: {text}", file=sys.stderr, flush=True)


def report(r: dict) -> str:
    f = r["flops"]
    lines = [f"Train step on {r['device_kind']} x{r['num_devices']} ({r['platform']}): {r['preset']} "
             f"({r['params'] / 1e6:.2f}M params, {r['dtype']}, remat {r['remat']}), {r['objective']} "
             f"({f['layout']}), batch {r['batch']} x {r['seq_len']}; median of {r['repeats']} rounds of "
             f"{r['steps_per_round']} steps",
             f"model FLOPs/token {f['per_token'] / 1e6:.2f}M = {f['formula']} / (B*L) "
             f"(PaLM 6N+12nHDL: {f['palm_per_token'] / 1e6:.2f}M)",
             f"peak {r['peak_tflops_per_device']:.2f} TFLOP/s per device ({r['peak_source']}); "
             f"measured {r['measured_matmul_tflops']:.2f} TFLOP/s matmul",
             f"{'impl':7s} {'compile s':>9s} {'step ms':>9s} {'tokens/s':>11s} {'TFLOP/s':>8s} {'MFU':>7s} "
             f"{'MFU(PaLM)':>9s} {'loss':>7s}"]
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"{row['attention_impl']:7s} failed: {row['error']}")
            continue
        lines.append(f"{row['attention_impl']:7s} {row['compile_s']:9.1f} {row['step_ms']:9.2f} "
                     f"{row['tokens_per_s']:11.0f} {row['achieved_tflops']:8.3f} {100 * row['mfu']:6.1f}% "
                     f"{100 * row['mfu_palm']:8.1f}% {row['loss']:7.3f}")
    if r["platform"] == "cpu" and any(row["attention_impl"] == "pallas" for row in r["rows"]):
        lines.append("pallas on CPU runs in interpret mode: a correctness run, not a speed measurement")
    return "\n".join(lines)


def main(args) -> None:
    impls = tuple(i.strip() for i in args.attention_impl.split(",") if i.strip()) if args.attention_impl else None
    results = run(preset=args.preset, batch=args.batch, seq_len=args.seq_len, objective=args.objective or "ar",
                  impls=impls, steps=args.steps or None, repeats=args.repeats, overrides=args.overrides,
                  peak_tflops=args.peak_tflops)
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
