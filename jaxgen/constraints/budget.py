"""Length budget for AR constrained decoding: keep every row completable within gen_length.

A grammar mask alone lets a row wander (an untrained model fills a JSON string with 4-byte
characters until the canvas ends). Each AR row therefore keeps a *witness*: a token list that
completes the grammar from the row's state (the matcher accepts after it; EOS may follow), no
longer than the slots left.

- mask: when the witness uses every slot left, only its first token is allowed (forced);
  otherwise the grammar mask.
- after a committed token t: the witness loses its head if t is it. Else, while the slack
  (slots left minus the last known witness's length minus the tokens committed since, each
  counted as one more token to complete) exceeds `SLACK`, t is accepted unchecked and the
  witness becomes unknown: no host work at all. Within `SLACK`: a suffix of the last known
  witness that completes from the new state is kept (cheap: one validate each), else a new
  witness is searched for (`complete_within`), and if none fits and the witness was known
  before t, t is replaced by the witness's head (AR writes a token only after this host step,
  so nothing downstream saw t). A repaired witness resets the slack, so a row with room checks
  about once every (slack - SLACK) / 2 tokens and every token near its end.
- no witness at all (the first search failed: the grammar may need more than gen_length
  tokens, or the greedy search missed a completion): the row decodes under the plain mask and
  searches again after 1, 2, 4, ... steps.

Speculative decoding uses the same budget (`Session.budget_tree_masks` / `budget_advance`): a
step may accept at most `free_tokens` draft tokens, the tokens that commit unchecked whatever
they are, so every token is masked and committed exactly as AR would (greedy output equals AR's).

Guarantee: a row whose witness is known when its slack estimate reaches `SLACK` completes
within gen_length. The unchecked stretches trade that for speed: a row fails only if one
stretch moved its shortest completion by more than twice the stretch's length past the
estimate, which the final check reports. Checks and searches run rarely until a row nears its
end, so the host cost stays near the mask fill's.

`complete_within` is a greedy search, not an exact shortest path (llguidance exposes no
distances): forced tokens first, else the allowed token whose successor can end, else the one
whose successor allows the fewest tokens (closing quotes, brackets, terminators), among the
first `CANDIDATES` allowed ids, at most `MAX_NODES` matcher steps per search. It finds
completions of JSON schemas and regexes readily; for recursive grammars (nested brackets) it
can miss them, and the row then has no budget guarantee (the final check still raises).
"""
from __future__ import annotations

import numpy as np

CANDIDATES = 8  # allowed ids scored per search level, in `search_order`
CLOSERS = b"\"}])'>`"  # tried first: they end strings and structures
MAX_NODES = 2000  # matcher consumes per search
SLACK = 16  # slots beyond the witness's length below which every token is checked
REPAIR_SUFFIXES = 4  # suffixes of the last known witness tried before a search
CANDIDATE_CACHE_BYTES = 4 << 20  # masks kept per constraint by `Searcher.candidates`


class Searcher:
    """Witness search for one constraint (scratch mask buffer, allowed ids)."""

    def __init__(self, constraint):
        self.words = constraint.words
        self.eos = constraint.eos_id
        self.allowed_W = constraint.allowed_W.copy()
        self.allowed_W &= ~_eos_bit_words(self.eos, self.words)  # never part of a witness
        self.order_V = search_order(constraint)
        self._buffer = np.zeros(self.words, np.int32)
        self._pointer, self._bytes = self._buffer.ctypes.data, self.words * 4  # `.ctypes.data` costs ~1 us a call
        self._view = memoryview(self._buffer).cast("B")
        self._allowed = int.from_bytes(self.allowed_W.tobytes(), "little")
        self._candidates = constraint._candidates  # mask bits -> candidates
        self._start_witness = constraint._start_witness  # budget -> witness from the start

    def allowed_bits(self, matcher) -> int:
        """The matcher's mask (EOS and specials excluded) as one int, bit v for id v."""
        matcher.unsafe_compute_mask_ptr(self._pointer, self._bytes)
        return int.from_bytes(self._view, "little") & self._allowed

    def candidates(self, matcher) -> list:
        """The first CANDIDATES allowed ids (EOS and specials excluded) in search order (cached
        per distinct mask: a grammar has few)."""
        bits = self.allowed_bits(matcher)
        found = self._candidates.get(bits)
        if found is None:
            found = first_allowed(self.order_V, np.bitwise_and(self._buffer, self.allowed_W))
            if len(self._candidates) * self._bytes < CANDIDATE_CACHE_BYTES:
                self._candidates[bits] = found
        return found

    def popcount(self, matcher) -> int:
        return self.allowed_bits(matcher).bit_count()

    def from_start(self, matcher, budget: int):
        """`complete_within` from the grammar's start (`matcher` fresh), cached on the constraint
        per budget: every session of a constraint begins with the same search."""
        if budget not in self._start_witness:
            found = self.complete_within(matcher, budget)
            self._start_witness[budget] = None if found is None else tuple(found)
        return self._start_witness[budget]

    def completes(self, matcher, tokens) -> bool:
        """Whether `tokens` then EOS is accepted from the matcher's state (left unchanged)."""
        tokens = list(tokens) + [self.eos]
        return matcher.validate_tokens(tokens) == len(tokens)

    def complete_within(self, matcher, budget: int):
        """A token list of length <= budget after which the grammar may end, or None (the matcher
        is left unchanged)."""
        path, nodes = [], 0
        try:
            while not matcher.is_accepting():
                if len(path) >= budget or matcher.is_stopped() or nodes > MAX_NODES:
                    return None
                forced = [t for t in matcher.compute_ff_tokens()][: budget - len(path)]
                if forced and matcher.consume_tokens(forced):
                    path += forced
                    nodes += len(forced)
                    continue
                best, best_score = None, None
                for t in self.candidates(matcher):
                    if not matcher.consume_token(t):
                        continue
                    nodes += 1
                    score = (0, 0) if matcher.is_accepting() else (1, self.popcount(matcher))
                    matcher.rollback(1)
                    if best_score is None or score < best_score:
                        best, best_score = t, score
                    if score == (0, 0):
                        break
                if best is None:
                    return None
                matcher.consume_token(best)
                path.append(best)
            return path
        finally:
            if path:
                matcher.rollback(len(path))


def search_order(constraint) -> np.ndarray:
    """Token ids ordered for the greedy search (cached on the constraint): closing characters,
    digits, letters, other ASCII, the rest; shorter tokens first within each class."""
    if constraint._search_order is None:
        classes = [CLOSERS, b"0123456789", bytes(range(65, 91)) + bytes(range(97, 123)), bytes(range(32, 127))]

        def rank(data: bytes):
            first = data[:1]
            return (next((i for i, c in enumerate(classes) if first and first in c), len(classes)), len(data))

        decode = constraint.ll_tokenizer.decode_bytes
        ranks = [rank(decode([i])) for i in range(constraint.vocab_size)]
        constraint._search_order = np.asarray(sorted(range(constraint.vocab_size), key=ranks.__getitem__), np.int64)
    return constraint._search_order


def first_allowed(order_V, mask_W) -> list:
    """The first CANDIDATES ids of `order_V` whose bit is set in `mask_W`."""
    bits = np.unpackbits(mask_W.view(np.uint8), bitorder="little")
    return order_V[bits[order_V].astype(bool)][:CANDIDATES].tolist()


def _eos_bit_words(eos: int, words: int) -> np.ndarray:
    bits = np.zeros(words * 32, bool)
    bits[eos] = True
    return np.packbits(bits, bitorder="little").view(np.int32)


class Budget:
    """Per-row witnesses of one AR session (see the module docstring)."""

    def __init__(self, constraint, batch: int, gen_length: int):
        self.searcher = Searcher(constraint)
        self.gen_length = gen_length
        self.witness = [None] * batch  # a witness for the row's current state, or None (unknown)
        self.last = [None] * batch  # the last known witness, and `used` when it was known
        self.last_used = [0] * batch  # (Python ints throughout: NumPy scalars cost ~10x per operation)
        self.used = [0] * batch  # tokens committed per row
        self.retry_at = [0] * batch  # `used` at which a row that never had a witness searches again
        self.backoff = [1] * batch
        self.searches = 0

    def left(self, b: int) -> int:
        return self.gen_length - self.used[b]

    def slack(self, b: int) -> int:
        """Slots left beyond the (last known) witness's length, each token since counted as one more."""
        if self.last[b] is None:
            return -1
        return self.gen_length - len(self.last[b]) - 2 * self.used[b] + self.last_used[b]

    def known(self, b: int, witness):
        self.witness[b] = self.last[b] = witness
        self.last_used[b] = self.used[b]

    def search(self, b: int, matcher):
        self.searches += 1
        return self.searcher.complete_within(matcher, self.left(b))

    def start(self, matcher):
        """Every row's first witness: one search from the grammar's start (`matcher`'s state)."""
        self.searches += 1
        found = self.searcher.from_start(matcher, self.gen_length)
        for b in range(len(self.witness)):
            if found is None:
                self.retry_at[b], self.backoff[b] = 1, 2
            else:
                self.known(b, list(found))

    def forced(self, b: int):
        """The token row b must take next, or None (free under the grammar mask)."""
        w = self.witness[b]
        return w[0] if w and len(w) >= self.gen_length - self.used[b] else None

    def free_tokens(self, b: int) -> int:
        """How many next tokens of row b `commit` takes unchecked, whatever they are: none is
        replaced and no mask after them is forced (speculative decoding may accept that many
        draft tokens in one step). Each token lowers the slack by at most 2 (`commit`); a row
        with no witness yet is unchecked until its next search."""
        if self.last[b] is None:
            return max(0, self.retry_at[b] - self.used[b] - 1)
        return max(0, (self.slack(b) - SLACK - 1) // 2)

    def repaired(self, b: int, matcher):
        """A suffix of the last known witness that completes from the row's state, or None."""
        last = self.last[b]
        for start in range(min(len(last), REPAIR_SUFFIXES) + 1) if last is not None else ():
            if len(last) - start <= self.left(b) and self.searcher.completes(matcher, last[start:]):
                return last[start:]
        return None

    def commit(self, b: int, matcher, token: int) -> int:
        """Row b's matcher takes `token` (or, if that leaves no completion within the slots left,
        the witness's head instead); returns the token committed, or -1 if the matcher refused."""
        before = self.witness[b]
        if not matcher.consume_token(token):
            return -1
        self.used[b] += 1
        if token == self.searcher.eos or (before and before[0] == token):
            self.known(b, [] if token == self.searcher.eos else before[1:])
            return token
        self.witness[b] = None
        if self.last[b] is not None and self.slack(b) > SLACK:  # plenty of room: accept unchecked
            return token
        repaired = self.repaired(b, matcher)
        if repaired is not None:
            self.known(b, repaired)
            return token
        if self.last[b] is None:  # never had a witness: search now and then
            if self.used[b] >= self.retry_at[b]:
                found = self.search(b, matcher)
                if found is not None:
                    self.known(b, found)
                else:
                    self.retry_at[b] = self.used[b] + self.backoff[b]
                    self.backoff[b] *= 2
            return token
        found = self.search(b, matcher)
        if found is not None:
            self.known(b, found)
            return token
        if before is not None:  # no completion after `token` fits: the witness's head (EOS if it is empty)
            head = before[0] if before else self.searcher.eos
            matcher.rollback(1)
            matcher.consume_token(head)
            self.known(b, before[1:])
            return head
        return token


class NoBudget:
    """`Budget`'s interface without a length budget (`length_budget=False`): the plain mask."""

    searches = 0

    def __init__(self, constraint, batch: int, gen_length: int):
        del constraint, batch
        self.gen_length = gen_length

    def start(self, matcher):
        del matcher

    def forced(self, b: int):
        return None

    def free_tokens(self, b: int) -> int:
        return self.gen_length

    def commit(self, b: int, matcher, token: int) -> int:
        return token if matcher.consume_token(token) else -1
