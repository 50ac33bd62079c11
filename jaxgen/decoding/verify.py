"""Draft verification: the lossless rules deciding how much of a draft the target keeps.

One rule family for every draft-and-verify sampler (speculative decoding, TiDAR). Per row
(callers vmap over rows), for a draft of N nodes forming a static tree (`parents[i]` in [-1, i),
-1 = a child of the root, the last committed token; a chain is (-1, 0, 1, ..., N-2)):

- the target scores C = N + 1 chunk rows [root, node 0, ..., node N-1]; row c's distribution is
  the target's next token after chunk row c. `target_C`: its argmax (greedy), or `p_CV`: its
  probabilities after the warpers (sampling);
- `draft_N`: the node tokens; `q_NV`: the distribution each node was drawn from (siblings drawn
  independently of each other), or None for a deterministic drafter (a point mass on each
  node's token; siblings may then repeat a token, the repeat is simply rejected).

Every rule returns (path_D, accepted, next_token): the chunk index (1 + node) of the accepted
node at each depth 1..D (-1 past the accepted depth; D = the tree's depth), the number of
accepted nodes, and the token drawn where verification stopped (the correction on a rejection,
the bonus after a fully accepted path). Committed: the path's tokens, then next_token.

Greedy: a node is accepted iff its token is the target's argmax after its parent (and so is
every ancestor); the deepest accepted node wins (ties: the lowest index), so greedy output is
greedy autoregressive decoding. Sampling: Leviathan/Chen (chain) and SpecInfer/EAGLE recursive
rejection (tree): at the current node try its children in order, accepting child x with
probability min(1, p(x) / q(x)); on a rejection p <- norm(max(0, p - q)) (a point mass q
removes x from p) and the next child is tried; once no child is accepted, next_token ~ p.
Outputs are distributed exactly as the target's.

Randomness: the key splits into (accept key, residual key); node i is accepted iff
u_i * q_i(x_i) < p(x_i), u = uniform(accept key, [N]); next_token = categorical(residual key,
log p). The tree walk over a chain makes exactly the chain's draws.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.decoding.propose import filter_top_k_top_p

TINY_MASS = 1e-30  # a residual with less mass is p == q up to rounding: fall back to p


@flax.struct.dataclass
class Warp:
    """The target's sampling warpers, in HF's order: temperature, top-k, top-p (values traced).
    Drafters that sample apply the same ones to q, so p and q are compared on equal terms.
    `greedy` (static): temperature 0, argmax everywhere, no softmax; `filtered` (static): whether
    top-k / top-p can cut anything (False skips their bisection passes)."""
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    greedy: bool = flax.struct.field(pytree_node=False, default=True)
    filtered: bool = flax.struct.field(pytree_node=False, default=False)

    def probs(self, logits):
        """softmax(top-p(top-k(logits / T))) along the last axis (sampling only)."""
        scaled = logits / self.temperature
        if self.filtered:
            scaled = filter_top_k_top_p(scaled, self.top_k, self.top_p)
        return jax.nn.softmax(scaled, axis=-1)

    def pick(self, logits, key):
        """(tokens, their distribution q or None when greedy) of logits [..., V]."""
        if self.greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
        q = self.probs(logits)
        return jax.random.categorical(key, jnp.log(q), axis=-1).astype(jnp.int32), q


def greedy_warp() -> Warp:
    return Warp(jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0), greedy=True, filtered=False)


def chain(n: int) -> tuple[int, ...]:
    """The parents of an n-node chain: (-1, 0, 1, ..., n-2)."""
    return (-1,) + tuple(range(n - 1))


def is_chain(parents) -> bool:
    return tuple(parents) == chain(len(parents))


@dataclasses.dataclass(frozen=True)
class TreeTables:
    """Static tables of a draft tree, over chunk indices (0 = root, 1 + i = node i)."""
    chunk_parents: np.ndarray  # int [C]: the chunk parent of each chunk row (-1 for the root)
    depth_C: np.ndarray  # int [C]: 0 for the root
    ancestors_CC: np.ndarray  # bool [C, C]: [c, a] when a is c or one of its ancestors
    path_CD: np.ndarray  # int [C, D]: chunk index of c's ancestor-or-self at depth d + 1, else -1
    children_CK: np.ndarray  # int [C, K]: chunk indices of each row's children in order, -1 padded

    @property
    def depth(self) -> int:
        return self.path_CD.shape[1]


@functools.lru_cache(maxsize=None)
def tree_tables(parents: tuple) -> TreeTables:
    chunk_parents = np.array([-1] + [p + 1 for p in parents])
    C = len(chunk_parents)
    depth = np.zeros(C, int)
    ancestors = np.eye(C, dtype=bool)
    for c in range(1, C):
        depth[c] = depth[chunk_parents[c]] + 1
        ancestors[c] |= ancestors[chunk_parents[c]]
    D = int(depth.max())
    path = np.full((C, D), -1)
    for c in range(C):
        for a in np.flatnonzero(ancestors[c]):
            if depth[a] > 0:
                path[c, depth[a] - 1] = a
    kids = [[c for c in range(C) if chunk_parents[c] == r] for r in range(C)]
    children = np.full((C, max(map(len, kids))), -1)
    for r, ks in enumerate(kids):
        children[r, :len(ks)] = ks
    return TreeTables(chunk_parents, depth, ancestors, path, children)


def chain_path(accepted, n: int):
    """The path_D of a chain with `accepted` nodes kept: 1..accepted, then -1."""
    steps = jnp.arange(n)
    return jnp.where(steps < accepted, steps + 1, -1)


def residual(p_V, q_V, x):
    """norm(max(0, p - q)), q a distribution or (q_V None) the point mass on token x; p itself
    when that leaves no mass (p == q up to rounding, where a rejection has probability ~0)."""
    rest = jnp.where(jnp.arange(p_V.shape[-1]) == x, 0.0, p_V) if q_V is None else jnp.maximum(p_V - q_V, 0.0)
    mass = rest.sum()
    return jnp.where(mass > TINY_MASS, rest / jnp.maximum(mass, TINY_MASS), p_V)


def chain_greedy(target_C, draft_N):
    """(accepted, next token): the longest prefix of draft_N that greedy decoding reproduces."""
    ok = target_C[:-1] == draft_N
    a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
    return a, target_C[a]


def chain_sample(p_CV, draft_N, q_NV, key):
    """(accepted, next token) by the Leviathan/Chen rule over a chain (all nodes tested at once)."""
    N = draft_N.shape[0]
    k_accept, k_next = jax.random.split(key)
    idx = jnp.arange(N)
    p_d = p_CV[idx, draft_N]
    q_d = 1.0 if q_NV is None else q_NV[idx, draft_N]
    ok = jax.random.uniform(k_accept, (N,)) * q_d < p_d  # u < p / q
    a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
    stop = jnp.minimum(a, N - 1)
    rest = residual(p_CV[stop], None if q_NV is None else q_NV[stop], draft_N[stop])
    dist = jnp.where(a < N, rest, p_CV[a])
    return a, jax.random.categorical(k_next, jnp.log(dist)).astype(jnp.int32)


def tree_greedy(target_C, draft_N, parents: tuple):
    """(path_D, accepted, next token): the deepest node whose whole path greedy decoding takes."""
    t = tree_tables(parents)
    match_C = jnp.concatenate([jnp.ones((1,), bool), draft_N == target_C[t.chunk_parents[1:]]])
    kept_C = jnp.all(jnp.where(t.ancestors_CC, match_C[None, :], True), axis=-1)
    C = len(t.depth_C)
    score = jnp.where(kept_C, t.depth_C * C + (C - 1 - np.arange(C)), -1)
    best = jnp.argmax(score)
    return jnp.asarray(t.path_CD)[best], jnp.asarray(t.depth_C)[best], target_C[best]


def tree_sample(p_CV, draft_N, q_NV, key, parents: tuple):
    """(path_D, accepted, next token) by recursive rejection over the tree (module docstring)."""
    t = tree_tables(parents)
    k_accept, k_next = jax.random.split(key)
    u_N = jax.random.uniform(k_accept, (len(parents),))
    children = jnp.asarray(t.children_CK)

    def try_child(k, carry):
        cur, p, chosen, searching = carry
        child = children[cur, k]
        node = jnp.maximum(child - 1, 0)
        x = draft_N[node]
        q = None if q_NV is None else q_NV[node]
        trying = searching & (child > 0) & (chosen < 0)
        ok = trying & (u_N[node] * (1.0 if q is None else q[x]) < p[x])
        p = jnp.where(trying & ~ok, residual(p, q, x), p)
        return cur, p, jnp.where(ok, child, chosen), searching

    def level(d, carry):
        cur, p, searching, path = carry
        _, p, chosen, _ = jax.lax.fori_loop(0, children.shape[1], try_child, (cur, p, jnp.int32(-1), searching))
        moved = chosen > 0
        path = path.at[d].set(jnp.where(moved, chosen, -1))
        p = jnp.where(moved, p_CV[jnp.maximum(chosen, 0)], p)
        return jnp.where(moved, chosen, cur), p, searching & moved, path

    start = (jnp.int32(0), p_CV[0], jnp.bool_(True), jnp.full((t.depth,), -1, jnp.int32))
    cur, p, _, path = jax.lax.fori_loop(0, t.depth, level, start)
    return path, jnp.asarray(t.depth_C)[cur], jax.random.categorical(k_next, jnp.log(p)).astype(jnp.int32)


def verify_draft(parents: tuple, draft_N, target, q_NV=None, key=None, *, greedy: bool):
    """(path_D, accepted, next token) of one row. `target`: argmax tokens [C] (greedy) or warped
    probabilities [C, V]; chains take the vectorized chain rules, other trees the tree walk."""
    N = len(parents)
    if is_chain(parents):
        a, nxt = chain_greedy(target, draft_N) if greedy else chain_sample(target, draft_N, q_NV, key)
        return chain_path(a, N), a, nxt
    if greedy:
        return tree_greedy(target, draft_N, parents)
    return tree_sample(target, draft_N, q_NV, key, parents)
