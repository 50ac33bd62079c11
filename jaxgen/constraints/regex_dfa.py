"""A regular expression as a byte-level DFA: the first half of the device-side token automaton
(`jaxgen.constraints.automaton`).

Parses the part of Rust's regex syntax (llguidance's) whose meaning needs no Unicode tables:
literals (any code point, matched as its UTF-8 bytes), escapes (punctuation, \\n \\t \\r \\f
\\v \\0, \\xHH, \\x{H..}, \\u{H..}), classes `[...]` with ranges and `^` negation, `.` (any scalar
but newline), groups `(...)`, `(?:...)`, `(?P<n>...)`, `(?<n>...)`, alternation, the quantifiers
`* + ? {n} {n,} {n,m}` (lazy `?` suffixes match the same strings), and `^` / `$` at the two ends
(the whole output must match anyway). Anything else (\\d \\w \\s and friends, whose Rust meaning
is Unicode-wide; \\p{..}; flags like (?i); \\b; nested class syntax) raises `Unsupported`, and
the caller keeps llguidance's host-side matcher instead.

Construction: Thompson NFA over bytes (code-point ranges become UTF-8 byte-range sequences,
surrogates excluded) -> subset construction over byte classes -> only states that can still
reach a match (dead transitions are -1). `max_states` bounds both automata.
"""
from __future__ import annotations

import dataclasses

import numpy as np

MAX_CODE_POINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)
PUNCTUATION = set("\\.+*?()|[]{}^$#&-~/ \"'`!%,:;<=>@_")
SIMPLE_ESCAPES = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B, "0": 0x00, "a": 0x07}


class Unsupported(ValueError):
    """The pattern uses syntax this compiler does not cover, or its automaton is too large."""


@dataclasses.dataclass(frozen=True)
class ByteDFA:
    """next_SA: int32 [S, 256] (-1: no match can follow); accepting_S: bool [S]; state 0 starts."""
    next_SA: np.ndarray
    accepting_S: np.ndarray


# parsing: code-point AST

@dataclasses.dataclass(frozen=True)
class Node:
    kind: str  # "set" (ranges), "cat" (parts), "alt" (parts), "rep" (parts[0], lo, hi or None)
    ranges: tuple = ()
    parts: tuple = ()
    lo: int = 0
    hi: int | None = 0


EMPTY = Node("cat")


class _Parser:
    def __init__(self, pattern: str):
        self.s, self.i = pattern, 0

    def peek(self, k: int = 0):
        j = self.i + k
        return self.s[j] if j < len(self.s) else None

    def take(self):
        c = self.peek()
        if c is None:
            raise Unsupported("unexpected end of pattern")
        self.i += 1
        return c

    def parse(self) -> Node:
        if self.peek() == "^":
            self.i += 1
        node = self.alternation()
        if self.peek() is not None:
            raise Unsupported(f"unexpected {self.peek()!r} at {self.i}")
        return node

    def alternation(self) -> Node:
        options = [self.concatenation()]
        while self.peek() == "|":
            self.i += 1
            options.append(self.concatenation())
        return options[0] if len(options) == 1 else Node("alt", parts=tuple(options))

    def concatenation(self) -> Node:
        parts = []
        while self.peek() not in (None, "|", ")"):
            if self.peek() == "$":
                if self.i != len(self.s) - 1:
                    raise Unsupported("'$' only at the end")
                self.i += 1
                break
            parts.append(self.quantified(self.atom()))
        return parts[0] if len(parts) == 1 else Node("cat", parts=tuple(parts))

    def quantified(self, node: Node) -> Node:
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                self.i += 1
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            elif c == "{" and self._counted():
                lo, hi = self._counts()
            else:
                return node
            if self.peek() == "?":  # lazy: the same strings
                self.i += 1
            node = Node("rep", parts=(node,), lo=lo, hi=hi)

    def _counted(self) -> bool:
        j = self.s.find("}", self.i)
        body = self.s[self.i + 1: j] if j > 0 else ""
        return bool(body) and all(p.strip().isdigit() or (k == 1 and not p.strip()) for k, p in
                                  enumerate(body.split(",", 1)))

    def _counts(self):
        j = self.s.index("}", self.i)
        body, self.i = self.s[self.i + 1: j], j + 1
        lo_text, _, hi_text = body.partition(",")
        lo = int(lo_text)
        hi = lo if "," not in body else (int(hi_text) if hi_text.strip() else None)
        if hi is not None and hi < lo:
            raise Unsupported(f"bad repetition {{{body}}}")
        return lo, hi

    def atom(self) -> Node:
        c = self.take()
        if c == "(":
            if self.peek() == "?":
                if self.s.startswith("?:", self.i):
                    self.i += 2
                elif self.s.startswith("?P<", self.i) or self.s.startswith("?<", self.i):
                    self.i = self.s.index(">", self.i) + 1
                else:
                    raise Unsupported("group flags and look-arounds")
            node = self.alternation()
            if self.take() != ")":
                raise Unsupported("unbalanced parenthesis")
            return node
        if c == "[":
            return Node("set", ranges=self.char_class())
        if c == ".":
            return Node("set", ranges=_complement(((0x0A, 0x0A),)))
        if c == "\\":
            return Node("set", ranges=((self.escape(),) * 2,))
        if c in "*+?{)|":
            raise Unsupported(f"unexpected {c!r}")
        return Node("set", ranges=((ord(c), ord(c)),))

    def escape(self) -> int:
        c = self.take()
        if c in SIMPLE_ESCAPES:
            return SIMPLE_ESCAPES[c]
        if c in ("x", "u", "U"):
            if self.peek() == "{":
                j = self.s.index("}", self.i)
                digits, self.i = self.s[self.i + 1: j], j + 1
            else:
                n = {"x": 2, "u": 4, "U": 8}[c]
                digits, self.i = self.s[self.i: self.i + n], self.i + n
            value = int(digits, 16)
            if value > MAX_CODE_POINT or SURROGATES[0] <= value <= SURROGATES[1]:
                raise Unsupported(f"escape \\{c}{digits}")
            return value
        if c in PUNCTUATION:
            return ord(c)
        raise Unsupported(f"escape \\{c} (Unicode classes, assertions)")

    def char_class(self) -> tuple:
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        end = self.s.find("]", self.i + 1)
        if end < 0 or any(op in self.s[self.i: end] for op in ("&&", "--", "~~", "[")):
            raise Unsupported("nested classes and class set operations")
        ranges, first = [], True
        while True:
            c = self.take()
            if c == "]" and not first:
                break
            first = False
            lo = self.escape() if c == "\\" else ord(c)
            if self.peek() == "-" and self.peek(1) not in ("]", None):
                self.i += 1
                d = self.take()
                hi = self.escape() if d == "\\" else ord(d)
                if hi < lo:
                    raise Unsupported("bad class range")
            else:
                hi = lo
            ranges.append((lo, hi))
        ranges = _normalized(ranges)
        return _complement(ranges) if negated else ranges


def _normalized(ranges) -> tuple:
    out = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def _complement(ranges) -> tuple:
    """Every scalar value (no surrogates) outside `ranges`."""
    out, at = [], 0
    for lo, hi in _normalized(list(ranges) + [SURROGATES]):
        if lo > at:
            out.append((at, lo - 1))
        at = max(at, hi + 1)
    if at <= MAX_CODE_POINT:
        out.append((at, MAX_CODE_POINT))
    return tuple(out)


def parse(pattern: str) -> Node:
    return _Parser(pattern).parse()


# code-point ranges as UTF-8 byte sequences

def utf8_sequences(lo: int, hi: int) -> list:
    """[(byte lo, byte hi), ...] sequences, together matching the UTF-8 encodings of [lo, hi]
    (surrogates excluded): the classic split by encoded length, then by continuation bytes."""
    out = []
    for a, b in _complement(_complement(((lo, hi),))):  # drops the surrogates
        _split(a, b, out)
    return out


def _split(lo: int, hi: int, out: list) -> None:
    for boundary in (0x7F, 0x7FF, 0xFFFF):
        if lo <= boundary < hi:
            _split(lo, boundary, out)
            _split(boundary + 1, hi, out)
            return
    if hi <= 0x7F:
        out.append(((lo, hi),))
        return
    for i in (1, 2, 3):
        m = (1 << (6 * i)) - 1
        if lo & ~m != hi & ~m:
            if lo & m:
                _split(lo, lo | m, out)
                _split((lo | m) + 1, hi, out)
                return
            if hi & m != m:
                _split(lo, (hi & ~m) - 1, out)
                _split(hi & ~m, hi, out)
                return
    out.append(tuple(zip(chr(lo).encode(), chr(hi).encode())))


# Thompson NFA over bytes

class _NFA:
    def __init__(self, max_states: int):
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple]] = []  # (byte lo, byte hi, target)
        self.max_states = max_states

    def state(self) -> int:
        if len(self.eps) >= self.max_states:
            raise Unsupported(f"more than {self.max_states} NFA states (long bounded repetitions)")
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, node: Node, start: int) -> int:
        """Add `node` after `start`; returns its end state."""
        if node.kind == "set":
            end = self.state()
            for lo, hi in node.ranges:
                for seq in utf8_sequences(lo, hi):
                    at = start
                    for k, (a, b) in enumerate(seq):
                        to = end if k == len(seq) - 1 else self.state()
                        self.edges[at].append((a, b, to))
                        at = to
            return end
        if node.kind == "cat":
            for part in node.parts:
                start = self.build(part, start)
            return start
        if node.kind == "alt":
            end = self.state()
            for part in node.parts:
                s = self.state()
                self.eps[start].append(s)
                self.eps[self.build(part, s)].append(end)
            return end
        body = node.parts[0]
        for _ in range(node.lo):
            start = self.build(body, start)
        if node.hi is None:  # star
            loop = self.state()
            self.eps[start].append(loop)
            self.eps[self.build(body, loop)].append(loop)
            return loop
        end = self.state()
        self.eps[start].append(end)
        for _ in range(node.hi - node.lo):  # optional copies, each may end the repetition
            start = self.build(body, start)
            self.eps[start].append(end)
        return end


def compile_regex(pattern: str, max_states: int = 4096) -> ByteDFA:
    """The byte DFA of a pattern (whole-string match); `Unsupported` past the syntax above or
    `max_states` NFA / DFA states."""
    nfa = _NFA(8 * max_states)
    start = nfa.state()
    final = nfa.build(parse(pattern), start)
    return _determinized(nfa, start, final, max_states)


def _determinized(nfa: _NFA, start: int, final: int, max_states: int) -> ByteDFA:
    cuts = {0, 256}
    for edges in nfa.edges:
        for a, b, _ in edges:
            cuts.update((a, b + 1))
    cuts = sorted(cuts)
    classes = list(zip(cuts[:-1], cuts[1:]))  # byte ranges no edge splits

    def closure(states):
        stack, seen = list(states), set(states)
        while stack:
            for t in nfa.eps[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return frozenset(seen)

    first = closure([start])
    index, order, rows = {first: 0}, [first], []
    while len(rows) < len(order):
        current = order[len(rows)]
        row = np.full(256, -1, np.int32)
        for lo, hi in classes:
            targets = [t for s in current for a, b, t in nfa.edges[s] if a <= lo and hi - 1 <= b]
            if not targets:
                continue
            nxt = closure(targets)
            if nxt not in index:
                if len(order) >= max_states:
                    raise Unsupported(f"more than {max_states} DFA states")
                index[nxt] = len(order)
                order.append(nxt)
            row[lo:hi] = index[nxt]
        rows.append(row)
    next_SA = np.stack(rows)
    accepting_S = np.array([final in s for s in order])
    return _pruned(ByteDFA(next_SA, accepting_S))


def _pruned(dfa: ByteDFA) -> ByteDFA:
    """Transitions into states that cannot reach a match become -1 (backward search from the
    accepting states)."""
    sources, _ = np.nonzero(dfa.next_SA >= 0)
    targets = dfa.next_SA[dfa.next_SA >= 0]
    order = np.argsort(targets, kind="stable")
    sources, targets = sources[order], targets[order]
    starts = np.searchsorted(targets, np.arange(dfa.next_SA.shape[0] + 1))
    live = dfa.accepting_S.copy()
    frontier = list(np.nonzero(live)[0])
    while frontier:
        t = frontier.pop()
        for s in sources[starts[t]: starts[t + 1]]:
            if not live[s]:
                live[s] = True
                frontier.append(s)
    next_SA = np.where((dfa.next_SA >= 0) & live[np.maximum(dfa.next_SA, 0)], dfa.next_SA, -1).astype(np.int32)
    return ByteDFA(next_SA, dfa.accepting_S)
