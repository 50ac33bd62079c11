"""LAVE-style verification of out-of-order commits (diffusion samplers), on the host.

Per row the host keeps a matcher that has taken the committed prefix gen[0 : frontier] (the
frontier is the leftmost still-masked generated position) and a verified *witness*: tokens for
gen[frontier : frontier + len(witness)] that agree with every committed token there and that
the matcher accepts as a grammar prefix. With a length budget (the row's first greedy search,
`budget.Searcher`, found a completion within gen_length) the witness moreover completes the
grammar within gen_length, so the row can always finish. A step's candidate commits (the
sampler's own rule) go through, in order:

1. lookahead: fill every masked position up to the last committed-or-candidate one with the
   model's current proposals (x0); if that fill is a valid prefix (and, with a budget, can be
   completed in the slots left: the old witness's tail or a new search), commit every
   candidate; the (completed) fill becomes the witness. Else the same with the witness's
   tokens at the masked non-candidate positions it covers.
2. otherwise candidate by candidate from the left: the witness with x0 at the candidate (and
   the lookahead fill up to it, when it lies past the witness's end), cut after the last
   committed position, must again be a valid (completable) prefix.
3. fallback when nothing was committed: the frontier position, with the witness's token when
   it has one, else with x0 there (drawn under the frontier's grammar mask; with a budget, EOS
   if x0 leaves no completion in the slots left).
4. the matcher takes the newly contiguous committed tokens; once it has taken EOS, or its
   grammar has nothing left but EOS, or the output is full, the row is complete and the device
   fills its remaining masked positions with EOS.

"Valid prefix" includes EOS: an EOS may stand only where the grammar may end, and is followed
by EOS only (masked positions after an EOS in a fill count as EOS). Positions past the row's
gen_length (a block sampler's last block overhangs it) are committed freely: they are dropped.
Every step commits at least one masked position of the block, and a row's committed tokens
always form a valid grammar prefix (completable within gen_length under a budget).
"""
from __future__ import annotations

import dataclasses

import numpy as np

SEARCHES_PER_STEP = 2  # witness searches one row may run in one step (the cheap checks are unlimited)


@dataclasses.dataclass
class Row:
    frontier: int = 0  # gen position of the leftmost masked token; the matcher took gen[:frontier]
    witness: list = dataclasses.field(default_factory=list)  # verified tokens from the frontier on
    budgeted: bool = False  # the witness also completes the grammar within gen_length
    complete: bool = False
    verified: int = 0  # candidates committed by steps 1-2 (counts, for benchmarks)
    fallbacks: int = 0  # step-3 commits


def new_rows(batch: int, matcher, searcher, gen_length: int) -> list:
    """Rows at the start of the grammar, sharing one search for a completion within gen_length
    (`searcher` None: no length budget)."""
    found = searcher.from_start(matcher, gen_length) if searcher is not None else None
    return [Row(witness=list(found or []), budgeted=found is not None) for _ in range(batch)]


def valid_prefix(matcher, tokens, eos: int) -> bool:
    """Whether the matcher (left unchanged) accepts `tokens` as a grammar prefix, with EOS only
    where the grammar may end and nothing but EOS after it."""
    tokens = [int(t) for t in tokens]
    if eos in tokens:
        end = tokens.index(eos)
        if any(t != eos for t in tokens[end:]):
            return False
        tokens = tokens[: end + 1]
    return matcher.validate_tokens(tokens) == len(tokens)


def fill(committed, proposal, eos: int, ended: bool = False):
    """The lookahead fill of a span: committed tokens (None where masked) with the proposals at
    masked positions; masked positions after an EOS (or all of them if `ended`) take EOS."""
    out = []
    for c, x in zip(committed, proposal):
        t = int(x if c is None else c)
        t = eos if c is None and ended else t
        ended = ended or t == eos
        out.append(t)
    return out


class RowStep:
    """One row's verdict on one step (see the module docstring)."""

    def __init__(self, row: Row, matcher, searcher, *, gen_length: int, eos: int):
        self.row, self.matcher, self.searcher = row, matcher, searcher
        self.gen_length, self.eos = gen_length, eos
        self.searches_left = SEARCHES_PER_STEP

    def witness_from(self, tokens, old=None):
        """`tokens` (from the frontier) as a witness: a valid prefix, completed within the
        slots left when the row has a budget (by the tail of `old`, default the row's witness,
        or a search); None if not."""
        if not valid_prefix(self.matcher, tokens, self.eos):
            return None
        if not self.row.budgeted:
            return tokens
        slots = self.gen_length - self.row.frontier
        if len(tokens) > slots:
            return None
        if self.eos in tokens or self.searcher.completes(self.matcher, tokens):
            return tokens
        tail = (self.row.witness if old is None else old)[len(tokens):]
        if tail and len(tokens) + len(tail) <= slots and self.searcher.completes(self.matcher, tokens + tail):
            return tokens + tail
        if self.searches_left <= 0:
            return None
        self.searches_left -= 1
        self.matcher.consume_tokens(tokens)
        try:
            found = self.searcher.complete_within(self.matcher, slots - len(tokens))
        finally:
            self.matcher.rollback(len(tokens))
        return None if found is None else tokens + found

    def verdict(self, start: int, block_K, proposal_K, candidates_K, mask_id: int):
        """(commit [K] bool, tokens [K]) for the block whose first column is gen position
        `start` (negative columns are prompt); updates the row and the matcher."""
        row, K = self.row, len(block_K)
        block, proposal = [int(t) for t in block_K], [int(t) for t in proposal_K]
        commit = np.zeros(K, bool)
        if row.complete:
            return commit, np.asarray(block, np.int32)
        masked = np.asarray(block) == mask_id
        pos = start + np.arange(K)
        candidates = np.asarray(candidates_K, bool) & masked & (pos >= 0)
        free = candidates & (pos >= self.gen_length)
        accepted = self._verified(start, block, proposal, masked, candidates & (pos < self.gen_length))
        for p in accepted:  # the witness's token: the proposal, or EOS where the fill ended the text
            commit[p - start] = True
            proposal[p - start] = row.witness[p - row.frontier]
        commit |= free
        row.verified += len(accepted)
        if not commit.any():
            col, token = self._fallback(start, proposal, masked, pos)
            if col is not None:
                commit[col] = True
                proposal[col] = token
                row.fallbacks += 1
        tokens = np.where(commit, np.asarray(proposal, np.int32), np.asarray(block, np.int32))
        self._advance(start, tokens, commit | ~masked)
        return commit, tokens

    def _verified(self, start, block, proposal, masked, candidates) -> list:
        """Gen positions of the candidates steps 1-2 commit; sets the row's witness."""
        f, W = self.row.frontier, self.row.witness
        wanted = [start + int(i) for i in np.flatnonzero(candidates)]
        if not wanted:
            return []
        at = lambda p: None if masked[p - start] else block[p - start]  # noqa: E731
        committed = [start + i for i in range(len(block)) if not masked[i] and f <= start + i < self.gen_length]
        span = range(f, max(wanted + committed) + 1)
        x0 = [proposal[p - start] for p in span]
        lookahead = fill([at(p) for p in span], x0, self.eos)
        witness_fill = fill([at(p) if at(p) is not None or p in wanted or p - f >= len(W) else W[p - f] for p in span],
                            x0, self.eos)
        for tokens in (lookahead, witness_fill):
            found = self.witness_from(tokens)
            if found is not None:
                self.row.witness = found
                return wanted
        accepted = []
        for p in wanted:
            keep = max([p] + [q for q in committed if q > p] + accepted) - f + 1
            gap = range(f + len(W), p + 1)
            base = W + fill([at(q) for q in gap], [proposal[q - start] for q in gap], self.eos,
                            ended=self.eos in W)
            tokens = base[:keep]
            tokens[p - f] = proposal[p - start]
            found = self.witness_from(tokens, W)
            if found is not None:
                W = found
                accepted.append(p)
        self.row.witness = W
        return accepted

    def _fallback(self, start, proposal, masked, pos):
        """Step 3: (column, token) at the frontier if it lies in the block, else the leftmost masked
        position past the output (its own proposal); (None, None) if the block has neither."""
        row, col = self.row, self.row.frontier - start
        if 0 <= col < len(masked) and masked[col] and row.frontier < self.gen_length:
            if row.witness:
                return col, row.witness[0]
            token = proposal[col]
            found = self.witness_from([token])
            if found is None:  # the device masks the frontier; with a budget x0 may not fit: EOS (accepting)
                token = self.eos if self.matcher.is_accepting() else _first_allowed(self.matcher, self.eos)
                found = [token]
            row.witness = found
            return col, token
        past = np.flatnonzero(masked & (pos >= self.gen_length))
        return (int(past[0]), proposal[int(past[0])]) if len(past) else (None, None)

    def _advance(self, start, tokens, committed):
        """Step 4: the matcher takes the committed run from the frontier; completion."""
        row, p = self.row, self.row.frontier
        while not row.complete and 0 <= p - start < len(tokens) and p < self.gen_length and committed[p - start]:
            token = int(tokens[p - start])
            if not self.matcher.consume_token(token):  # cannot happen while the witness invariant holds
                row.complete = True
                break
            row.witness = row.witness[1:]
            p += 1
            row.complete = token == self.eos or self.matcher.is_stopped()
        row.frontier = p
        row.complete = row.complete or p >= self.gen_length


def forced(row: Row, gen_length: int):
    """With a budget and no slack left, the token the row's frontier must take; else None."""
    no_slack = row.budgeted and row.witness and len(row.witness) >= gen_length - row.frontier
    return row.witness[0] if no_slack and not row.complete else None


def _first_allowed(matcher, eos: int) -> int:
    words = np.frombuffer(matcher.compute_bitmask(), np.uint8)
    allowed = np.flatnonzero(np.unpackbits(words, bitorder="little"))
    return int(allowed[0]) if len(allowed) else eos
