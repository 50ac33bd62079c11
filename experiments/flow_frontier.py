"""Flow-matching frontier: quality against NFE for jaxgen's flows, its five FM variants and
continuous-token AR, on models trained here from offline data (spec §5's honest metrics).

  toy          flow matching trained by the train loop (`--objective flow_matching`, loaded back
               with `runs.load_run`) on eight_gaussians, whose log-density is exact. For each solver
               (euler, midpoint, heun, rk4 at NFE 1..64; dopri5 at its measured NFE) it reports the
               exact NLL in nats/dim (`log_likelihood` with exact divergence) on held-out points,
               KL(p || p_theta) = E_p[log p - log p_theta], and the MMD^2 and sliced W2 of samples
               against held-out data. Each value sits beside its floor: the true entropy for the NLL,
               and for the distances the train-vs-held-out value (mean over 5 disjoint train sets).
               A coarse grid's likelihood is the change of variables of no sampler (it can fall
               below the entropy, giving a negative KL). Read the NLL only where it has settled in NFE.
  convergence  the same model trained for N and 2N steps; both KLs, and the goal
               |KL(N) - KL(2N)| <= 0.05 nats.
  digits       class-conditional FM with classifier-free guidance on the 8x8 digits. It generates as
               many samples as the train split, with the train split's labels, and scores them by
               FD-digits against the validation split. The calibration is FD(train, validation) at
               the same sizes. Also per solver and NFE: class accuracy and IS-digits. A guidance
               sweep adds a memorization ratio (nearest-train distance of samples / that of
               validation images).
  variants     the toy with a fitted diagonal-Gaussian source, blockwise FM (K=2), VeCoR and
               transition matching (DTM), each beside plain FM at the toy run's budget. All five
               train side by side in one jitted scan, on the same minibatches (`fit`). Reported:
               KL/NLL where the density is exact (not DTM), plus MMD/SW. On the digits: latent FM
               (MLP autoencoder) against pixel-space FM, by FD-digits.
  car          continuous-token AR (causal) with a flow head against the Gaussian-head baseline.
               Both train through the loop. Reported: exact per-token NLL (`continuous_ar.token_nll`)
               on held-out data, for the toy as 2 tokens of 1 value and the digits as 16 tokens of
               2x2 pixels. The digits get uniform dequantization, so the NLL is a density: nats/dim,
               and a bound in bits/pixel on the 17-level pixels.

NFE counts evaluations of the velocity field, measured with a host callback. A likelihood
evaluation also takes D Jacobian-vector products for the exact divergence. A guided evaluation is
one call on the doubled batch.

The script writes flow_frontier.json and PNGs (sample grids, NLL vs NFE) to --out, and prints the
table. Trained runs live in --out and are reloaded on the next call; use --fresh to retrain them.

    python experiments/flow_frontier.py                        # 2 CPU cores: ~8.5 min (504 s measured)
    python experiments/flow_frontier.py --only toy,convergence
    python experiments/flow_frontier.py --preset accelerator   # bigger nets, more steps
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgen import config, flow, objectives
from jaxgen.data import continuous
from jaxgen.flow import continuous_ar as car
from jaxgen.flow import continuous_ar_sampling as car_sampling
from jaxgen.flow import guidance, likelihood, metrics, nets
from jaxgen.flow.variants import blockwise, latent, source, transition, vecor
from jaxgen.flow.variants.common import NetVelocity, uniform_grid
from jaxgen.objectives.flow import flow_matching_loss, velocity_fn
from jaxgen.training import families, loop, runs

TOY = "eight_gaussians"
SECTIONS = ("toy", "convergence", "digits", "variants", "car")
EVALS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}  # velocity evaluations per step
SOLVERS = (*EVALS, "dopri5")
KL_GOAL = 0.05
PIXEL_STEP = 1 / 8  # digits: pixel/8 - 1, 17 levels 1/8 apart
PRESETS = {  # the toy / digits / variant nets are `nets.NetSpec` shapes; car's backbone a ModelConfig's
    "tiny": dict(  # the smoke test's: seconds of training, every code path
        toy_sizes=(2000, 500), n_eval=256, solvers=("euler", "dopri5"), nfes=(2, 4),
        digits_solvers=("rk4",), digits_nfes=(4,), cfg_scale=1.0, cfg_scales=(1.0,), lr=1e-2, warmup=2,
        fm=dict(hidden=32, depth=1, batch_size=128, steps=20),
        digits=dict(hidden=32, depth=1, batch_size=128, steps=10),
        variant=dict(hidden=32, depth=1, batch_size=128, steps=20), ae=dict(latent_dim=4, hidden=32, depth=1, steps=20),
        car=dict(backbone=dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64),
                 head_hidden=32, head_depth=1, steps=4, batch_size=32),
        car_digits=None, car_ode_steps=4),
    "default": dict(  # 2 CPU cores
        toy_sizes=(20_000, 5_000), n_eval=2000, solvers=SOLVERS, nfes=(1, 2, 4, 8, 16, 32, 64),
        digits_solvers=SOLVERS, digits_nfes=(4, 8, 16, 32), cfg_scale=1.0, cfg_scales=(0.0, 1.0, 2.0), lr=3e-3,
        warmup=50, fm=dict(hidden=128, depth=3, batch_size=512, steps=4000),
        digits=dict(hidden=256, depth=3, batch_size=256, steps=2000),
        variant=dict(hidden=128, depth=3, batch_size=512, steps=4000),  # = fm: its baseline row cross-checks it
        ae=dict(latent_dim=8, hidden=256, depth=2, steps=1500),
        car=dict(backbone=dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=256),
                 head_hidden=128, head_depth=2, steps=1500, batch_size=128),
        car_digits=dict(steps=600, batch_size=32), car_ode_steps=16),
    "accelerator": dict(  # bigger nets, longer runs
        toy_sizes=(50_000, 10_000), n_eval=10_000, solvers=SOLVERS, nfes=(1, 2, 4, 8, 16, 32, 64),
        digits_solvers=SOLVERS, digits_nfes=(4, 8, 16, 32, 64), cfg_scale=1.0, cfg_scales=(0.0, 0.5, 1.0, 2.0, 4.0),
        lr=2e-3, warmup=200, fm=dict(hidden=256, depth=4, batch_size=2048, steps=20_000),
        digits=dict(hidden=512, depth=4, batch_size=512, steps=20_000),
        variant=dict(hidden=256, depth=4, batch_size=2048, steps=20_000),
        ae=dict(latent_dim=8, hidden=512, depth=3, steps=10_000),
        car=dict(backbone=dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=64, mlp_dim=768),
                 head_hidden=256, head_depth=3, steps=20_000, batch_size=512),
        car_digits=dict(steps=20_000, batch_size=256), car_ode_steps=32),
}


@dataclasses.dataclass
class Context:
    """What every section reads: the preset, the output folder, the data folder and run flags."""

    p: dict
    out: pathlib.Path
    data_dir: str = ""
    progress: bool = True
    fresh: bool = False
    cache: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- shared helpers

def std_normal_logpdf(x_ND):
    return -0.5 * jnp.sum(x_ND ** 2 + math.log(2 * math.pi), axis=-1)


def counting(fn):
    """(fn with a host-side call counter, the list it appends to): measures NFE inside jit."""
    calls = []

    def counted(x, t, *args):
        jax.debug.callback(lambda _: calls.append(1), t)
        return fn(x, t, *args)
    return counted, calls


def n_calls(calls) -> int:
    jax.effects_barrier()
    n = len(calls)
    calls.clear()
    return n


def solver_plan(solvers, nfes) -> list[tuple[str, int, int]]:
    """(method, NFE, steps) for each fixed-step method and NFE it reaches in whole steps, then
    (dopri5, None, None) when asked for (its NFE is measured)."""
    fixed = [(m, n, n // EVALS[m]) for m in solvers if m in EVALS for n in nfes if n >= EVALS[m] and n % EVALS[m] == 0]
    return fixed + [("dopri5", None, None)] * ("dopri5" in solvers)


def grid(method: str, steps: int, start: float, end: float):
    return (start, end) if method == "dopri5" else uniform_grid(steps, start, end)


def train_cfg(ctx, objective: str, dataset: str, net: dict, **options):
    """A TrainConfig for `objective` on `dataset` with the preset's optimizer (no weight decay)."""
    steps = net["steps"]
    sizes = {} if dataset == "digits" else dict(zip(("num_train", "num_validation"), ctx.p["toy_sizes"]))
    return objectives.configure(config.TrainConfig(), objective=objective, dataset=dataset, data_dir=ctx.data_dir,
                                lr=ctx.p["lr"], warmup_steps=min(ctx.p["warmup"], steps), weight_decay=0.0,
                                eval_every=steps, ckpt_every=steps, log_every=max(1, steps // 10), eval_batches=2,
                                progress=ctx.progress, **net, **sizes, **options)


def train_run(ctx, name: str, model_cfg, tcfg, family: str, **data):
    """(spec, tcfg, params, seconds) of a run trained by the loop into out/name (resumed, or reused
    when already done there), then loaded back from its folder."""
    t = time.perf_counter()
    loop.train(model_cfg, tcfg, ctx.out / name, fresh=ctx.fresh, desc=name, **data)
    spec, tcfg, params = runs.load_run(ctx.out / name, family=family)
    return spec, tcfg, params, time.perf_counter() - t


def toy_data(ctx):
    """(train x, held-out x [n_eval, 2], exact log p of the held-out x) of the toy's tfds splits."""
    if "toy" not in ctx.cache:
        ctx.cache["toy"] = _toy_data(ctx)
    return ctx.cache["toy"]


def _toy_data(ctx):
    sizes = dict(zip(("num_train", "num_validation"), ctx.p["toy_sizes"]))
    train, val = (continuous.load_continuous(TOY, s, data_dir=ctx.data_dir, **sizes)["x"] for s in continuous.SPLITS)
    held = val[:ctx.p["n_eval"]]
    return train, held, np.asarray(continuous.toy(TOY).log_prob(held), np.float64)


def two_sample(samples, ref) -> dict:
    """MMD^2 (RBF, median-heuristic bandwidths) and sliced W2 (fixed projections) of two sets."""
    sw = metrics.sliced_wasserstein(jax.random.key(7), samples, ref)
    return {"mmd2": metrics.mmd2(samples, ref), "sliced_w2": sw}


def toy_floors(ctx, chunks: int = 5) -> dict:
    """What a perfect model scores: the entropy (nats/dim) for the NLL, and for the distances their
    mean (and std) over up to `chunks` disjoint train sets of the held-out size against held-out."""
    if "floors" in ctx.cache:
        return ctx.cache["floors"]
    train, held, logp = toy_data(ctx)
    n = len(held)
    values = [two_sample(train[i * n:(i + 1) * n], held) for i in range(max(1, min(chunks, len(train) // n)))]
    floors = {"nll_per_dim": float(-logp.mean() / held.shape[1])}
    for k in values[0]:
        floors.update({k: float(np.mean([v[k] for v in values])), f"{k}_std": float(np.std([v[k] for v in values]))})
    ctx.cache["floors"] = floors
    return floors


def kl_row(logp, logq, dim: int) -> dict:
    kl = metrics.kl_estimate(logp, logq)
    return {"nll_per_dim": float(-np.mean(logq) / dim), "kl": kl.kl, "kl_stderr": kl.stderr}


def fit(losses: dict, params: dict, x, steps: int, batch_size: int, lr: float, seed: int = 0):
    """Train models side by side in one jitted scan: params[name] by Adam (warmup + cosine, its own
    gradient clipped to norm 1) on losses[name](params, {"x": minibatch}, key). They share the
    minibatches of x and nothing else, so this is separate runs on one data order, compiled once.
    Returns (params, {name: mean loss of the last 100 steps})."""
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, min(50, steps // 10)), steps, lr * 0.1)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))
    x, names = jnp.asarray(x), sorted(losses)

    def step(carry, key):
        p, s = carry
        k_batch, k_loss = jax.random.split(key)
        batch = {"x": x[jax.random.randint(k_batch, (batch_size,), 0, x.shape[0])]}
        p, s, values = dict(p), dict(s), {}
        for i, name in enumerate(names):
            loss = lambda q: losses[name](q, batch, jax.random.fold_in(k_loss, i))[0]  # noqa: B023
            values[name], g = jax.value_and_grad(loss)(p[name])
            u, s[name] = opt.update(g, s[name], p[name])
            p[name] = optax.apply_updates(p[name], u)
        return (p, s), values

    @jax.jit
    def run(params, key):
        state = {name: opt.init(params[name]) for name in names}
        return jax.lax.scan(step, (params, state), jax.random.split(key, steps))

    (params, _), values = run(params, jax.random.key(seed))
    return params, {name: float(np.mean(np.asarray(v)[-100:])) for name, v in values.items()}


# ----------------------------------------------------------------------------- toy FM: solvers x NFE

def eval_solver(v, method: str, steps: int, x0, held, logp) -> tuple[dict, np.ndarray]:
    """(row, samples) of one solver setting: measured NFE, exact NLL / KL, MMD^2 / SW of samples."""
    counted, calls = counting(v)
    samples = np.asarray(flow.solve(counted, x0, grid(method, steps, 0.0, 1.0), method))
    nfe = n_calls(calls)
    _, logq = flow.log_likelihood(counted, jnp.asarray(held), std_normal_logpdf, grid(method, steps, 1.0, 0.0), method)
    row = {"solver": method, "steps": None if method == "dopri5" else steps, "nfe": nfe, "nll_nfe": n_calls(calls),
           **kl_row(logp, np.asarray(logq), held.shape[1]), **two_sample(samples, held)}
    return row, samples


def train_toy_fm(ctx, steps: int):
    tcfg = train_cfg(ctx, "flow_matching", TOY, dict(ctx.p["fm"], steps=steps))
    spec, tcfg, params, train_s = train_run(ctx, f"toy_fm_{steps}", None, tcfg, "flow")
    return velocity_fn(params, spec, objectives.options_of(tcfg)), spec, train_s


def toy_section(ctx) -> dict:
    """Per solver and NFE: exact NLL / KL on held-out points and MMD / SW of as many samples."""
    _, held, logp = toy_data(ctx)
    v, spec, train_s = train_toy_fm(ctx, ctx.p["fm"]["steps"])
    x0 = jax.random.normal(jax.random.key(1), held.shape)
    rows, samples = [], {}
    for method, _, steps in solver_plan(ctx.p["solvers"], ctx.p["nfes"]):
        row, s = eval_solver(v, method, steps, x0, held, logp)
        samples[(method, row["nfe"])] = s
        rows.append(row)
    floors = toy_floors(ctx)
    plot_toy(rows, samples, held, floors, ctx.out)
    return {"toy": TOY, "net": dataclasses.asdict(spec), "train_steps": ctx.p["fm"]["steps"], "train_s": train_s,
            "n_eval": len(held), "floors": floors, "rows": rows}


def convergence_section(ctx) -> dict:
    """KL (rk4 at the largest NFE) of the toy model trained for N and for 2N steps."""
    _, held, logp = toy_data(ctx)
    n = ctx.p["fm"]["steps"]
    nfe = max(ctx.p["nfes"])
    logqs = []
    for steps in (n, 2 * n):
        v, _, _ = train_toy_fm(ctx, steps)
        _, logq = flow.log_likelihood(v, jnp.asarray(held), std_normal_logpdf, grid("rk4", max(1, nfe // 4), 1.0, 0.0),
                                      "rk4")
        logqs.append(np.asarray(logq, np.float64))
    kls = [metrics.kl_estimate(logp, q) for q in logqs]
    diff = kls[1].kl - kls[0].kl  # paired on the same held-out points
    return {"steps": [n, 2 * n], "solver": "rk4", "nfe": max(4, nfe - nfe % 4), "kl": [k.kl for k in kls],
            "kl_stderr": [k.stderr for k in kls], "difference": diff,
            "difference_stderr": float(np.std(logqs[0] - logqs[1], ddof=1) / np.sqrt(len(held))),
            "goal": f"|KL(N) - KL(2N)| <= {KL_GOAL}", "met": bool(abs(diff) <= KL_GOAL)}


# ----------------------------------------------------------------------------- digits FM (CFG, FD-digits)

def nn_ratio(samples, train, val) -> float:
    """Mean distance of samples to their nearest train image over that of validation images (< 1:
    samples sit closer to the train set than unseen data does, i.e. memorization)."""
    def nearest(a):
        d2 = (a ** 2).sum(1)[:, None] + (train ** 2).sum(1)[None] - 2 * a @ train.T
        return np.sqrt(np.maximum(d2.min(1), 0)).mean()
    return float(nearest(samples) / nearest(val))


def digits_row(images, labels, method, nfe, steps, w, val) -> dict:
    images = np.clip(np.asarray(images), -1, 1)
    acc = float(np.mean(metrics.digits_logits(images).argmax(-1) == labels))
    return {"solver": method, "steps": steps, "nfe": nfe, "cfg_scale": w, "fd_digits": metrics.fd_digits(images, val),
            "class_accuracy": acc, "is_digits": metrics.digits_score(images)}


def digits_section(ctx) -> dict:
    """Class-conditional FM with CFG: FD-digits, class accuracy, IS-digits per solver / NFE and scale."""
    tcfg = train_cfg(ctx, "flow_matching", "digits", ctx.p["digits"], class_conditional=True)
    spec, tcfg, params, train_s = train_run(ctx, "digits_fm", None, tcfg, "flow")
    options = objectives.options_of(tcfg)
    xt, yt = continuous.digits_arrays("train")
    xt, xv = xt.reshape(len(xt), -1), continuous.digits_arrays("validation")[0].reshape(-1, 64)
    x0 = jax.random.normal(jax.random.key(2), xt.shape)

    fields = {}

    def sample(method, steps, w):
        if w not in fields:  # one field per scale: its solves compile once per (method, steps)
            fields[w] = counting(guidance.guide(lambda x, t, y: velocity_fn(params, spec, options, y)(x, t),
                                                jnp.asarray(yt), spec.null_label, w))
        counted, calls = fields[w]
        images = flow.solve(counted, x0, grid(method, steps, 0.0, 1.0), method)
        return np.asarray(images), n_calls(calls)

    rows, w = [], ctx.p["cfg_scale"]
    for method, _, steps in solver_plan(ctx.p["digits_solvers"], ctx.p["digits_nfes"]):
        images, nfe = sample(method, steps, w)
        rows.append(digits_row(images, yt, method, nfe, steps, w, xv))
    top = max(ctx.p["digits_nfes"])
    sweep, grids = [], {}
    for scale in ctx.p["cfg_scales"]:
        images, nfe = sample("rk4", max(1, top // 4), scale)
        sweep.append(dict(digits_row(images, yt, "rk4", nfe, max(1, top // 4), scale, xv),
                          memorization=nn_ratio(np.clip(images, -1, 1), xt, xv)))
        grids[f"w={scale:g}"] = (images, yt)
    plot_digit_grids(grids, ctx.out / "digits_fm_samples.png", "class-conditional FM on digits (rk4)")
    noisy = np.clip(xt + 0.2 * np.random.RandomState(0).randn(*xt.shape), -1, 1)
    calibration = {"fd_train_vs_val": metrics.fd_digits(xt, xv), "fd_noisy_train_vs_val": metrics.fd_digits(noisy, xv),
                   "noise_std": 0.2, "n_samples": len(xt), "n_reference": len(xv)}
    return {"net": dataclasses.asdict(spec), "train_steps": ctx.p["digits"]["steps"], "train_s": train_s,
            "calibration": calibration, "rows": rows, "guidance": sweep}


# ----------------------------------------------------------------------------- variants

@dataclasses.dataclass(frozen=True)
class NetDivergence:
    """d/dt (x, log-det) = (u, div u) of a net's velocity, params as `solve` args (hashable)."""

    net: nets.NetSpec

    def __call__(self, state, t, params):
        return likelihood.divergence(lambda x, s: nets.apply(params, self.net, x, s), state[0], t)


def segments_log_likelihood(net, params_K, edges, x, steps_per_segment: int):
    """Exact log p(x) (rk4, exact divergence) of a flow whose velocity is net k on the time segment
    [edges[k], edges[k+1]]: the augmented ODE from t=1 back to 0, segment by segment, the edges on
    the grid (blockwise FM; plain FM is one segment). One compiled solve per grid, params traced."""
    state = (jnp.asarray(x), jnp.zeros(len(x)))
    for k in reversed(range(len(params_K))):
        g = uniform_grid(steps_per_segment, edges[k + 1], edges[k])
        state = flow.solve(NetDivergence(net), state, g, "rk4", args=(params_K[k],))
    return std_normal_logpdf(state[0]) + state[1]


def toy_variant_table(ctx, train, held):
    """(name, loss(params, batch, key), init(key), sampler(params), log-likelihood(params) or None,
    NFE) of plain FM and four variants on the toy, all sampled with rk4 at NFE 32."""
    vp, n, key = ctx.p["variant"], len(held), jax.random.key(3)
    net = nets.NetSpec(dim=2, hidden=vp["hidden"], depth=vp["depth"])
    x0 = jax.random.normal(key, held.shape)
    plain_sample = lambda p: flow.solve(NetVelocity(net), x0, uniform_grid(8), "rk4", args=(p,))  # = vecor.sample
    plain_ll = lambda p: segments_log_likelihood(net, [p], (0.0, 1.0), held, 8)
    sspec = source.SourceFMSpec(net, source.SourceSpec("diag_gaussian", dim=2))
    src = source.fit_source(sspec.source, train)
    bspec = blockwise.BlockwiseSpec(net, blockwise.uniform_edges(2))
    vspec = vecor.VeCoRSpec(net, weight=0.05)
    dspec = transition.DTMSpec(dim=2, transitions=8, hidden=vp["hidden"], depth=vp["depth"],
                               head_hidden=max(8, vp["hidden"] // 2), head_steps=4)
    return [
        ("flow matching (baseline)", lambda p, b, k: flow_matching_loss(p, net, b, k), lambda k: nets.init(k, net),
         plain_sample, plain_ll, 32),
        ("source: fitted diagonal Gaussian", lambda p, b, k: source.loss(p, sspec, b, k),
         lambda k: source.init(k, sspec, src), lambda p: source.sample(p, sspec, key, n, steps=8, method="rk4"),
         lambda p: source.log_likelihood(p, sspec, jnp.asarray(held), steps=8, method="rk4"), 32),
        ("blockwise (K=2)", lambda p, b, k: blockwise.loss(p, bspec, b, k), lambda k: blockwise.init(k, bspec),
         lambda p: blockwise.sample(p, bspec, key, n, steps_per_segment=4, method="rk4"),
         lambda p: segments_log_likelihood(net, [blockwise.net_params(p, i) for i in range(2)], bspec.edges, held, 4),
         32),
        ("VeCoR (shuffle, w=0.05)", lambda p, b, k: vecor.loss(p, vspec, b, k), lambda k: vecor.init(k, vspec),
         plain_sample, plain_ll, 32),
        ("transition matching (DTM, T=8)", lambda p, b, k: transition.loss(p, dspec, b, k),
         lambda k: transition.init(k, dspec), lambda p: transition.sample(p, dspec, key, n), None,
         dspec.transitions * dspec.head_steps),
    ]


def toy_variants(ctx, train, held, logp) -> tuple[list, dict]:
    """Rows and samples of the toy variants, trained side by side by `fit` (same budget, same data)."""
    vp, rows, samples = ctx.p["variant"], [], {}
    table = {row[0]: row[1:] for row in toy_variant_table(ctx, train, held)}
    t0 = time.perf_counter()
    init = jax.jit(lambda key: {name: t[1](key) for name, t in table.items()})  # one compile for all
    params, last = fit({name: t[0] for name, t in table.items()}, init(jax.random.key(3)), train, vp["steps"],
                       vp["batch_size"], ctx.p["lr"])
    train_s = time.perf_counter() - t0
    for name, (_, _, sampler, loglik, nfe) in table.items():
        row = {"variant": name, "data": TOY, "nfe": nfe, "final_loss": last[name], "train_s": train_s}
        samples[name] = np.asarray(sampler(params[name]))
        if loglik is not None:
            row.update(kl_row(logp, np.asarray(loglik(params[name]), np.float64), 2))
        rows.append(dict(row, **two_sample(samples[name], held)))
    return rows, samples


def digits_variants(ctx) -> tuple[list, dict]:
    """Latent FM (an MLP autoencoder trained here first) vs pixel-space FM, unconditional, trained
    side by side, sampled with rk4 at NFE 32; FD-digits against the validation split."""
    vp, ap = ctx.p["variant"], ctx.p["ae"]
    xt = continuous.digits_arrays("train")[0].reshape(-1, 64)
    xv = continuous.digits_arrays("validation")[0].reshape(-1, 64)
    k = jax.random.key(4)
    t0 = time.perf_counter()
    aspec = latent.AESpec(dim=64, latent_dim=ap["latent_dim"], hidden=ap["hidden"], depth=ap["depth"])
    ae, ae_loss = latent.train_autoencoder(k, aspec, xt, steps=ap["steps"])
    lspec = latent.LatentFMSpec(aspec, nets.NetSpec(dim=aspec.latent_dim, hidden=vp["hidden"], depth=vp["depth"]),
                                latent.latent_scale(ae, aspec, xt))
    pix = nets.NetSpec(dim=64, hidden=vp["hidden"], depth=vp["depth"])
    params, last = fit({"pixel": lambda p, b, key: flow_matching_loss(p, pix, b, key),
                        "latent": lambda p, b, key: latent.loss(p, lspec, b, key)},
                       {"pixel": nets.init(k, pix), "latent": latent.init(k, lspec, ae)}, xt, vp["steps"],
                       vp["batch_size"], ctx.p["lr"])
    train_s = time.perf_counter() - t0
    images = {"pixel": flow.solve(NetVelocity(pix), jax.random.normal(k, xt.shape), uniform_grid(8), "rk4",
                                  args=(params["pixel"],)),
              "latent": latent.sample(params["latent"], lspec, k, len(xt), steps=8, method="rk4")}
    recon = latent.decode(ae, aspec, latent.encode(ae, aspec, xt))
    rows = [latent_row("pixel flow matching (baseline)", images["pixel"], xv, last["pixel"], train_s),
            dict(latent_row(f"latent FM (AE latent {aspec.latent_dim})", images["latent"], xv, last["latent"],
                            train_s), ae_mse=float(ae_loss),
                 fd_ae_reconstruction_vs_val=metrics.fd_digits(np.clip(recon, -1, 1), xv))]
    return rows, {"pixel FM": (np.asarray(images["pixel"]), None), "latent FM": (np.asarray(images["latent"]), None)}


def latent_row(name, images, xv, last, train_s) -> dict:
    return {"variant": name, "data": "digits", "nfe": 32, "final_loss": last, "train_s": train_s,
            "fd_digits": metrics.fd_digits(np.clip(np.asarray(images), -1, 1), xv)}


def variants_section(ctx) -> dict:
    """The five variants beside plain FM: toy (exact KL where the density is known) and digits (FD)."""
    train, held, logp = toy_data(ctx)
    rows, samples = toy_variants(ctx, train, held, logp)
    digit_rows, grids = digits_variants(ctx)
    plot_scatter(samples, held, ctx.out / "variants_toy_samples.png", "FM variants on the toy (NFE 32)")
    plot_digit_grids(grids, ctx.out / "variants_digits_samples.png", "pixel vs latent FM (rk4, NFE 32)")
    xt = continuous.digits_arrays("train")[0].reshape(-1, 64)
    xv = continuous.digits_arrays("validation")[0].reshape(-1, 64)
    return {"toy_floors": toy_floors(ctx), "digits_calibration": {"fd_train_vs_val":
                                                                                metrics.fd_digits(xt, xv)},
            "rows": rows + digit_rows}


# ----------------------------------------------------------------------------- continuous-token AR

@dataclasses.dataclass
class Dequantized:
    """Batches whose x gets fresh uniform noise U(0, width) per step (pure in (seed, step))."""

    batches: continuous.ArrayBatches
    width: float
    seed: int = 0

    def at(self, step: int) -> dict:
        b = self.batches.at(step)
        noise = np.random.default_rng((self.seed, step)).uniform(0, self.width, b["x"].shape)
        return dict(b, x=(b["x"] + noise).astype(np.float32))


def from_tokens(x_NLD, size: int = 8) -> np.ndarray:
    """[N, size*size] images from [N, (size/2)^2, 4] 2x2-patch tokens (the inverse of families.to_tokens)."""
    n, h = len(x_NLD), size // families.PATCH
    x = np.asarray(x_NLD).reshape(n, h, h, families.PATCH, families.PATCH)
    return x.transpose(0, 1, 3, 2, 4).reshape(n, size * size)


def train_car(ctx, name, dataset, gaussian: bool, steps: int, batch_size: int, **data):
    cp = ctx.p["car"]
    tcfg = train_cfg(ctx, "continuous_ar", dataset, dict(steps=steps, batch_size=batch_size),
                     head_hidden=cp["head_hidden"], head_depth=cp["head_depth"], gaussian_head=gaussian)
    backbone = config.ModelConfig(**cp["backbone"], max_seq_len=32)
    spec, _, params, train_s = train_run(ctx, name, backbone, tcfg, "continuous_ar", **data)
    return spec, params, train_s


def car_row(ctx, head, spec, params, tokens, n: int, train_s, offset=0.0) -> tuple[dict, np.ndarray]:
    """(row, n samples [n, L*D] shifted by -offset) of one AR model: exact per-token NLL of the
    held-out tokens (head ODE: midpoint, car_ode_steps), and its samples."""
    steps = ctx.p["car_ode_steps"]
    nll = np.asarray(car.token_nll(params, spec, tokens, method="midpoint", steps=steps), np.float64)
    samples = car_sampling.sample(params, spec, jax.random.key(5), n, steps=steps, method="midpoint")
    row = {"head": head, "nll_per_token": nll.mean(0).tolist(), "head_nfe_per_token": 2 * steps, "train_s": train_s,
           "nll_per_dim": float(nll.sum(1).mean() / tokens[0].size)}
    return row, np.asarray(samples).reshape(n, -1) - offset


def car_toy(ctx) -> dict:
    """Both heads on the toy as 2 tokens of 1 value: exact NLL per token, KL, MMD / SW of samples."""
    _, held, logp = toy_data(ctx)
    rows, samples = [], {}
    for head, gaussian in (("flow", False), ("gaussian", True)):
        spec, params, train_s = train_car(ctx, f"car_toy_{head}", TOY, gaussian, ctx.p["car"]["steps"],
                                          ctx.p["car"]["batch_size"])
        row, s = car_row(ctx, head, spec, params, families.to_tokens(held), len(held), train_s)
        row.update(two_sample(s, held), kl=float(logp.mean() + row["nll_per_dim"] * 2))
        rows.append(row)
        samples[f"{head} head"] = s
    plot_scatter(samples, held, ctx.out / "car_toy_samples.png", "continuous AR on the toy (2 tokens)")
    return {"floors": toy_floors(ctx), "rows": rows, "goal": "flow-head NLL < Gaussian-head NLL",
            "met": bool(rows[0]["nll_per_dim"] < rows[1]["nll_per_dim"])}


def car_digits(ctx) -> dict:
    """Both heads on the digits as 16 tokens of 2x2 pixels, uniformly dequantized (fresh noise
    each step; fixed noise on the held-out images): NLL in nats/dim and <= bits per pixel."""
    (xt, yt), (xv, yv) = (continuous.digits_arrays(split) for split in continuous.SPLITS)
    train = continuous.ArrayBatches({"x": families.to_tokens(xt), "label": yt}, ctx.p["car_digits"]["batch_size"])
    held = families.to_tokens(xv) + np.random.default_rng(1).uniform(0, PIXEL_STEP, families.to_tokens(xv).shape)
    held = held.astype(np.float32)
    rows, grids = [], {}
    for head, gaussian in (("flow", False), ("gaussian", True)):
        spec, params, train_s = train_car(ctx, f"car_digits_{head}", "digits", gaussian, **ctx.p["car_digits"],
                                          batches=Dequantized(train, PIXEL_STEP), val_rows={"x": held, "label": yv})
        row, s = car_row(ctx, head, spec, params, held, len(xt), train_s, offset=PIXEL_STEP / 2)
        images = from_tokens(s.reshape(len(s), 16, 4))
        row.update(bits_per_pixel=(row["nll_per_dim"] + math.log(1 / PIXEL_STEP)) / math.log(2),
                   fd_digits=metrics.fd_digits(np.clip(images, -1, 1), xv.reshape(len(xv), -1)))
        rows.append(row)
        grids[f"{head} head"] = (images, None)
    plot_digit_grids(grids, ctx.out / "car_digits_samples.png", "continuous AR on digits (16 tokens)")
    return {"rows": rows, "dequantization": f"U(0, {PIXEL_STEP})", "n_eval": len(held),
            "fd_train_vs_val": metrics.fd_digits(xt.reshape(len(xt), -1), xv.reshape(len(xv), -1)),
            "goal": "flow-head NLL < Gaussian-head NLL", "met": bool(rows[0]["nll_per_dim"] < rows[1]["nll_per_dim"])}


def car_section(ctx) -> dict:
    """The toy, and the digits unless the preset skips them (car_digits=None)."""
    return {"toy": car_toy(ctx), **({"digits": car_digits(ctx)} if ctx.p["car_digits"] else {})}


RUNNERS = {"toy": toy_section, "convergence": convergence_section, "digits": digits_section,
           "variants": variants_section, "car": car_section}


# ----------------------------------------------------------------------------- plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_toy(rows, samples, held, floors, out: pathlib.Path) -> None:
    """toy_fm_nll_vs_nfe.png (NLL and MMD^2 per solver against NFE) and toy_fm_samples.png."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (key, label), ax in zip((("nll_per_dim", "exact NLL (nats/dim)"), ("mmd2", "MMD^2 vs held-out")), axes):
        for method in SOLVERS:
            nfe = "nll_nfe" if key == "nll_per_dim" else "nfe"
            pts = sorted((r[nfe], r[key]) for r in rows if r["solver"] == method)
            if pts:
                ax.plot(*zip(*pts), marker="*" if method == "dopri5" else "o", label=method)
        ax.axhline(floors[key], color="k", ls="--", lw=1, label="entropy" if key == "nll_per_dim" else "noise floor")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("flow matching on eight_gaussians: quality vs NFE")
    fig.tight_layout()
    fig.savefig(out / "toy_fm_nll_vs_nfe.png", dpi=90)
    plt.close(fig)
    shown = {f"{m} NFE {n}": s for (m, n), s in samples.items() if m == "dopri5" or n in (1, 4, 16, 64)}
    plot_scatter(shown, held, out / "toy_fm_samples.png", "flow-matching samples per solver and NFE")


def plot_scatter(samples: dict, held, path, title: str) -> None:
    plt = _plt()
    panels = {"held-out data": held, **samples}
    cols = min(5, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, x) in zip(axes.flat, panels.items()):
        x = np.asarray(x)
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
        ax.set_title(name, fontsize=8)
        ax.set_xlim(-5, 5)
        ax.set_ylim(-5, 5)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_digit_grids(grids: dict, path, title: str, per_side: int = 10) -> None:
    """One 10x10 image grid per entry (name -> (images [N, 64], labels or None)); labelled sets
    show 10 of each class in a row."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.4), squeeze=False)
    for ax, (name, (images, labels)) in zip(axes.flat, grids.items()):
        images = np.clip(np.asarray(images), -1, 1)
        if labels is not None:
            idx = [i for c in range(per_side) for i in np.flatnonzero(labels == c)[:per_side]]
        else:
            idx = list(range(min(len(images), per_side * per_side)))
        canvas = np.full((per_side * 9, per_side * 9), -1.0)
        for j, i in enumerate(idx[:per_side * per_side]):
            r, c = divmod(j, per_side)
            canvas[r * 9:r * 9 + 8, c * 9:c * 9 + 8] = images[i].reshape(8, 8)
        ax.imshow(canvas, cmap="gray_r", vmin=-1, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- table

def _f(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def format_table(result: dict) -> str:
    s, lines = result["sections"], []
    if "toy" in s:
        fl = s["toy"]["floors"]
        lines += [f"toy FM on {TOY} ({s['toy']['n_eval']} held-out points; entropy {fl['nll_per_dim']:.4f} nats/dim, "
                  f"floors MMD^2 {fl['mmd2']:.5f} +- {fl['mmd2_std']:.5f}, SW {fl['sliced_w2']:.4f} +- "
                  f"{fl['sliced_w2_std']:.4f})",
                  f"{'solver':<9} {'NFE':>4} {'NLL NFE':>7} {'NLL/dim':>8} {'KL':>8} {'+-':>6} {'MMD^2':>8} {'SW':>7}"]
        lines += [f"{r['solver']:<9} {r['nfe']:>4} {r['nll_nfe']:>7} {r['nll_per_dim']:>8.4f} {r['kl']:>8.4f} "
                  f"{r['kl_stderr']:>6.4f} {r['mmd2']:>8.5f} {r['sliced_w2']:>7.4f}" for r in s["toy"]["rows"]]
    if "convergence" in s:
        c = s["convergence"]
        lines += ["", f"convergence: KL({c['steps'][0]} steps) {c['kl'][0]:.4f}, KL({c['steps'][1]} steps) "
                      f"{c['kl'][1]:.4f}, difference {c['difference']:+.4f} +- {c['difference_stderr']:.4f}; goal "
                      f"{c['goal']}: {'met' if c['met'] else 'not met'}"]
    if "digits" in s:
        d, cal = s["digits"], s["digits"]["calibration"]
        lines += ["", f"digits FM (class-conditional; {cal['n_samples']} samples vs {cal['n_reference']} validation): "
                      f"FD(train, val) {cal['fd_train_vs_val']:.3f}, FD(train + N(0, {cal['noise_std']}), val) "
                      f"{cal['fd_noisy_train_vs_val']:.3f}",
                  f"{'solver':<9} {'NFE':>4} {'w':>4} {'FD-digits':>9} {'class acc':>9} {'IS-digits':>9} {'memo':>6}"]
        lines += [f"{r['solver']:<9} {r['nfe']:>4} {r['cfg_scale']:>4g} {r['fd_digits']:>9.3f} "
                  f"{r['class_accuracy']:>9.3f} {r['is_digits']:>9.3f} {_f(r.get('memorization'), '.3f'):>6}"
                  for r in d["rows"] + d["guidance"]]
    if "variants" in s:
        lines += ["", f"variants (toy floors: entropy {s['variants']['toy_floors']['nll_per_dim']:.4f}, MMD^2 "
                      f"{s['variants']['toy_floors']['mmd2']:.5f}; digits FD(train, val) "
                      f"{s['variants']['digits_calibration']['fd_train_vs_val']:.3f})",
                  f"{'variant':<36} {'NFE':>4} {'KL':>8} {'NLL/dim':>8} {'MMD^2':>8} {'SW':>7} {'FD':>7} "
                  f"{'train s':>7}"]
        lines += [f"{r['variant']:<36} {r['nfe']:>4} {_f(r.get('kl')):>8} {_f(r.get('nll_per_dim')):>8} "
                  f"{_f(r.get('mmd2'), '.5f'):>8} {_f(r.get('sliced_w2')):>7} {_f(r.get('fd_digits'), '.3f'):>7} "
                  f"{r['train_s']:>7.1f}" for r in s["variants"]["rows"]]
    if "car" in s:
        t, d = s["car"]["toy"], s["car"].get("digits")
        lines += ["", f"continuous AR, toy (entropy {t['floors']['nll_per_dim']:.4f} nats/dim): exact NLL per token"]
        per_token = lambda r: ", ".join(f"{v:.4f}" for v in r["nll_per_token"])  # noqa: E731
        lines += [f"  {r['head']:<9} head: NLL/dim {r['nll_per_dim']:.4f} (tokens {per_token(r)}), KL {r['kl']:.4f}, "
                  f"MMD^2 {r['mmd2']:.5f}" for r in t["rows"]]
        lines += [f"  goal flow-head NLL < Gaussian-head NLL: {'met' if t['met'] else 'not met'}"]
        if d:
            lines += [f"continuous AR, digits (16 tokens of 2x2, dequantized; FD(train, val) "
                      f"{d['fd_train_vs_val']:.3f})"]
            lines += [f"  {r['head']:<9} head: NLL/dim {r['nll_per_dim']:.4f} (<= {r['bits_per_pixel']:.3f} "
                      f"bits/pixel), FD-digits {r['fd_digits']:.3f}" for r in d["rows"]]
            lines += [f"  goal flow-head NLL < Gaussian-head NLL: {'met' if d['met'] else 'not met'}"]
    times = ", ".join(f"{k} {v:.0f} s" for k, v in result["section_s"].items())
    return "\n".join(lines + ["", f"wall time {result['wall_s']:.0f} s ({times})"])


# ----------------------------------------------------------------------------- entry points

def run(out_dir="out/flow_frontier", preset: str = "default", only=None, data_dir: str = "", progress: bool = True,
        fresh: bool = False) -> dict:
    """Run the sections in `only` (default: all) and write flow_frontier.json + PNGs to out_dir."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    names = list(only or SECTIONS)
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(PRESETS[preset], out, data_dir, progress, fresh)
    result = {"preset": preset, "device": jax.devices()[0].device_kind, "sections": {}, "section_s": {}}
    start = time.perf_counter()
    for name in names:
        t = time.perf_counter()
        result["sections"][name] = RUNNERS[name](ctx)
        result["section_s"][name] = time.perf_counter() - t
    result["wall_s"] = time.perf_counter() - start
    (out / "flow_frontier.json").write_text(json.dumps(result, indent=2))
    print(format_table(result))
    print(f"wrote {out / 'flow_frontier.json'} and {len(list(out.glob('*.png')))} PNGs")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/flow_frontier")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--only", default="", help=f"comma-separated sections (default: all): {', '.join(SECTIONS)}")
    p.add_argument("--data-dir", default="", help="tfds data folder (default: jaxgen's)")
    p.add_argument("--fresh", action="store_true", help="retrain the loop's runs found in --out")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)  # tfds's "custom data configuration" notes
    only = [n.strip() for n in a.only.split(",") if n.strip()] or None
    run(a.out, a.preset, only, a.data_dir, progress=not a.no_progress, fresh=a.fresh)


if __name__ == "__main__":
    main()
