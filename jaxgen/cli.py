"""The `jaxgen` command: train | sample | eval | convert | bench | demo."""
from __future__ import annotations

import argparse
import sys

from jaxgen.errors import JaxgenError


def _train(args):
    from jaxgen import config, parallel, train
    parallel.initialize_distributed(args.distributed)
    model_cfg, train_cfg = config.preset(args.preset)
    fixed = {"objective": args.objective, "steps": args.steps, "seed": args.seed, "mesh": args.mesh,
             "rules": args.rules}
    overrides = list(args.overrides) + [f"{k}={v}" for k, v in fixed.items() if v is not None]
    model_cfg, train_cfg = config.apply_overrides(model_cfg, train_cfg, overrides)  # validated once, together
    if train_cfg.objective == "learn2pd":
        from jaxgen.samplers import learn2pd
        m = learn2pd.train_filter(train_cfg, args.out, progress=train_cfg.progress)["metrics"]
        print(f"Learn2PD filter: BCE {m['first_bce']:.4f} -> {m['fit_bce']:.4f} (early-stopped at step "
              f"{m['best_step']}, held-out {m['val_bce']:.4f}, test {m['test_bce']:.4f}); test precision "
              f"{m['test_precision']:.3f}, recall {m['test_recall']:.3f} at positive rate "
              f"{m['test_positive_rate']:.3f}, over {m['records']} step records; "
              f"saved to {args.out} (load with jaxgen.samplers.learn2pd.load_filter)")
        return
    result = train.train(model_cfg, train_cfg, args.out, fresh=args.fresh)
    last = train.read_metrics(result["metrics_path"])[-1]
    print(f"step {last['step']}: loss {last['loss']:.4f}"
          + (f", eval loss {result['eval_loss']:.4f}" if result["eval_loss"] is not None else "")
          + f"; checkpoints and metrics.jsonl in {args.out}")


def _load_model(args):
    from jaxgen import hf, runs
    if bool(args.run) == bool(args.hf):
        raise JaxgenError("pass exactly one of --run OUT (a jaxgen train folder) or --hf DIR (a HF checkpoint)")
    if args.run:
        cfg, tcfg, params = runs.load_run(args.run)
        return cfg, params, tcfg.tokenizer
    cfg, params = hf.load(args.hf)
    import pathlib
    tok = str(pathlib.Path(args.hf) / "tokenizer.json") if (pathlib.Path(args.hf) / "tokenizer.json").exists() else "bytes"
    return cfg, params, tok


SAMPLERS = ("ar", "masked_diffusion", "block_diffusion", "dream", "lavida", "nbdiff", "wedlm", "tidar")


def _sampler_call(args, params, cfg, prompt, key):
    """Run the sampler `--sampler` names with the flags that apply to it."""
    import importlib
    module = importlib.import_module(f"jaxgen.samplers.{args.sampler}")
    n, steps, block = args.gen_length, args.steps, args.block_length
    common = dict(temperature=args.temperature)
    if args.sampler == "ar":
        return module.generate(params, cfg, prompt, key, max_new_tokens=n, top_k=args.top_k, top_p=args.top_p, **common)
    if args.sampler == "masked_diffusion":
        rule = {}
        if args.filter:
            from jaxgen.samplers import learn2pd
            rule = dict(commit_filter=learn2pd.load_filter(args.filter), filter_threshold=args.threshold or 0.5)
        elif args.threshold is not None:
            rule = dict(threshold=args.threshold)
        return module.generate(params, cfg, prompt, key, gen_length=n, steps=steps or n, block_length=block,
                               remasking=args.remasking or "low_confidence", cache=args.cache, eotp=args.eotp,
                               **rule, **common)
    if args.sampler == "block_diffusion":
        return module.generate(params, cfg, prompt, key, gen_length=n, block_length=block,
                               denoising_steps=steps or block, top_k=args.top_k, top_p=args.top_p,
                               remasking=args.remasking or "low_confidence_dynamic",
                               threshold=0.9 if args.threshold is None else args.threshold, **common)
    if args.sampler == "dream":
        return module.generate(params, cfg, prompt, key, gen_length=n, steps=steps or n, alg=args.alg or "origin",
                               top_k=args.top_k or None, top_p=args.top_p if args.top_p < 1 else None, **common)
    if args.sampler == "lavida":
        return module.generate(params, cfg, prompt, key, gen_length=n, steps=steps or n, block_length=block,
                               remasking=args.remasking or "low_confidence", **common)
    if args.sampler == "nbdiff":
        return module.generate(params, cfg, prompt, key, gen_length=n, block_length=block,
                               alg=args.alg or "confidence_threshold",
                               threshold=0.9 if args.threshold is None else args.threshold, **common)
    if args.sampler == "wedlm":
        return module.generate(params, cfg, prompt, key, gen_length=n, window_size=block, entropy_threshold=0.4 if args.threshold is None else args.threshold,
                               top_k=args.top_k, top_p=args.top_p, **common)
    return module.generate(params, cfg, prompt, key, gen_length=n, draft_length=block, **common)


def _sample(args):
    import jax
    import numpy as np
    from jaxgen import data
    cfg, params, tok_name = _load_model(args)
    tokenizer = data.get_tokenizer(args.tokenizer or tok_name)
    ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + list(tokenizer.encode(args.prompt))
    prompt = np.asarray([ids] * args.batch, np.int32)
    out = _sampler_call(args, params, cfg, prompt, jax.random.key(args.seed))
    for row in np.asarray(out.tokens):
        print(repr(tokenizer.decode(row)))
    print(f"nfe={int(out.nfe)}")


def _eval(args):
    import dataclasses as dc
    from jaxgen import data, parallel, runs, train
    cfg, tcfg, params = runs.load_run(args.run)
    tcfg = dc.replace(tcfg, eval_batches=args.batches)
    tokenizer = data.get_tokenizer(tcfg.tokenizer)
    _, val_rows = data.corpus(tcfg, tokenizer)
    mesh = parallel.make_mesh("")
    loss = train.evaluate(train.make_eval_step(cfg, tcfg), params, val_rows, tcfg,
                          parallel.batch_sharding(mesh, tcfg.rules, tcfg.batch_size))
    bpb = train.bits_per_byte(loss) if tokenizer.name == "bytes" else None
    print(f"{tcfg.objective} eval loss {loss:.4f} nats/token" + (f", {bpb:.4f} bits/byte" if bpb else ""))


def _convert(args):
    from jaxgen import hf, runs
    cfg, _, params = runs.load_run(args.run)
    hf.save(args.to_hf, cfg, params, family=args.family)
    print(f"wrote a Hugging Face checkpoint to {args.to_hf}")


def _bench(args):
    if args.what == "ar":
        from jaxgen.bench import ar
        ar.main(args)
    else:
        from jaxgen.bench import dlm
        dlm.main(args)


def _demo(args):
    from jaxgen import demo
    demo.run(out_dir=args.out, steps=args.steps, preset=args.preset, gen_length=args.gen_length,
             overrides=args.overrides, progress=not args.no_progress)


def config_objectives():
    from jaxgen.config import OBJECTIVES
    return OBJECTIVES


def hf_families():
    from jaxgen.hf import FAMILIES
    return FAMILIES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxgen", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a model; key=value overrides any config field")
    t.add_argument("--preset", default="tiny")
    t.add_argument("--objective", choices=config_objectives())
    t.add_argument("--steps", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--mesh", help="e.g. data=2,fsdp=2,tensor=2 (default: all devices on data)")
    t.add_argument("--rules", choices=("dp", "fsdp", "tp", "fsdp+tp"))
    t.add_argument("--out", default="runs/default")
    t.add_argument("--fresh", action="store_true", help="discard checkpoints in --out and start over")
    t.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
    t.add_argument("overrides", nargs="*", metavar="key=value")
    t.set_defaults(fn=_train)

    s = sub.add_parser("sample", help="generate from a trained run or a HF checkpoint")
    s.add_argument("--run")
    s.add_argument("--hf")
    s.add_argument("--tokenizer", help="bytes or a tokenizer.json (default: the run's)")
    s.add_argument("--sampler", choices=SAMPLERS, default="ar", help="a module of jaxgen.samplers")
    s.add_argument("--prompt", default="def ")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--gen-length", type=int, default=64)
    s.add_argument("--steps", type=int, default=0)
    s.add_argument("--block-length", type=int, default=16,
                   help="block (masked/block diffusion, lavida, nbdiff), window (wedlm), draft length (tidar)")
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--remasking")
    s.add_argument("--threshold", type=float, help="masked_diffusion: Fast-dLLM threshold (or the filter's tau); "
                   "block_diffusion/nbdiff: commit threshold (default 0.9); wedlm: entropy threshold")
    s.add_argument("--cache", choices=("prefix", "dual", "dkv_decode"), help="masked_diffusion only")
    s.add_argument("--alg", help="dream / nbdiff: origin, maskgit_plus, topk_margin, entropy, confidence_threshold")
    s.add_argument("--filter", help="masked_diffusion: a Learn2PD filter folder (jaxgen train --objective learn2pd)")
    s.add_argument("--eotp", action="store_true", help="masked_diffusion: stop after End-of-Text (Learn2PD EoTP)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_sample)

    e = sub.add_parser("eval", help="validation loss and bits/byte of a trained run")
    e.add_argument("--run", required=True)
    e.add_argument("--batches", type=int, default=8)
    e.set_defaults(fn=_eval)

    c = sub.add_parser("convert", help="export a trained run as a Hugging Face checkpoint")
    c.add_argument("--run", required=True)
    c.add_argument("--to-hf", required=True)
    c.add_argument("--family", choices=hf_families())
    c.set_defaults(fn=_convert)

    b = sub.add_parser("bench", help="side-by-side benchmarks against peers")
    b.add_argument("what", choices=("ar", "dlm"), help="ar: vs HF generate; dlm: LLaDA vs a PyTorch loop, "
                   "and each Fast-dLLM mode vs no cache")
    b.add_argument("--prompt-len", type=int, default=32)
    b.add_argument("--new-tokens", type=int, default=128, help="ar only")
    b.add_argument("--batches", default="1,8", help="ar only")
    b.add_argument("--gen-length", type=int, default=256, help="dlm only")
    b.add_argument("--block-length", type=int, default=32, help="dlm only")
    b.add_argument("--steps", type=int, default=0, help="dlm only (default: gen-length)")
    b.add_argument("--batch", type=int, default=1, help="dlm only")
    b.add_argument("--repeats", type=int, default=None, help="timed rounds (default: ar 5, dlm 3)")
    b.add_argument("--json", help="also write the results here")
    b.set_defaults(fn=_bench)

    d = sub.add_parser("demo", help="train and sample AR, masked- and block-diffusion models (offline)")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--steps", type=int, default=300)
    d.add_argument("--preset", default="tiny")
    d.add_argument("--gen-length", type=int, default=64)
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("overrides", nargs="*", metavar="key=value")
    d.set_defaults(fn=_demo)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may sit anywhere among the options
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    if len(overrides) != len(extra) or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(a for a in extra if a not in overrides) or ' '.join(extra)}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    try:
        args.fn(args)
    except JaxgenError as e:
        print(f"jaxgen {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
