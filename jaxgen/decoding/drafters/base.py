"""The drafter contract: what speculative decoding asks of anything that proposes draft tokens.

A drafter is a frozen (hashable) dataclass: a static argument of the jitted decode loop. Array
data (a draft model's params) is not part of its identity: `operands()` returns it and the loop
passes it through jit as a traced argument to every method (a field holding it must be declared
`compare=False, hash=False`, so drafters that differ only in their arrays share one compile).

The loop calls, all inside jit unless said otherwise:

    drafter = drafter.configured(num_draft, tree)     # outside jit: resolve the static shape
    drafter.check(cfg)                                # outside jit: refuse an incompatible target
    ops = drafter.operands()                          # outside jit
    state = drafter.init(ops, cfg, prompt_BP, lengths_B, total_len)
    each step:
        draft_BN, q_BNV, state = drafter.draft(ops, state, tokens_BT, end_B, key)
        ... the target verifies [root, draft nodes] under the tree `drafter.parents` ...
        state = drafter.observe(ops, state, tokens_BT, end_B, chunk_BC, logits_BCV, path_BD, accepted_B)

Shapes and meanings:
- `parents`: the static draft tree over N nodes: parents[i] in [-1, i), -1 = a child of the
  root (the last committed token); a chain is (-1, 0, 1, ..., N-2). Chain drafters take N =
  num_draft and refuse a `tree`; tree drafters take `tree` (a tuple of parents, or None for
  their default template).
- `init`: prompt_BP is right-padded, row b's prompt is its first lengths_B[b] tokens;
  `total_len` is the static width T of the token canvas (prompt + output + slack): no row ever
  writes, or asks a drafter to look at, a position >= T.
- `draft`: tokens_BT[b, :end_B[b]] are committed and tokens_BT[b, end_B[b] - 1] is the root
  (columns >= end_B hold stale values: ignore them). Returns int32 draft_BN (the node tokens),
  q_BNV float32 (the distribution each node was drawn from, after the target's warpers;
  siblings drawn independently of each other) or None for a deterministic drafter (a point
  mass on each node's token), and the new state.
  Rows that are finished still get drafts (their results are ignored); never fail on them.
- `observe` (default: state unchanged): after verification. chunk_BC = [root, drafts]
  (C = N + 1); logits_BCV the target's raw logits (before warpers) at every chunk row;
  path_BD the chunk index of each accepted node by depth (-1 padded; D = tree depth);
  accepted_B the accepted draft count. tokens_BT / end_B already include the newly committed
  tokens and the bonus token (end_B clipped at the row's output length).

Extension (backward compatible; drafters that ignore it need no change): a drafter that samples
its drafts from q sets the class attribute `uses_warp = True`; `draft` is then called with a
keyword `warp=` (a `jaxgen.decoding.verify.Warp`: `warp.greedy` static, temperature / top_k /
top_p traced), the target's warpers, to apply to its own logits (`warp.pick(logits, key)`).
`ChainDrafter` is an optional base for chain drafters (the `num_draft` field, `configured`,
`parents`).
"""
from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

from jaxgen.decoding.verify import chain
from jaxgen.errors import JaxgenError


@dataclasses.dataclass(frozen=True)
class Drafter(abc.ABC):
    """Frozen and hashable: a static argument of the jitted loop (see the module docstring)."""

    uses_warp: ClassVar[bool] = False  # True: `draft` takes warp= (the target's warpers)

    @property
    def name(self) -> str:
        """How errors name this drafter."""
        return type(self).__name__

    def operands(self):
        """A pytree of arrays passed through jit to every method (default: none)."""
        return None

    @abc.abstractmethod
    def configured(self, num_draft: int, tree) -> "Drafter":
        """This drafter with its static shape resolved (chain drafters: num_draft nodes; tree
        drafters: `tree`, a tuple of parents, or None = their default template)."""

    @property
    @abc.abstractmethod
    def parents(self) -> tuple[int, ...]:
        """The static draft tree (module docstring)."""

    def check(self, cfg) -> None:
        """Raise a JaxgenError when the target model `cfg` is incompatible (default: never)."""

    @abc.abstractmethod
    def init(self, operands, cfg, prompt_BP, lengths_B, total_len: int):
        """The drafter's state pytree after the prompt (inside jit)."""

    @abc.abstractmethod
    def draft(self, operands, state, tokens_BT, end_B, key):
        """(draft_BN int32, q_BNV float32 or None, state): the next draft after the root."""

    def observe(self, operands, state, tokens_BT, end_B, chunk_BC, logits_BCV, path_BD, accepted_B):
        """The state after a verification (default: unchanged)."""
        return state


@dataclasses.dataclass(frozen=True)
class ChainDrafter(Drafter):
    """A drafter of one chain of `num_draft` tokens (set by `configured`)."""

    num_draft: int = 1

    def configured(self, num_draft: int, tree) -> "ChainDrafter":
        if tree is not None:
            raise JaxgenError(f"the {self.name} drafter drafts a chain of num_draft tokens; tree={tree!r} applies to "
                              "tree drafters (e.g. token_recycling): drop tree or pick a tree drafter")
        if not isinstance(num_draft, int) or isinstance(num_draft, bool) or num_draft < 1:
            raise JaxgenError(f"num_draft={num_draft!r} must be an integer >= 1 (draft tokens per step)")
        return dataclasses.replace(self, num_draft=num_draft)

    @property
    def parents(self) -> tuple[int, ...]:
        return chain(self.num_draft)


def check_parents(parents, what: str = "tree") -> tuple[int, ...]:
    """`parents` as a tuple of ints, each in [-1, i) (a node's parent comes before it); a
    JaxgenError naming the first bad entry otherwise."""
    if isinstance(parents, (str, bytes)) or not hasattr(parents, "__len__"):
        raise JaxgenError(f"{what}={parents!r} must be a tuple of parent indices, e.g. (-1, 0, 0, 1)")
    if len(parents) == 0:
        raise JaxgenError(f"{what}=() has no nodes; give at least one parent index (-1 = child of the root)")
    out = []
    for i, p in enumerate(parents):
        if isinstance(p, bool) or not isinstance(p, int) and not hasattr(p, "__index__"):
            raise JaxgenError(f"{what}[{i}]={p!r} must be an integer parent index")
        p = int(p)
        if not -1 <= p < i:
            raise JaxgenError(f"{what}[{i}]={p} must be -1 (a child of the root) or an earlier node in [0, {i}): "
                              "parents come before their children")
        out.append(p)
    return tuple(out)
