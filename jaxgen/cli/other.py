"""`jaxgen bench` and `jaxgen demo`."""
from __future__ import annotations

from jaxgen import demo
from jaxgen.bench import ar as bench_ar
from jaxgen.bench import attention as bench_attention
from jaxgen.bench import constrained as bench_constrained
from jaxgen.bench import dlm as bench_dlm
from jaxgen.bench import flow as bench_flow
from jaxgen.bench import spec as bench_spec
from jaxgen.bench import train as bench_train
from jaxgen.errors import ConfigError

BENCHES = {"ar": bench_ar, "dlm": bench_dlm, "attention": bench_attention, "train": bench_train, "flow": bench_flow,
           "spec": bench_spec, "constrained": bench_constrained}
TRAIN_ONLY = ("preset", "seq_len", "objective", "attention_impl", "peak_tflops")
PROMPT_LEN = {"spec": 128, "constrained": 64}  # --prompt-len default per bench (others: 32)
NEW_TOKENS = {"constrained": 64}  # --new-tokens default per bench (others: 128)


def run_bench(args):
    if args.what != "train":  # the train bench's flags and key=value overrides mean nothing to the others
        given = [f"--{name.replace('_', '-')}" for name in TRAIN_ONLY if getattr(args, name) is not None]
        if given or args.overrides:
            raise ConfigError(f"{', '.join(given + list(args.overrides))}: only `jaxgen bench train` reads these")
        if args.batch is None:
            args.batch = 1
    if args.prompt_len is None:
        args.prompt_len = PROMPT_LEN.get(args.what, 32)
    if args.new_tokens is None:
        args.new_tokens = NEW_TOKENS.get(args.what, 128)
    BENCHES[args.what].main(args)


def run_demo(args):
    demo.run(out_dir=args.out, steps=args.steps, preset=args.preset, gen_length=args.gen_length,
             overrides=args.overrides, progress=not args.no_progress, bpe_vocab=args.bpe_vocab,
             temperature=args.temperature, top_p=args.top_p, trace_length=args.trace_length)


def add_parsers(sub) -> None:
    b = sub.add_parser("bench", help="side-by-side benchmarks against peers")
    b.add_argument("what", choices=tuple(BENCHES), help="ar: vs HF generate; dlm: LLaDA vs two "
                   "PyTorch loops (as written and equal work), and each Fast-dLLM mode vs no cache; attention: "
                   "the door's xla / pallas (/ cudnn on GPU) per layout, fwd and fwd+bwd, and the cache path; "
                   "train: tokens/s and MFU of the train step of a preset per attention impl (key=value overrides "
                   "any config field or objective option); flow: jitted jaxgen.flow.solve vs the reference flow_matching "
                   "ODESolver (torchdiffeq) on the same velocity MLP, per method; spec: speculative decoding "
                   "(each drafter) vs jaxgen AR and HF prompt lookup / assisted generation on the same weights; "
                   "constrained: grammar-mask overhead per step (JSON schema, regex) for AR and block diffusion")
    b.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default: spec 128, constrained 64, "
                   "else 32)")
    b.add_argument("--new-tokens", type=int, default=None, help="ar, spec (default 128); constrained: at most "
                   "(default 64)")
    b.add_argument("--batches", default="1,8", help="ar, spec, constrained")
    b.add_argument("--gen-length", type=int, default=256, help="dlm only")
    b.add_argument("--block-length", type=int, default=32, help="dlm only")
    b.add_argument("--steps", type=int, default=0, help="dlm: denoising steps (default: gen-length); train: "
                   "steps per timed round (default: 5 on CPU, 10 on an accelerator)")
    b.add_argument("--batch", type=int, default=None, help="dlm (default 1); train (default: 8)")
    b.add_argument("--repeats", type=int, default=None, help="timed rounds (default: ar 5, spec 5, constrained 5, "
                   "dlm 3, train 3 on CPU, 5 on an accelerator)")
    b.add_argument("--preset", help="train only (default: tiny on CPU, base-125m on an accelerator)")
    b.add_argument("--seq-len", type=int, help="train only (default: 128 on CPU, 1024 on an accelerator)")
    b.add_argument("--objective", help=f"train only: {', '.join(bench_train.OBJECTIVES)} (default: ar)")
    b.add_argument("--attention-impl", help="train only: comma-separated attention impls side by side "
                   "(default: xla on CPU, xla,pallas on an accelerator)")
    b.add_argument("--peak-tflops", type=float, help="train only: peak TFLOP/s per device for MFU (default: "
                   "the bf16 table for a known accelerator, else a matmul measured in the run)")
    b.add_argument("--json", help="also write the results here")
    b.add_argument("overrides", nargs="*", metavar="key=value", help="train only: config fields, objective options")
    bench_flow.add_arguments(b)
    bench_spec.add_arguments(b)
    bench_constrained.add_arguments(b)
    b.set_defaults(fn=run_bench)

    d = sub.add_parser("demo", help="train and sample AR, masked- and block-diffusion models (offline)")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--steps", type=int, default=500)
    d.add_argument("--preset", default="tiny")
    d.add_argument("--gen-length", type=int, default=64)
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--temperature", type=float, default=0.8, help="of the shown samples (0 = greedy)")
    d.add_argument("--top-p", type=float, default=0.9, help="nucleus of the shown samples (AR, block diffusion)")
    d.add_argument("--bpe-vocab", type=int, default=1024, help="BPE tokenizer fitted on the corpus (0 = bytes)")
    d.add_argument("--trace-length", type=int, default=32, help="tokens of the step-by-step diffusion view")
    d.add_argument("overrides", nargs="*", metavar="key=value")
    d.set_defaults(fn=run_demo)
