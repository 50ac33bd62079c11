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

import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import layouts
from jaxgen.attention import attention
from jaxgen.bench.timing import alternate, block, median

LAYOUTS = {"causal": layouts.causal(), "block_causal(32)": layouts.block_causal(32),
           "dual_stream(32)": layouts.dual_stream(32)}


def shapes(platform: str) -> dict:
    """The measured sizes: the issue's on an accelerator, toy ones on CPU."""
    if platform == "cpu":
        return dict(heads=4, kv_heads=2, head_dim=32, lengths=(128,), dtype=jnp.float32, cache_slots=256,
                    fills=(64, 256), chunks=(1, 8, 32))
    return dict(heads=32, kv_heads=8, head_dim=128, lengths=(2048, 4096, 8192), dtype=jnp.bfloat16,
                cache_slots=8192, fills=(2048, 8192), chunks=(1, 8, 32))


def _cudnn(q, k, v, mask_BLS):
    """cuDNN flash attention (GQA by repeating K/V heads as jax.nn requires), the mask dense."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    return jax.nn.dot_product_attention(q, k, v, mask=mask_BLS[:, None], implementation="cudnn")


def _contenders(layout, T, s, platform):
    """name -> attention(q, k, v) for one layout at length T (the mask's visible-pair count too)."""
    seq_len = T if layout.two_stream else None
    idx = jnp.broadcast_to(jnp.arange(T), (1, T))
    door = lambda impl: lambda q, k, v: attention(q, k, v, layout, q_idx_BL=idx, kv_idx_BS=idx, seq_len=seq_len,
                                                  impl=impl)
    fns = {"xla": door("xla"), "pallas": door("pallas")}
    mask = layout.mask(idx, idx, seq_len)
    if platform == "gpu":
        fns["cudnn"] = lambda q, k, v: _cudnn(q, k, v, mask)
    return fns, int(np.asarray(mask).sum())


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
            fns, pairs = _contenders(layout, T, s, platform)
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


def run_cache(s, repeats) -> list[dict]:
    """A chunk of C queries (block causal within the chunk) over a cache filled to `fill` slots."""
    rows = []
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
                     for impl in ("xla", "pallas")}
            runs = {impl: (lambda f=f: block(f(q, k))) for impl, f in calls.items()}
            for fn in runs.values():
                fn()
            times = alternate(runs, repeats)
            filled_bytes = 2 * (start + C) * K * D * jnp.dtype(s["dtype"]).itemsize
            for impl in runs:
                t = median(times[impl])
                rows.append({"fill": start + C, "slots": S, "chunk": C, "impl": impl, "ms": t * 1e3,
                             "filled_gb_per_s": filled_bytes / t / 1e9})
    return rows


def run(repeats: int = 5) -> dict:
    platform = jax.default_backend()
    s = shapes(platform)
    return {"platform": platform, "device": str(jax.devices()[0]), "heads": s["heads"], "kv_heads": s["kv_heads"],
            "head_dim": s["head_dim"], "dtype": jnp.dtype(s["dtype"]).name, "repeats": repeats,
            "pallas_mode": "interpret" if platform == "cpu" else "compiled",
            "dense": run_dense(s, platform, repeats), "cache": run_cache(s, repeats)}


def print_table(r: dict) -> None:
    print(f"Attention on {r['device']} ({r['platform']}; Pallas {r['pallas_mode']}): heads {r['heads']}/{r['kv_heads']}, "
          f"head dim {r['head_dim']}, {r['dtype']}, median of {r['repeats']}; TFLOP/s on visible pairs")
    print(f"{'layout':18s} {'T':>6s} {'impl':7s} {'fwd ms':>9s} {'TFLOP/s':>8s} {'fwd+bwd ms':>11s} {'TFLOP/s':>8s}")
    for row in r["dense"]:
        print(f"{row['layout']:18s} {row['T']:6d} {row['impl']:7s} {row['fwd_ms']:9.3f} {row['fwd_tflops']:8.2f} "
              f"{row['fwd_bwd_ms']:11.3f} {row['fwd_bwd_tflops']:8.2f}")
    print(f"{'cache fill':>10s} {'slots':>6s} {'chunk':>6s} {'impl':7s} {'ms':>8s} {'GB/s filled':>12s}")
    for row in r["cache"]:
        print(f"{row['fill']:10d} {row['slots']:6d} {row['chunk']:6d} {row['impl']:7s} {row['ms']:8.3f} "
              f"{row['filled_gb_per_s']:12.2f}")


def main(args) -> None:
    results = run(repeats=args.repeats or 5)
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
