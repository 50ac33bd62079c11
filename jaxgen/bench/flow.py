"""`jaxgen bench flow`: the jitted `jaxgen.flow.solve` vs the reference `ODESolver.sample`
(flow_matching 1.0.10 on torchdiffeq, CPU torch) for one velocity MLP with the same weights in
both, per fixed-step method: batch 4096, 32 steps (step_size 1/32 on [0, 1]) by default.

Each round runs every contender once (alternating, so drift hits all alike), each after an
untimed `settle` pause: XLA's CPU worker threads spin for a while after a call and would steal the
cores from torch's OpenMP threads (measured: a torch GEMM right after a jax call ran 2-10x slower).
The medians are reported, with the reference/jitted speed ratio and the max |difference| of the two
outputs. Compile time is reported apart and not in the ratio.
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.bench.timing import block, median, timed
from jaxgen.errors import JaxgenError

TORCH_METHOD = {"euler": "euler", "midpoint": "midpoint", "heun": "heun2", "rk4": "rk4"}


def init_mlp(dim: int, hidden: int, layers: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(W, b)] for an MLP on [x, t] -> velocity: `layers` hidden SiLU layers of width `hidden`."""
    r = np.random.RandomState(seed)
    sizes = [dim + 1] + [hidden] * layers + [dim]
    return [(r.randn(a, b).astype(np.float32) / np.sqrt(a), r.randn(b).astype(np.float32) * 0.1)
            for a, b in zip(sizes[:-1], sizes[1:])]


def mlp_jax(x, t, params):
    h = jnp.concatenate([x, jnp.broadcast_to(t, x.shape[:1] + (1,)).astype(x.dtype)], -1)
    for i, (w, b) in enumerate(params):
        h = h @ w + b
        if i < len(params) - 1:
            h = jax.nn.silu(h)
    return h


def mlp_torch(params):
    import torch

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList()
            for w, b in params:
                lin = torch.nn.Linear(*w.shape)
                with torch.no_grad():
                    lin.weight.copy_(torch.from_numpy(w.T.copy()))
                    lin.bias.copy_(torch.from_numpy(b))
                self.layers.append(lin)

        def forward(self, x, t):
            h = torch.cat([x, t.reshape(1, 1).expand(x.shape[0], 1).to(x.dtype)], -1)
            for i, lin in enumerate(self.layers):
                h = lin(h)
                if i < len(self.layers) - 1:
                    h = torch.nn.functional.silu(h)
            return h

    return MLP().eval()


def alternate_settled(contenders: dict, repeats: int, settle: float) -> dict[str, list[float]]:
    """`timing.alternate` over name -> (setup, fn) with an untimed setup and pause before each call."""
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, (setup, fn) in contenders.items():
            setup()
            time.sleep(settle)
            times[name].append(timed(fn)[1])
    return times


def run(batch: int = 4096, steps: int = 32, methods=("euler", "midpoint", "heun", "rk4"), dim: int = 2,
        hidden: int = 256, layers: int = 2, repeats: int = 5, settle: float = 0.05, torch_threads=None) -> dict:
    """Time the contenders; the reference runs at each of `torch_threads` (default: 1 and torch's
    default count) and the speedup is against its fastest setting."""
    try:
        import torch
        from flow_matching.solver import ODESolver
    except ImportError as e:
        raise JaxgenError(f"jaxgen bench flow runs the reference flow_matching package on torch ({e}); install "
                          "the test extras: pip install -e '.[test]'") from e

    from jaxgen.flow import solve

    threads = tuple(torch_threads or sorted({1, torch.get_num_threads()}))
    params_np = init_mlp(dim, hidden, layers)
    params = jax.tree_util.tree_map(jnp.asarray, params_np)
    x_np = np.random.RandomState(1).randn(batch, dim).astype(np.float32)
    x = jnp.asarray(x_np)
    x_t = torch.from_numpy(x_np)
    model = mlp_torch(params_np)
    ref = ODESolver(lambda x, t: model(x, t))
    h = 1.0 / steps
    grid_t = torch.tensor([0.0, 1.0])
    rows = []
    for method in methods:
        fn = jax.jit(lambda x, p, m=method: solve(mlp_jax, x, (0.0, 1.0), m, h, args=(p,)))
        out, compile_s = timed(lambda: block(fn(x, params)))
        reference = lambda m=method: ref.sample(x_t, h, method=TORCH_METHOD[m], time_grid=grid_t)
        with torch.no_grad():
            diff = float(np.abs(np.asarray(out) - reference().numpy()).max())
            calls = {"jaxgen": (lambda: None, lambda: block(fn(x, params)))}
            calls.update({f"reference_{n}t": (lambda n=n: torch.set_num_threads(n), reference) for n in threads})
            times = alternate_settled(calls, repeats, settle)
        med = {name: median(ts) for name, ts in times.items()}
        best = min((name for name in med if name != "jaxgen"), key=med.get)
        rows.append({"method": method, "jaxgen_ms": med["jaxgen"] * 1e3,
                     **{f"{name}_ms": v * 1e3 for name, v in med.items() if name != "jaxgen"},
                     "best_reference": best, "speedup": med[best] / med["jaxgen"], "compile_s": compile_s,
                     "max_abs_diff": diff})
    return {"device": str(jax.devices()[0]), "torch_threads": list(threads), "batch": batch, "steps": steps,
            "dim": dim, "hidden": hidden, "layers": layers, "repeats": repeats, "rows": rows}


def report(r: dict) -> str:
    refs = [f"reference_{n}t" for n in r["torch_threads"]]
    lines = [f"Flow ODE solve on {r['device']}: velocity MLP {r['dim']}+1 -> {r['layers']}x{r['hidden']} SiLU -> "
             f"{r['dim']}, batch {r['batch']}, {r['steps']} steps (step_size 1/{r['steps']}), median of {r['repeats']};"
             " "
             f"reference = flow_matching ODESolver.sample at torch threads {r['torch_threads']}, speedup vs the faster",
             f"{'method':9s} {'jaxgen ms':>10s} " + " ".join(f"{name + ' ms':>16s}" for name in refs)
             + f" {'speedup':>8s} {'compile s':>10s} {'max|diff|':>10s}"]
    for row in r["rows"]:
        lines.append(f"{row['method']:9s} {row['jaxgen_ms']:10.2f} "
                     + " ".join(f"{row[name + '_ms']:16.2f}" for name in refs)
                     + f" {row['speedup']:7.2f}x {row['compile_s']:10.2f} {row['max_abs_diff']:10.2e}")
    return "\n".join(lines)


def _add(parser, *flags, **kw) -> None:
    """Add an option unless the (shared) parser already has it."""
    import argparse
    try:
        parser.add_argument(*flags, **kw)
    except argparse.ArgumentError:
        pass


def add_arguments(parser) -> None:
    _add(parser, "--flow-batch", type=int, default=4096, help="flow only: batch of initial states")
    _add(parser, "--flow-steps", type=int, default=32, help="flow only: fixed steps on [0, 1]")
    _add(parser, "--flow-methods", default="euler,midpoint,heun,rk4", help="flow only: comma-separated")
    _add(parser, "--flow-dim", type=int, default=2, help="flow only: data dimension")
    _add(parser, "--flow-hidden", type=int, default=256, help="flow only: MLP width")
    _add(parser, "--flow-layers", type=int, default=2, help="flow only: MLP hidden layers")
    _add(parser, "--flow-torch-threads", default="", help="flow only: comma-separated torch thread counts for the "
         "reference (default: 1 and torch's default); the speedup is against the fastest")
    _add(parser, "--repeats", type=int, default=None, help="timed rounds (default 5)")
    _add(parser, "--json", help="also write the results here")


def main(args) -> None:
    get = lambda name, default: getattr(args, name, None) or default
    results = run(batch=get("flow_batch", 4096), steps=get("flow_steps", 32),
                  methods=tuple(get("flow_methods", "euler,midpoint,heun,rk4").split(",")), dim=get("flow_dim", 2),
                  hidden=get("flow_hidden", 256), layers=get("flow_layers", 2), repeats=get("repeats", 5),
                  torch_threads=tuple(int(n) for n in get("flow_torch_threads", "").split(",") if n))
    print(report(results))
    if get("json", None):
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
