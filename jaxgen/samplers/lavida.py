"""LaViDa decoding (jacklishufan/LaViDa `llada/generate.py`; shared/specs/diffusion_lm.md §6.2).

Prefix-LM layout: the prompt attends only to itself, so its K/V never depend on the answer and
are computed once (one forward, written to the cache). Each step feeds only the answer canvas
[P, P + gen_length) with full attention over prompt cache + answer, LLaDA-style in semi-AR
blocks: propose x0 = argmax (Gumbel-max at temperature > 0), score the current block's masked
positions and commit the top n[step], where n comes from `transfer_schedule` (LaViDa's
`get_num_transfer_tokens_sch`; `schedule=None` is LLaDA's linear split). Steps whose block is
already clean run no forward (the reference `continue`s). Scores: `low_confidence` (max prob),
`random`, `entropy` (negative entropy; the reference spells it "entrophy") and `margin` (top-1
minus top-2 prob).

The prompt is encoded bidirectionally (prefix-LM); the model should be trained that way
(`objectives.masked_diffusion.loss(..., prefix_lm=True)`) for the answer to read it well.
`experiments/reference_parity.py --lavida` runs LaViDa's own `generate` (prefix_lm=True) against
this sampler: identical tokens and NFE for every schedule and score.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import layouts
from jaxgen.cache import init_cache, read
from jaxgen.errors import JaxgenError
from jaxgen.model import forward, is_decode_form
from jaxgen.decoding.checks import check_choice, check_prompt, with_mask_id
from jaxgen.decoding import checks, loop, rules
from jaxgen.decoding.loop import SamplerOutput
from jaxgen.decoding.processors import forbid_mask_token
from jaxgen.decoding.propose import margin, neg_entropy
from jaxgen.decoding.schedules import num_transfer_tokens
from jaxgen.decoding.propose import gumbel_argmax
from jaxgen.samplers.masked_diffusion import validate_blocks

REMASKING = ("low_confidence", "random", "entropy", "margin")
SCHEDULES = (None, "shift", "cosine", "logit_normal")


def schedule_sigmas(schedule, t: np.ndarray, shift: float) -> np.ndarray:
    """sigma(t) in float32, as LaViDa computes it with torch."""
    t = t.astype(np.float32)
    if schedule == "shift":
        return (np.float32(shift) * t / (1 + (np.float32(shift) - 1) * t)).astype(np.float32)
    if schedule == "cosine":
        return (1 - 0.5 * (1 + np.cos(np.pi * np.clip(t, 0, 1)))).astype(np.float32)
    if schedule == "logit_normal":
        with np.errstate(divide="ignore"):
            logit = np.log(t / (1 - t))
        return (0.5 * (1 + np.vectorize(math.erf)(logit / np.sqrt(2.0)))).astype(np.float32)
    return t


def transfer_schedule(n: int, steps: int, schedule=None, shift: float = 3.0) -> np.ndarray:
    """Tokens committed per step for n masks: floor(sigma(t) n) differences on t = linspace(0, 1,
    steps + 1) (steps capped at n), each >= 1, the excess taken one at a time round-robin from
    entries > 1, then reversed (few tokens early). schedule=None: LLaDA's linear split."""
    if schedule is None:
        return num_transfer_tokens(n, steps)
    steps = min(steps, n)
    sig = schedule_sigmas(schedule, np.linspace(0, 1, steps + 1, dtype=np.float32), shift)
    cum = (sig * np.float32(n)).astype(np.int64)
    counts = np.maximum(np.diff(cum), 1)
    delta, j = int(counts.sum() - n), 0
    while delta > 0:
        j %= len(counts)
        if counts[j] > 1:
            counts[j] -= 1
            delta -= 1
        j += 1
    return counts[::-1].copy()


def generate(params, cfg, prompt, key, *, gen_length: int = 64, steps: int = 64, block_length: int = 64,
             temperature: float = 0.0, remasking: str = "low_confidence", schedule: str | None = "shift",
             shift: float | None = None, mask_id: int | None = None) -> SamplerOutput:
    """LaViDa sampler (see the module docstring); `steps` in total, split evenly over blocks.
    shift: the "shift" schedule's (default 3.0)."""
    cfg = with_mask_id(cfg, mask_id)
    prompt = checks.as_prompt(prompt)
    check_choice("remasking", remasking, REMASKING)
    check_choice("schedule", schedule, SCHEDULES)
    validate_blocks(gen_length, block_length, steps)
    checks.check_temperature(temperature)
    if schedule != "shift":
        checks.check_not_given(f"with schedule={schedule!r} (it is the 'shift' schedule's parameter)", shift=shift)
    shift = 3.0 if shift is None else shift
    if schedule == "shift" and not shift > 0:
        raise JaxgenError(f"shift={shift} must be positive (LaViDa uses 3)")
    check_prompt(prompt, cfg, prompt.shape[1] + gen_length, diffusion=True)
    counts = transfer_schedule(block_length, steps // (gen_length // block_length), schedule, shift)
    return _generate(params, cfg, prompt, key, jnp.float32(temperature), counts=tuple(int(c) for c in counts),
                     gen_length=gen_length, block_length=block_length, remasking=remasking)


def score(logits, x0, key, remasking):
    if remasking == "random":
        return jax.random.uniform(key, x0.shape)
    probs = jax.nn.softmax(logits, axis=-1)
    if remasking == "low_confidence":
        return jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
    return neg_entropy(probs) if remasking == "entropy" else margin(probs)


@functools.partial(jax.jit, static_argnames=("cfg", "counts", "gen_length", "block_length", "remasking"))
def _generate(params, cfg, prompt, key, temperature, *, counts, gen_length, block_length, remasking):
    B, P = prompt.shape
    cache = init_cache(cfg, B, P, per_layer=is_decode_form(params))
    _, cache = forward(params, cfg, prompt, layout=layouts.full(), cache=cache)  # prompt K/V, once
    positions = jnp.broadcast_to(P + jnp.arange(gen_length, dtype=jnp.int32), (B, gen_length))
    schedule = jnp.asarray(counts, jnp.int32)
    per_block = len(counts)

    def block(state):
        """(start of the step's block, its tokens)."""
        start = (state.step // per_block) * block_length
        return start, jax.lax.dynamic_slice_in_dim(state.tokens, start, block_length, axis=1)

    def step_forward(state):  # a clean block costs no forward
        start, blk = block(state)

        def run(_):
            return forward(params, cfg, state.tokens, positions=positions, layout=layouts.full(), cache=read(cache),
                           out_rows=(start, block_length))[0]

        unclean = jnp.any(blk == cfg.mask_id)
        skip = lambda _: jnp.zeros((B, block_length, cfg.vocab_size), jnp.float32)
        return jax.lax.cond(unclean, run, skip, None), None, unclean.astype(jnp.int32)

    def propose(logits, state):
        k_tok, k_conf = jax.random.split(jax.random.fold_in(key, state.step))
        logits = forbid_mask_token(logits, cfg)
        x0 = gumbel_argmax(logits, k_tok, temperature).astype(jnp.int32)
        return x0, score(logits, x0, k_conf, remasking)

    def rule(proposal, state):
        _, blk = block(state)
        return rules.scheduled(proposal[1], blk == cfg.mask_id, schedule[state.step % per_block])

    def update(state, proposal, commit, _):
        start, blk = block(state)
        return state.replace(tokens=jax.lax.dynamic_update_slice_in_dim(
            state.tokens, jnp.where(commit, proposal[0], blk), start, axis=1))

    recipe = loop.Recipe(forward=step_forward, propose=propose, rule=rule, update=update)
    state = loop.new_state(jnp.full((B, gen_length), cfg.mask_id, jnp.int32), nfe=1)
    state = loop.run(recipe, state, (gen_length // block_length) * per_block)
    return loop.SamplerOutput(tokens=jnp.concatenate([prompt, state.tokens], axis=1), nfe=state.nfe)
