"""`jaxgen sample`: decode from a run or a HF checkpoint with any registered sampler.

The sampler flags are generated from the samplers' `generate` keyword arguments
(`jaxgen.samplers.registry.options`): `foo_bar=0.5` becomes `--foo-bar`, typed after the
sampler chosen. Only flags given on the command line are passed (plus the few CLI defaults
below), and a flag the chosen sampler does not take is refused, never dropped.

`--mesh` (and `--rules`) place the params and the prompt batch on a device mesh as `jaxgen train`
does; with `--distributed` every host runs the same command and the main process prints.
"""
from __future__ import annotations

import argparse
import pathlib

import jax
import numpy as np

from jaxgen import data, hf, model, parallel
from jaxgen.cli import sample_continuous
from jaxgen.errors import ConfigError, JaxgenError, ShardingError
from jaxgen.samplers import learn2pd
from jaxgen.samplers import registry as samplers
from jaxgen.training import runs

# One flag for what the samplers name differently: the first keyword a sampler takes wins.
ALIASES = {
    "block_length": ("block_length", "draft_length", "window_size"),
    "steps": ("steps", "denoising_steps"),
    "threshold": ("threshold", "entropy_threshold"),
}
DEFAULTS = {"gen_length": 64, "block_length": 16}  # passed when not given and the sampler takes them
STEPS_FOLLOW = {"steps": "gen_length", "denoising_steps": "block_length"}  # unset: one token per step


def sampler_flags() -> dict[str, list[tuple[str, samplers.Option]]]:
    """flag name -> [(sampler, the option it sets)] over every registered sampler; an alias flag
    lists the keyword it stands for in each sampler that takes one."""
    flags: dict[str, list] = {}
    for sampler in samplers.names():
        options = samplers.options(sampler)
        for name in ALIASES:
            target = _target(name, options, False)
            if target is not None:
                flags.setdefault(name, []).append((sampler, options[target]))
        for name, option in options.items():
            if name not in ALIASES:
                flags.setdefault(name, []).append((sampler, option))
    return flags


def _help(name: str, takers) -> str:
    said = "; ".join(f"{s}: {'' if o.name == name else o.name + ' '}{o.type.__name__} = {o.default!r}"
                     for s, o in takers)
    return said + (f" (jaxgen sample sends {DEFAULTS[name]} unless given)" if name in DEFAULTS else "")


def add_parser(sub) -> None:
    aliases = ", ".join(f"--{k.replace('_', '-')} = {' / '.join(v)}" for k, v in ALIASES.items())
    s = sub.add_parser("sample", help="generate from a trained run or a HF checkpoint",
                       description=f"Sampler flags are the chosen sampler's generate keywords; aliases: {aliases}")
    s.add_argument("--run", help="a jaxgen train --out folder")
    s.add_argument("--hf", help="a Hugging Face checkpoint folder")
    s.add_argument("--tokenizer", help="bytes or a tokenizer.json (default: the run's)")
    s.add_argument("--sampler", default="ar", help=f"one of {', '.join(samplers.names())}")
    s.add_argument("--prompt", default="def ")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--filter", help="a Learn2PD filter folder (jaxgen train --objective learn2pd); "
                   "--threshold is then the filter's tau")
    s.add_argument("--mesh", help="shard params and prompts on a mesh, e.g. data=2,fsdp=2,tensor=2 ('' = all "
                   "devices on data; default: one device, or all on data with --distributed)")
    s.add_argument("--rules", choices=tuple(parallel.RULES), help="sharding rules with --mesh (default: the "
                   "run's, fsdp for --hf)")
    s.add_argument("--method", help="runs on continuous data: the ODE method (euler, midpoint, heun, rk4; "
                   "default midpoint)")
    s.add_argument("--label", type=int, help="runs on continuous data: the class to sample (default: unconditional)")
    s.add_argument("--out", help="runs on continuous data: the .npy file for the samples (default: "
                   "RUN/samples.npy; a .png picture next to it)")
    s.add_argument("--draft-run", help="--sampler speculative: a jaxgen train folder whose model drafts (a draft "
                   "model with the target's vocabulary; replaces --drafter)")
    s.add_argument("--drafter-option", action="append", default=[], metavar="KEY=VALUE",
                   help="--sampler speculative: an option of the named drafter, e.g. max_depth=3 for "
                   "token_recycling (repeatable)")
    s.add_argument("--json-schema", help="constrain the output to a JSON schema (a .json file)")
    s.add_argument("--regex", help="constrain the output to a regular expression")
    s.add_argument("--grammar", help="constrain the output to a Lark grammar (a .lark file)")
    s.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host; "
                   "run the same command on every host)")
    for name, takers in sampler_flags().items():
        flag = "--" + name.replace("_", "-")
        if any(o.type is bool for _, o in takers):
            s.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=_help(name, takers))
        else:
            s.add_argument(flag, default=argparse.SUPPRESS, metavar="VALUE", help=_help(name, takers))
    s.set_defaults(fn=run_sample)


def _target(flag: str, options: dict, with_filter: bool) -> str | None:
    """The generate keyword `flag` sets for a sampler with `options`, or None."""
    candidates = ("filter_threshold",) if with_filter and flag == "threshold" else ALIASES.get(flag, (flag,))
    return next((c for c in candidates if c in options), None)


def _convert(raw, option: samplers.Option, flag: str):
    """A flag's text as the option's type ("none" -> None where the option allows it)."""
    if isinstance(raw, bool) or option.type is bool:
        if not isinstance(raw, bool):
            raise ConfigError(f"--{flag.replace('_', '-')} is not a switch for this sampler; pass a value")
        return raw
    if option.optional and raw.lower() == "none":
        return None
    try:
        return option.type(raw)
    except ValueError:
        kind = option.type.__name__
        article = "an" if kind == "int" else "a"
        raise ConfigError(f"--{flag.replace('_', '-')}={raw!r} is not {article} {kind}") from None


def _flags_of(options: dict) -> str:
    """What a sampler takes, for error messages: its flags and the aliases that reach them."""
    dash = lambda name: "--" + name.replace("_", "-")
    aliases = [f"{dash(a)} sets {t}" for a in ALIASES if (t := _target(a, options, False)) not in (None, a)]
    return f"its flags: {', '.join(dash(o) for o in options)}" + (f" ({'; '.join(aliases)})" if aliases else "")


def run_continuous(args) -> None:
    """A run on continuous data: its own sampler (`sample_continuous`); token-sampler flags refused."""
    given = [f"--{name.replace('_', '-')}" for name in sampler_flags() if hasattr(args, name)
             and name not in sample_continuous.READS]
    token_only = [flag for flag, value in (("--sampler", args.sampler != "ar"), ("--prompt", args.prompt != "def "),
                                           ("--filter", args.filter), ("--mesh", args.mesh), ("--hf", args.hf))
                  if value]
    if given or token_only:
        raise ConfigError(f"{', '.join(token_only + given)}: a run on continuous data samples with --batch, --seed, "
                          "--steps, --method, --cfg-scale, --temperature, --label and --out only")
    sample_continuous.run(args)


def sampler_kwargs(args) -> dict:
    """The keyword arguments of `args.sampler`'s generate from the flags given; refuses flags
    the sampler does not take (naming the ones it does)."""
    name = args.sampler
    samplers.get(name)
    options = samplers.options(name)
    flags = sampler_flags()
    given = {k: v for k, v in vars(args).items() if k in flags}
    kwargs = {}
    for flag, raw in given.items():
        target = _target(flag, options, bool(args.filter))
        if target is None:
            raise ConfigError(f"sampler {name!r} takes no --{flag.replace('_', '-')}; {_flags_of(options)}")
        if target in kwargs:
            raise ConfigError(f"two flags set {target!r} of sampler {name!r}; pass one")
        kwargs[target] = _convert(raw, options[target], flag)
    for flag, value in DEFAULTS.items():
        target = _target(flag, options, False)
        if target is not None:
            kwargs.setdefault(target, value)
    for steps, follow in STEPS_FOLLOW.items():
        if steps in options and steps not in kwargs and _target(follow, options, False) in kwargs:
            kwargs[steps] = kwargs[_target(follow, options, False)]
    if args.filter:
        if not samplers.accepts(name, "commit_filter"):
            raise ConfigError(f"--filter needs a sampler that takes a commit filter (masked_diffusion), not {name!r}")
        kwargs["commit_filter"] = learn2pd.load_filter(args.filter)
    return kwargs


def load_model(args, mesh=None):
    """(cfg, params, tokenizer name, rules) from --run or --hf; with a mesh, params sharded by the
    rules (--rules, else the run's, else fsdp) and stacked (the samplers scan over layers); on one
    device, in the decode form (`model.decode_params`: the fastest per step)."""
    if bool(args.run) == bool(args.hf):
        raise JaxgenError("pass exactly one of --run OUT (a jaxgen train folder) or --hf DIR (a HF checkpoint)")
    if args.run:
        cfg, tcfg, params = runs.load_run(args.run, mesh=mesh, rules=args.rules)
        params = params if mesh is not None else jax.jit(model.decode_params)(params)
        return cfg, params, tcfg.tokenizer, args.rules or tcfg.rules
    cfg, params = hf.load(args.hf, form="stacked" if mesh is not None else "decode")
    rules = args.rules or "fsdp"
    if mesh is not None:
        params = parallel.put_global(params, parallel.param_shardings(cfg, mesh, rules))
    tok = pathlib.Path(args.hf) / "tokenizer.json"
    return cfg, params, str(tok) if tok.exists() else "bytes", rules


def sample_mesh(args):
    """The mesh of --mesh / --distributed (None: one device)."""
    if args.mesh is None and not args.distributed:
        if args.rules:
            raise ConfigError("--rules shards the params on a mesh; pass --mesh too (e.g. --mesh data=2,tensor=2)")
        return None
    return parallel.make_mesh(args.mesh or "")


def place_prompt(prompt, mesh, rules):
    """The [batch, length] prompt as a global array split over the mesh's batch axes."""
    try:
        sharding = parallel.batch_sharding(mesh, rules, prompt.shape[0])
    except ShardingError as e:
        raise ShardingError(f"--batch={prompt.shape[0]} must split evenly over the mesh's batch axes: {e}") from None
    return parallel.put_global(prompt, sharding)


def constraint_flag(args):
    """(flag, value) of the one constraint flag given (--json-schema / --regex / --grammar), or
    None; refused for a sampler that takes no constraint."""
    given = [(flag, value) for flag, value in (("json_schema", args.json_schema), ("regex", args.regex),
                                               ("grammar", args.grammar)) if value is not None]
    if not given:
        return None
    if len(given) > 1:
        raise ConfigError(f"{' and '.join('--' + f.replace('_', '-') for f, _ in given)}: pass one constraint")
    if not samplers.accepts(args.sampler, "constraint"):
        raise ConfigError(f"sampler {args.sampler!r} takes no constraint; constrained samplers: "
                          f"{', '.join(n for n in samplers.names() if samplers.accepts(n, 'constraint'))}")
    flag, value = given[0]
    if flag != "regex" and not pathlib.Path(value).is_file():
        raise ConfigError(f"--{flag.replace('_', '-')}={value}: no such file")
    return given[0]


def constraint_of(args, tokenizer):
    """The `jaxgen.constraints` Constraint the constraint flag asks for (None: none)."""
    given = constraint_flag(args)
    if given is None:
        return None
    from jaxgen import constraints
    flag, value = given
    if flag == "regex":
        return constraints.regex(value, tokenizer)
    build = constraints.json_schema if flag == "json_schema" else constraints.grammar
    return build(pathlib.Path(value).read_text(), tokenizer)


def drafter_of(args, kwargs) -> dict:
    """The speculative sampler's drafter keywords: --draft-run's model, or --drafter's options."""
    if args.sampler != "speculative":
        given = [f for f, v in (("--draft-run", args.draft_run), ("--drafter-option", args.drafter_option)) if v]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to --sampler speculative, not {args.sampler!r}")
        return {}
    options = dict(_drafter_option(item) for item in args.drafter_option)
    if args.draft_run is None:
        return options
    if "drafter" in kwargs or options:
        raise ConfigError("--draft-run is the drafter (a draft model); drop --drafter and --drafter-option")
    from jaxgen.decoding import drafters
    draft_cfg, _, draft_params = runs.load_run(args.draft_run)
    return {"drafter": drafters.model_drafter(jax.jit(model.decode_params)(draft_params), draft_cfg)}


def _drafter_option(item: str):
    """KEY=VALUE with VALUE as an int, float, bool or string."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--drafter-option {item!r}: write KEY=VALUE, e.g. max_depth=3")
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(raw.lower(), raw)


def run_sample(args):
    parallel.initialize_distributed(args.distributed)  # before anything touches a device (--filter loads)
    if args.run and sample_continuous.run_family(args.run) != "lm":
        return run_continuous(args)
    generate = samplers.get(args.sampler)
    kwargs = sampler_kwargs(args)  # bad flags fail before the model loads
    constraint_flag(args)
    kwargs.update(drafter_of(args, kwargs))
    if args.batch < 1:
        raise ConfigError(f"--batch={args.batch} must be >= 1 (the number of prompt rows)")
    mesh = sample_mesh(args)
    cfg, params, tok_name, rules = load_model(args, mesh)
    tokenizer = data.get_tokenizer(args.tokenizer or tok_name)
    ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + list(tokenizer.encode(args.prompt))
    prompt = np.asarray([ids] * args.batch, np.int32)
    if mesh is not None:
        prompt = place_prompt(prompt, mesh, rules)
    constraint = constraint_of(args, tokenizer)
    if constraint is not None:
        kwargs["constraint"] = constraint
    out = generate(params, cfg, prompt, jax.random.key(args.seed), **kwargs)
    tokens, nfe = parallel.to_host(out.tokens), parallel.to_host(out.nfe)  # every process gathers; main prints
    if parallel.is_main():
        for row in tokens:
            print(repr(tokenizer.decode(row)))
        print(f"nfe={int(nfe)}" + (f" accepted/forward={float(out.accepted):.2f}" if hasattr(out, "accepted") else ""))
