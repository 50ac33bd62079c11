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
threshold rules commit several tokens per step, and its layer matrices so that attention
matters: with a plain init (std 0.02) the approximate caches (prefix, dual, dKV) change no token
against no-cache decoding and matching the reference would prove little. Rows for cached
decoders report how many tokens agree with no-cache decoding. The one intended difference: jaxgen never
proposes the mask token, so the reference model's mask-token logit is set to -inf (a wrapper
on its output; its decoding code is untouched). Shims for transformers 5: the reference models
are built from their config and given the checkpoint with a strict `load_state_dict` (its
`from_pretrained` needs hooks these classes predate), the LLaDA config gets `use_cache=False`,
and Dream's RoPE gets transformers' removed "default" init function.

Torch and XLA round float32 differently, so two candidates whose confidences differ by ~1e-7 can
swap order: a random model's still-masked positions often score almost alike. Exact ties
happen too: when top-p leaves one candidate, several positions score exactly 1.0; jaxgen
commits the lowest positions first, while `torch.topk` leaves the order of ties unspecified. A
row that differs should be checked for a near or exact tie at the commit boundary (or rerun
with another `--seed`) before it is read as a semantic difference. Fast-dLLM 24cc59e (the snapshot without `factor`) runs one
cached forward after a block-start forward that already cleaned the block; f6b35ec and jaxgen
do not, so with that snapshot NFE can be one higher per such block.
"""
from __future__ import annotations

import argparse
import inspect
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
LAYER_SCALE = 5.0  # strengthens attention so stale cached K/V visibly change the output


def saved_random_model(tmp: pathlib.Path, family: str, seed: int, num_kv_heads: int = 2):
    """A random model written as a `family` ("llada" or "dream") checkpoint and read back (so
    jaxgen runs exactly the float32 weights the reference loads). Grouped-query by default;
    dKV-Cache's model code assumes as many K/V heads as query heads. Dream gets random q/k/v
    biases so they matter."""
    qkv_bias = family == "dream"
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=num_kv_heads,
                      head_dim=16, mlp_dim=128, max_seq_len=256, rope_theta=10000.0, norm_eps=1e-5,
                      qkv_bias=qkv_bias, mask_id=MASK_ID, eos_id=3, pad_id=3)
    init_key, bias_key = jax.random.split(jax.random.PRNGKey(seed))
    params = model.init(cfg, init_key)
    params["lm_head"] = params["lm_head"] * LOGIT_SCALE
    params["layers"] = {k: v * LAYER_SCALE if k.startswith("w") else v for k, v in params["layers"].items()}
    if qkv_bias:
        for name, key in zip(("bq", "bk", "bv"), jax.random.split(bias_key, 3)):
            params["layers"][name] = 0.1 * jax.random.normal(key, params["layers"][name].shape)
    path = tmp / f"{family}_{num_kv_heads}kv"
    hf.save(path, cfg, params, family=family)
    return path, *hf.load(path)


def no_cache_tokens(params, cfg, prompts, steps, gen_length, block_length):
    """jaxgen's no-cache LLaDA tokens: how far an approximate cache moves the output."""
    return np.asarray(masked_diffusion.generate(params, cfg, jnp.asarray(prompts), jax.random.PRNGKey(0),
                                                steps=steps, gen_length=gen_length,
                                                block_length=block_length).tokens)


class NeverProposeMask:
    """The reference model with the mask token's logit at -inf (what jaxgen does by design)."""

    def __init__(self, ref_model):
        self.ref_model = ref_model

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
    return ref_generate, reference_llada_model(LLaDAConfig, LLaDAModelLM, ckpt)


def reference_llada_model(config_cls, model_cls, ckpt: pathlib.Path):
    config = config_cls.from_pretrained(ckpt)
    config.use_cache = False  # transformers 5 no longer keeps the attribute LLaDAConfig passes
    return NeverProposeMask(with_checkpoint_weights(model_cls(config), ckpt))


def with_checkpoint_weights(ref_model, ckpt: pathlib.Path):
    """Load model.safetensors strictly (every tensor name must match the reference's own)."""
    from safetensors.torch import load_file
    ref_model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
    return ref_model.eval()


def load_reference_dream(fast_dllm: pathlib.Path, ckpt: pathlib.Path):
    """Dream's model class and `_sample` (Dream-org's decoding loop, as shipped in Fast-dLLM)."""
    import torch
    from transformers import modeling_rope_utils

    def default_rope(config, device=None, seq_len=None, **_):  # removed from transformers 5
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        exponent = torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim
        return 1.0 / (config.rope_theta ** exponent), 1.0

    modeling_rope_utils.ROPE_INIT_FUNCTIONS.setdefault("default", default_rope)
    sys.path[:0] = [str(fast_dllm)]
    from dream.model.configuration_dream import DreamConfig
    from dream.model.generation_utils import DreamGenerationConfig
    from dream.model.modeling_dream import DreamModel
    return DreamGenerationConfig, with_checkpoint_weights(DreamModel(DreamConfig.from_pretrained(ckpt)), ckpt)


def load_reference_dkv_decode(dkv_cache: pathlib.Path, ckpt: pathlib.Path):
    """horseee/dKV-Cache's dKV-Cache-Decode LLaDA model class and generate function."""
    import importlib
    sys.path[:0] = [str(dkv_cache)]
    ref_generate = importlib.import_module("generation_utils.llada_dkv_cache_decode")
    from models.configuration_llada import LLaDAConfig
    from models.modeling_llada_dkv_cache_decode import LLaDAModelLM
    return ref_generate, reference_llada_model(LLaDAConfig, LLaDAModelLM, ckpt)


def run_dkv_decode(dkv_cache, tmp, prompts, gen_length, block_length, seed):
    ckpt, cfg, params = saved_random_model(tmp, "llada", seed, num_kv_heads=4)
    ref_generate, ref_model = load_reference_dkv_decode(dkv_cache, ckpt)
    rows = []
    for steps in (gen_length, gen_length // 2):
        baseline = no_cache_tokens(params, cfg, prompts, steps, gen_length, block_length)
        for reload in (2, 4, 8):
            kw = dict(steps=steps, gen_length=gen_length, block_length=block_length)
            ref_fn = lambda p, kw=kw, reload=reload: (ref_generate.generate(  # noqa: E731
                ref_model, None, p, temperature=0.0, remasking="low_confidence", mask_id=MASK_ID,
                enable_cache=True, cache_reloading_step=reload, **kw), kw["steps"])
            jax_fn = jax.jit(lambda p, kw=kw, reload=reload: masked_diffusion.generate(
                params, cfg, p, jax.random.PRNGKey(0), cache="dkv_decode", cache_reloading_step=reload, **kw))
            rows.append(compare(f"dKV-Cache-Decode steps={steps} reload {reload}", ref_fn, jax_fn, prompts, baseline))
    return rows


def dream_cases(gen_length):
    return [(f"Dream {alg} steps={steps}{extra_name}", dict(alg=alg, steps=steps, **extra))
            for alg in ("maskgit_plus", "topk_margin", "entropy")
            for steps in (gen_length, gen_length // 4)
            for extra_name, extra in (("", {}), (", top_p 0.9", dict(top_p=0.9)))]


def run_dream(fast_dllm, tmp, prompts, gen_length, seed):
    import contextlib
    import io

    import torch
    ckpt, cfg, params = saved_random_model(tmp, "dream", seed)
    generation_config_cls, ref_model = load_reference_dream(fast_dllm, ckpt)

    def never_mask(step, x, logits):
        logits[..., MASK_ID] = -float("inf")
        return logits

    def ref_sample(p, kw):
        gen_cfg = generation_config_cls(max_length=p.shape[1] + gen_length, mask_token_id=MASK_ID, temperature=0.0,
                                        **kw)
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # it prints its step count and time
            x = ref_model._sample(p, attention_mask=None, generation_config=gen_cfg,
                                  generation_tokens_hook_func=lambda step, x, logits: x,
                                  generation_logits_hook_func=never_mask)
        return x, kw["steps"]

    rows = []
    for name, kw in dream_cases(gen_length):
        jax_fn = jax.jit(lambda p, kw=kw: masked_diffusion.generate(
            params, cfg, p, jax.random.PRNGKey(0), gen_length=gen_length, block_length=gen_length, **kw))
        rows.append(compare(name, lambda p, kw=kw: ref_sample(p, kw), jax_fn, prompts))
    return rows


def compare(name, ref_fn, jax_fn, prompts, baseline=None):
    """Reference (one prompt at a time) vs jaxgen (one at a time, then batched). `baseline`: the
    no-cache tokens for a cached decoder (so that matching the reference is visibly more than
    matching no-cache decoding)."""
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
    if baseline is not None:
        row["agreement_with_no_cache"] = float((ref_tokens == baseline).mean())
    print(f"{name:44s} tokens {'identical' if row['tokens_identical'] else 'DIFFER'} "
          f"({row['token_agreement']:.1%}), batched {'same' if row['batched_identical'] else 'DIFFERS'}, "
          f"NFE ref {ref_nfe} jaxgen {ours_nfe}"
          + (f", {row['agreement_with_no_cache']:.0%} like no cache" if baseline is not None else ""))
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


def run_llada(fast_dllm, tmp, prompts, gen_length, block_length, seed):
    ckpt, cfg, params = saved_random_model(tmp, "llada", seed)
    ref_generate, ref_model = load_reference_llada(fast_dllm, ckpt)
    baselines = {steps: no_cache_tokens(params, cfg, prompts, steps, gen_length, block_length)
                 for steps in (gen_length, gen_length // 2)}
    rows = []
    with_factor = "factor" in inspect.signature(ref_generate.generate).parameters
    for name, fn_name, kw, ours_kw in llada_cases(gen_length, block_length, with_factor):
        ref_fn = lambda p, fn=getattr(ref_generate, fn_name), kw=kw: fn(  # noqa: E731
            ref_model, p, gen_length=gen_length, block_length=block_length, temperature=0.0,
            remasking="low_confidence", mask_id=MASK_ID, **kw)
        jax_fn = jax.jit(lambda p, kw=kw, ours_kw=ours_kw: masked_diffusion.generate(
            params, cfg, p, jax.random.PRNGKey(0), gen_length=gen_length, block_length=block_length,
            **kw, **ours_kw))
        baseline = baselines[kw["steps"]] if "cache" in ours_kw else None
        rows.append(compare(name, ref_fn, jax_fn, prompts, baseline))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast-dllm", type=pathlib.Path, required=True, help="a local NVlabs/Fast-dLLM checkout")
    ap.add_argument("--dkv-cache", type=pathlib.Path, help="a local horseee/dKV-Cache checkout (optional)")
    ap.add_argument("--out", type=pathlib.Path, help="write the rows as JSON here")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random model and prompts")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-length", type=int, default=13)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=16)
    args = ap.parse_args(argv)
    needed = [(args.fast_dllm, "--fast-dllm", "Fast-dLLM", sub) for sub in (
        "llada/generate.py", "llada/model/modeling_llada.py", "dream/model/generation_utils.py")]
    needed += [(args.dkv_cache, "--dkv-cache", "dKV-Cache", sub) for sub in (
        "generation_utils/llada_dkv_cache_decode.py", "models/modeling_llada_dkv_cache_decode.py")] * bool(args.dkv_cache)
    for root, flag, repo, sub in needed:
        if not (root / sub).exists():
            raise SystemExit(f"{flag} {root} has no {sub}; pass the root of a {repo} checkout")
    prompts = np.random.RandomState(args.seed).randint(4, MASK_ID, (args.prompts, args.prompt_length))
    with tempfile.TemporaryDirectory() as d:
        rows = run_llada(args.fast_dllm, pathlib.Path(d), prompts, args.gen_length, args.block_length, args.seed)
        rows += run_dream(args.fast_dllm, pathlib.Path(d), prompts, args.gen_length, args.seed)
        if args.dkv_cache:
            rows += run_dkv_decode(args.dkv_cache, pathlib.Path(d), prompts, args.gen_length, args.block_length, args.seed)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    bad = [r["decoder"] for r in rows if not (r["tokens_identical"] and r["nfe_identical"] and r["batched_identical"])]
    print("all identical" if not bad else f"not identical: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
