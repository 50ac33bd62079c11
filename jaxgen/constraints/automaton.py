"""The device-side token automaton: a regular constraint as tables the jitted loop reads, so
AR and speculative decoding mask and advance every row with two gathers and no host call.

    next_SV [S, V] int32: the state after token v from state s (-1: the grammar refuses v there)
    need_S  [S]    int32: the fewest tokens, the final EOS included, that finish from state s

State 0 is the start; the last state is "finished" (only EOS, looping). EOS leads there from
every accepting state. Special ids other than EOS, and ids past the tokenizer's vocabulary, are
always refused, as on the host path.

Why: a host callback per step costs ~65-95 us of XLA:CPU round trip on this project's 2-core
box whatever the host does (a no-op host function included; see `jaxgen.samplers.ar`), 15-20%
of a `small`-preset AR step; the tables cost nothing measurable there, and nothing on a TPU or
GPU, where a host round trip per token is far dearer. They exist only for regular languages
(regexes, `regex_dfa`, and the non-recursive core of JSON Schema, `json_regex`), and only while S x V stays small (`MAX_TABLE_BYTES`); every other
constraint keeps llguidance's host-side matchers.

Exactness: the byte DFA is built from the pattern by our own compiler, then checked against
llguidance: for every state, the tokens of its shortest path are fed to a llguidance matcher,
whose mask must equal the table's row (EOS: accepting). A mismatch means the automaton is not
used (the host path is), so both paths allow the same tokens after the same prefix.

Length budget (`Constraint.length_budget`): with r tokens left for a row (EOS included), token v
is allowed only if need[next[s, v]] <= r - 1: exact, so a row never needs a replacement token
(the host path's greedy witness search may replace a token near the end instead; the two paths
then differ only there). When no token fits (a budget too short from the start), the plain
grammar mask applies and the final check reports the row.
"""
from __future__ import annotations

import collections
import dataclasses
import json

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.constraints import backend, json_regex, regex_dfa
from jaxgen.decoding.propose import NEG_INF

MAX_TABLE_BYTES = 64 << 20  # next_SV larger than this keeps the host path
MAX_BYTE_STATES = 4096
SHARED_ROWS, SHARED_TABLE_BYTES = 256, 8 << 20  # device tables of small vocabularies get >= 256 states
UNREACHABLE = np.iinfo(np.int32).max // 2


class Unsupported(regex_dfa.Unsupported):
    """This constraint has no (small enough, verified) token automaton."""


@dataclasses.dataclass(frozen=True)
class Tables:
    """Host copy of the automaton (see the module docstring)."""
    next_SV: np.ndarray
    need_S: np.ndarray

    @property
    def states(self) -> int:
        return self.next_SV.shape[0]


@flax.struct.dataclass
class TokenAutomaton:
    """The tables on device, V = the model's vocabulary (a traced jit argument)."""
    next_SV: jax.Array
    need_S: jax.Array


def build(constraint) -> Tables:
    """The verified token automaton of a regex or JSON schema constraint, or `Unsupported`
    with the reason."""
    if constraint.kind == "regex":
        pattern = constraint.source
    elif constraint.kind == "json_schema":
        source = constraint.source
        pattern = json_regex.schema_regex(json.loads(source) if isinstance(source, str) else source)
    else:
        raise Unsupported(f"{constraint.kind} constraints use the host matchers")
    dfa = regex_dfa.compile_regex(pattern, MAX_BYTE_STATES)
    tables = _token_tables(dfa, constraint)
    _check_against_llguidance(tables, constraint)
    return tables


def _token_bytes(constraint) -> list:
    """Each id's bytes, or None for ids the constraint never allows as text (specials, EOS)."""
    ll_tok, tokenizer = constraint.ll_tokenizer, constraint.tokenizer
    ok_V = backend.unpack_bits(constraint.allowed_W[None], constraint.vocab_size)[0]
    out = []
    for v in range(constraint.vocab_size):
        if v == constraint.eos_id or not ok_V[v] or ll_tok.is_special_token(v) or tokenizer.is_special(v):
            out.append(None)
        else:
            out.append(ll_tok.decode_bytes([v]) or None)
    return out


def _token_tables(dfa: regex_dfa.ByteDFA, constraint) -> Tables:
    pieces = _token_bytes(constraint)
    V, S = constraint.vocab_size, dfa.next_SA.shape[0]
    if (S + 1) * V * 4 > MAX_TABLE_BYTES:
        raise Unsupported(f"{S + 1} states x {V} ids exceed {MAX_TABLE_BYTES >> 20} MB")
    longest = max((len(p) for p in pieces if p), default=0)
    bytes_LV = np.full((longest, V), -1, np.int32)
    for v, p in enumerate(pieces):
        if p:
            bytes_LV[: len(p), v] = np.frombuffer(p, np.uint8)
    has_text_V = np.array([p is not None for p in pieces])
    cur_SV = np.where(has_text_V[None], np.arange(S, dtype=np.int32)[:, None], -1)
    for byte_V in bytes_LV:  # walk every token's bytes from every state at once
        step = (byte_V >= 0)[None] & (cur_SV >= 0)
        cur_SV = np.where(step, dfa.next_SA[np.maximum(cur_SV, 0), np.maximum(byte_V, 0)[None]], cur_SV)
    finished = S
    next_SV = np.full((S + 1, V), -1, np.int32)
    next_SV[:S] = cur_SV
    next_SV[:S, constraint.eos_id] = np.where(dfa.accepting_S, finished, -1)
    next_SV[finished, constraint.eos_id] = finished
    return _reachable(next_SV, finished)


def _reachable(next_SV: np.ndarray, finished: int) -> Tables:
    """Keep the states reachable from 0 that can finish; renumber them (finished last)."""
    need = _need(next_SV, finished)
    next_SV = np.where((next_SV >= 0) & (need[np.maximum(next_SV, 0)] < UNREACHABLE), next_SV, -1)
    order, seen = [0], {0}
    for s in order:
        for t in np.unique(next_SV[s]):
            if t >= 0 and t not in seen and t != finished:
                seen.add(int(t))
                order.append(int(t))
    if need[0] >= UNREACHABLE:
        raise Unsupported("no token string completes the pattern with this tokenizer")
    order.append(finished)
    renumber = np.full(next_SV.shape[0] + 1, -1, np.int32)  # last slot: -1 stays -1
    renumber[order] = np.arange(len(order), dtype=np.int32)
    table = renumber[next_SV[order]]
    return Tables(np.ascontiguousarray(table), need[order].astype(np.int32))


def _need(next_SV: np.ndarray, finished: int) -> np.ndarray:
    """Fewest tokens from each state to `finished` (UNREACHABLE: never), by backward BFS."""
    S = next_SV.shape[0]
    preds = collections.defaultdict(set)
    for s, t in zip(*np.nonzero(next_SV >= 0)):
        preds[int(next_SV[s, t])].add(int(s))
    need = np.full(S, UNREACHABLE, np.int64)
    need[finished] = 0
    frontier = [finished]
    while frontier:
        nxt = []
        for t in frontier:
            for s in preds[t]:
                if need[s] == UNREACHABLE:
                    need[s] = need[t] + 1
                    nxt.append(s)
        frontier = nxt
    return need


def _check_against_llguidance(tables: Tables, constraint) -> None:
    """Each state's row must be llguidance's mask after that state's shortest token path: one
    matcher walks the tree of those paths depth first (consume, compare, roll back)."""
    from jaxgen.constraints.sessions import Session
    S, finished = tables.states, tables.states - 1
    children, reached = collections.defaultdict(list), {0}
    for s in range(S):  # BFS order: states are numbered in discovery order from 0
        for v in np.nonzero(tables.next_SV[s] >= 0)[0]:
            t = int(tables.next_SV[s, v])
            if t not in reached:
                reached.add(t)
                children[s].append((int(v), t))
    if finished not in reached:
        raise Unsupported("no token string completes the pattern")
    probe, matcher = Session(constraint, 1, 1, constraint.vocab_size), constraint.matcher()
    pad = probe.words * 32 - constraint.vocab_size
    stack, path = [(0, None)], []
    while stack:
        s, token = stack.pop()
        if s is None:  # leaving a subtree
            matcher.rollback(1)
            path.pop()
            continue
        if token is not None:
            if not matcher.consume_token(token):
                raise Unsupported(f"llguidance refuses the tokens {path + [token]} (automaton state {s})")
            path.append(token)
            stack.append((None, None))
        if s != finished:
            row_V = np.pad(tables.next_SV[s] >= 0, (0, pad))
            if not np.array_equal(probe.mask_of(matcher), backend.pack_bits(row_V[None])[0]):
                raise Unsupported(f"the automaton differs from llguidance after the tokens {path}")
        stack.extend((t, v) for v, t in children[s] if t != finished)  # (EOS: compared as a mask bit)


def on_device(tables: Tables, vocab_size: int) -> TokenAutomaton:
    """The tables for a model with `vocab_size` ids (ids past the tokenizer's: refused), the
    states padded with unreachable rows to a power of two (at least `SHARED_ROWS` for small
    vocabularies), so that constraints of similar size share one compiled program."""
    rows = 1 << max(tables.states - 1, 1).bit_length()
    if SHARED_ROWS * vocab_size * 4 <= SHARED_TABLE_BYTES:
        rows = max(rows, SHARED_ROWS)
    next_SV = np.full((rows, vocab_size), -1, np.int32)
    next_SV[: tables.states, : tables.next_SV.shape[1]] = tables.next_SV
    need_S = np.full(rows, UNREACHABLE, np.int32)
    need_S[: tables.states] = tables.need_S
    return TokenAutomaton(jnp.asarray(next_SV), jnp.asarray(need_S))


# traced side

def allowed(auto: TokenAutomaton, state_B, remaining_B=None):
    """bool [B, V]: the ids each row may take next from `state_B`; with `remaining_B` (tokens a
    row may still emit, EOS included) only ids after which the row can still finish in time,
    unless none can (then the grammar's ids)."""
    next_BV = auto.next_SV[jnp.maximum(state_B, 0)]
    ok_BV = (next_BV >= 0) & (state_B >= 0)[:, None]
    if remaining_B is None:
        return ok_BV
    fits_BV = ok_BV & (auto.need_S[jnp.maximum(next_BV, 0)] <= (remaining_B - 1)[:, None])
    return jnp.where(jnp.any(fits_BV, axis=-1, keepdims=True), fits_BV, ok_BV)


def tree_allowed(auto: TokenAutomaton, state_B, chunk_BC, parents, depth_C, left_B=None):
    """bool [B, C, V]: for every node of a static draft tree, the ids allowed after the path
    from the root (column 0, whose token `state_B` has taken) to it. parents: C static ints
    (parents[0] = -1, parents[j] < j); a node the grammar refuses (and its subtree) gets no id.
    left_B: tokens left for the root's next token (EOS included; node j at depth d: left - d)."""
    B, C = chunk_BC.shape
    parents, depth_C = np.asarray(parents), np.asarray(depth_C)
    state_BC = jnp.broadcast_to(state_B[:, None], (B, C))
    for d in range(1, int(depth_C.max(initial=0)) + 1):  # one gather per tree level
        nodes = np.flatnonzero(depth_C == d)
        state_BC = state_BC.at[:, nodes].set(advance(auto, state_BC[:, parents[nodes]], chunk_BC[:, nodes]))
    left = None if left_B is None else (left_B[:, None] - jnp.asarray(depth_C)[None]).reshape(-1)
    return allowed(auto, state_BC.reshape(-1), left).reshape(B, C, -1)


def mask_logits(logits_BV, ok_BV):
    return jnp.where(ok_BV, logits_BV, NEG_INF)


def advance(auto: TokenAutomaton, state_B, tok_B):
    """Each row's state after its token (-1 once a row took a refused id: never expected);
    any matching shapes ([B], [B, N])."""
    nxt = auto.next_SV[jnp.maximum(state_B, 0), tok_B]
    return jnp.where(state_B >= 0, nxt, -1)


def advance_by(auto: TokenAutomaton, state_B, tokens_BK, counts_B):
    """Each row's state after its first counts[b] tokens (e.g. a speculative step's commits)."""
    for i in range(tokens_BK.shape[1]):
        state_B = jnp.where(i < counts_B, advance(auto, state_B, tokens_BK[:, i]), state_B)
    return state_B
