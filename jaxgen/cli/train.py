"""`jaxgen train`, `jaxgen eval` and `jaxgen convert`: runs in and out."""
from __future__ import annotations

import dataclasses

from jaxgen import config, data, hf, objectives, parallel
from jaxgen.objectives.registry import FILTER, LM
from jaxgen.training import families, filter_fit, loop, runs, vocab


def run_train(args):
    parallel.initialize_distributed(args.distributed)
    model_cfg, train_cfg = config.preset(args.preset)
    fixed = {"objective": args.objective, "steps": args.steps, "seed": args.seed, "mesh": args.mesh,
             "rules": args.rules}
    overrides = list(args.overrides) + [f"{k}={v}" for k, v in fixed.items() if v is not None]
    model_cfg, train_cfg = objectives.apply_overrides(model_cfg, train_cfg, overrides)  # validated once, together
    if objectives.get(train_cfg.objective).trains == FILTER:
        refuse_unread_by_filter_fit(args, overrides)
        m = filter_fit.train_filter(train_cfg, args.out, progress=train_cfg.progress)["metrics"]
        print(f"Learn2PD filter: BCE {m['first_bce']:.4f} -> {m['fit_bce']:.4f} (early-stopped at step "
              f"{m['best_step']}, held-out {m['val_bce']:.4f}, test {m['test_bce']:.4f}); test precision "
              f"{m['test_precision']:.3f}, recall {m['test_recall']:.3f} at positive rate "
              f"{m['test_positive_rate']:.3f}, over {m['records']} step records; "
              f"saved to {args.out} (load with jaxgen.samplers.learn2pd.load_filter)")
        return
    family = families.of_objective(train_cfg.objective)
    if family.name != LM:  # continuous data: the family builds its model from the options (and model keys)
        refuse_unread_by_family(family, train_cfg.objective, overrides)
        train_cfg = with_family_defaults(family, train_cfg, overrides)
        spec = family.spec(model_cfg if family.reads_model_config else None, train_cfg)
        result = loop.train(spec, train_cfg, args.out, fresh=args.fresh, extend=args.extend)
        report(result, args.out, f" (load with jaxgen.training.runs.load_run(out, family={family.name!r}))")
        return
    tokenizer = data.get_tokenizer(train_cfg.tokenizer)
    explicit = {key.removeprefix("model.") for key, _ in config.override_items(overrides)} & set(vocab.VOCAB_FIELDS)
    model_cfg = vocab.model_for_tokenizer(model_cfg, train_cfg, tokenizer, explicit)  # vocab and ids follow it
    result = loop.train(model_cfg, train_cfg, args.out, tokenizer=tokenizer, fresh=args.fresh, extend=args.extend)
    report(result, args.out)


def with_family_defaults(family, train_cfg, overrides):
    """`train_cfg` with the family's own defaults for the fields the command line left unset."""
    given = {key.removeprefix("train.") for key, _ in config.override_items(overrides)}
    unset = {k: v for k, v in family.train_defaults.items() if k not in given}
    return dataclasses.replace(train_cfg, **unset)


def report(result, out, note: str = "") -> None:
    """The last logged step's loss (and eval loss) and where the run is; process 0 only."""
    if not parallel.is_main():  # process 0 wrote metrics.jsonl and reports
        return
    last = loop.read_metrics(result["metrics_path"])[-1]
    print(f"step {last['step']}: loss {last['loss']:.4f}"
          + (f", eval loss {result['eval_loss']:.4f}" if result["eval_loss"] is not None else "")
          + f"; checkpoints and metrics.jsonl in {out}{note}")


_MODEL_KEYS = frozenset(f.name for f in dataclasses.fields(config.ModelConfig))


def refuse_unread_by_family(family, objective: str, overrides) -> None:
    """Refuse keys a non-language-model family never reads (model keys of a family that builds its
    own model; token-data keys) rather than drop them."""
    keys = [key.removeprefix("model.").removeprefix("train.") for key, _ in config.override_items(overrides)]
    unread = [k for k in keys if (k in _MODEL_KEYS and not family.reads_model_config) or k in family.unread_keys]
    if unread:
        model = "its backbone takes the model keys" if family.reads_model_config else "builds its net from its options"
        raise config.ConfigError(f"objective {objective} ({family.name} family) does not read "
                                 f"{', '.join(dict.fromkeys(unread))}: it trains on a continuous dataset= and {model} "
                                 f"({', '.join(objectives.get(objective).option_names())}); drop them")


FILTER_FIT_READS = {"objective", "steps", "seed", "seq_len", "batch_size", "lr", "weight_decay", "tokenizer",
                    "dataset", "data_dir", "data_files", "max_files", "progress", "init_from"}


def refuse_unread_by_filter_fit(args, overrides) -> None:
    """The Learn2PD filter fit takes its model from init_from and reads only the fields above and
    its options: refuse anything else rather than drop it."""
    options = set(objectives.get("learn2pd").option_names())
    unread = [f"--{flag}" for flag in ("fresh", "extend") if getattr(args, flag)]
    unread += [key for key, _ in config.override_items(overrides)
               if key.removeprefix("model.").removeprefix("train.") not in FILTER_FIT_READS | options]
    if unread:
        raise config.ConfigError(f"the Learn2PD filter fit does not read {', '.join(unread)}; it reads "
                                 f"{', '.join(sorted(FILTER_FIT_READS - {'objective'}))} and its options "
                                 f"({', '.join(sorted(options))}); the model comes from init_from")


def run_eval(args):
    cfg, tcfg, params = runs.load_run(args.run, family=None)
    tcfg = dataclasses.replace(tcfg, eval_batches=args.batches)
    family = families.of_spec(cfg)
    prepared = family.prepare(cfg, tcfg, None, have_data=False)  # a language model's tokenizer
    _, val_rows = family.data(cfg, tcfg, prepared)
    mesh = parallel.make_mesh("")
    loss = loop.evaluate(loop.make_eval_step(cfg, tcfg), params, val_rows, tcfg, family.batch_sharding(cfg, mesh, tcfg))
    bpb = loop.bits_per_byte(loss) if getattr(prepared, "name", None) == "bytes" else None
    print(f"{tcfg.objective} eval loss {loss:.4f}" + (" nats/token" if family.unit == "tokens" else "")
          + (f", {bpb:.4f} bits/byte" if bpb else ""))


def run_convert(args):
    cfg, _, params = runs.load_run(args.run)
    hf.save(args.to_hf, cfg, params, family=args.family)
    print(f"wrote a Hugging Face checkpoint to {args.to_hf}")


def add_parsers(sub) -> None:
    t = sub.add_parser("train", help="train (or resume) a model; key=value overrides any config field or "
                       "objective option (continuous objectives, e.g. flow_matching, take dataset= a "
                       "jaxgen.data.continuous data set: digits or a 2-D toy)")
    t.add_argument("--preset", default="tiny")
    t.add_argument("--objective", choices=objectives.names(),
                   help="options (key=value): " + "; ".join(
                       f"{n}: {', '.join(objectives.get(n).option_names()) or '-'}" for n in objectives.names()))
    t.add_argument("--steps", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--mesh", help="e.g. data=2,fsdp=2,tensor=2 (default: all devices on data)")
    t.add_argument("--rules", choices=("dp", "fsdp", "tp", "fsdp+tp"))
    t.add_argument("--out", default="runs/default")
    t.add_argument("--fresh", action="store_true", help="discard checkpoints in --out and start over")
    t.add_argument("--extend", action="store_true", help="continue the run in --out to a larger --steps (the "
                   "rest of the run follows the new learning-rate schedule); other config changes need --fresh")
    t.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
    t.add_argument("overrides", nargs="*", metavar="key=value")
    t.set_defaults(fn=run_train)

    e = sub.add_parser("eval", help="validation loss and bits/byte of a trained run")
    e.add_argument("--run", required=True)
    e.add_argument("--batches", type=int, default=8)
    e.set_defaults(fn=run_eval)

    c = sub.add_parser("convert", help="export a trained run as a Hugging Face checkpoint")
    c.add_argument("--run", required=True)
    c.add_argument("--to-hf", required=True)
    c.add_argument("--family", choices=hf.FAMILIES)
    c.set_defaults(fn=run_convert)
