"""Host side of a constrained `generate` call: a session holds one llguidance matcher per row,
registered under an int id that the jitted loop passes to the host functions below (so the
compiled program does not depend on the constraint).

Masks are int32 [B, W] bitmasks, W = ceil(model vocab / 32), bit v % 32 of word v // 32 set when
id v is allowed (llguidance's layout). Every mask is ANDed with the constraint's `allowed_W`, so
special ids other than EOS are never allowed, whatever the grammar says. A row that has
finished (consumed EOS) gets the EOS-only mask.

`Session.stats` counts host calls and the seconds spent in them and in the mask fill alone;
`last_stats()` returns the last closed session's, for benchmarks of the overhead.
"""
from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np

from jaxgen.constraints import backend, budget, lave
from jaxgen.errors import JaxgenError

PAR_FILL_MIN_VOCAB = 32768  # vocabularies this large fill a batch's masks on llguidance's thread pool
_SESSIONS: dict[int, "Session"] = {}
_IDS = itertools.count(1)
_EXECUTOR: list = []
_LAST_STATS: list = []  # the stats of the session closed last (what a benchmark reads after a generate call)


@dataclasses.dataclass
class Stats:
    calls: int = 0  # host calls from the decode loop
    host_seconds: float = 0.0  # time inside them (matcher updates, fills, LAVE checks)
    fills: int = 0  # row masks filled
    fill_seconds: float = 0.0  # time in the mask fill alone


class Session:
    """Per-row matchers of one decode call; a context manager that registers it under `.id`."""

    def __init__(self, constraint, batch: int, gen_length: int, vocab_size: int, mask_id: int | None = None):
        self.constraint, self.mask_id = constraint, mask_id
        self.id = next(_IDS)
        self.batch, self.gen_length = batch, gen_length
        self.words = -(-vocab_size // 32)
        self.allowed_W = np.zeros(self.words, np.int32)
        self.allowed_W[: constraint.words] = constraint.allowed_W
        self.eos_only_W = backend.pack_bits(np.arange(self.words * 32) == constraint.eos_id)
        self.matchers = [constraint.matcher() for _ in range(batch)]
        self.finished = np.zeros(batch, bool)  # consumed EOS (or failed): EOS-only masks
        self.failed = np.zeros(batch, bool)  # a matcher refused a token (never expected: masks forbid it)
        self.rows = None  # diffusion: per-row LAVE states (jaxgen.constraints.lave)
        self.budget = None  # AR: per-row witnesses (jaxgen.constraints.budget)
        self.stats = Stats()
        self._fill_buffer_BW = np.zeros((batch, constraint.words), np.int32)  # llguidance writes rows here
        self._fill_pointer, self._row_bytes = self._fill_buffer_BW.ctypes.data, constraint.words * 4
        self._scratch_W = np.zeros(constraint.words, np.int32)  # `mask_of` (`.ctypes.data` costs ~1 us a call)
        self._scratch_pointer = self._scratch_W.ctypes.data

    def __enter__(self):
        _SESSIONS[self.id] = self
        return self

    def __exit__(self, *exc):
        _SESSIONS.pop(self.id, None)
        _LAST_STATS[:] = [self.stats]

    # masks

    def fill_masks(self) -> np.ndarray:
        """int32 [B, W]: every row's next-token mask (finished rows: EOS only)."""
        return self._masks(self.live_rows())

    def live_rows(self) -> list:
        """The rows not finished, as Python ints."""
        return [b for b, done in enumerate(self.finished.tolist()) if not done]

    def _masks(self, live: list) -> np.ndarray:
        """`fill_masks` given its live rows."""
        start = time.perf_counter()
        if len(live) > 1 and self.constraint.vocab_size >= PAR_FILL_MIN_VOCAB:
            from llguidance.numpy import fill_next_token_bitmask_par
            fill_next_token_bitmask_par(executor(), [(self.matchers[b], b) for b in live], self._fill_buffer_BW)
        else:
            pointer, row_bytes, matchers = self._fill_pointer, self._row_bytes, self.matchers
            for b in live:
                matchers[b].unsafe_compute_mask_ptr(pointer + b * row_bytes, row_bytes)
        self.stats.fill_seconds += time.perf_counter() - start
        self.stats.fills += len(live)
        own = self.constraint.words  # the tokenizer's words; a wider model vocabulary stays 0 past them
        if own == self.words:
            out_BW = np.bitwise_and(self._fill_buffer_BW, self.allowed_W)
        else:
            out_BW = np.zeros((self.batch, self.words), np.int32)
            np.bitwise_and(self._fill_buffer_BW, self.allowed_W[:own], out=out_BW[:, :own])
        if len(live) < self.batch:
            out_BW[self.finished] = self.eos_only_W
        return out_BW

    def mask_of(self, matcher) -> np.ndarray:
        """int32 [W]: one matcher's mask (ignoring the finished flags)."""
        start = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(self._scratch_pointer, self._row_bytes)
        self.stats.fill_seconds += time.perf_counter() - start
        self.stats.fills += 1
        out = np.zeros(self.words, np.int32)
        own = self.constraint.words
        np.bitwise_and(self._scratch_W, self.allowed_W[:own], out=out[:own])
        return out

    # AR and speculative decoding

    def consume(self, b: int, tokens) -> None:
        """Row b's matcher takes `tokens` (up to and including an EOS, which finishes the row)."""
        for t in tokens:
            if self.finished[b]:
                return
            t = int(t)
            if not self.matchers[b].consume_token(t):
                self.failed[b] = self.finished[b] = True
                return
            self.finished[b] = t == self.constraint.eos_id

    def ar_start(self):
        """AR: each row's first witness (`jaxgen.constraints.budget`); the first masks [B, W]."""
        kind = budget.Budget if self.constraint.length_budget else budget.NoBudget
        self.budget = kind(self.constraint, self.batch, self.gen_length)
        self.budget.start(self.matchers[0])
        return self.ar_masks()

    def ar_step(self, proposed_B, active_B):
        """AR: each active row commits its proposed token, or its witness's head when the token
        leaves no completion within the slots left; (committed [B], next masks [B, W])."""
        committed = np.asarray(proposed_B).tolist()
        finished, commit, eos = self.finished, self.budget.commit, self.constraint.eos_id
        for b, active in enumerate(np.asarray(active_B).tolist()):
            if not active or finished[b]:
                continue
            token = commit(b, self.matchers[b], committed[b])
            if token < 0:  # the mask forbade it: never expected
                self.failed[b] = finished[b] = True
                continue
            committed[b] = token
            if token == eos:
                finished[b] = True
        return np.array(committed, np.int32), self.ar_masks()

    def ar_masks(self):
        """The grammar masks, or the witness's head alone for rows with no slack."""
        live = self.live_rows()
        masks_BW = self._masks(live)
        forced = self.budget.forced
        for b in live:
            self.force(masks_BW, b, forced(b))
        return masks_BW

    def advance(self, tokens_BK, counts_B):
        """Each row takes its first counts[b] tokens; the next masks [B, W]."""
        tokens_BK = np.asarray(tokens_BK)
        for b, n in enumerate(np.asarray(counts_B)):
            self.consume(b, tokens_BK[b, : int(n)])
        return self.fill_masks()

    def tree_masks(self, chunk_BT, parents_T) -> np.ndarray:
        """int32 [B, T, W]: node j's mask is the next-token mask after the committed prefix and
        the tokens on the path from the root (node 0, already committed) to j, root excluded.
        A node whose path the grammar refuses gets an all-zero mask (so do its descendants).
        After an EOS on the path only EOS is allowed (as for a finished row). Each row's
        matcher walks the tree depth first, consuming and rolling back."""
        chunk_BT, children = np.asarray(chunk_BT), _children(parents_T)
        out_BTW = np.zeros((self.batch, len(children), self.words), np.int32)
        for b in range(self.batch):
            if self.finished[b]:
                out_BTW[b] = self.eos_only_W
                continue
            self._walk(self.matchers[b], chunk_BT[b], children, 0, out_BTW[b])
        return out_BTW

    def budget_tree_masks(self, chunk_BT, parents_T):
        """Speculative decoding under AR's length budget (after `ar_start`): (masks [B, T, W],
        free [B]). Row b may accept at most free[b] draft nodes (`Budget.free_tokens`: its next
        free[b] tokens commit unchecked, under plain grammar masks). Masks as `tree_masks`,
        filled down to depth free[b] only (deeper nodes: zeros); the root's is AR's mask (the
        witness's head alone when the row has no slack left)."""
        chunk_BT, children = np.asarray(chunk_BT), _children(parents_T)
        T = len(children)
        out_BTW = np.zeros((self.batch, T, self.words), np.int32)
        free_B = np.zeros(self.batch, np.int32)
        for b in range(self.batch):
            if self.finished[b]:
                out_BTW[b] = self.eos_only_W
                continue
            free_B[b] = min(self.budget.free_tokens(b), T)
            self._walk(self.matchers[b], chunk_BT[b], children, 0, out_BTW[b], depth_left=int(free_B[b]))
            self.force(out_BTW[b], 0, self.budget.forced(b))
        return out_BTW, free_B

    def budget_advance(self, tokens_BK, counts_B):
        """Each row commits its first counts[b] tokens through AR's length budget
        (`Budget.commit`); returns the tokens committed [B, K]: the budget may replace a row's
        last one (the bonus token), as AR's step may. A replacement before it (never expected
        within `free_tokens`) or a refused token fails the row (the final check reports it)."""
        committed_BK = np.array(tokens_BK, np.int32)
        for b, count in enumerate(np.asarray(counts_B).tolist()):
            for i in range(int(count)):
                if self.finished[b]:
                    break
                proposed = int(committed_BK[b, i])
                token = self.budget.commit(b, self.matchers[b], proposed)
                if token < 0 or (token != proposed and i < count - 1):
                    self.failed[b] = self.finished[b] = True
                    break
                committed_BK[b, i] = token
                self.finished[b] = token == self.constraint.eos_id
        return committed_BK

    # diffusion

    def lave_step(self, gen_start_B, block_BK, proposal_BK, candidates_BK):
        """Verify one step's candidate commits per row (`jaxgen.constraints.lave`); returns
        (commit [B, K], tokens [B, K], frontier [B], frontier masks [B, W], complete [B])."""
        if self.rows is None:
            self.searcher = budget.Searcher(self.constraint) if self.constraint.length_budget else None
            self.rows = lave.new_rows(self.batch, self.matchers[0], self.searcher, self.gen_length)
        commit_BK = np.zeros(np.shape(block_BK), bool)
        tokens_BK = np.array(block_BK, np.int32)
        for b, row in enumerate(self.rows):
            step = lave.RowStep(row, self.matchers[b], self.searcher, gen_length=self.gen_length,
                                eos=self.constraint.eos_id)
            commit_BK[b], tokens_BK[b] = step.verdict(int(gen_start_B[b]), block_BK[b], proposal_BK[b],
                                                      candidates_BK[b], self.mask_id)
            self.finished[b] = row.complete
        frontier_B = np.array([row.frontier for row in self.rows], np.int32)
        masks_BW = self.fill_masks()
        for b, row in enumerate(self.rows):
            self.force(masks_BW, b, lave.forced(row, self.gen_length))
        return commit_BK, tokens_BK, frontier_B, masks_BW, self.finished.copy()

    @staticmethod
    def force(masks_BW, b: int, token):
        """Row b's mask allows only `token` (None: unchanged)."""
        if token is not None:
            masks_BW[b] = 0
            masks_BW[b, token // 32] = _BITS[token % 32]

    def _walk(self, matcher, tokens_T, children, node, out_TW, ended=False, depth_left=1 << 30):
        """Fill node's mask and its subtree's, down to `depth_left` levels below node; `ended`:
        an EOS is on the path (EOS only after it)."""
        out_TW[node] = self.eos_only_W if ended or matcher.is_stopped() else self.mask_of(matcher)
        eos = self.constraint.eos_id
        for child in children[node] if depth_left > 0 else ():
            token = int(tokens_T[child])
            if ended or token == eos:
                if token == eos and (ended or matcher.is_accepting()):
                    self._walk(matcher, tokens_T, children, child, out_TW, True, depth_left - 1)
            elif matcher.try_consume_tokens([token]) == 1:
                self._walk(matcher, tokens_T, children, child, out_TW, False, depth_left - 1)
                matcher.rollback(1)


_BITS = [(1 << k) - (1 << 32 if k == 31 else 0) for k in range(32)]  # int32 word with bit k set


def _children(parents_T) -> list[list[int]]:
    """Each tree node's children (parents[0] = -1 is the root)."""
    parents = [int(p) for p in np.asarray(parents_T)]
    children = [[] for _ in parents]
    for j, p in enumerate(parents[1:], 1):
        children[p].append(j)
    return children


def last_stats() -> Stats | None:
    """The `Stats` of the most recently closed session (None before any)."""
    return _LAST_STATS[0] if _LAST_STATS else None


def executor():
    """llguidance's thread pool for batched mask fills (one per process)."""
    if not _EXECUTOR:
        _EXECUTOR.append(backend.llguidance().LLExecutor())
    return _EXECUTOR[0]


def session(session_id) -> Session:
    sid = int(session_id)
    if sid not in _SESSIONS:
        raise JaxgenError(f"no open constraint session {sid}: host functions run only inside the `with session:` "
                          "block of the call that opened it")
    return _SESSIONS[sid]


def timed(method_name: str):
    """A host function for the decode loop: session(id).<method>(*args), timed into its stats."""

    def call(session_id, *args):
        s = session(session_id)
        start = time.perf_counter()
        out = getattr(s, method_name)(*args)
        s.stats.host_seconds += time.perf_counter() - start
        s.stats.calls += 1
        return out if isinstance(out, tuple) else (out,)

    call.__name__ = f"host_{method_name}"
    return call
