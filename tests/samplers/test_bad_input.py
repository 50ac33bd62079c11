"""Bad sampler arguments fail with a clear ValueError before anything compiles: out-of-range
values, options that do not apply to the chosen mode (refused, never dropped) and malformed
prompts. Dream's and NBDiff's top_p / top_k are traced: a new value does not recompile."""
import dataclasses

import jax
import numpy as np
import pytest

from jaxgen.errors import JaxgenError
from jaxgen.samplers import (ar, block_diffusion, dream, lavida, masked_diffusion, nbdiff, registry, tidar,
                             wedlm)

PROMPT = np.array([[256, 10, 20, 30, 40], [256, 50, 60, 70, 80]], np.int32)
MODULES = {"ar": ar, "masked_diffusion": masked_diffusion, "block_diffusion": block_diffusion, "dream": dream,
           "lavida": lavida, "nbdiff": nbdiff, "wedlm": wedlm, "tidar": tidar}
BASE = {"ar": dict(gen_length=4), "masked_diffusion": dict(gen_length=8, steps=8, block_length=4),
        "block_diffusion": dict(gen_length=8), "dream": dict(gen_length=8, steps=4),
        "lavida": dict(gen_length=8, steps=8, block_length=8), "nbdiff": dict(gen_length=8, block_length=4),
        "wedlm": dict(gen_length=8, window_size=4), "tidar": dict(gen_length=8, draft_length=4)}
DREAM_MODE = dict(alg="entropy", block_length=8)  # masked_diffusion's Dream decoding: one block

BAD = [
    # out-of-range values
    ("ar", dict(temperature=-1.0), "temperature=-1.0 must be a finite number >= 0"),
    ("ar", dict(temperature=float("nan")), "temperature=nan"),
    ("ar", dict(temperature=1.0, top_p=0.0), "top_p=0.0 must lie in (0, 1]"),
    ("ar", dict(temperature=1.0, top_p=1.5), "top_p=1.5 must lie in (0, 1]"),
    ("ar", dict(temperature=1.0, top_k=-1), "top_k=-1 must be an integer >= 0"),
    ("ar", dict(temperature=1.0, top_k=2.5), "top_k=2.5 must be an integer"),
    ("ar", dict(gen_length=0), "gen_length=0 must be positive"),
    ("block_diffusion", dict(temperature=-1.0), "temperature=-1.0"),
    ("block_diffusion", dict(temperature=1.0, top_k=-3), "top_k=-3"),
    ("masked_diffusion", dict(temperature=-0.5), "temperature=-0.5"),
    ("masked_diffusion", dict(cfg_scale=-1.0), "cfg_scale=-1.0 must be >= 0"),
    ("dream", dict(temperature=-1.0), "temperature=-1.0"),
    ("dream", dict(top_p=1.5), "top_p=1.5"),
    ("dream", dict(top_k=-2), "top_k=-2 must be positive (or None"),
    ("dream", dict(alg="entropy", alg_temp=-1.0), "alg_temp=-1.0 must be a finite number >= 0"),
    ("nbdiff", dict(temperature=-1.0), "temperature=-1.0"),
    ("nbdiff", dict(top_p=0.0), "top_p=0.0"),
    ("nbdiff", dict(alg="confidence_threshold", threshold=1.5), "threshold=1.5 must lie in (0, 1]"),
    ("lavida", dict(temperature=-1.0), "temperature=-1.0"),
    ("wedlm", dict(pos_penalty=-1.0), "pos_penalty=-1.0 must be >= 0"),
    ("wedlm", dict(temperature=1.0, top_p=2.0), "top_p=2.0"),
    ("tidar", dict(temperature=-1.0), "temperature=-1.0"),
    # ar: one option, two names
    ("ar", dict(gen_length=4, max_new_tokens=4), "one option under two names"),
    # options that do not apply
    ("ar", dict(top_p=0.9), "top_p=0.9 applies only when sampling: at temperature=0 decoding is greedy"),
    ("ar", dict(top_k=3, top_p=0.9), "top_k=3 and top_p=0.9 apply only when sampling"),
    ("ar", dict(eos_id=257), "eos_id=257 does not apply without stop_at_eos=True"),
    ("block_diffusion", dict(top_k=5), "top_k=5 applies only when sampling"),
    ("block_diffusion", dict(remasking="low_confidence_static", threshold=0.9),
     "threshold=0.9 does not apply with remasking='low_confidence_static'"),
    ("wedlm", dict(top_p=0.9), "top_p=0.9 applies only when sampling"),
    ("masked_diffusion", dict(top_k=3), "top_k=3 does not apply without alg="),
    ("masked_diffusion", dict(top_p=0.9, top_k=3), "top_k=3, top_p=0.9 do not apply without alg= (LLaDA"),
    ("masked_diffusion", dict(alg_temp=0.5), "alg_temp=0.5 does not apply without alg="),
    ("masked_diffusion", dict(window_size=2), "window_size=2 does not apply with cache=None"),
    ("masked_diffusion", dict(window_size=2, cache="dkv_decode"), "window_size=2 does not apply with "
                                                                  "cache='dkv_decode'"),
    ("masked_diffusion", dict(cache_reloading_step=2, cache="dual"),
     "cache_reloading_step=2 does not apply with cache='dual'"),
    ("masked_diffusion", dict(filter_threshold=0.9), "filter_threshold=0.9 does not apply without commit_filter"),
    ("masked_diffusion", dict(threshold=0.9, factor=1.0), "threshold and factor are separate commit rules"),
    ("masked_diffusion", dict(eos_logit_inf=True, confidence_eos_inf=True),
     "confidence_eos_inf=True does not apply with eos_logit_inf=True"),
    ("masked_diffusion", dict(remasking="random", confidence_eos_inf=True),
     "confidence_eos_inf=True does not apply with remasking='random'"),
    ("masked_diffusion", dict(DREAM_MODE, cache="dual"), "cache='dual' does not apply with alg='entropy'"),
    ("masked_diffusion", dict(DREAM_MODE, remasking="low_confidence"), "remasking='low_confidence' does not apply"),
    ("masked_diffusion", dict(DREAM_MODE, threshold=0.9), "threshold=0.9 does not apply with alg="),
    ("masked_diffusion", dict(DREAM_MODE, cfg_scale=1.0), "cfg_scale=1.0 does not apply with alg="),
    ("masked_diffusion", dict(DREAM_MODE, eotp=True, window_size=2), "window_size=2, eotp=True do not apply"),
    ("masked_diffusion", dict(DREAM_MODE, prompt_lengths=[5, 5]), "prompt_lengths does not apply with alg="),
    ("masked_diffusion", dict(DREAM_MODE, block_length=4), "block_length=4 must equal gen_length=8"),
    ("masked_diffusion", dict(alg="origin", block_length=8, alg_temp=0.5), "alg_temp=0.5 does not apply with "
                                                                           "alg='origin'"),
    ("dream", dict(alg_temp=0.0), "alg_temp=0.0 does not apply with alg='origin'"),
    ("nbdiff", dict(threshold=0.5), "threshold=0.5 does not apply with alg='origin'"),
    ("nbdiff", dict(alg="entropy", threshold=0.9), "threshold=0.9 does not apply with alg='entropy'"),
    ("lavida", dict(schedule="cosine", shift=2.0), "shift=2.0 does not apply with schedule='cosine'"),
]


@pytest.fixture
def no_compile(monkeypatch):
    """Every sampler's jitted `_generate` fails loudly: the checks must refuse before it."""
    def reached(*args, **kwargs):
        raise AssertionError("the jitted decode was reached: the bad argument was not refused")

    for module in MODULES.values():
        monkeypatch.setattr(module, "_generate", reached)


@pytest.mark.parametrize("sampler,kwargs,message", BAD, ids=[f"{s}-{'-'.join(k)}" for s, k, _ in BAD])
def test_bad_arguments_are_refused_before_compiling(sampler, kwargs, message, tiny_cfg, no_compile):
    generate = registry.get(sampler)
    with pytest.raises(JaxgenError) as info:  # a ValueError
        generate(None, tiny_cfg, PROMPT, jax.random.key(0), **dict(BASE[sampler], **kwargs))
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize("sampler", sorted(MODULES))
@pytest.mark.parametrize("prompt,message", [
    (PROMPT[0], "prompt must be a [batch, length] array of token ids, got shape (5,); for one prompt pass "
                "prompt[None]"),
    (PROMPT[:, :0], "empty prompts; every sampler needs at least one prompt token"),
    (PROMPT[:0], "a batch of 0 prompts"),
    (PROMPT.astype(np.float32), "prompt must hold integer token ids, got dtype float32"),
    (PROMPT[None], "got shape (1, 2, 5)"),
])
def test_malformed_prompts_are_refused(sampler, prompt, message, tiny_cfg, no_compile):
    with pytest.raises(JaxgenError) as info:
        registry.get(sampler)(None, tiny_cfg, prompt, jax.random.key(0), **BASE[sampler])
    assert message in str(info.value)


def test_ar_max_new_tokens_is_an_alias_of_gen_length(tiny_cfg, monkeypatch):
    seen, cfg = [], dataclasses.replace(tiny_cfg, max_seq_len=256)
    monkeypatch.setattr(ar, "_generate", lambda *a, **kw: seen.append(kw["max_new_tokens"]))
    for kwargs in (dict(max_new_tokens=3), dict(gen_length=3), dict()):
        ar.generate(None, cfg, PROMPT, jax.random.key(0), **kwargs)
    ar.generate(None, cfg, PROMPT, jax.random.key(0), 3)  # positional, as before
    assert seen == [3, 3, 128, 3]


def test_checks_skip_values_traced_by_an_enclosing_jit(tiny_cfg, monkeypatch):
    """Inside a user's jit, values are unknown: their checks are skipped (shape checks still run)."""
    monkeypatch.setattr(nbdiff, "_generate", lambda *a, **kw: jax.numpy.zeros(()))
    traced = jax.jit(lambda t, p: nbdiff.generate(None, tiny_cfg, PROMPT, jax.random.key(0), gen_length=4,
                                                  block_length=4, temperature=t, top_p=p))
    traced(1.0, 0.5)
    with pytest.raises(JaxgenError, match="got shape"):
        jax.jit(lambda x: nbdiff.generate(None, tiny_cfg, x, jax.random.key(0), gen_length=4,
                                          block_length=4))(PROMPT[0])


@pytest.mark.parametrize("sampler", ["dream", "nbdiff"])
def test_top_p_and_top_k_are_traced_not_static(sampler, tiny_cfg, tiny_params):
    """One compile for every top_p (and top_k) value: Dream and NBDiff pass them as arrays."""
    module = MODULES[sampler]
    kw = dict(gen_length=4, steps=2) if sampler == "dream" else dict(gen_length=4, block_length=4)
    run = lambda **f: module.generate(tiny_params, tiny_cfg, PROMPT, jax.random.key(0), temperature=1.0, **kw, **f)
    outs = [run(top_p=0.9)]
    compiled = module._generate._cache_size()
    outs += [run(top_p=0.5), run(top_p=0.7)]
    assert module._generate._cache_size() == compiled
    outs += [run(top_p=0.9, top_k=3)]
    compiled = module._generate._cache_size()
    outs += [run(top_p=0.8, top_k=5), run(top_p=1e-6, top_k=2)]
    assert module._generate._cache_size() == compiled
    for out in outs:
        assert (np.asarray(out.tokens) != tiny_cfg.mask_id).all()
