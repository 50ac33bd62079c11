"""`jaxgen sample --run OUT` for runs on continuous data (flow matching, continuous-token AR):
`--batch` samples, saved as .npy and plotted (a scatter for the 2-D toys, an image grid for the
digits). `--cfg-scale` s follows MAR's convention for both (1 = the plain conditional model,
s > 1 pushes away from the null class); `--label` picks the class (default: the null class,
i.e. unconditional); `--temperature` scales the source noise; `--steps` / `--method` are the ODE's.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import objectives
from jaxgen.errors import ConfigError
from jaxgen.flow import continuous_ar_sampling, guidance, solve
from jaxgen.training import families, runs

READS = ("steps", "cfg_scale", "temperature")  # the sampler flags these runs take


def run_family(run_dir) -> str:
    """The family name a run folder records ("lm", "flow", "continuous_ar", ...)."""
    found, _ = runs.model_of_record(runs.read_record(run_dir), run_dir)
    return found.name


def _number(args, name: str, kind, default, least):
    raw = getattr(args, name, None)
    value = default if raw is None else kind(raw)
    if not value >= least:
        raise ConfigError(f"--{name.replace('_', '-')}={raw} must be >= {least}")
    return value


def options(args) -> dict:
    """steps / method / cfg_scale / temperature / label of the command line, checked."""
    return {"steps": _number(args, "steps", int, 32, 1), "cfg_scale": _number(args, "cfg_scale", float, 1.0, 0.0),
            "temperature": _number(args, "temperature", float, 1.0, 0.0), "method": args.method or "midpoint",
            "label": args.label}


def _labels(spec, label, batch: int):
    """[batch] class ids: --label, else the null class (no condition); None for an unconditional net."""
    classes = int(getattr(spec, "num_classes", 0) or 0)
    if not classes:
        if label is not None:
            raise ConfigError(f"--label={label}: this run's model is not class-conditional; drop --label")
        return None
    if label is not None and not 0 <= label < classes:
        raise ConfigError(f"--label={label} is outside the run's classes [0, {classes})")
    return jnp.full((batch,), classes if label is None else label, jnp.int32)


def sample_flow(spec, tcfg, params, key, batch: int, o: dict):
    """[batch, dim] samples of a velocity net: its field (guided when s != 1) solved from t=0 to 1."""
    opts = objectives.options_of(tcfg)
    labels = _labels(spec, o["label"], batch)
    if labels is None or o["cfg_scale"] == 1.0:
        field = objectives.flow.velocity_fn(params, spec, opts, labels)
    else:
        conditional = lambda x, t, y: objectives.flow.velocity_fn(params, spec, opts, y)(x, t)
        field = guidance.guide(conditional, labels, spec.null_label, o["cfg_scale"] - 1.0)  # guide's w = s - 1
    end = 1.0 if opts.param == "v" else 1.0 - 1e-3  # an x / eps prediction is singular at the data end
    x0 = o["temperature"] * jax.random.normal(key, (batch, spec.dim))
    return solve(field, x0, (0.0, end), o["method"], step_size=end / o["steps"])


def sample_continuous_ar(spec, params, key, batch: int, o: dict):
    """[batch, L, D] tokens of a continuous-token AR model."""
    return continuous_ar_sampling.sample(params, spec, key, batch, steps=o["steps"], method=o["method"],
                                         cfg_scale=o["cfg_scale"], temperature=o["temperature"],
                                         label_B=_labels(spec, o["label"], batch))


def from_tokens(tokens_BLD, shape):
    """Examples of `shape` back from continuous-AR tokens (inverse of `families.to_tokens`)."""
    tokens = np.asarray(tokens_BLD)
    if len(shape) == 1:
        return tokens[..., 0]
    h, w, c, p = *shape, families.PATCH
    patches = tokens.reshape(len(tokens), h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(len(tokens), h, w, c)


def plot(x, dataset: str, path) -> None:
    """A scatter of 2-D points or a grid of 8x8 images."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = np.asarray(x)
    if dataset == "digits":
        images = x.reshape(len(x), 8, 8)
        cols = min(len(images), 10)
        rows = -(-len(images) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(cols, rows), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, image in zip(axes.ravel(), images):
            ax.imshow(image, cmap="gray_r", vmin=-1, vmax=1)
    else:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(x[:, 0], x[:, 1], s=2)
        ax.set_aspect("equal")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def run(args) -> None:
    """Sample a continuous run, save `--out` (.npy) and its picture (.png), print a summary."""
    o = options(args)
    if args.batch < 1:
        raise ConfigError(f"--batch={args.batch} must be >= 1 (the number of samples)")
    spec, tcfg, params = runs.load_run(args.run, family=None)
    family = families.of_spec(spec)
    key = jax.random.key(args.seed)
    if family.name == "flow":
        x = sample_flow(spec, tcfg, params, key, args.batch, o)
    else:
        shape, _ = families.data_info(tcfg, objectives.options_of(tcfg))
        x = from_tokens(sample_continuous_ar(spec, params, key, args.batch, o), shape)
    x = np.asarray(x).reshape(args.batch, -1)
    out = pathlib.Path(args.out or pathlib.Path(args.run) / "samples.npy")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, x)
    plot(x, tcfg.dataset, out.with_suffix(".png"))
    print(f"{args.batch} samples of {tcfg.objective} on {tcfg.dataset} ({family.what}; {o['method']}, "
          f"{o['steps']} steps, cfg scale {o['cfg_scale']}): mean {x.mean():.3f}, std {x.std():.3f}; saved "
          f"{out} and {out.with_suffix('.png')}")
