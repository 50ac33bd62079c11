"""`jaxgen bench` and `jaxgen demo`."""
from __future__ import annotations

from jaxgen import demo
from jaxgen.bench import ar as bench_ar
from jaxgen.bench import attention as bench_attention
from jaxgen.bench import dlm as bench_dlm


def run_bench(args):
    {"ar": bench_ar, "dlm": bench_dlm, "attention": bench_attention}[args.what].main(args)


def run_demo(args):
    demo.run(out_dir=args.out, steps=args.steps, preset=args.preset, gen_length=args.gen_length,
             overrides=args.overrides, progress=not args.no_progress, bpe_vocab=args.bpe_vocab,
             temperature=args.temperature, top_p=args.top_p, trace_length=args.trace_length)


def add_parsers(sub) -> None:
    b = sub.add_parser("bench", help="side-by-side benchmarks against peers")
    b.add_argument("what", choices=("ar", "dlm", "attention"), help="ar: vs HF generate; dlm: LLaDA vs two "
                   "PyTorch loops (as written and equal work), and each Fast-dLLM mode vs no cache; attention: "
                   "the door's xla / pallas (/ cudnn on GPU) per layout, fwd and fwd+bwd, and the cache path")
    b.add_argument("--prompt-len", type=int, default=32)
    b.add_argument("--new-tokens", type=int, default=128, help="ar only")
    b.add_argument("--batches", default="1,8", help="ar only")
    b.add_argument("--gen-length", type=int, default=256, help="dlm only")
    b.add_argument("--block-length", type=int, default=32, help="dlm only")
    b.add_argument("--steps", type=int, default=0, help="dlm only (default: gen-length)")
    b.add_argument("--batch", type=int, default=1, help="dlm only")
    b.add_argument("--repeats", type=int, default=None, help="timed rounds (default: ar 5, dlm 3)")
    b.add_argument("--json", help="also write the results here")
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
