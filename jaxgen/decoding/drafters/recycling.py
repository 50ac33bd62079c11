"""Token Recycling drafter (Luo et al. 2024, arXiv 2408.08696; Luowaterbi/TokenRecycling).

Train-free. The state is an adjacency matrix `adj_VK` int32 [V, k] (k = 8): row t holds the
top-k tokens the target itself predicted after token t, the last time t was fed. Drafting is a
BFS over a static tree template from the root (the last committed token): the node with path
[i, j, ...] gets child = adj[parent token, i]; one gather per depth. After verification every
chunk row (root and all draft nodes, accepted or not) writes the top-k of its target logits into
its token's row (`observe`). The template's paths become the verify layout's `parents`
(parents before children); a node's slot is its rank among its parent's children.

Reference semantics kept (evaluation/inference_recycling.py, model/recycling/tree_template_.py):
- the matrix starts as zeros (`torch.zeros((vocab, topk))`), so a cold row drafts token 0;
- the default template "2.2.2": 80 nodes over 6 depths (8/21/25/15/8/3);
- the update writes the top-k of the raw logits at every chunk row, after verification, and the
  next draft reads the updated matrix; the prompt's prefill logits are not used (as in the
  reference: its prefill forward does not touch the matrix).

Decisions and deviations:
- A token fed at several chunk rows (of one row, or, with `shared`, of several rows) writes
  once: the last occurrence in row-major chunk order wins (deeper/later nodes, then later batch
  rows). The reference's `adj[ids] = topk` with repeated ids leaves the winner unspecified.
- Batches: `shared=True` (default) keeps ONE matrix for the whole batch, like the reference's
  one global matrix that every request reads and updates (V*k int32, < 5 MB at V = 152k;
  what one row learns helps the others; acceptance then depends on the batch, tokens never
  do: verification is lossless). `shared=False` keeps one matrix per row ([B, V, k]): each
  row drafts exactly as if decoded alone.
- The reference keeps its matrix across prompts (hot start); ours starts from zeros at every
  `generate` call (the smpanaro/token-recycling "cold start", minus its prompt-logit seeding,
  which would need the prefill logits that `init` does not receive).
- Top-k by k argmax passes (lowest index first among ties), not a vocabulary sort, and over
  the logits verification sees: the model's MASK token (which the target never emits) is left
  out, so no draft node is spent on it.
- Templates for small machines: `max_depth` / `max_width` keep the nodes of a template whose
  depth <= max_depth and whose every slot < max_width (the kept set is prefix-closed). A
  template slot >= k cannot be drafted, so max_width is capped at k. E.g. "2.2.2" with
  max_width=2, max_depth=4: 19 nodes; max_width=2, max_depth=3: 13 nodes.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.decoding.drafters.base import Drafter
from jaxgen.errors import JaxgenError

_T = [[0], [1], [2], [3], [4], [5], [6], [7]]
_T += [[0, 0], [0, 1], [0, 2], [0, 3], [0, 4], [0, 5], [0, 6], [0, 7], [1, 0], [1, 1], [1, 2], [1, 3], [2, 0],
       [2, 1], [2, 2], [3, 0], [3, 1], [4, 0], [5, 0], [6, 0], [7, 0]]
_T += [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 0, 4], [0, 0, 5], [0, 0, 6], [0, 0, 7], [0, 1, 0],
       [0, 1, 1], [0, 1, 2], [0, 2, 0], [0, 2, 1], [0, 3, 0], [0, 4, 0], [0, 5, 0], [0, 6, 0], [0, 7, 0],
       [1, 0, 0], [1, 0, 1], [1, 1, 0], [2, 0, 0], [3, 0, 0], [4, 0, 0], [5, 0, 0]]
_T += [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 3], [0, 0, 0, 4], [0, 0, 1, 0], [0, 0, 1, 1],
       [0, 0, 2, 0], [0, 0, 3, 0], [0, 0, 4, 0], [0, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0],
       [3, 0, 0, 0]]
_T += [[0, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 2], [0, 0, 0, 1, 0], [0, 0, 0, 2, 0], [0, 0, 1, 0, 0],
       [0, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
_T += [[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 0, 0]]

TEMPLATES = {"2.2.2": tuple(tuple(p) for p in _T)}  # the reference's `choose_tree_template` versions
del _T


# ---- templates and trees (static, numpy / Python) ----

def template_paths(name: str, max_depth: int | None = None, max_width: int | None = None) -> tuple:
    """A named template's node paths, trimmed to depth <= max_depth and slots < max_width."""
    if name not in TEMPLATES:
        raise JaxgenError(f"unknown Token Recycling template {name!r}; use one of {', '.join(TEMPLATES)}")
    return trim_paths(TEMPLATES[name], max_depth, max_width)


def trim_paths(paths, max_depth: int | None = None, max_width: int | None = None) -> tuple:
    """The paths with depth <= max_depth and every slot < max_width (a prefix-closed subset of a
    prefix-closed template, in the template's order)."""
    for name, value in (("max_depth", max_depth), ("max_width", max_width)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise JaxgenError(f"{name}={value!r} must be a positive integer (or None: no limit)")
    keep = lambda p: (max_depth is None or len(p) <= max_depth) and (max_width is None or max(p) < max_width)
    return tuple(tuple(p) for p in paths if keep(p))


def paths_to_parents(paths) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(parents, slots) of a template: node i's parent index (-1: the root) and its slot (the
    last path entry: which of the parent token's k candidates it drafts). Every path's prefix
    must be an earlier node."""
    index = {}
    parents, slots = [], []
    for i, path in enumerate(paths):
        path = tuple(int(x) for x in path)
        if not path or min(path) < 0:
            raise JaxgenError(f"template node {i} has path {list(path)}; paths are non-empty lists of slots >= 0")
        if path in index:
            raise JaxgenError(f"template node {i} repeats path {list(path)}")
        if len(path) > 1 and path[:-1] not in index:
            raise JaxgenError(f"template node {i} (path {list(path)}) comes before its parent {list(path[:-1])}; "
                              "list parents before children")
        parents.append(index[path[:-1]] if len(path) > 1 else -1)
        slots.append(path[-1])
        index[path] = i
    return tuple(parents), tuple(slots)


def parents_to_slots(parents) -> tuple[int, ...]:
    """Each node's rank among its parent's children (node order): the slot a user tree drafts."""
    seen: dict[int, int] = {}
    slots = []
    for p in parents:
        slots.append(seen.get(int(p), 0))
        seen[int(p)] = slots[-1] + 1
    return tuple(slots)


def parents_to_paths(parents) -> tuple:
    """The template paths of a parents tuple (inverse of `paths_to_parents`)."""
    paths = []
    for p, s in zip(parents, parents_to_slots(parents)):
        paths.append((paths[p] if p >= 0 else ()) + (s,))
    return tuple(paths)


def depths(parents) -> np.ndarray:
    """int [N]: node depth (root children: 1)."""
    d = np.zeros(len(parents), np.int32)
    for i, p in enumerate(parents):
        d[i] = 1 if p < 0 else d[p] + 1
    return d


@functools.lru_cache(maxsize=64)
def depth_groups(parents: tuple) -> tuple:
    """Per depth 1, 2, ...: (node indices, parent chunk columns, ...) as numpy int32 arrays;
    chunk column = node index + 1, the root being column 0."""
    d = depths(parents)
    par = np.asarray(parents, np.int32)
    return tuple((np.flatnonzero(d == level).astype(np.int32), par[d == level] + 1)
                 for level in range(1, int(d.max(initial=0)) + 1))


# ---- the adjacency matrix (pure jnp) ----

def top_k_ids(logits_LV, k: int):
    """int32 [..., k]: the k largest entries' ids in descending order (ties: lowest id first),
    by k argmax passes (a vocabulary sort is slow on XLA:CPU)."""
    ids = []
    x = logits_LV
    for _ in range(k):
        best = jnp.argmax(x, axis=-1)
        ids.append(best)
        x = jnp.where(jnp.arange(x.shape[-1]) == best[..., None], -jnp.inf, x)
    return jnp.stack(ids, axis=-1).astype(jnp.int32)


def last_occurrence(tokens_L, vocab_size: int):
    """bool [L]: position i holds the last occurrence of its token."""
    pos = jnp.arange(tokens_L.shape[0], dtype=jnp.int32)
    winner_V = jnp.full((vocab_size,), -1, jnp.int32).at[tokens_L].max(pos)
    return winner_V[tokens_L] == pos


def update_adjacency(adj_VK, tokens_L, cand_LK):
    """adj[tokens[i]] = cand[i] for every i, the last occurrence of a repeated token winning."""
    V = adj_VK.shape[0]
    rows = jnp.where(last_occurrence(tokens_L, V), tokens_L, V)  # V: out of range, dropped
    return adj_VK.at[rows].set(cand_LK.astype(adj_VK.dtype), mode="drop")


def bfs_draft(adj_GVK, root_B, parents: tuple, slots: tuple):
    """int32 [B, N]: the tree template expanded from each row's root; row b reads matrix
    b % G (G = 1: one shared matrix; G = B: one per row)."""
    B, N = root_B.shape[0], len(parents)
    mat_B = jnp.arange(B) % adj_GVK.shape[0]
    slot_N = np.asarray(slots, np.int32)
    full_BC = jnp.zeros((B, N + 1), jnp.int32).at[:, 0].set(root_B)
    for nodes, parent_cols in depth_groups(tuple(parents)):
        parent_tok = full_BC[:, parent_cols]
        full_BC = full_BC.at[:, nodes + 1].set(adj_GVK[mat_B[:, None], parent_tok, slot_N[nodes][None, :]])
    return full_BC[:, 1:]


# ---- the drafter ----

@flax.struct.dataclass
class RecyclingState:
    adj: jax.Array  # int32 [G, V, k]: one matrix (G = 1, shared) or one per row (G = B)
    banned: jax.Array  # int32 []: the token never recorded as a candidate (the MASK id; -1: none)


@dataclasses.dataclass(frozen=True)
class TokenRecycling(Drafter):
    """Token Recycling over a static tree (see the module docstring). `tree`: the resolved
    parents (None until `configured`, then the template's or the user's)."""
    k: int = 8
    template: str = "2.2.2"
    max_depth: int | None = None
    max_width: int | None = None
    shared: bool = True
    tree: tuple | None = None

    def __post_init__(self):
        if not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise JaxgenError(f"Token Recycling k={self.k!r} must be a positive integer (the reference uses 8)")
        if self.tree is None:
            template_paths(self.template, self.max_depth, self.max_width)  # validates the names and limits
        else:
            widest = max(parents_to_slots(self.tree), default=0)
            if widest >= self.k:
                raise JaxgenError(f"the draft tree gives a node {widest + 1} children but the adjacency matrix "
                                  f"keeps k={self.k} candidates per token; use k >= {widest + 1} or a narrower tree")

    def configured(self, num_draft: int, tree) -> "TokenRecycling":
        """A tree drafter: `tree` (a parents tuple) replaces the template; num_draft is unused."""
        if tree is None:
            return self
        return dataclasses.replace(self, tree=tuple(int(p) for p in tree))

    @property
    def paths(self) -> tuple:
        if self.tree is not None:
            return parents_to_paths(self.tree)
        width = self.k if self.max_width is None else min(self.max_width, self.k)
        return template_paths(self.template, self.max_depth, width)

    @property
    def parents(self) -> tuple[int, ...]:
        return paths_to_parents(self.paths)[0]

    @property
    def slots(self) -> tuple[int, ...]:
        return paths_to_parents(self.paths)[1]

    def check(self, cfg) -> None:
        if self.k > cfg.vocab_size:
            raise JaxgenError(f"Token Recycling k={self.k} exceeds the vocabulary ({cfg.vocab_size}); lower k")

    def init(self, operands, cfg, prompt_BP, lengths_B, total_len: int):
        matrices = 1 if self.shared else prompt_BP.shape[0]
        adj = jnp.zeros((matrices, cfg.vocab_size, self.k), jnp.int32)  # the reference's zero start
        return RecyclingState(adj, jnp.int32(-1 if cfg.mask_id is None else cfg.mask_id))

    def draft(self, operands, state, tokens_BT, end_B, key):
        root_B = tokens_BT[jnp.arange(tokens_BT.shape[0]), end_B - 1]
        return bfs_draft(state.adj, root_B, self.parents, self.slots), None, state

    def observe(self, operands, state, tokens_BT, end_B, chunk_BC, logits_BCV, path_BD, accepted_B):
        logits_BCV = jnp.where(jnp.arange(logits_BCV.shape[-1]) == state.banned, -jnp.inf, logits_BCV)
        cand_BCK = top_k_ids(logits_BCV, self.k)
        if self.shared:
            adj = update_adjacency(state.adj[0], chunk_BC.reshape(-1), cand_BCK.reshape(-1, self.k))[None]
        else:
            adj = jax.vmap(update_adjacency)(state.adj, chunk_BC, cand_BCK)
        return state.replace(adj=adj)


def make(k: int = 8, template: str = "2.2.2", max_depth: int | None = None, max_width: int | None = None,
         shared: bool = True) -> TokenRecycling:
    """The "token_recycling" drafter: adjacency top-k `k`, tree `template` trimmed to
    `max_depth` / `max_width` (e.g. max_width=2, max_depth=4: 19 nodes for small machines), one
    matrix for the batch (`shared`) or one per row."""
    return TokenRecycling(k=k, template=template, max_depth=max_depth, max_width=max_width, shared=shared)

