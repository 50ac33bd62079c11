"""Speculative decoding: a drafter proposes, the target verifies in one forward, lossless.

Each step (one target forward) feeds the chunk [root, N draft nodes] (root = the last committed
token, not yet cached) at the row's next cache slots: a chain under the causal layout, a draft
tree under `layouts.tree` (each node sees the cache and its ancestors; RoPE position = root
position + depth). Verification (`jaxgen.decoding.verify`) keeps the longest path the target
agrees with: greedy, token-identical to greedy AR decoding; sampling (temperature > 0), the
Leviathan/Chen rule and, for trees, recursive rejection, with the warpers (temperature, top-k,
top-p) applied to both p and q: outputs are distributed as AR sampling's. The path's tokens and
one more token (the bonus or the correction) are committed; the path's K/V are moved into
contiguous slots (already so for a chain) and the cache forgets the rest.

On the decode skeleton: forward = drafter.draft + the target forward over the chunk; propose =
the target's next-token choices at every chunk row (argmax, or warped probabilities); rule =
verification (path, accepted count, next token); update = write the committed tokens (clipped
so that no row exceeds gen_length), compact the path's K/V, truncate, drafter.observe. The
prefill forward commits the first token, as `ar.generate` does.

Batched: rows accept different counts; each row verifies at its own cache length and finished
rows idle. Ragged prompts (`prompt_lengths`) as in `ar.generate`. Output: `.tokens` [B, P + N],
`.nfe` (target forwards, the slowest row's, prefill included), `.accepted` (committed tokens per
target forward over all rows: AR = 1.0, a fully accepted chain = num_draft + 1).

Stopping (`stop_at_eos`, as `ar.generate`): a row that commits EOS (anywhere in a step's
committed tokens) stops and is padded with EOS after its first generated EOS; the loop ends
once every row has stopped. Greedy output equals `ar.generate(..., stop_at_eos=True)`'s.

Constrained decoding (`constraint=`, see `jaxgen.constraints`), exactly AR's token rule:
- masks: one host call per step (`device.budget_tree_masks`, before the target forward) walks
  each row's draft tree with its llguidance matcher and returns every chunk row's grammar mask
  after the committed tokens + the path to that node; verification sees the target logits
  masked row by row (`target_logits`), so an accepted node is a grammar-valid token and the
  bonus / correction token is drawn under its node's mask. Drafts that leave the grammar are
  simply rejected. A second host call (`device.budget_advance`, after verification) commits
  the accepted tokens + the bonus to the matchers; the next step's masks are computed from
  those matchers (data flow orders the calls: a mask never lags the tokens).
- length budget (`jaxgen.constraints.budget`, as AR's): the root's mask is AR's (only the
  witness's head when a row has no slack), the bonus token is committed through the budget
  (which may replace it, as AR's step does), and a row accepts at most `free` draft tokens, the
  number its budget would take unchecked whatever they are (`Budget.free_tokens`); deeper
  nodes are neither accepted nor tried (`untried_beyond`), which is lossless. So every
  committed token is the token AR would commit after the same prefix: constrained greedy
  output equals constrained greedy `ar.generate` token for token, sampling is distributed as
  constrained AR sampling, and the completion guarantee is AR's (with length_budget=False:
  no limit on drafts, every row a valid prefix, completion not guaranteed). Cost: while a
  row's slack is at most SLACK + 2 slots (a tight budget, or just before one of AR's checks)
  it accepts no draft (one token per target forward, as AR).
- a row whose grammar is complete gets the EOS-only mask (EOS, padding, idle; `stop_at_eos`
  is on); after generation `constraints.finish` checks every row: invalid rows raise
  (on_incomplete="error") or come back flagged in `.valid` ("return"). Output:
  `ConstrainedSpeculativeOutput` (`.tokens`, `.nfe`, `.accepted`, `.valid`).
- host cost per step: one mask fill per draft node within `free` depth (a tree walk with
  rollback), plus the budget's commits; use small trees (e.g. token_recycling max_width=2,
  max_depth=3) with large vocabularies. constraint=None compiles the unconstrained program,
  without any host call.
"""
from __future__ import annotations

import functools
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import constraints, layouts
from jaxgen.cache import init_cache, place_rows, truncate, with_lengths, write_at
from jaxgen.cache.dense import gather_slots
from jaxgen.decoding import checks, drafters, loop
from jaxgen.decoding import verify as verify_lib
from jaxgen.decoding.processors import forbid_mask_token
from jaxgen.errors import JaxgenError
from jaxgen.model import forward, is_decode_form
from jaxgen.samplers.ar import pad_token

KEYWORD_ALIASES = {"max_new_tokens": "gen_length"}  # Hugging Face's name, as in ar.generate


@flax.struct.dataclass
class SpeculativeOutput:
    tokens: jax.Array  # [B, P + N]
    nfe: jax.Array  # int32: target forwards (prefill included), the slowest row's
    accepted: jax.Array  # float32: committed tokens per target forward, over all rows


@flax.struct.dataclass
class ConstrainedSpeculativeOutput(SpeculativeOutput):
    """With `constraint=`: `valid` [B] bool, which rows are complete grammar strings (all True
    unless on_incomplete="return"), as `jaxgen.constraints.ConstrainedOutput`."""
    valid: jax.Array = None


@flax.struct.dataclass
class Rows:
    """Per-row progress: tokens [0, end) are committed, the K/V of [0, end - 1) cached."""
    end: jax.Array  # int32 [B]
    forwards: jax.Array  # int32 [B]: target forwards while the row was decoding
    drafter: object  # the drafter's state
    grammar: object = None  # int32 [B]: the token automaton's state after [0, end) (device masks)


def generate(params, cfg, prompt, key, gen_length: int | None = None, drafter: str = "prompt_lookup",
             num_draft: int = 4, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, tree=None,
             prompt_lengths=None, constraint=None, *, eos_id: int | None = None, stop_at_eos: bool = False,
             on_incomplete: Literal["error", "return"] = "error", max_new_tokens: int | None = None,
             **drafter_options) -> SpeculativeOutput:
    """Continue `prompt` [B, P] by `gen_length` tokens (default 128; `max_new_tokens` is the same
    option under Hugging Face's name) with drafts verified by the target (module docstring).

    drafter: a name (`jaxgen.decoding.drafters.names()`: "prompt_lookup", ...), built with
      `drafter_options` (e.g. max_matching_ngram_size=3), or a Drafter (e.g.
      `drafters.model_drafter(draft_params, draft_cfg)`).
    num_draft: draft tokens per step of a chain drafter. tree: a tree drafter's parents tuple
      (None: its default template). prompt_lengths: [B] ints of a right-padded ragged prompt.
    stop_at_eos / eos_id: as `ar.generate`: a row that emits EOS (`eos_id`, default cfg.eos_id)
      is padded with EOS after it and stops; the loop ends once every row has stopped.
    constraint / on_incomplete: as `ar.generate` (a `jaxgen.constraints` Constraint; every
      verified token is grammar-valid, a completed row emits EOS then padding; the result is a
      `ConstrainedSpeculativeOutput` with `.valid`). See the module docstring.
    """
    gen_length = checks.gen_length_of(gen_length, max_new_tokens)
    prompt = checks.as_prompt(prompt)
    checks.check_positive(gen_length=gen_length)
    warp = target_warp(temperature, top_k, top_p)
    drafter = configured_drafter(drafter, num_draft, tree, cfg, **drafter_options)
    B, P = prompt.shape
    N = len(drafter.parents)
    if P + gen_length + N > cfg.max_seq_len:
        raise JaxgenError(f"prompt length {P} + gen_length {gen_length} + {N} draft nodes = {P + gen_length + N} "
                          f"exceeds the model's max_seq_len={cfg.max_seq_len} (the last verify chunk reaches N "
                          "slots past the output); shorten the prompt, ask for fewer tokens or draft fewer nodes")
    checks.check_prompt(prompt, cfg, P + gen_length, diffusion=False)
    lengths = checks.check_prompt_lengths(prompt_lengths, prompt.shape)
    ragged = lengths is not None
    eos = stop_token(cfg, eos_id, stop_at_eos, ragged=ragged, constrained=constraint is not None)
    # host (numpy) values, not eager jnp ops: each eager op is a dispatch (~0.1-0.2 ms on CPU)
    lengths = np.full((B,), P, np.int32) if lengths is None else jnp.asarray(lengths)
    run = functools.partial(_generate, params, cfg, prompt, lengths, key, warp, drafter.operands(),
                            np.int32(-1 if eos is None else eos), drafter=drafter, gen_length=gen_length,
                            ragged=ragged)
    if constraint is None:
        constraints.check_no_policy(on_incomplete)
        return run(None, stop_at_eos=stop_at_eos)
    constraints.check_constraint(constraint, cfg, eos, on_incomplete)
    out = constraints.run_constrained(run, constraint, B, gen_length, cfg.vocab_size)
    checked = constraints.finish(out, constraint, lengths, gen_length, on_incomplete)
    return ConstrainedSpeculativeOutput(tokens=out.tokens, nfe=out.nfe, accepted=out.accepted, valid=checked.valid)


def stop_token(cfg, eos_id, stop_at_eos: bool, *, ragged: bool, constrained: bool):
    """The EOS id (eos_id, else cfg.eos_id) after `ar.generate`'s checks: eos_id only where it
    is used (stopping, a ragged batch's padding, a constraint's end)."""
    if not stop_at_eos and not ragged and not constrained:
        checks.check_not_given("without stop_at_eos=True (or a ragged batch, or a constraint, whose padding it is)",
                               eos_id=eos_id)
    eos = cfg.eos_id if eos_id is None else eos_id
    if stop_at_eos and eos is None:
        raise JaxgenError("stop_at_eos=True needs an eos_id (the config has none)")
    return eos


def target_warp(temperature=0.0, top_k=0, top_p=1.0) -> verify_lib.Warp:
    """The target's warpers, after the same checks as `ar.generate`."""
    checks.check_temperature(temperature)
    checks.check_top_k(top_k)
    checks.check_top_p(top_p)
    checks.check_filters_need_sampling(temperature, top_k, top_p)
    greedy = checks.concrete(temperature) and float(temperature) == 0
    filtered = not (checks.concrete(top_k) and checks.concrete(top_p) and int(top_k) == 0 and float(top_p) == 1.0)
    # concrete values as numpy scalars (jnp.float32(x) is an eager device op: ~0.2 ms each per call)
    host = lambda x, dtype: dtype(x) if checks.concrete(x) else jnp.asarray(x, dtype)
    return verify_lib.Warp(host(temperature, np.float32), host(top_k, np.int32), host(top_p, np.float32),
                           greedy=greedy, filtered=filtered and not greedy)


def configured_drafter(drafter, num_draft, tree, cfg, **drafter_options) -> drafters.Drafter:
    """The drafter named (built with `drafter_options`) or given, its static shape resolved and
    checked against the target."""
    if isinstance(num_draft, bool) or not isinstance(num_draft, (int, np.integer)) or num_draft < 1:
        raise JaxgenError(f"num_draft={num_draft!r} must be an integer >= 1 (draft tokens per step)")
    if tree is not None:
        tree = drafters.check_parents(tree, "tree")
    drafter = drafters.get(drafter, **drafter_options).configured(int(num_draft), tree)
    drafters.check_parents(drafter.parents, f"the {drafter.name} drafter's parents")
    drafter.check(cfg)
    return drafter


def chunk_layout(parents: tuple):
    """The verify chunk's layout: causal for a chain, else the tree over [root, nodes]."""
    if verify_lib.is_chain(parents):
        return layouts.causal()
    return layouts.tree((-1,) + tuple(p + 1 for p in parents))


def written_tokens(chunk_BC, path_BD, accepted_B, next_B):
    """[B, D + 1]: the accepted path's tokens, then the next token (repeated after it)."""
    on_path = jnp.take_along_axis(chunk_BC, jnp.maximum(path_BD, 0), axis=1)
    D = path_BD.shape[1]
    return jnp.where(jnp.arange(D + 1) < accepted_B[:, None], jnp.pad(on_path, ((0, 0), (0, 1))), next_B[:, None])


def path_sources(path_BD, accepted_B, num_nodes: int):
    """[B, N]: for slot w after the root, the chunk node (0-based) whose K/V it takes: the path's
    node at depth w + 1 while w < accepted, else its own (no move)."""
    w = jnp.arange(num_nodes)
    at_depth = jnp.pad(path_BD, ((0, 0), (0, num_nodes - path_BD.shape[1])), constant_values=1) - 1
    return jnp.where(w < accepted_B[:, None], at_depth, w)


def untried_beyond(free_B, depth_N, draft_BN, target, q_BNV, vocab_size: int, *, greedy: bool):
    """Verification inputs under which no draft node deeper than free_B[b] is accepted, nor
    tried: its token becomes `vocab_size`, an id of target probability 0 (greedy: no argmax
    equals it; sampling: p gets a zero column for it and a drafter's q the point mass on it, so
    its rejection leaves p as it was). Stopping a path early is lossless: the next token is
    then drawn from the target after the deepest accepted node, as AR would draw it."""
    beyond_BN = depth_N[None, :] > free_B[:, None]
    draft_BN = jnp.where(beyond_BN, vocab_size, draft_BN)
    if greedy:
        return draft_BN, target, q_BNV
    zero_column = ((0, 0), (0, 0), (0, 1))
    if q_BNV is not None:
        q_BNV = jnp.where(beyond_BN[..., None], jax.nn.one_hot(vocab_size, vocab_size + 1), jnp.pad(q_BNV, zero_column))
    return draft_BN, jnp.pad(target, zero_column), q_BNV


def emits_eos(tokens_BK, counts_B, eos):
    """[B] bool: whether a row's first counts[b] tokens hold EOS."""
    return jnp.any((tokens_BK == eos) & (jnp.arange(tokens_BK.shape[1]) < counts_B[:, None]), axis=1)


def kept_columns(tokens_BL, lengths_B, end_B, eos):
    """[B]: the columns a stopping row keeps, through its first generated EOS (else its end)."""
    col = jnp.arange(tokens_BL.shape[1])[None, :]
    eos_BL = (tokens_BL == eos) & (col >= lengths_B[:, None]) & (col < end_B[:, None])
    return jnp.where(jnp.any(eos_BL, axis=1), jnp.argmax(eos_BL, axis=1) + 1, end_B)


@functools.partial(jax.jit, static_argnames=("cfg", "drafter", "gen_length", "ragged", "stop_at_eos",
                                             "length_budget"))
def _generate(params, cfg, prompt, lengths_B, key, warp, operands, eos, session, *, drafter, gen_length, ragged,
              stop_at_eos, length_budget=False):
    """`session`: None (unconstrained: no host call), the traced id of an open constraint
    session (masks and commits through AR's length budget), or a
    `constraints.automaton.TokenAutomaton` (device masks, AR's exact budget if `length_budget`)."""
    B, P = prompt.shape
    parents = drafter.parents
    N, chain = len(parents), verify_lib.is_chain(parents)
    tables = verify_lib.tree_tables(parents)
    T = P + gen_length + N  # canvas and cache slots: a live row's chunk ends below P + gen_length + N - 1
    limit_B = lengths_B + gen_length
    layout = chunk_layout(parents)
    k_first, k_draft, k_verify = jax.random.split(key, 3)
    draft_kw = {"warp": warp} if drafter.uses_warp else {}
    constrained, words = session is not None, -(-cfg.vocab_size // 32)
    on_device = isinstance(session, constraints.automaton.TokenAutomaton)
    auto = constraints.automaton

    def grammar_masks(chunk_BC, rows):
        """(each chunk row's mask [B, C, W] (device masks: bool [B, C, V]), free [B]: the draft
        depth a row may accept), or None."""
        if on_device:
            left_B = limit_B - rows.end if length_budget else None  # tokens left for the root's next one
            return auto.tree_allowed(session, rows.grammar, chunk_BC, tables.chunk_parents, tables.depth_C,
                                     left_B), None
        if not constrained:
            return None
        return constraints.device.budget_tree_masks(session, chunk_BC, tuple(tables.chunk_parents), words)

    def target_logits(logits_BCV, grammar):
        """The logits verification sees: constrained, each chunk row's masked by the grammar
        after the committed tokens and the row's path (the root's: AR's budgeted mask)."""
        logits_BCV = forbid_mask_token(logits_BCV, cfg)
        if on_device:
            return auto.mask_logits(logits_BCV, grammar[0])
        return logits_BCV if grammar is None else constraints.device.apply_mask(logits_BCV, grammar[0])

    def first_token(last_BV):
        """The first new token, drawn under AR's first mask and committed as `ar.generate` does."""
        last_BV = forbid_mask_token(last_BV, cfg)
        if on_device:
            left_B = jnp.full((B,), gen_length, jnp.int32) if length_budget else None
            last_BV = auto.mask_logits(last_BV, auto.allowed(session, jnp.zeros((B,), jnp.int32), left_B))
        elif constrained:
            last_BV = constraints.device.apply_mask(last_BV, constraints.device.ar_start(session, B, words))
        first_B, _ = warp.pick(last_BV, k_first)
        if constrained and not on_device:  # the matchers take it (the budget may replace it)
            first_B = constraints.device.budget_advance(session, first_B[:, None], jnp.ones((B,), jnp.int32))[:, 0]
        return first_B

    def step_forward(state):
        rows = state.carry
        draft_BN, q_BNV, drafter_state = drafter.draft(operands, rows.drafter, state.tokens, rows.end,
                                                       loop.step_key(k_draft, state.step), **draft_kw)
        n_B = rows.end - 1  # the root's slot
        chunk_BC = jnp.concatenate([loop.take_at(state.tokens, n_B)[:, None], draft_BN.astype(jnp.int32)], axis=1)
        grammar = grammar_masks(chunk_BC, rows)
        tree_args = {} if chain else dict(positions=n_B[:, None] + tables.depth_C, layout_idx_BL=n_B[:, None]
                                          + jnp.arange(N + 1), split_B=n_B)
        start = n_B[0] if B == 1 else n_B  # one row: a plain in-place slice write, as ar.generate's
        logits, cache = forward(params, cfg, chunk_BC, layout=layout, cache=write_at(state.cache, start), **tree_args)
        return (logits, chunk_BC, q_BNV, drafter_state, grammar), cache, 1

    def propose(out, state):
        logits, chunk_BC, q_BNV, drafter_state, grammar = out
        masked = target_logits(logits, grammar)
        target = jnp.argmax(masked, axis=-1).astype(jnp.int32) if warp.greedy else warp.probs(masked)
        return logits, chunk_BC, q_BNV, drafter_state, grammar, target

    def rule(proposal, state):
        _, chunk_BC, q_BNV, _, grammar, target = proposal
        draft_BN = chunk_BC[:, 1:]
        if constrained and not on_device:  # the length budget: no node past a row's free tokens
            draft_BN, target, q_BNV = untried_beyond(grammar[1], tables.depth_C[1:], draft_BN, target, q_BNV,
                                                     cfg.vocab_size, greedy=warp.greedy)
        # greedy verification draws nothing: no per-row keys (a threefry split per step)
        keys = None if warp.greedy else jax.random.split(loop.step_key(k_verify, state.step), B)
        verify_row = lambda d, t, q, k: verify_lib.verify_draft(parents, d, t, q, k, greedy=warp.greedy)
        return jax.vmap(verify_row)(draft_BN, target, q_BNV, keys)

    def update(state, proposal, commit, cache):
        logits, chunk_BC, _, drafter_state, _, _ = proposal
        path_BD, accepted_B, next_B = commit
        rows, live = state.carry, ~state.done
        end = jnp.where(live, jnp.minimum(rows.end + accepted_B + 1, limit_B), rows.end)
        new_BK = written_tokens(chunk_BC, path_BD, accepted_B, next_B)
        grammar = auto.advance_by(session, rows.grammar, new_BK, end - rows.end) if on_device else None
        if constrained and not on_device:  # the matchers take the committed tokens (the budget may replace the last)
            new_BK = constraints.device.budget_advance(session, new_BK, end - rows.end)
        tokens = jnp.where(live[:, None], place_rows(state.tokens, new_BK, rows.end), state.tokens)
        if not chain:
            cache = gather_slots(cache, rows.end, path_sources(path_BD, accepted_B, N))
        cache = truncate(cache, end - 1)  # the new root (the next token) is fed by the next step
        drafter_state = drafter.observe(operands, drafter_state, tokens, end, chunk_BC, logits, path_BD, accepted_B)
        done = end >= limit_B
        if stop_at_eos:
            done = done | state.done | emits_eos(new_BK, end - rows.end, eos)
        carry = Rows(end, rows.forwards + live, drafter_state, grammar)
        return state.replace(tokens=tokens, cache=cache, carry=carry, done=done)

    recipe = loop.Recipe(forward=step_forward, propose=propose, rule=rule, update=update)
    state = _prefill(params, cfg, prompt, lengths_B, first_token, T, gen_length,
                     drafter.init(operands, cfg, prompt, lengths_B, T))
    if on_device:  # the automaton after each row's first token
        first_B = loop.take_at(state.tokens, lengths_B)
        state = state.replace(carry=state.carry.replace(grammar=auto.advance(session, jnp.zeros((B,), jnp.int32),
                                                                             first_B)))
    if stop_at_eos:
        state = state.replace(done=state.done | (loop.take_at(state.tokens, lengths_B) == eos))
    state = loop.run(recipe, state, gen_length)
    return _output(cfg, state, P, gen_length, lengths_B, limit_B, eos, ragged=ragged, stop_at_eos=stop_at_eos)


def _output(cfg, state, P: int, gen_length: int, lengths_B, limit_B, eos, *, ragged: bool,
            stop_at_eos: bool) -> SpeculativeOutput:
    """Tokens [B, P + gen_length]: EOS after a stopped row's EOS, padding after a ragged row's
    output (as `ar.generate`); `accepted`: tokens emitted per target forward."""
    col = jnp.arange(P + gen_length)[None, :]
    tokens = state.tokens[:, :P + gen_length]
    emitted = lengths_B.shape[0] * gen_length
    if stop_at_eos:
        keep_B = kept_columns(tokens, lengths_B, state.carry.end, eos)
        tokens = jnp.where(col < keep_B[:, None], tokens, eos)
        emitted = jnp.sum(keep_B - lengths_B)
    if ragged:  # columns after a row's output: padding, as ar.generate
        tokens = jnp.where(col < limit_B[:, None], tokens, pad_token(cfg, eos))
    accepted = emitted / jnp.sum(state.carry.forwards).astype(jnp.float32)
    return SpeculativeOutput(tokens=tokens, nfe=state.nfe, accepted=accepted)


def _prefill(params, cfg, prompt, lengths_B, first_token, T, gen_length, drafter_state):
    """The prompt's forward and the first new token (`first_token(last logits [B, V])`)."""
    B, P = prompt.shape
    cache = init_cache(cfg, B, T, per_layer=is_decode_form(params))
    # padded rows: extra slots, ignored; logits of each row's last prompt token only
    logits, cache = forward(params, cfg, prompt, cache=cache, out_rows=(lengths_B - 1, 1))
    tokens = jnp.zeros((B, T), jnp.int32).at[:, :P].set(prompt)
    tokens = place_rows(tokens, first_token(logits[:, 0])[:, None], lengths_B)
    end = lengths_B + 1
    rows = Rows(end, jnp.ones((B,), jnp.int32), drafter_state)
    return loop.new_state(tokens, with_lengths(cache, lengths_B), nfe=1, carry=rows, done=end >= lengths_B + gen_length)
