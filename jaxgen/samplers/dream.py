"""Dream decoding (Dream-org `generation_utils.py::_sample`, also shipped in Fast-dLLM `dream/`).

Canvas [prompt | MASK * gen_length], `steps` full forwards with the full layout, logits shifted
right by one (position i reads the output at i - 1; Dream is initialised from an AR model), on
the time grid t = linspace(1, eps, steps + 1):

- `alg="origin"`: each masked position is revealed with probability 1 - s/t (all at the last
  step), its token sampled from the filtered distribution;
- `"maskgit_plus"` / `"topk_margin"` / `"entropy"`: score every masked position (max prob,
  top-1 minus top-2 prob, or sum p log p) and reveal n = int(#masked * (1 - s/t)) of them (all at
  the last step): the top n, or with `alg_temp > 0` n drawn without replacement from
  softmax(score / alg_temp).

Token proposal follows Dream's order: temperature, then top-p, then top-k (the reverse of the
HF/SDAR order in `common.filter_top_k_top_p`), removed entries at the float minimum; greedy
takes the argmax and its probability under the filtered distribution. As everywhere in jaxgen,
the mask token is never a candidate. Every row holds the same number of masks at each step, so
the reveal counts are static and computed at trace time exactly as the reference does (float32).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import layouts
from jaxgen.errors import JaxgenError
from jaxgen.model import forward
from jaxgen.decoding.checks import check_choice, check_prompt, with_mask_id
from jaxgen.decoding import checks, loop
from jaxgen.decoding.loop import SamplerOutput
from jaxgen.decoding.processors import forbid_mask_token
from jaxgen.decoding.propose import NEG_INF, kth_largest_key, margin, neg_entropy, nucleus_keep, order_keys
from jaxgen.decoding.rules import top_k_commit

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def generate(params, cfg, prompt, key, *, gen_length: int = 128, steps: int = 128, alg: str = "origin",
             alg_temp: float | None = None, temperature: float = 0.0, top_p: float | None = None,
             top_k: int | None = None, eps: float = 1e-3, mask_id: int | None = None) -> SamplerOutput:
    """Dream sampler (see the module docstring); NFE = steps. top_p / top_k filter the token
    distribution, which also sets the confidences at temperature 0; alg_temp (>= 0) samples the
    revealed positions of the confidence algs (not 'origin')."""
    cfg = with_mask_id(cfg, mask_id)
    prompt = checks.as_prompt(prompt)
    check_choice("alg", alg, ALGS)
    checks.check_positive(gen_length=gen_length, steps=steps)
    if not 0.0 < eps < 1.0:
        raise JaxgenError(f"eps={eps} must lie in (0, 1) (Dream uses 1e-3)")
    checks.check_temperature(temperature)
    checks.check_top_p(top_p)
    checks.check_top_k(top_k, off=None)
    if alg == "origin":
        checks.check_not_given("with alg='origin', which reveals positions at random (alg_temp samples the "
                               f"positions of {', '.join(ALGS[1:])})", alg_temp=alg_temp)
    elif alg_temp is not None:
        checks.check_temperature(alg_temp, "alg_temp")
    check_prompt(prompt, cfg, prompt.shape[1] + gen_length, diffusion=True)
    return _generate(params, cfg, prompt, key, jnp.float32(temperature), jnp.float32(alg_temp or 0.0),
                     *traced_filters(top_p, top_k), gen_length=gen_length, steps=steps, alg=alg,
                     sample_positions=bool(alg_temp), eps=float(eps))


def traced_filters(top_p, top_k):
    """(top_p, top_k) as jit arguments: arrays (one compile for every value), None where the
    filter is off (top_p None or >= 1, top_k None), which compiles without it."""
    off = top_p is None or (checks.concrete(top_p) and float(top_p) >= 1.0)
    return (None if off else jnp.float32(top_p)), (None if top_k is None else jnp.int32(top_k))


def time_grid(steps: int, eps: float) -> np.ndarray:
    """Dream's t = linspace(1, eps, steps + 1) in float32."""
    return np.linspace(1.0, eps, steps + 1).astype(np.float32)


def reveal_counts(num_masked: int, steps: int, eps: float) -> np.ndarray:
    """Tokens revealed per step by the confidence algorithms: int(#masked * (1 - s/t)), all the
    rest at the last step (float32 arithmetic, as the reference)."""
    ts = time_grid(steps, eps)
    counts, left = [], num_masked
    for i in range(steps):
        n = left if i == steps - 1 else int(np.float32(left) * (np.float32(1) - ts[i + 1] / ts[i]))
        counts.append(n)
        left -= n
    return np.asarray(counts, np.int32)


def dream_filter(logits, top_p, top_k):
    """Top-p then top-k (Dream's order); removed entries get the float32 minimum. None turns a
    filter off; top_p and top_k may be traced."""
    floor = jnp.finfo(jnp.float32).min
    if top_p is not None:  # keep the sorted entry j iff the mass strictly before it is <= top_p (all for >= 1)
        logits = jnp.where((top_p >= 1) | nucleus_keep(logits, top_p, inclusive=True), logits, floor)
    if top_k is not None:
        keys = order_keys(logits)
        logits = jnp.where(keys < kth_largest_key(keys, jnp.minimum(top_k, logits.shape[-1])), floor, logits)
    return logits


def score_tokens(logits, key, temperature, top_p, top_k, alg):
    """(token, confidence) per position: Dream's `sample_tokens` with the alg's confidence."""
    logits = jnp.where(temperature > 0, logits / jnp.where(temperature > 0, temperature, 1.0), logits)
    probs = jax.nn.softmax(dream_filter(logits, top_p, top_k), axis=-1)
    sampled = jax.random.categorical(key, jnp.log(probs), axis=-1)
    tok = jnp.where(temperature > 0, sampled, jnp.argmax(probs, axis=-1))
    conf = jnp.take_along_axis(probs, tok[..., None], axis=-1)[..., 0]
    if alg == "topk_margin":
        conf = margin(probs)
    elif alg == "entropy":
        conf = neg_entropy(probs)
    return tok.astype(jnp.int32), conf


@functools.partial(jax.jit, static_argnames=("cfg", "gen_length", "steps", "alg", "sample_positions", "eps"))
def _generate(params, cfg, prompt, key, temperature, alg_temp, top_p, top_k, *, gen_length, steps, alg,
              sample_positions, eps):
    B, P = prompt.shape
    ts = jnp.asarray(time_grid(steps, eps))
    counts = jnp.asarray(reveal_counts(gen_length, steps, eps))
    x = jnp.concatenate([prompt, jnp.full((B, gen_length), cfg.mask_id, jnp.int32)], axis=1)

    def step_forward(state):
        logits, _ = forward(params, cfg, state.tokens, layout=layouts.full())
        logits = jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)  # right shift
        return forbid_mask_token(logits, cfg), None, 1

    def propose(logits, state):
        k_tok, _ = jax.random.split(jax.random.fold_in(key, state.step))
        return score_tokens(logits, k_tok, temperature, top_p, top_k, alg)

    def rule(proposal, state):
        i = state.step
        _, k_pos = jax.random.split(jax.random.fold_in(key, i))
        masked = state.tokens == cfg.mask_id
        if alg == "origin":
            p_reveal = jnp.where(i < steps - 1, 1.0 - ts[i + 1] / ts[i], 1.0)
            return masked & (jax.random.uniform(k_pos, masked.shape) < p_reveal)
        score = jnp.where(masked, proposal[1], NEG_INF)
        if sample_positions:  # multinomial without replacement = Gumbel top-k on log-softmax
            score = jnp.where(masked, jax.nn.log_softmax(score / alg_temp, axis=-1)
                              + jax.random.gumbel(k_pos, score.shape), NEG_INF)
        return top_k_commit(score, counts[i])

    def update(state, proposal, commit, _):
        return state.replace(tokens=jnp.where(commit, proposal[0], state.tokens))

    recipe = loop.Recipe(forward=step_forward, propose=propose, rule=rule, update=update)
    state = loop.run(recipe, loop.new_state(x), steps)
    return SamplerOutput(tokens=state.tokens, nfe=state.nfe)
