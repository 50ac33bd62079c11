"""Run the reference decoders themselves against jaxgen's on the same random weights.

    python experiments/reference_parity.py [--fast-dllm PATH] [--dkv-cache PATH] [--sdar PATH]
        [--wedlm PATH] [--nbdiff PATH] [--lavida PATH] [--seed N] [--prompts N] [--timed-rounds N] [--out F]

Needs local checkouts (any subset) of NVlabs/Fast-dLLM (its `llada/` and `dream/` folders),
horseee/dKV-Cache, JetAstra/SDAR (`generate.py`, `training/model/SDAR-4B-Chat/`),
tencent/WeDLM (`wedlm/engine/`, `hf_compat/`), YuchuanTian/NBDiff (`generation_utils.py`) and
jacklishufan/LaViDa (`llava/model/language_model/llada/`). WeDLM's model file needs the
transformers its requirements pin (4.56) and NBDiff's cache class one from before 4.56 (it pins
4.53); the others run on transformers 5: run those two flags in such environments (the script
says so when the version does not fit). Nothing is downloaded and nothing of them is copied into
jaxgen: this script imports the references' own model classes and decoding code from those paths
at run time.

For each decoder it builds a tiny random model, writes it with `jaxgen.hf.save` as a LLaDA, Dream,
SDAR, Qwen3 (WeDLM) or Qwen2 (NBDiff) checkpoint (LLaDA for LaViDa), loads that with the
reference's model class, and decodes the same prompts with the reference function (batch 1, as the
references require) and with jaxgen (each prompt alone, for per-row NFE, and all prompts as one
batch). It reports whether tokens and NFE are identical, and the wall time per prompt of both:
jaxgen through its public API (`generate(params, ...)`, weights passed, not closed over), the two
alternating call by call over --timed-rounds rounds, medians compared (see `compare`).

The random model's output layer is scaled up so confidences spread over (0, 1) and the
threshold rules commit several tokens per step, and its layer matrices so that attention
matters: with a plain init (std 0.02) the approximate caches (prefix, dual, dKV) change no token
against no-cache decoding and matching the reference would prove little. Rows for cached
decoders report how many tokens agree with no-cache decoding. The one intended difference: jaxgen never
proposes the mask token, so the reference model's mask-token logit is set to -inf (a wrapper
on its output; its decoding code is untouched). Shims for transformers 5: the reference models
are built from their config and given the checkpoint with a strict `load_state_dict` (its
`from_pretrained` needs hooks these classes predate), the LLaDA config gets `use_cache=False`,
and Dream's RoPE gets transformers' removed "default" init function. SDAR's GPU kernels and
greedy decoding: see `load_reference_sdar`, `greedy_sdar_sampling` and `run_sdar`; the loop
that drives WeDLM's engine decoder on CPU: `reference_wedlm_decode`.

Torch and XLA round float32 differently, so two candidates whose confidences differ by ~1e-7 can
swap order: a random model's still-masked positions often score almost alike. Exact ties happen
too: when top-p leaves one candidate, several positions score exactly 1.0; jaxgen commits the
lowest positions first, while `torch.topk` leaves the order of ties unspecified. A row that differs
should be checked for a near or exact tie at the commit boundary (or rerun with another `--seed`)
before it is read as a semantic difference. Fast-dLLM 24cc59e (the snapshot without `factor`) runs
one cached forward after a block-start forward that already cleaned the block; f6b35ec and jaxgen
do not, so with that snapshot NFE can be one higher per such block.
"""
from __future__ import annotations

import argparse
import inspect
import json
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import hf, model
from jaxgen.config import ModelConfig
from jaxgen.samplers import block_diffusion, lavida, masked_diffusion, nbdiff, wedlm

VOCAB, MASK_ID = 512, 511
LOGIT_SCALE = 25.0  # sharpens the random model (logit std ~4) so confidences spread over (0, 1)
LAYER_SCALE = 5.0  # strengthens attention so stale cached K/V visibly change the output


def saved_random_model(tmp: pathlib.Path, family: str, seed: int, num_kv_heads: int = 2):
    """A random model written as a `family` ("llada", "dream" or "sdar") checkpoint and read back
    (so jaxgen runs exactly the float32 weights the reference loads). Grouped-query by default;
    dKV-Cache's model code assumes as many K/V heads as query heads. Qwen2-layout q/k/v biases
    and Qwen3-layout q/k norms are random so they matter."""
    qkv_bias, qk_norm = family in ("dream", "qwen2"), family in ("qwen3", "sdar")
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=num_kv_heads,
                      head_dim=16, mlp_dim=128, max_seq_len=256, rope_theta=10000.0, norm_eps=1e-5,
                      qkv_bias=qkv_bias, qk_norm=qk_norm, mask_id=MASK_ID, eos_id=3, pad_id=3)
    init_key, extra_key = jax.random.split(jax.random.PRNGKey(seed))
    params = model.init(cfg, init_key)
    params["lm_head"] = params["lm_head"] * LOGIT_SCALE
    params["layers"] = {k: v * LAYER_SCALE if k.startswith("w") else v for k, v in params["layers"].items()}
    extras = {"bq": 0.0, "bk": 0.0, "bv": 0.0} if qkv_bias else {"q_norm": 1.0, "k_norm": 1.0} if qk_norm else {}
    for (name, center), key in zip(extras.items(), jax.random.split(extra_key, 3)):
        params["layers"][name] = center + 0.1 * jax.random.normal(key, params["layers"][name].shape)
    path = tmp / f"{family}_{num_kv_heads}kv"
    hf.save(path, cfg, params, family=family)
    return path, *hf.load(path)


def no_cache_tokens(params, cfg, prompts, steps, gen_length, block_length):
    """jaxgen's no-cache LLaDA tokens: how far an approximate cache moves the output."""
    return np.asarray(masked_diffusion.generate(params, cfg, jnp.asarray(prompts), jax.random.PRNGKey(0),
                                                steps=steps, gen_length=gen_length,
                                                block_length=block_length).tokens)


class NeverProposeMask:
    """The reference model with the mask token's logit at -inf (what jaxgen does by design);
    counts its forwards (`calls`)."""

    def __init__(self, ref_model):
        self.ref_model = ref_model
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.ref_model, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
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


def with_default_rope():
    """Give transformers 5 back the plain-RoPE init function Dream's and SDAR's models look up."""
    import torch
    from transformers import modeling_rope_utils

    def default_rope(config, device=None, seq_len=None, **_):
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        exponent = torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim
        return 1.0 / (config.rope_theta ** exponent), 1.0

    modeling_rope_utils.ROPE_INIT_FUNCTIONS.setdefault("default", default_rope)


def load_reference_dream(fast_dllm: pathlib.Path, ckpt: pathlib.Path):
    """Dream's model class and `_sample` (Dream-org's decoding loop, as shipped in Fast-dLLM)."""
    with_default_rope()
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
            jax_fn = (lambda p, kw=kw, reload=reload: masked_diffusion.generate(
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
        jax_fn = (lambda p, kw=kw: masked_diffusion.generate(
            params, cfg, p, jax.random.PRNGKey(0), gen_length=gen_length, block_length=gen_length, **kw))
        rows.append(compare(name, lambda p, kw=kw: ref_sample(p, kw), jax_fn, prompts))
    return rows


def package_from_folder(name: str, folder: pathlib.Path):
    """Register `folder` as package `name` without running any __init__.py, so its modules
    import (relative imports included) without the rest of their repository."""
    package = stub_module(name, __path__=[str(folder)])
    package.__spec__.submodule_search_locations = package.__path__
    return package


def stub_module(name: str, **attrs):
    """Register an importable module `name` holding `attrs` (stands in for a GPU-only package)."""
    import importlib.machinery
    import types
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def load_reference_sdar(sdar: pathlib.Path, ckpt: pathlib.Path):
    """JetAstra/SDAR's `generate.py` and its model class (`training/model/SDAR-4B-Chat`). Its
    GPU-only kernels are replaced by the same math in torch: flash-attn's Triton RMSNorm (float32
    statistics) and `flash_attn_func` (non-causal, grouped-query); the Triton training loss is
    never called. transformers 5 lacks `LossKwargs` (which the model file only names), the
    plain-RoPE init function and `DynamicCache[layer]`; 5.24 also lacks `modeling_attn_mask_utils`
    (imported by the model file, called only on its sdpa path)."""
    import importlib
    import importlib.util
    import typing

    import torch
    import torch.nn.functional as F
    import transformers.utils
    from transformers.cache_utils import DynamicCache

    def rms_norm_fn(x, weight, bias=None, eps=1e-6, **_):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
        return (y if bias is None else y + bias.float()).to(x.dtype)

    def flash_attn_func(q, k, v, causal=False, softmax_scale=None, **_):  # [batch, length, heads, head_dim]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, scale=softmax_scale, enable_gqa=True)
        return out.transpose(1, 2)

    stub_module("flash_attn", flash_attn_func=flash_attn_func, flash_attn_varlen_func=None)
    stub_module("flash_attn.bert_padding", index_first_axis=None, pad_input=None, unpad_input=None)
    for name in ("flash_attn.ops", "flash_attn.ops.triton"):
        stub_module(name)
    stub_module("flash_attn.ops.triton.layer_norm", rms_norm_fn=rms_norm_fn)
    package_from_folder("sdar_model", sdar / "training/model/SDAR-4B-Chat")
    stub_module("sdar_model.fused_linear_diffusion_cross_entropy", FusedLinearDiffusionCrossEntropyLoss=None)
    with_default_rope()
    if importlib.util.find_spec("transformers.modeling_attn_mask_utils") is None:  # gone in transformers 5.24
        def removed(*_, **__):  # only SDAR's sdpa mask path calls it, not the flash path run here
            raise RuntimeError("transformers.modeling_attn_mask_utils is gone from this transformers; "
                               "SDAR's sdpa mask path needs transformers < 5.24")
        stub_module("transformers.modeling_attn_mask_utils", AttentionMaskConverter=type(
            "AttentionMaskConverter", (), {"_ignore_causal_mask_sdpa": staticmethod(removed),
                                           "_unmask_unattended": staticmethod(removed)}))
    if not hasattr(transformers.utils, "LossKwargs"):
        transformers.utils.LossKwargs = typing.TypedDict("LossKwargs", {}, total=False)
    if not hasattr(DynamicCache, "__getitem__"):  # transformers 5: cache[layer] -> cache.layers[layer]
        DynamicCache.__getitem__ = lambda cache, i: (cache.layers[i].keys, cache.layers[i].values)
    modeling = importlib.import_module("sdar_model.modeling_sdar")
    configuration = importlib.import_module("sdar_model.configuration_sdar")
    spec = importlib.util.spec_from_file_location("sdar_generate", sdar / "generate.py")
    ref_generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref_generate)
    ref_model = modeling.SDARForCausalLM(configuration.SDARConfig.from_pretrained(ckpt))
    return ref_generate, NeverProposeMask(with_checkpoint_weights(ref_model, ckpt))


def greedy_sdar_sampling(logits, temperature=1.0, top_k=0, top_p=1.0):
    """SDAR's `sample_with_temperature_topk_topp` made greedy: the argmax and its softmax
    probability (the reference always samples; temperature 0 would divide by zero)."""
    import torch
    assert (temperature, top_k, top_p) == (1.0, 0, 1.0), "greedy parity runs without temperature/top-k/top-p"
    probs = torch.softmax(logits, dim=-1)
    token = probs.argmax(dim=-1)
    return token, probs.gather(-1, token[..., None])[..., 0]


def sdar_cases():
    """(name, block_length, denoising_steps, remasking, threshold). With one commit per step (k = 1)
    the reference never touches a committed token; with k = 2 its top-k can pick one (see
    `run_sdar`): those cases trim the prompt so that its last block holds an even number of
    MASKs, which keeps the static rule clear of it (the dynamic rule can still leave an odd
    count)."""
    return [(f"SDAR {rule.removeprefix('low_confidence_')} block {block} steps {steps}"
             + (f" threshold {threshold}" if rule.endswith("dynamic") else ""), block, steps, rule, threshold)
            for block, steps in ((4, 4), (8, 8), (8, 4))
            for rule, threshold in (("low_confidence_static", 0.9), ("low_confidence_dynamic", 0.9),
                                    ("low_confidence_dynamic", 0.5), ("sequential", 0.9))]


def run_sdar(sdar, tmp, prompts, gen_length, seed):
    """SDAR's block_diffusion_generate vs `jaxgen.samplers.block_diffusion`. The reference's NFE
    counts its K/V-storing forward after the last block, whose K/V nothing reads (jaxgen skips
    it): the row compares the reference's count minus one. Where the reference's top-k picks an
    already committed position (fewer masks left than k), it overwrites that token with the
    model's prediction; jaxgen never does (documented in its sampler), and the row reports how
    many such rewrites changed a token."""
    import torch
    ckpt, cfg, params = saved_random_model(tmp, "sdar", seed)
    ref_generate, ref_model = load_reference_sdar(sdar, ckpt)
    ref_generate.sample_with_temperature_topk_topp = greedy_sdar_sampling
    inner = ref_model.ref_model
    seen, rewrites = {}, []  # first position of a forward's input -> that input; rewrites per forward

    def forward_noting_rewrites(*args, **kwargs):  # a committed token changed since this block's last forward
        x = args[0] if args else kwargs["input_ids"]
        last = seen.get(int(kwargs["position_ids"][0, 0]))
        if last is not None and last.shape == x.shape:
            rewrites.append(int(((last != MASK_ID) & (x != last)).sum()))
        seen[int(kwargs["position_ids"][0, 0])] = x.clone()
        return type(inner).forward(inner, *args, **kwargs)

    inner.forward = forward_noting_rewrites
    rows = []
    for name, block, steps, rule, threshold in sdar_cases():
        rewrites_per_prompt = []

        def ref_fn(p, block=block, steps=steps, rule=rule, threshold=threshold):
            ref_model.calls = 0
            seen.clear()
            rewrites.clear()
            x = ref_generate.block_diffusion_generate(
                ref_model, {"input_ids": p}, MASK_ID, gen_length=gen_length, block_length=block,
                denoising_steps=steps, temperature=1.0, remasking_strategy=rule, confidence_threshold=threshold)
            rewrites_per_prompt.append(sum(rewrites))
            return x[:, : p.shape[1] + gen_length], ref_model.calls - 1

        jax_fn = (lambda p, block=block, steps=steps, rule=rule, threshold=threshold: block_diffusion.generate(
            params, cfg, p, jax.random.PRNGKey(0), gen_length=gen_length, block_length=block,
            denoising_steps=steps, remasking=rule,
            threshold=threshold if rule == "low_confidence_dynamic" else None))
        k = block // steps  # commits per step; a first block with a multiple of k MASKs avoids a rewrite there
        case_prompts = prompts[:, : prompts.shape[1] - (-prompts.shape[1]) % block % k]
        with torch.no_grad():
            row = compare(name + f", prompt {case_prompts.shape[1]}", ref_fn, jax_fn, case_prompts)
        del rewrites_per_prompt[len(case_prompts):]  # the checking pass's calls; the timed calls follow them
        fused = block_diffusion.generate(params, cfg, jnp.asarray(case_prompts), jax.random.PRNGKey(0),
                                         gen_length=gen_length, block_length=block, denoising_steps=steps,
                                         remasking=rule, fuse_block_write=True,
                                         threshold=threshold if rule == "low_confidence_dynamic" else None)
        row["fused_block_write"] = {"tokens_as_unfused": bool((np.asarray(fused.tokens) == np.asarray(
            jax_fn(jnp.asarray(case_prompts)).tokens)).all()), "nfe_batched": int(fused.nfe)}
        same = "as" if row["fused_block_write"]["tokens_as_unfused"] else "NOT as"
        print(f"{'':44s} fuse_block_write=True: tokens {same} unfused, batch NFE {int(fused.nfe)}")
        kept = [i for i, n in enumerate(rewrites_per_prompt) if n == 0]
        row |= {"reference_rewrites_per_prompt": rewrites_per_prompt,
                "identical_where_reference_kept_commits": all(row["prompts_identical"][i] for i in kept)}
        if any(rewrites_per_prompt):
            verdict = ("nothing left to compare" if not kept else f"the {len(kept)} prompts it did not rewrite are "
                       + ("identical" if row["identical_where_reference_kept_commits"] else "NOT identical"))
            print(f"{'':44s} the reference rewrote {rewrites_per_prompt} committed tokens per prompt (jaxgen "
                  f"never does); {verdict}")
        rows.append(row)
    return rows


def load_reference_wedlm(wedlm_root: pathlib.Path, ckpt: pathlib.Path):
    """The WeDLM engine's decoding state machine (`wedlm/engine/wedlm_decoder.py`, `sampler.py`,
    `sequence.py`, imported without the engine package, whose model runner needs CUDA) and the
    repository's CPU-capable model class (`hf_compat/modeling_wedlm.py`). The decoder's only CUDA
    use on this path (`torch.device("cuda")` for the window tensors) is pointed at the CPU."""
    import importlib
    import importlib.machinery
    import inspect
    import json
    import types

    import torch
    from transformers import masking_utils
    if "input_embeds" not in inspect.signature(masking_utils.create_causal_mask).parameters:
        raise SystemExit("--wedlm: WeDLM's hf_compat model calls transformers' create_causal_mask as of "
                         "transformers 4.56 (its requirements.txt pins 4.56.1); run --wedlm under that version")
    for name, sub in (("wedlm", "wedlm"), ("wedlm.engine", "wedlm/engine")):  # packages without __init__ side effects
        package_from_folder(name, wedlm_root / sub)
    decoder = importlib.import_module("wedlm.engine.wedlm_decoder")
    cpu_torch = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    cpu_torch.device = lambda *_, **__: torch.device("cpu")
    decoder.torch = cpu_torch
    engine = types.SimpleNamespace(decoder=decoder, sampler=importlib.import_module("wedlm.engine.sampler"),
                                   sequence=importlib.import_module("wedlm.engine.sequence"),
                                   params=importlib.import_module("wedlm.sampling_params"))
    sys.path[:0] = [str(wedlm_root)]
    modeling = importlib.import_module("hf_compat.modeling_wedlm")
    configuration = importlib.import_module("hf_compat.configuration_wedlm")
    hf_config = json.loads((ckpt / "config.json").read_text())
    fields = {k: v for k, v in hf_config.items() if k not in ("architectures", "model_type")}
    config = configuration.WeDLMConfig(**fields, qk_norm=True, attention_bias=False)
    return engine, NeverProposeMask(with_checkpoint_weights(modeling.WeDLMForCausalLM(config), ckpt))


def reference_wedlm_decode(engine, ref_model, prompt, gen_length, window_size, entropy_threshold, pos_penalty):
    """One prompt through the WeDLM engine's decoder and sampler, greedy. This loop stands in for
    the engine's scheduler and CUDA model runner: each step it runs the decoder's own refill and
    reordering, feeds [committed tokens | reordered window] to the model with the window's
    logical positions and causal attention in fed order (recomputing the committed prefix, whose
    paged K/V the engine keeps: the same values), and hands the window's logits to the decoder's
    own `process_decode_outputs`. NFE counts the prompt's prefill and every decode forward. With
    unlimited KV blocks the engine's kv_budget never binds; no stop tokens."""
    import torch
    engine.sequence.Sequence.block_size = 16  # the KV page size: only the engine's slot mapping reads it
    decoder = engine.decoder.WeDLMDecoder(MASK_ID, block_size=16, wedlm_window_size=window_size,
                                          sampler=engine.sampler.Sampler())
    seq = engine.sequence.Sequence([int(t) for t in prompt], engine.params.SamplingParams(
        temperature=0.0, max_tokens=gen_length, wedlm_entropy_threshold=entropy_threshold,
        wedlm_pos_penalty_factor=pos_penalty))
    seq.kv_budget = 1 << 30
    forwards = 1
    while True:
        decoder.initialize_states([seq])
        state = seq.wedlm_state
        if state.is_finished or not state.window_tokens:
            break
        decoder._refill_window_masks(seq, state)
        window_ids, window_pos, non_mask = decoder._prepare_window_inputs([state])
        committed = torch.tensor(seq.token_ids)
        ids = torch.cat([committed, window_ids])[None]
        pos = torch.cat([torch.arange(len(committed)), window_pos])[None]
        logits = ref_model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids)).logits
        forwards += 1
        prepared = engine.decoder.PreparedDecodeInputs([seq], [state], [0], window_ids, window_pos, non_mask, None)
        for token in decoder.process_decode_outputs([seq], prepared, logits[0, len(committed):])[0] or []:
            seq.append_token(token)
    return torch.tensor(seq.token_ids[: len(prompt) + gen_length])[None], forwards


def run_wedlm(wedlm_root, tmp, prompts, gen_length, seed):
    """The WeDLM engine's streaming decoder vs `jaxgen.samplers.wedlm` (Qwen3-layout model). The
    reference runs one more forward than jaxgen, whose only effect is to commit the last tokens
    (see the sampler's docstring), so the row compares its count minus one; the engine's last
    commit can also overshoot max_tokens by a few tokens, which are cut."""
    import torch
    ckpt, cfg, params = saved_random_model(tmp, "qwen3", seed)
    engine, ref_model = load_reference_wedlm(wedlm_root, ckpt)
    rows = []
    for window in (8, 16):
        for threshold in (None, 0.4, 2.0):
            for penalty in (0.02, 0.2):
                name = f"WeDLM window {window} entropy {threshold} penalty {penalty}"

                def ref_fn(p, window=window, threshold=threshold, penalty=penalty):
                    x, nfe = reference_wedlm_decode(engine, ref_model, p[0].tolist(), gen_length, window, threshold,
                                                    penalty)
                    return x, nfe - 1

                jax_fn = (lambda p, window=window, threshold=threshold, penalty=penalty: wedlm.generate(
                    params, cfg, p, jax.random.PRNGKey(0), gen_length=gen_length, window_size=window,
                    entropy_threshold=threshold, pos_penalty=penalty))
                with torch.no_grad():
                    rows.append(compare(name, ref_fn, jax_fn, prompts))
    return rows


def load_reference_nbdiff(nbdiff_root: pathlib.Path, ckpt: pathlib.Path):
    """NBDiff's `generation_utils.py` (model-agnostic: any causal LM taking a 4D boolean mask and
    its cache) and transformers' Qwen2 model class for the Qwen2-layout checkpoint. Its
    `BlockDynamicCache` reads `DynamicCache.key_cache`, which transformers dropped after 4.5x
    (the repository pins 4.53.2)."""
    import importlib.util

    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.cache_utils import DynamicCache
    if not hasattr(DynamicCache(), "key_cache"):
        raise SystemExit("--nbdiff: NBDiff's BlockDynamicCache needs DynamicCache.key_cache (transformers <= 4.55; "
                         "the repository pins 4.53.2); run --nbdiff under such a version")
    spec = importlib.util.spec_from_file_location("nbdiff_generation_utils", nbdiff_root / "generation_utils.py")
    generation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generation)
    config = Qwen2Config.from_pretrained(ckpt)
    config._attn_implementation = "sdpa"  # takes the 4D boolean masks as they are
    return generation, NeverProposeMask(with_checkpoint_weights(Qwen2ForCausalLM(config), ckpt))


def nbdiff_cases():
    """NBDiff's `topk_margin` is not run: its `sample_tokens` takes top-1 minus top-2 as
    `sorted_probs[:, 0] - sorted_probs[:, 1]`, written for Dream's [positions, vocab] input, and
    NBDiff passes [batch, positions, vocab], so the reference fails with a shape error (jaxgen
    scores per position, as Dream does)."""
    return [(f"NBDiff {alg}{f' {threshold}' if alg == 'confidence_threshold' else ''} block {block} "
             f"sub-blocks {sub}", dict(alg=alg, threshold=threshold, block_length=block, num_small_blocks=sub))
            for block, sub in ((8, 1), (8, 2), (16, 4))
            for alg, threshold in (("origin", 0.9), ("confidence_threshold", 0.9), ("confidence_threshold", 0.5),
                                   ("entropy", 0.9))]


def run_nbdiff(nbdiff_root, tmp, prompts, gen_length, seed):
    """NBDiff's `diffusion_generate` vs `jaxgen.samplers.nbdiff`, greedy, stopping at EOS as the
    reference does (`stop_at_eos=True`). The reference's NFE counts its K/V-storing forward after
    the last block (jaxgen skips it: the row compares its count minus one); when it stops early at
    EOS it leaves the undecoded tail as MASK, which jaxgen fills with EOS, so the row maps that
    tail to EOS before comparing."""
    import torch
    ckpt, cfg, params = saved_random_model(tmp, "qwen2", seed)
    generation, ref_model = load_reference_nbdiff(nbdiff_root, ckpt)
    rows = []
    for name, kw in nbdiff_cases():
        def ref_fn(p, kw=kw):
            ref_model.calls = 0
            x = generation.diffusion_generate(ref_model, p, attention_mask=torch.ones_like(p), temperature=0.0,
                                              max_new_tokens=gen_length, mask_token_id=MASK_ID,
                                              eos_token_id=cfg.eos_id, **kw)
            stopped = bool((x == MASK_ID).any())
            x = torch.where(x == MASK_ID, cfg.eos_id, x)
            return x, ref_model.calls - (not stopped)

        ours = dict(kw, threshold=kw["threshold"] if kw["alg"] == "confidence_threshold" else None)
        jax_fn = (lambda p, ours=ours: nbdiff.generate(params, cfg, p, jax.random.PRNGKey(0), gen_length=gen_length,
                                                       stop_at_eos=True, **ours))
        with torch.no_grad():
            rows.append(compare(name, ref_fn, jax_fn, prompts, batch_stops_at=cfg.eos_id))
    return rows


def load_reference_lavida(lavida_root: pathlib.Path, ckpt: pathlib.Path):
    """LaViDa's `llada/generate.py` and its LLaDA model (`llava/model/language_model/llada/`),
    imported as a package without the LLaVA stack. Its only deepspeed use, activation
    checkpointing of each block, is a plain call at inference."""
    import importlib
    import types
    stub_module("deepspeed", checkpointing=types.SimpleNamespace(checkpoint=lambda fn, *a, **kw: fn(*a, **kw)))
    package_from_folder("lavida_llada", lavida_root / "llava/model/language_model/llada")
    modeling = importlib.import_module("lavida_llada.modeling_llada")
    configuration = importlib.import_module("lavida_llada.configuration_llada")
    generation = importlib.import_module("lavida_llada.generate")
    ref_model = reference_llada_model(configuration.LLaDAConfig, modeling.LLaDAModelLM, ckpt)
    return generation, NeverProposeMask(ref_model.ref_model.model)  # LaViDa decodes with the inner LLaDAModel


def run_lavida(lavida_root, tmp, prompts, gen_length, block_length, seed):
    """LaViDa's `generate` with `prefix_lm=True` (the prompt's K/V computed once, from its
    embeddings, as LaViDa's LLaVA wrapper calls it) vs `jaxgen.samplers.lavida`: every transfer
    schedule and scoring rule, at one and at half a step per token (`step_per_block`)."""
    import torch
    ckpt, cfg, params = saved_random_model(tmp, "llada", seed)
    generation, ref_model = load_reference_lavida(lavida_root, ckpt)
    num_blocks = gen_length // block_length
    rows = []
    for schedule in (None, "shift", "cosine", "logit_normal"):
        for remasking, ref_remasking in (("low_confidence", "low_confidence"), ("entropy", "entrophy"),
                                         ("margin", "margin")):
            for per_block in (block_length, block_length // 2):
                name = f"LaViDa schedule {schedule} {remasking} {per_block} steps/block"

                def ref_fn(p, schedule=schedule, ref_remasking=ref_remasking, per_block=per_block):
                    ref_model.calls = 0
                    x = generation.generate(ref_model, None, max_new_tokens=gen_length, block_length=block_length,
                                            temperature=0.0, remasking=ref_remasking, mask_id=MASK_ID,
                                            inputs_embeds=ref_model.transformer.wte(p), prefix_lm=True,
                                            step_per_block=per_block, schedule=schedule,
                                            schedule_kwargs={"shift": 3.0} if schedule == "shift" else None)
                    return torch.cat([p, x], dim=1), ref_model.calls

                jax_fn = (lambda p, schedule=schedule, remasking=remasking, per_block=per_block: lavida.generate(
                    params, cfg, p, jax.random.PRNGKey(0), gen_length=gen_length, block_length=block_length,
                    steps=per_block * num_blocks, remasking=remasking, schedule=schedule,
                    shift=3.0 if schedule == "shift" else None))
                with torch.no_grad():
                    rows.append(compare(name, ref_fn, jax_fn, prompts))
    return rows


TIMED_ROUNDS = 7  # timing: rounds of one reference call then one jaxgen call, medians reported


def compare(name, ref_fn, jax_fn, prompts, baseline=None, batch_stops_at=None, rounds=None):
    """Reference (one prompt at a time) vs jaxgen (one at a time, then batched). `baseline`: the
    no-cache tokens for a cached decoder (so that matching the reference is visibly more than
    matching no-cache decoding). `batch_stops_at`: an EOS id that ends decoding only once every
    row of the batch holds it, so a row decodes on past its EOS in a batch and not alone; the
    batched check then covers each row through its first generated EOS.
    Wall time per prompt, both sides, after the checking pass (which compiles jaxgen's sampler):
    `rounds` (default TIMED_ROUNDS) rounds, each one reference call then one jaxgen call on the
    same prompt (prompts taken in turn), so load drift hits both alike; the medians are reported.
    jaxgen runs through its public API, `generate(params, cfg, prompt, key, ...)` with the
    weights as an argument, as a user calls it (no outer jit closing over them). The model is
    tiny and random, so per-forward overhead dominates."""
    import torch
    ref_tokens, ref_nfe, ours_tokens, ours_nfe = [], [], [], []
    for p in prompts:
        x, nfe = ref_fn(torch.as_tensor(p[None]))
        ref_tokens.append(x.numpy()[0])
        ref_nfe.append(int(nfe))
        out = jax.block_until_ready(jax_fn(jnp.asarray(p[None])))
        ours_tokens.append(np.asarray(out.tokens)[0])
        ours_nfe.append(int(out.nfe))
    ref_s, ours_s = [], []
    for i in range(TIMED_ROUNDS if rounds is None else rounds):
        p = prompts[i % len(prompts)][None]
        t = time.perf_counter()
        ref_fn(torch.as_tensor(p))
        ref_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        jax.block_until_ready(jax_fn(jnp.asarray(p)))
        ours_s.append(time.perf_counter() - t)
    ref_time, ours_time = float(np.median(ref_s)), float(np.median(ours_s))
    batched = np.asarray(jax_fn(jnp.asarray(prompts)).tokens)
    ref_tokens, ours_tokens = np.stack(ref_tokens), np.stack(ours_tokens)
    if batch_stops_at is not None:  # positions after a row's first generated EOS: as decoded alone
        P = prompts.shape[1]
        is_eos = ours_tokens[:, P:] == batch_stops_at
        first = np.where(is_eos.any(1), is_eos.argmax(1), is_eos.shape[1]) + P
        after = np.arange(ours_tokens.shape[1]) > first[:, None]
        batched = np.where(after, ours_tokens, batched)
    prompts_identical = [bool((r == o).all()) and rn == on
                         for r, o, rn, on in zip(ref_tokens, ours_tokens, ref_nfe, ours_nfe)]
    row = {"decoder": name, "tokens_identical": bool((ref_tokens == ours_tokens).all()),
           "prompts_identical": prompts_identical,
           "token_agreement": float((ref_tokens == ours_tokens).mean()),
           "batched_identical": bool((batched == ours_tokens).all()),
           "nfe_reference": ref_nfe, "nfe_jaxgen": ours_nfe, "nfe_identical": ref_nfe == ours_nfe,
           "reference_s": ref_time, "jaxgen_s": ours_time, "speedup": ref_time / ours_time,
           "timed_rounds": len(ref_s)}
    if baseline is not None:
        row["agreement_with_no_cache"] = float((ref_tokens == baseline).mean())
    print(f"{name:44s} tokens {'identical' if row['tokens_identical'] else 'DIFFER'} "
          f"({row['token_agreement']:.1%}), batched {'same' if row['batched_identical'] else 'DIFFERS'}, "
          f"NFE ref {ref_nfe} jaxgen {ours_nfe}, {1e3 * ref_time:.0f} ms vs {1e3 * ours_time:.0f} ms "
          f"({row['speedup']:.1f}x, median of {len(ref_s)})"
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
        jax_fn = (lambda p, kw=kw, ours_kw=ours_kw: masked_diffusion.generate(
            params, cfg, p, jax.random.PRNGKey(0), gen_length=gen_length, block_length=block_length,
            **kw, **ours_kw))
        baseline = baselines[kw["steps"]] if "cache" in ours_kw else None
        rows.append(compare(name, ref_fn, jax_fn, prompts, baseline))
    return rows


REFERENCES = {  # flag -> (repository, files the run imports)
    "fast_dllm": ("NVlabs/Fast-dLLM", ("llada/generate.py", "llada/model/modeling_llada.py",
                                       "dream/model/generation_utils.py")),
    "dkv_cache": ("horseee/dKV-Cache", ("generation_utils/llada_dkv_cache_decode.py",
                                        "models/modeling_llada_dkv_cache_decode.py")),
    "sdar": ("JetAstra/SDAR", ("generate.py", "training/model/SDAR-4B-Chat/modeling_sdar.py",
                               "training/model/SDAR-4B-Chat/configuration_sdar.py")),
    "wedlm": ("tencent/WeDLM", ("wedlm/engine/wedlm_decoder.py", "wedlm/engine/sampler.py",
                                "hf_compat/modeling_wedlm.py")),
    "nbdiff": ("YuchuanTian/NBDiff", ("generation_utils.py",)),
    "lavida": ("jacklishufan/LaViDa", ("llava/model/language_model/llada/generate.py",
                                       "llava/model/language_model/llada/modeling_llada.py")),
}


def main(argv=None):
    global TIMED_ROUNDS  # --timed-rounds sets compare's default for this run
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for dest, (repo, _) in REFERENCES.items():
        ap.add_argument("--" + dest.replace("_", "-"), dest=dest, type=pathlib.Path, help=f"a local {repo} checkout")
    ap.add_argument("--out", type=pathlib.Path, help="write the rows as JSON here")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random model and prompts")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-length", type=int, default=13)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=16)
    ap.add_argument("--timed-rounds", type=int, default=TIMED_ROUNDS,
                    help="timed rounds per case (one reference call, then one jaxgen call); medians reported")
    args = ap.parse_args(argv)
    if args.timed_rounds < 1:
        raise SystemExit(f"--timed-rounds {args.timed_rounds}: use 1 or more (the default is {TIMED_ROUNDS})")
    given = {dest: getattr(args, dest) for dest in REFERENCES if getattr(args, dest) is not None}
    if not given:
        raise SystemExit("pass at least one reference checkout: " + ", ".join(
            f"--{dest.replace('_', '-')} ({repo})" for dest, (repo, _) in REFERENCES.items()))
    for dest, root in given.items():
        repo, files = REFERENCES[dest]
        for sub in files:
            if not (root / sub).exists():
                raise SystemExit(f"--{dest.replace('_', '-')} {root} has no {sub}; pass the root of a {repo} checkout")
    prompts = np.random.RandomState(args.seed).randint(4, MASK_ID, (args.prompts, args.prompt_length))
    TIMED_ROUNDS = args.timed_rounds
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        if args.fast_dllm:
            rows += run_llada(args.fast_dllm, tmp, prompts, args.gen_length, args.block_length, args.seed)
            rows += run_dream(args.fast_dllm, tmp, prompts, args.gen_length, args.seed)
        if args.dkv_cache:
            rows += run_dkv_decode(args.dkv_cache, tmp, prompts, args.gen_length, args.block_length, args.seed)
        if args.sdar:
            rows += run_sdar(args.sdar, tmp, prompts, args.gen_length, args.seed)
        if args.wedlm:
            rows += run_wedlm(args.wedlm, tmp, prompts, args.gen_length, args.seed)
        if args.nbdiff:
            rows += run_nbdiff(args.nbdiff, tmp, prompts, args.gen_length, args.seed)
        if args.lavida:
            rows += run_lavida(args.lavida, tmp, prompts, args.gen_length, args.block_length, args.seed)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    bad = [r["decoder"] for r in rows if not (r["batched_identical"] and r.get(
        "identical_where_reference_kept_commits", r["tokens_identical"] and r["nfe_identical"]))]
    speedups = [r["speedup"] for r in rows]
    print(f"jaxgen vs reference wall time per prompt: median {np.median(speedups):.1f}x "
          f"(range {min(speedups):.1f}x to {max(speedups):.1f}x over {len(rows)} cases)")
    print("all identical" if not bad else f"not identical: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
