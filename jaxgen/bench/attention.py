"""`jaxgen bench attention`: the attention door's implementations side by side.

Per layout and length: the XLA reference, the Pallas block-sparse kernel and (on GPU) cuDNN
through `jax.nn.dot_product_attention` (a dense mask for the non-causal layouts), forward and
forward + backward, median of `repeats` alternating rounds, TFLOP/s counted on the visible
(query, key) pairs only. Then the cache path: a chunk of 1 / 8 / 32 queries over a cache filled
to `fill` of its slots, GB/s of the filled K/V read. On CPU it runs toy shapes (the Pallas kernel
in interpret mode: a correctness run, not a speed one); on an accelerator, the issue's shapes
(bf16, 32 query heads, 8 kv heads, head dim 128). One call is the one-shot device script.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import config, layouts
from jaxgen import model as model_lib
from jaxgen.attention import attention
from jaxgen.bench import peaks
from jaxgen.bench.timing import alternate, block, median
from jaxgen.samplers import ar

LAYOUTS = {"causal": layouts.causal(), "block_causal(32)": layouts.block_causal(32),
           "dual_stream(32)": layouts.dual_stream(32)}


def shapes(platform: str) -> dict:
    """The measured sizes: the issue's on an accelerator, toy ones on CPU."""
    if platform == "cpu":
        return dict(heads=4, kv_heads=2, head_dim=32, lengths=(128,), dtype=jnp.float32, cache_slots=256,
                    fills=(256,), chunks=(1, 8, 32))
    return dict(heads=32, kv_heads=8, head_dim=128, lengths=(2048, 4096, 8192), dtype=jnp.bfloat16,
                cache_slots=8192, fills=(2048, 8192), chunks=(1, 8, 32))


PLATFORM_IMPLS = {"cpu": ("xla", "pallas"), "gpu": ("xla", "pallas", "cudnn"), "tpu": ("xla", "splash")}


def _contenders(layout, T, platform):
    """impl -> attention(q, k, v) through the door for one layout at length T (static 0..T-1
    coordinates, as a training forward passes them), and the layout's visible-pair count."""
    seq_len = T if layout.two_stream else None
    idx = np.broadcast_to(np.arange(T, dtype=np.int32), (1, T))
    door = lambda impl: lambda q, k, v: attention(q, k, v, layout, q_idx_BL=idx, kv_idx_BS=idx, seq_len=seq_len,
                                                  impl=impl)
    return {impl: door(impl) for impl in PLATFORM_IMPLS.get(platform, ("xla",))}, \
        int(np.asarray(layout.mask(idx, idx, seq_len)).sum())


def _timed_pair(fn, q, k, v):
    """(forward, forward + backward) as jitted callables of no arguments."""
    fwd = jax.jit(fn)
    bwd = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), (0, 1, 2)))
    return (lambda: block(fwd(q, k, v))), (lambda: block(bwd(q, k, v)))


def run_dense(s, platform, repeats) -> list[dict]:
    rows = []
    key = jax.random.key(0)
    for T in s["lengths"]:
        q = jax.random.normal(key, (1, T, s["heads"], s["head_dim"]), s["dtype"])
        k = jax.random.normal(key, (1, T, s["kv_heads"], s["head_dim"]), s["dtype"])
        for name, layout in LAYOUTS.items():
            fns, pairs = _contenders(layout, T, platform)
            flops = 4 * pairs * s["heads"] * s["head_dim"]  # QK^T and PV on visible pairs
            calls = {}
            for impl, fn in fns.items():
                calls[impl + " fwd"], calls[impl + " fwd+bwd"] = _timed_pair(fn, q, k, k)
            for fn in calls.values():
                fn()  # compile
            times = alternate(calls, repeats)
            for impl in fns:
                fwd_s, both_s = median(times[impl + " fwd"]), median(times[impl + " fwd+bwd"])
                rows.append({"layout": name, "T": T, "impl": impl, "fwd_ms": fwd_s * 1e3, "fwd_bwd_ms": both_s * 1e3,
                             "fwd_tflops": flops / fwd_s / 1e12, "fwd_bwd_tflops": 3.5 * flops / both_s / 1e12})
    return rows


def run_cache(s, platform, repeats) -> list[dict]:
    """A chunk of C queries (block causal within the chunk) over a cache filled to `fill` slots;
    GB/s of the filled K/V read, and its share of the device's HBM bandwidth where known."""
    rows = []
    hbm = peaks.hbm_gbps()[1]
    S, H, K, D = s["cache_slots"], s["heads"], s["kv_heads"], s["head_dim"]
    key = jax.random.key(1)
    k = jax.random.normal(key, (1, S, K, D), s["dtype"])
    kv_idx = jnp.broadcast_to(jnp.arange(S), (1, S))
    for fill in s["fills"]:
        for C in s["chunks"]:
            start = min(fill, S - C)
            q = jax.random.normal(key, (1, C, H, D), s["dtype"])
            q_idx = jnp.broadcast_to(start + jnp.arange(C), (1, C))
            valid = kv_idx < start + C
            calls = {impl: jax.jit(lambda q, k, impl=impl: attention(q, k, k, layouts.block_causal(C), q_idx_BL=q_idx,
                                                                      kv_idx_BS=kv_idx, kv_valid_BS=valid, impl=impl))
                     for impl in CACHE_IMPLS.get(platform, ("xla",))}
            runs = {impl: (lambda f=f: block(f(q, k))) for impl, f in calls.items()}
            for fn in runs.values():
                fn()
            times = alternate(runs, repeats)
            filled_bytes = 2 * (start + C) * K * D * jnp.dtype(s["dtype"]).itemsize
            for impl in runs:
                t = median(times[impl])
                gbps = filled_bytes / t / 1e9
                rows.append({"fill": start + C, "slots": S, "chunk": C, "impl": impl, "ms": t * 1e3,
                             "filled_gb_per_s": gbps, "pct_hbm": 100 * gbps / hbm if hbm else None})
    return rows


CACHE_IMPLS = {"cpu": ("xla", "pallas"), "gpu": ("xla", "pallas", "cudnn")}  # splash needs static coordinates


def decode_config(platform: str):
    """The AR decode-step model: a TinyLlama-1.1B-shaped Llama in bf16 on an accelerator, the tiny
    preset on CPU."""
    if platform == "cpu":
        return config.preset("tiny")[0], 32
    return config.ModelConfig(vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
                              head_dim=64, mlp_dim=5632, max_seq_len=2048, dtype="bfloat16",
                              param_dtype="bfloat16", mask_id=None, bos_id=1, eos_id=None, pad_id=None), 256


def weight_read_bytes(params) -> int:
    """Bytes one decode step must read: every weight but the embedding table (one row of it)."""
    return sum(int(a.size) * a.dtype.itemsize for path, a in jax.tree_util.tree_leaves_with_path(params)
               if "embed" not in jax.tree_util.keystr(path))


def run_decode(platform: str, repeats: int, impls=("xla", "pallas")) -> list[dict]:
    """Batch-1 greedy AR decoding (decode-form params, KV cache): ms per step against the
    weight-read floor (weight bytes / HBM bandwidth) where the device's bandwidth is known."""
    cfg, new_tokens = decode_config(platform)
    params = model_lib.decode_params(model_lib.init(cfg, jax.random.key(0)))
    prompt = jnp.ones((1, 16), jnp.int32)
    hbm = peaks.hbm_gbps()[1]
    floor_ms = weight_read_bytes(params) / (hbm * 1e9) * 1e3 if hbm else None
    runs = {}
    for impl in impls if platform != "cpu" else ("xla",):  # interpret-mode Pallas is no speed measurement
        c = dataclasses.replace(cfg, attention_impl=impl)
        gen = jax.jit(lambda p, x, c=c: ar.generate(p, c, x, jax.random.key(0), gen_length=new_tokens).tokens)
        runs[impl] = lambda gen=gen: block(gen(params, prompt))
        runs[impl]()  # compile
    times = alternate(runs, repeats)
    rows = []
    for impl in runs:
        step_ms = median(times[impl]) / new_tokens * 1e3
        rows.append({"model": f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.dtype}", "impl": impl,
                     "new_tokens": new_tokens, "ms_per_step": step_ms, "floor_ms": floor_ms,
                     "pct_of_floor": 100 * floor_ms / step_ms if floor_ms else None})
    return rows


def run(repeats: int = 5) -> dict:
    platform = jax.default_backend()
    s = shapes(platform)
    return {"platform": platform, "device": str(jax.devices()[0]), "heads": s["heads"], "kv_heads": s["kv_heads"],
            "head_dim": s["head_dim"], "dtype": jnp.dtype(s["dtype"]).name, "repeats": repeats,
            "pallas_mode": "interpret" if platform == "cpu" else "compiled",
            "dense": run_dense(s, platform, repeats), "cache": run_cache(s, platform, repeats),
            "decode": run_decode(platform, repeats)}


def print_table(r: dict) -> None:
    print(f"Attention on {r['device']} ({r['platform']}; Pallas {r['pallas_mode']}): heads {r['heads']}/{r['kv_heads']}, "
          f"head dim {r['head_dim']}, {r['dtype']}, median of {r['repeats']}; TFLOP/s on visible pairs")
    print(f"{'layout':18s} {'T':>6s} {'impl':7s} {'fwd ms':>9s} {'TFLOP/s':>8s} {'fwd+bwd ms':>11s} {'TFLOP/s':>8s}")
    for row in r["dense"]:
        print(f"{row['layout']:18s} {row['T']:6d} {row['impl']:7s} {row['fwd_ms']:9.3f} {row['fwd_tflops']:8.2f} "
              f"{row['fwd_bwd_ms']:11.3f} {row['fwd_bwd_tflops']:8.2f}")
    pct = lambda v: "n/a" if v is None else f"{v:.1f}%"
    print(f"{'cache fill':>10s} {'slots':>6s} {'chunk':>6s} {'impl':7s} {'ms':>8s} {'GB/s filled':>12s} {'of HBM':>7s}")
    for row in r["cache"]:
        print(f"{row['fill']:10d} {row['slots']:6d} {row['chunk']:6d} {row['impl']:7s} {row['ms']:8.3f} "
              f"{row['filled_gb_per_s']:12.2f} {pct(row['pct_hbm']):>7s}")
    print(f"{'AR decode step (batch 1)':32s} {'impl':7s} {'ms/step':>8s} {'floor ms':>9s} {'of floor':>9s}")
    for row in r["decode"]:
        floor = "n/a" if row["floor_ms"] is None else f"{row['floor_ms']:.3f}"
        print(f"{row['model']:32s} {row['impl']:7s} {row['ms_per_step']:8.3f} {floor:>9s} "
              f"{pct(row['pct_of_floor']):>9s}")


def main(args) -> None:
    results = run(repeats=args.repeats or 5)
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
