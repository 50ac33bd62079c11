"""`jaxgen train`, `jaxgen eval` and `jaxgen convert`: runs in and out."""
from __future__ import annotations

import dataclasses

from jaxgen import config, data, hf, objectives, parallel
from jaxgen.objectives.registry import FILTER
from jaxgen.training import filter_fit, loop, runs, vocab


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
    tokenizer = data.get_tokenizer(train_cfg.tokenizer)
    explicit = {key.removeprefix("model.") for key, _ in config.override_items(overrides)} & set(vocab.VOCAB_FIELDS)
    model_cfg = vocab.model_for_tokenizer(model_cfg, train_cfg, tokenizer, explicit)  # vocab and ids follow it
    result = loop.train(model_cfg, train_cfg, args.out, tokenizer=tokenizer, fresh=args.fresh, extend=args.extend)
    if not parallel.is_main():  # process 0 wrote metrics.jsonl and reports
        return
    last = loop.read_metrics(result["metrics_path"])[-1]
    print(f"step {last['step']}: loss {last['loss']:.4f}"
          + (f", eval loss {result['eval_loss']:.4f}" if result["eval_loss"] is not None else "")
          + f"; checkpoints and metrics.jsonl in {args.out}")


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
    cfg, tcfg, params = runs.load_run(args.run)
    tcfg = dataclasses.replace(tcfg, eval_batches=args.batches)
    tokenizer = data.get_tokenizer(tcfg.tokenizer)
    _, val_rows = data.corpus(tcfg, tokenizer)
    mesh = parallel.make_mesh("")
    loss = loop.evaluate(loop.make_eval_step(cfg, tcfg), params, val_rows, tcfg,
                         parallel.batch_sharding(mesh, tcfg.rules, tcfg.batch_size))
    bpb = loop.bits_per_byte(loss) if tokenizer.name == "bytes" else None
    print(f"{tcfg.objective} eval loss {loss:.4f} nats/token" + (f", {bpb:.4f} bits/byte" if bpb else ""))


def run_convert(args):
    cfg, _, params = runs.load_run(args.run)
    hf.save(args.to_hf, cfg, params, family=args.family)
    print(f"wrote a Hugging Face checkpoint to {args.to_hf}")


def add_parsers(sub) -> None:
    t = sub.add_parser("train", help="train (or resume) a model; key=value overrides any config field or "
                       "objective option")
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
