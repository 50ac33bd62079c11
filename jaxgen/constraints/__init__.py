"""Constrained decoding: JSON schema, regex and Lark grammars over jaxgen's samplers, on the
llguidance back end (no torch; `pip install 'jaxgen[constraints]'`).

    c = jaxgen.constraints.json_schema(schema, tokenizer)   # or regex(pattern, tok), grammar(lark, tok)
    out = ar.generate(params, cfg, prompt, key, gen_length=64, constraint=c)
    out = masked_diffusion.generate(..., constraint=c)      # and block_diffusion.generate(..., constraint=c)
    out = speculative.generate(..., constraint=c)           # draft trees verified under per-node masks
    out.valid                                              # [B] bool; all True unless on_incomplete="return"

Every sampler takes `constraint=None` (unconstrained: the exact old program) and
`on_incomplete="error"|"return"`: a row that did not complete the grammar within gen_length
raises a JaxgenError after generation, or comes back flagged in `.valid`. Output rows are
[prompt | grammar string | EOS ... | padding]; special tokens other than EOS never appear.

Two mask paths, chosen per constraint (`masks="auto"`, the default; or "device" / "host"):
- device: a regex or a non-recursive JSON schema (`json_regex`) becomes a token automaton
  (`automaton`: tables next[state, id] and each state's shortest completion) that AR and
  speculative decoding read inside the jitted loop: no host call at all. Each table is checked
  against llguidance state by state when the constraint is built; where it cannot be built or
  differs (Unicode classes like \d, formats, $ref, more than a few thousand states, a
  multi-byte tokenizer where the grammar forces bytes), the host path is used and
  `constraint.automaton_reason` says why.
- host: llguidance matchers held on the host, one per row, in a session registered under an
  int id; the jitted loop passes that id (traced, so the program never recompiles per
  constraint) and the committed tokens to one host call per step (`host_call`, a lean
  io_callback) and gets back an int32 bitmask [B, ceil(V/32)] that it unpacks on device. Lark
  grammars, and the diffusion samplers (whose out-of-order commits need llguidance's
  verification) always take it. Measured costs of both: `jaxgen.samplers.ar`'s docstring.

Guarantees (every sampler): a returned row with `.valid` True is a complete grammar string
followed by EOS / padding; with on_incomplete="error" (default) every returned row is valid,
else a JaxgenError is raised after generation. Beyond that:
- AR (`ar.generate`): every token is drawn under the grammar mask, so a row is always a valid
  prefix. Device masks: with the length budget (default on) a row completes within gen_length
  whenever its grammar has a string that short (the budget is exact). Host masks: with the
  length budget (`budget`) a row also completes within gen_length, except when its slack was
  spent in an unchecked stretch (far from its end) by a jump no cheap repair covered, or when
  the greedy witness search misses a completion (recursive grammars), both reported by the
  final check.
- speculative decoding (`speculative.generate`): AR's rule at every committed token (the root's
  budgeted mask, a node's mask after its path, the budget's commits; a row accepts at most the
  draft tokens its budget takes unchecked; device masks: each node's mask from the automaton
  state after its path, with the exact budget), so greedy output equals constrained greedy
  AR's on the same path and the guarantee is AR's.
- masked / block diffusion: tokens are committed out of order, each step's commits verified
  LAVE-style (`lave`: lookahead fill with the model's current proposals, a verified witness,
  a frontier fallback), so the committed tokens always form a valid prefix and every step
  commits at least one token; with the length budget the witness also completes the grammar
  within gen_length. Weaker than LAVE (arXiv 2602.00612): one lookahead fill (the model's
  argmax / sampled proposals), not several candidate completions; a rejected candidate is not
  resampled, the step falls back to the frontier instead, so an untrained model decodes
  mostly left to right; the budget's completions come from a greedy search, not a parser's
  exact shortest completion. Blocks run until clean (at most block_length forwards each), so
  NFE can exceed the unconstrained schedule.

Device tables (jit-compatible): `auto = constraint.device_automaton(cfg.vocab_size)` (None: no
tables); inside jit `automaton.allowed(auto, state_B, left_B)` -> bool [B, V] (left_B: tokens a
row may still emit, None: no budget), `automaton.advance(auto, state_B, tok_B)`,
`automaton.tree_allowed(auto, state_B, chunk_BC, parents, depth_C, left_B)` -> bool [B, C, V].

Host-session API (jit-compatible; `words` = ceil(model vocab / 32); open a session first):

    with open_session(constraint, batch, gen_length, cfg.vocab_size) as s:   # host, outside jit
        sid = jnp.int32(s.id)                                                # pass it traced
        ... inside jit:
        mask_BW = device.first_masks(sid, B, words)                # before the first token
        mask_BW = device.advance(sid, tokens_BK, counts_B, words)  # commit counts[b] tokens / row
        mask_BTW = device.tree_masks(sid, chunk_BT, parents, words)  # speculative draft tree (below)
        logits = device.apply_mask(logits_BV, mask_BW)             # -inf where not allowed
        # AR's own pair, with the length budget (use these or the three above in one session):
        mask_BW = device.ar_start(sid, B, words)
        tok_B, mask_BW = device.ar_step(sid, proposed_B, active_B, words)   # may replace tokens
        # speculative decoding with AR's length budget (after ar_start):
        mask_BTW, free_B = device.budget_tree_masks(sid, chunk_BT, parents, words)
        tokens_BK = device.budget_advance(sid, tokens_BK, counts_B)         # may replace the last
    s.stats    # host calls, seconds in them, seconds in the mask fill alone (for benchmarks)

After a sampler call, `last_stats()` is the `Stats` of its session (calls, host_seconds, fills,
fill_seconds): `host_seconds / calls` is the host cost per decode step.

Speculative decoding: `device.tree_masks(session_id, chunk_BT, parents, words) -> int32 [B, T, W]`.
chunk_BT = [root, N nodes] per row, root = the last committed token (already taken by the
matchers); `parents` = T static ints (parents[0] = -1, parents[j] < j). Mask j = allowed next
tokens after the committed prefix + the path root -> j (root excluded); a node off the grammar
(and its subtree) gets all zeros. Verification masks the target logits of node j with mask j;
after acceptance, `device.advance(sid, accepted_BK, counts_B, words)` commits the accepted
tokens (bonus token included) and returns the masks for the next round. The matchers walk each
row's tree depth first (consume, mask, roll back), so the cost is one mask fill per node.
(llguidance's `fill_next_token_bitmask_par_with_draft_tokens` fills one linear draft chain per
matcher; a tree would need a matcher copy per leaf path, so the walk is done here.) No length
budget on this path (plain grammar masks; `finish` checks the rows). The speculative sampler
uses the budgeted pair instead: `budget_tree_masks` is `tree_masks` with the root's mask AR's
(forced when the row has no slack) and free_B, the draft depth row b may accept this step
(`Budget.free_tokens`: the tokens the budget takes unchecked whatever they are; deeper nodes
get zero masks and are not walked); `budget_advance` commits through the budget and returns the
tokens committed (the last may be replaced, as in `ar_step`), without a mask fill.

Timing the host side alone: `mask_fill_seconds(constraint, token_rows)` replays token rows
through fresh matchers and returns seconds per mask fill.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.constraints import automaton, device  # noqa: F401
from jaxgen.constraints.backend import INSTALL_HINT, llguidance  # noqa: F401
from jaxgen.constraints.constraint import (ON_INCOMPLETE, ConstrainedOutput, Constraint,  # noqa: F401
                                           check_constraint, check_no_policy, finish)
from jaxgen.constraints.sessions import Session, Stats, last_stats  # noqa: F401


def json_schema(schema, tokenizer, *, length_budget: bool = True, masks: str = "auto") -> Constraint:
    """A JSON schema (dict or JSON text). Output is compact JSON (no free whitespace) unless the
    schema's "x-guidance" options say otherwise. length_budget, masks: see `Constraint`."""
    return Constraint("json_schema", schema, tokenizer, length_budget=length_budget, masks=masks)


def regex(pattern: str, tokenizer, *, length_budget: bool = True, masks: str = "auto") -> Constraint:
    """A regular expression (Rust regex syntax) the whole output must match."""
    return Constraint("regex", pattern, tokenizer, length_budget=length_budget, masks=masks)


def grammar(lark_text: str, tokenizer, *, length_budget: bool = True, masks: str = "auto") -> Constraint:
    """A Lark grammar (llguidance's dialect; `start` is the start rule)."""
    return Constraint("grammar", lark_text, tokenizer, length_budget=length_budget, masks=masks)


def open_session(constraint: Constraint, batch: int, gen_length: int, vocab_size: int,
                 mask_id: int | None = None) -> Session:
    """Fresh matchers for `batch` rows; use as `with open_session(...) as s:` around the jitted
    call (and block on its result inside the block). mask_id: the diffusion samplers' MASK."""
    return Session(constraint, batch, gen_length, vocab_size, mask_id)


def run_constrained(run, constraint: Constraint, batch: int, gen_length: int, vocab_size: int):
    """Call a sampler's jitted program, `run(grammar, stop_at_eos=True, **static)`, with the
    constraint's device tables (and static `length_budget`), or else inside an open host
    session with its traced id. `grammar` is the program's session argument."""
    tables = constraint.device_automaton(vocab_size)
    if tables is not None:  # no host call: the tables ride along as a traced argument
        return run(tables, stop_at_eos=True, length_budget=constraint.length_budget)
    with open_session(constraint, batch, gen_length, vocab_size) as session:
        return jax.block_until_ready(run(jnp.int32(session.id), stop_at_eos=True))


def mask_fill_seconds(constraint: Constraint, token_rows, vocab_size: int | None = None) -> float:
    """Mean seconds per row mask fill (llguidance fill, special-token filter) when the rows of
    `token_rows` (lists of ids, e.g. encoded valid outputs) are replayed token by token, all
    rows together as one batch."""
    rows = [list(map(int, r)) for r in token_rows]
    s = Session(constraint, len(rows), max(map(len, rows)), vocab_size or constraint.vocab_size)
    for step in range(max(map(len, rows)) + 1):
        s.fill_masks()
        for b, r in enumerate(rows):
            s.consume(b, r[step: step + 1])
    return s.stats.fill_seconds / max(1, s.stats.fills)


__all__ = ["json_schema", "regex", "grammar", "Constraint", "ConstrainedOutput", "open_session", "device", "automaton",
           "mask_fill_seconds", "last_stats", "run_constrained", "Stats", "INSTALL_HINT"]
