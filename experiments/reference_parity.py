"""Run the reference decoders themselves against jaxgen's on the same random weights.

    python experiments/reference_parity.py --fast-dllm /path/to/Fast-dLLM [--out parity.json]

Needs a local checkout of NVlabs/Fast-dLLM (its `llada/` and `dream/` folders). Nothing is
downloaded and nothing of it is copied into jaxgen: this script imports the reference's own
model classes and generate functions from that path at run time.

For each decoder it builds a tiny random model, writes it with `jaxgen.hf.save` as a LLaDA (or
Dream) checkpoint, loads that with the reference's model class, and decodes the same prompts
with the reference function (batch 1, as the reference requires) and with jaxgen (each prompt
alone, for per-row NFE, and all prompts as one batch). It reports whether tokens and NFE are
identical.

The random model's output layer is scaled up so confidences spread over (0, 1) and the
threshold rules commit several tokens per step. The one intended difference: jaxgen never
proposes the mask token, so the reference model's mask-token logit is set to -inf (a wrapper
on its output; its decoding code is untouched). Shims for transformers 5: the reference models
are built from their config and given the checkpoint with a strict `load_state_dict` (its
`from_pretrained` needs hooks these classes predate), the LLaDA config gets `use_cache=False`,
and Dream's RoPE gets transformers' removed "default" init function.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import hf, model
from jaxgen.config import ModelConfig
from jaxgen.samplers import masked_diffusion

VOCAB, MASK_ID = 512, 511
LOGIT_SCALE = 25.0  # sharpens the random model (logit std ~4) so confidences spread over (0, 1)


def random_model(qkv_bias: bool, seed: int = 0):
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      mlp_dim=128, max_seq_len=256, rope_theta=10000.0, norm_eps=1e-5, qkv_bias=qkv_bias,
                      mask_id=MASK_ID, eos_id=3, pad_id=3)
    params = model.init(cfg, jax.random.PRNGKey(seed))
    params["lm_head"] = params["lm_head"] * LOGIT_SCALE
    return cfg, params


class NeverProposeMask:
    """The reference model with the mask token's logit at -inf (what jaxgen does by design)."""

    def __init__(self, ref_model):
        self.ref_model = ref_model

    @property
    def device(self):
        return self.ref_model.device

    def __getattr__(self, name):
        return getattr(self.ref_model, name)

    def __call__(self, *args, **kwargs):
        out = self.ref_model(*args, **kwargs)
        out.logits[..., MASK_ID] = -float("inf")
        return out


def load_reference_llada(fast_dllm: pathlib.Path, ckpt: pathlib.Path):
    import importlib
    # llada/generate.py imports its model as `model.` (24cc59e) or `.model.` (f6b35ec): allow both.
    sys.path[:0] = [str(fast_dllm), str(fast_dllm / "llada")]
    ref_generate = importlib.import_module("llada.generate")
    from llada.model.configuration_llada import LLaDAConfig
    from llada.model.modeling_llada import LLaDAModelLM
    config = LLaDAConfig.from_pretrained(ckpt)
    config.use_cache = False  # transformers 5 no longer keeps the attribute LLaDAConfig passes
    return ref_generate, NeverProposeMask(with_checkpoint_weights(LLaDAModelLM(config), ckpt))


def with_checkpoint_weights(ref_model, ckpt: pathlib.Path):
    """Load model.safetensors strictly (every tensor name must match the reference's own)."""
    from safetensors.torch import load_file
    ref_model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
    return ref_model.eval()


def compare(name, ref_fn, jax_fn, prompts):
    """Reference (one prompt at a time) vs jaxgen (one at a time, then batched)."""
    import torch
    ref_tokens, ref_nfe, ours_tokens, ours_nfe = [], [], [], []
    for p in prompts:
        x, nfe = ref_fn(torch.as_tensor(p[None]))
        ref_tokens.append(x.numpy()[0])
        ref_nfe.append(int(nfe))
        out = jax_fn(jnp.asarray(p[None]))
        ours_tokens.append(np.asarray(out.tokens)[0])
        ours_nfe.append(int(out.nfe))
    batched = np.asarray(jax_fn(jnp.asarray(prompts)).tokens)
    ref_tokens, ours_tokens = np.stack(ref_tokens), np.stack(ours_tokens)
    row = {"decoder": name, "tokens_identical": bool((ref_tokens == ours_tokens).all()),
           "token_agreement": float((ref_tokens == ours_tokens).mean()),
           "batched_identical": bool((batched == ours_tokens).all()),
           "nfe_reference": ref_nfe, "nfe_jaxgen": ours_nfe, "nfe_identical": ref_nfe == ours_nfe}
    print(f"{name:44s} tokens {'identical' if row['tokens_identical'] else 'DIFFER'} "
          f"({row['token_agreement']:.1%}), batched {'same' if row['batched_identical'] else 'DIFFERS'}, "
          f"NFE ref {ref_nfe} jaxgen {ours_nfe}")
    return row


def llada_cases(gen_length, block_length, with_factor: bool):
    """(name, reference function name, shared kwargs, jaxgen-only kwargs). `factor` exists only in
    Fast-dLLM versions after 24cc59e."""
    steps_full, steps_half = gen_length, gen_length // 2
    factor_cases = [
        ("Fast-dLLM factor 1.0", "generate", dict(steps=steps_full, factor=1.0), {}),
        ("Fast-dLLM factor 2.0", "generate", dict(steps=steps_full, factor=2.0), {}),
        ("Fast-dLLM prefix cache + factor 1.0", "generate_with_prefix_cache", dict(steps=steps_full, factor=1.0),
         dict(cache="prefix")),
        ("Fast-dLLM dual cache + factor 1.0", "generate_with_dual_cache", dict(steps=steps_full, factor=1.0),
         dict(cache="dual")),
    ]
    return factor_cases * with_factor + [
        ("LLaDA steps=gen", "generate", dict(steps=steps_full), {}),
        ("LLaDA steps=gen/2", "generate", dict(steps=steps_half), {}),
        ("Fast-dLLM threshold 0.9", "generate", dict(steps=steps_full, threshold=0.9), {}),
        ("Fast-dLLM threshold 0.5", "generate", dict(steps=steps_full, threshold=0.5), {}),
        ("Fast-dLLM prefix cache", "generate_with_prefix_cache", dict(steps=steps_full), dict(cache="prefix")),
        ("Fast-dLLM prefix cache, steps=gen/2", "generate_with_prefix_cache", dict(steps=steps_half),
         dict(cache="prefix")),
        ("Fast-dLLM prefix cache + threshold 0.5", "generate_with_prefix_cache", dict(steps=steps_full, threshold=0.5),
         dict(cache="prefix")),
        ("Fast-dLLM dual cache", "generate_with_dual_cache", dict(steps=steps_full), dict(cache="dual")),
        ("Fast-dLLM dual cache, steps=gen/2", "generate_with_dual_cache", dict(steps=steps_half), dict(cache="dual")),
        ("Fast-dLLM dual cache + threshold 0.5", "generate_with_dual_cache", dict(steps=steps_full, threshold=0.5),
         dict(cache="dual")),
    ]


def run_llada(fast_dllm, tmp, prompts, gen_length, block_length):
    cfg, params = random_model(qkv_bias=False)
    hf.save(tmp / "llada", cfg, params, family="llada")
    cfg, params = hf.load(tmp / "llada")  # what the reference sees, float32 round trip
    ref_generate, ref_model = load_reference_llada(fast_dllm, tmp / "llada")
    rows = []
    import inspect
    with_factor = "factor" in inspect.signature(ref_generate.generate).parameters
    for name, fn_name, kw, ours_kw in llada_cases(gen_length, block_length, with_factor):
        ref_fn = lambda p, fn=getattr(ref_generate, fn_name), kw=kw: fn(  # noqa: E731
            ref_model, p, gen_length=gen_length, block_length=block_length, temperature=0.0,
            remasking="low_confidence", mask_id=MASK_ID, **kw)
        jax_fn = jax.jit(lambda p, kw=kw, ours_kw=ours_kw: masked_diffusion.generate(
            params, cfg, p, jax.random.PRNGKey(0), gen_length=gen_length, block_length=block_length,
            **kw, **ours_kw))
        rows.append(compare(name, ref_fn, jax_fn, prompts))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast-dllm", type=pathlib.Path, required=True, help="a local NVlabs/Fast-dLLM checkout")
    ap.add_argument("--out", type=pathlib.Path, help="write the rows as JSON here")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-length", type=int, default=13)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=16)
    args = ap.parse_args(argv)
    for sub in ("llada/generate.py", "llada/model/modeling_llada.py"):
        if not (args.fast_dllm / sub).exists():
            raise SystemExit(f"--fast-dllm {args.fast_dllm} has no {sub}; pass the root of a Fast-dLLM checkout")
    prompts = np.random.RandomState(0).randint(4, MASK_ID, (args.prompts, args.prompt_length))
    with tempfile.TemporaryDirectory() as d:
        rows = run_llada(args.fast_dllm, pathlib.Path(d), prompts, args.gen_length, args.block_length)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    bad = [r["decoder"] for r in rows if not (r["tokens_identical"] and r["nfe_identical"] and r["batched_identical"])]
    print("all identical" if not bad else f"not identical: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
