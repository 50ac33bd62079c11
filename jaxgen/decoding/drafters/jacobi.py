"""Lookahead decoding as a tree drafter: an n-gram pool filled from Jacobi iterations (Fu et al.
2024, arXiv 2402.02057; hao-ai-lab/LookaheadDecoding `lade/decoding.py`, llama.cpp
`examples/lookahead/lookahead.cpp`).

Parameters as the reference's `config_lade(LEVEL=N, WINDOW_SIZE=W, GUESS_SET_SIZE=G)`; defaults
5 / 7 / 7, the README's (the code's fallbacks are 8 / 60 / 60; llama.cpp uses 5 / 15 / 15).
Write M = N - 1 (the n-gram's tokens after its first, lade's GUESS_SIZE).

One target forward per step feeds [root | draft nodes] under `layouts.tree(parents)`; the nodes:

- verification branch: the pool's G n-grams keyed by the root, each a chain of M nodes hanging
  from the root (positions root+1..root+M);
- lookahead branch, the 2-D window: a trunk of W-1 tokens after the root (level 0 columns
  1..W-1; column 0 is the root itself) and N-2 further levels of W tokens; level l column j sits
  at position root + j + l and its parent is level l-1 column j (level 0: the trunk/root).

Lade's lookahead mask (`j_make_causal_mask_multilevel`; llama.cpp's sequence ids say the same)
lets level l column j see exactly level 0 columns 0..j and levels 1..l of column j: its
ancestors in this tree. So lade's 2-D mask IS a tree mask, and the tree layout reproduces it
exactly, positions included; no approximation is needed.

After verification (`observe`), as lade with ALWAYS_FWD_ONE=1 (the only mode it runs):
- new[j] = argmax of the target logits at level N-2 column j (the Jacobi update);
- each column j gives an N-gram (level 0..N-2 of column j, new[j]) inserted into the pool under
  its first token, columns in order 0..W-1 (lade's `update_token_map`);
- the window slides one position: trunk <- level 1 columns 1..W-1, level l <- level l+1,
  level N-2 <- new (whatever the number of accepted tokens, as lade does).

The pool is a fixed array per row: n-grams [V, G, M], a count [V] and a last-use stamp
[V, G], with lade's LRU policy for GUESS_SET_SIZE != -1: an n-gram already present is refreshed,
a new one fills a free slot, else replaces the least recently inserted/refreshed one
(llama.cpp's `ngram_container` is the same ring buffer without the refresh).

Deviations (each forced by static shapes or a fixed tree, or in our favour):
- The whole window exists from step 1: the tokens of every level are copied from the row's
  prompt at positions drawn with a fixed key (`seed`; lade: `random.choice` of prompt tokens)
  instead of lade's N-2 warm-up steps that grow the window one level per step; n-grams enter
  the pool only from step N-1 on, once every level has been produced by the model (lade's
  warm-up collects none either).
- The verification branch always holds G chains: a key with fewer than G n-grams fills the
  rest with the slots' initial zeros (wasted nodes; lade shortens the chunk instead).
- Every fed node is a draft the verifier may accept, the window's trunk and vertical chains
  included (Jacobi decoding's own acceptance); lade verifies only the guess n-grams.
- Lade's greedy match stops one short on a fully matched n-gram (its `for gg ... break` leaves
  gg = M - 1), dropping the bonus token; the shared verifier commits it.
- The Jacobi update is the argmax at any temperature (lade's TEMP_FOR_GUESS = 0), over the
  logits verification sees (the model's MASK token, never emitted, left out).
- `pool_from_prompt` (lade POOL_FROM_PROMPT): the prompt's N-grams fill the pool at init, and
  the N-grams ending at each newly committed token join it after each step (lade appends a
  repeated token there, a bug: it pushes hits[max_hit] max_hit + 1 times).
- Tie between equally long accepted paths: the shared verifier's choice, not lade's (first
  n-gram in LRU order).
- Rows of a batch keep their own window and pool (lade runs batch 1): n-grams [B, V, G, M] and
  stamps [B, V, G] int32, about 21 MB per row at V = 152k with the defaults.
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

_NEVER = np.iinfo(np.int32).max


# ---- the static tree ----

@dataclasses.dataclass(frozen=True)
class LookaheadTree:
    """Node indices (draft order) of the chunk: guesses [G, M], trunk [W-1] (level 0 columns
    1..W-1), levels [N-2, W] (levels 1..N-2); `parents` over all nodes."""
    guesses: np.ndarray
    trunk: np.ndarray
    levels: np.ndarray
    parents: tuple


@functools.lru_cache(maxsize=32)
def lookahead_tree(level: int, window: int, guess: int) -> LookaheadTree:
    """The static tree of one step (see the module docstring): guesses first, then the trunk,
    then the levels row by row; parents before children."""
    M = level - 1
    guesses = np.arange(guess * M, dtype=np.int32).reshape(guess, M)
    trunk = guess * M + np.arange(window - 1, dtype=np.int32)
    levels = guess * M + window - 1 + np.arange((level - 2) * window, dtype=np.int32).reshape(level - 2, window)
    parents = np.full(guess * M + window - 1 + (level - 2) * window, -1, np.int32)
    parents[guesses[:, 1:]] = guesses[:, :-1]
    parents[trunk[1:]] = trunk[:-1]
    parents[levels[0, 1:]] = trunk  # level 1 column j hangs from level 0 column j (column 0: the root)
    parents[levels[1:]] = levels[:-1]
    return LookaheadTree(guesses, trunk, levels, tuple(int(p) for p in parents))


def level0_columns(tree: LookaheadTree) -> np.ndarray:
    """Chunk columns of level 0 columns 0..W-1 (the root is chunk column 0, node i column i+1)."""
    return np.concatenate([[0], tree.trunk + 1]).astype(np.int32)


# ---- the n-gram pool (one row; vmap over rows) ----

@flax.struct.dataclass
class NgramPool:
    ngrams: jax.Array  # int32 [V, G, M]: up to G n-grams (their tokens after the first) per first token
    count: jax.Array  # int32 [V]: filled slots of each key
    stamp: jax.Array  # int32 [V, G]: when each slot was last inserted or refreshed
    clock: jax.Array  # int32 []: insertions so far


def empty_pool(vocab_size: int, guess: int, m: int) -> NgramPool:
    return NgramPool(jnp.zeros((vocab_size, guess, m), jnp.int32), jnp.zeros((vocab_size,), jnp.int32),
                     jnp.full((vocab_size, guess), _NEVER, jnp.int32), jnp.int32(0))


def pool_insert(pool: NgramPool, key, ngram_M, enabled=True) -> NgramPool:
    """Lade's LRU insert of (key, ngram): refresh it if present, else take a free slot, else
    replace the least recently used one. No-op where `enabled` is false."""
    V, G, _ = pool.ngrams.shape
    count = pool.count[key]
    valid_G = jnp.arange(G) < count
    match_G = valid_G & jnp.all(pool.ngrams[key] == ngram_M, axis=-1)
    found = jnp.any(match_G)
    oldest = jnp.argmin(jnp.where(valid_G, pool.stamp[key], _NEVER))
    slot = jnp.where(found, jnp.argmax(match_G), jnp.where(count < G, count, oldest))
    row = jnp.where(enabled, key, V)  # V: out of range, dropped
    return NgramPool(pool.ngrams.at[row, slot].set(ngram_M, mode="drop"),
                     pool.count.at[row].set(jnp.where(found, count, jnp.minimum(count + 1, G)), mode="drop"),
                     pool.stamp.at[row, slot].set(pool.clock, mode="drop"),
                     pool.clock + jnp.asarray(enabled, jnp.int32))


def pool_lookup(pool: NgramPool, key):
    """(ngrams [G, M], valid [G]) stored under `key`; invalid slots hold their initial zeros."""
    G = pool.ngrams.shape[1]
    return pool.ngrams[key], jnp.arange(G) < pool.count[key]


def insert_text_ngrams(pool: NgramPool, tokens_T, first, stop, n: int) -> NgramPool:
    """Insert the n-grams tokens[i:i+n] for i in [first, stop) (traced bounds, i >= 0 and
    i + n <= T checked), in order."""
    T = tokens_T.shape[0]

    def body(i, pool):
        ok = (i >= first) & (i < stop) & (i >= 0) & (i + n <= T)
        gram = jax.lax.dynamic_slice_in_dim(tokens_T, jnp.clip(i, 0, max(T - n, 0)), n)
        return pool_insert(pool, gram[0], gram[1:], ok)

    return jax.lax.fori_loop(jnp.maximum(first, 0), jnp.maximum(stop, first), body, pool)


# ---- the window (one row) ----

def column_ngrams(level0_W, levels_LW, new_W):
    """(keys [W], n-grams [W, M]): column j's tokens of levels 0..N-2 and its Jacobi update."""
    return level0_W, jnp.concatenate([levels_LW, new_W[None]], axis=0).T


def slide_window(levels_LW, new_W):
    """(trunk [W-1], levels [N-2, W]) of the next step: one position forward (ALWAYS_FWD_ONE)."""
    return levels_LW[0, 1:], jnp.concatenate([levels_LW[1:], new_W[None]], axis=0)


def initial_window(prompt_P, length, shape, key):
    """Window tokens copied from the row's prompt [0, length) at positions drawn with `key`."""
    picks = jax.random.randint(key, shape, 0, jnp.maximum(length, 1))
    return prompt_P[picks]


# ---- the drafter ----

@flax.struct.dataclass
class JacobiState:
    pool: NgramPool  # per row: [B, V, G, M] ...
    trunk: jax.Array  # int32 [B, W-1]
    levels: jax.Array  # int32 [B, N-2, W]
    steps: jax.Array  # int32 [B]: observed steps
    banned: jax.Array  # int32 []: the token the Jacobi update never picks (the MASK id; -1: none)


@dataclasses.dataclass(frozen=True)
class Jacobi(Drafter):
    """Lookahead decoding's n-gram pool and Jacobi window (see the module docstring)."""
    level: int = 5
    window: int = 7
    guess: int = 7
    pool_from_prompt: bool = False
    seed: int = 0

    def __post_init__(self):
        for name, low in (("level", 3), ("window", 1), ("guess", 1)):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < low:
                raise JaxgenError(f"jacobi {name}={value!r} must be an integer >= {low} (lade's defaults: level=5, "
                                  "window=7, guess=7)")

    @property
    def tree(self) -> LookaheadTree:
        return lookahead_tree(self.level, self.window, self.guess)

    @property
    def parents(self) -> tuple[int, ...]:
        return self.tree.parents

    def configured(self, num_draft: int, tree) -> "Jacobi":
        """The tree is fixed by level / window / guess; num_draft is unused."""
        if tree is not None and tuple(int(p) for p in tree) != self.parents:
            raise JaxgenError("the jacobi drafter's tree is fixed by level / window / guess "
                              f"({len(self.parents)} nodes); drop tree= or use token_recycling for a custom tree")
        return self

    def init(self, operands, cfg, prompt_BP, lengths_B, total_len: int):
        B = prompt_BP.shape[0]
        N, W, G = self.level, self.window, self.guess
        keys = jax.vmap(lambda b: jax.random.fold_in(jax.random.key(self.seed), b))(jnp.arange(B))
        window = jax.vmap(lambda p, n, k: initial_window(p, n, (W - 1 + (N - 2) * W,), k))(prompt_BP, lengths_B, keys)
        pool = jax.vmap(lambda _: empty_pool(cfg.vocab_size, G, N - 1))(jnp.arange(B))
        if self.pool_from_prompt:
            pool = jax.vmap(lambda pl, p, n: insert_text_ngrams(pl, p, 0, n - N + 1, N))(pool, prompt_BP, lengths_B)
        banned = jnp.int32(-1 if cfg.mask_id is None else cfg.mask_id)
        return JacobiState(pool, window[:, : W - 1], window[:, W - 1:].reshape(B, N - 2, W), jnp.zeros((B,), jnp.int32),
                           banned)

    def draft(self, operands, state, tokens_BT, end_B, key):
        B = tokens_BT.shape[0]
        tree = self.tree
        root_B = tokens_BT[jnp.arange(B), end_B - 1]
        guesses_BGM, _ = jax.vmap(pool_lookup)(state.pool, root_B)
        draft_BN = jnp.zeros((B, len(tree.parents)), jnp.int32)
        draft_BN = draft_BN.at[:, tree.guesses.ravel()].set(guesses_BGM.reshape(B, -1))
        draft_BN = draft_BN.at[:, tree.trunk].set(state.trunk)
        draft_BN = draft_BN.at[:, tree.levels.ravel()].set(state.levels.reshape(B, -1))
        return draft_BN, None, state

    def observe(self, operands, state, tokens_BT, end_B, chunk_BC, logits_BCV, path_BD, accepted_B):
        N, W = self.level, self.window
        tree = self.tree
        last_BWV = logits_BCV[:, tree.levels[-1] + 1]
        last_BWV = jnp.where(jnp.arange(last_BWV.shape[-1]) == state.banned, -jnp.inf, last_BWV)
        new_BW = jnp.argmax(last_BWV, axis=-1).astype(jnp.int32)
        level0_BW = chunk_BC[:, level0_columns(tree)]
        levels_BLW = chunk_BC[:, tree.levels + 1]
        keys_BW, grams_BWM = jax.vmap(column_ngrams)(level0_BW, levels_BLW, new_BW)
        ready_B = state.steps >= N - 2  # every level of the fed window came from the model

        def insert_columns(pool, keys_W, grams_WM, ready):
            return jax.lax.fori_loop(0, W, lambda j, pl: pool_insert(pl, keys_W[j], grams_WM[j], ready), pool)

        pool = jax.vmap(insert_columns)(state.pool, keys_BW, grams_BWM, ready_B)
        if self.pool_from_prompt:  # the N-grams that end at the newly committed tokens
            first_B = end_B - accepted_B - N  # the n-gram ending at the first new token starts here
            pool = jax.vmap(lambda pl, t, f, e: insert_text_ngrams(pl, t, f, e - N + 1, N))(pool, tokens_BT, first_B,
                                                                                            end_B)
        trunk_B, levels_B = jax.vmap(slide_window)(levels_BLW, new_BW)
        return JacobiState(pool, trunk_B, levels_B, state.steps + 1, state.banned)


def make(level: int = 5, window: int = 7, guess: int = 7, pool_from_prompt: bool = False, seed: int = 0) -> Jacobi:
    """The "jacobi" drafter: lookahead decoding with n-gram size `level` (N), a Jacobi window
    of `window` (W) columns and up to `guess` (G) n-grams verified per step: G(N-1) + (W-1) +
    (N-2)W nodes (55 by default; level=3, window=4, guess=4: 15, for small machines).
    `pool_from_prompt`: also pool the prompt's and the output's n-grams; `seed`: the window's
    initial copies from the prompt."""
    return Jacobi(level=level, window=window, guess=guess, pool_from_prompt=pool_from_prompt, seed=seed)

