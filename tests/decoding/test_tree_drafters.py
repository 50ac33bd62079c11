"""Tree drafters' data structures against hand-computed cases and independent re-statements of
the references' semantics: Token Recycling (Luowaterbi/TokenRecycling `inference_recycling.py`,
`tree_template_.py`) and lookahead decoding (hao-ai-lab/LookaheadDecoding `lade/decoding.py`,
`lade/models/modeling_llama.py::j_make_causal_mask_multilevel`)."""
import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import layouts
from jaxgen.decoding.drafters import jacobi, recycling
from jaxgen.errors import JaxgenError


# ---- Token Recycling ----

def test_default_template_has_the_papers_shape():
    paths = recycling.TEMPLATES["2.2.2"]
    assert len(paths) == 80
    per_depth = collections.Counter(len(p) for p in paths)
    assert [per_depth[d] for d in range(1, 7)] == [8, 21, 25, 15, 8, 3]
    parents, slots = recycling.paths_to_parents(paths)
    assert len(parents) == 80 and all(-1 <= p < i for i, p in enumerate(parents))
    assert recycling.parents_to_paths(parents) == paths  # slots are sibling ranks in this template
    assert slots == tuple(p[-1] for p in paths)
    assert len(recycling.make().parents) == 80


def test_paths_to_parents_by_hand():
    parents, slots = recycling.paths_to_parents([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    assert parents == (-1, -1, 0, 0, 1, 2)
    assert slots == (0, 1, 0, 1, 0, 0)
    with pytest.raises(JaxgenError, match="before its parent"):
        recycling.paths_to_parents([[0, 0], [0]])
    with pytest.raises(JaxgenError, match="repeats"):
        recycling.paths_to_parents([[0], [0]])


def test_trimmed_templates_are_prefix_closed_subsets():
    for depth, width, n in ((4, 2, 19), (3, 2, 13), (3, 3, 24), (None, 4, 56)):
        paths = recycling.template_paths("2.2.2", depth, width)
        assert len(paths) == n
        kept = set(paths)
        assert all(len(p) == 1 or p[:-1] in kept for p in paths)
        recycling.paths_to_parents(paths)
    assert len(recycling.make(max_width=2, max_depth=4).parents) == 19
    assert len(recycling.make(k=4).parents) == 56  # slots >= k cannot be drafted
    with pytest.raises(JaxgenError, match="unknown"):
        recycling.make(template="9.9")


def _reference_recycling_draft(paths, adj, root):
    """inference_recycling.py's prepare_data / prepare_data_input_ids: node i+1's father is
    template.index(path[:-1]) + 1 (0: the root), its token adj[father token, path[-1]]."""
    ids = [root]
    for path in paths:
        father = 0 if len(path) == 1 else paths.index(path[:-1]) + 1
        ids.append(int(adj[ids[father], path[-1]]))
    return ids[1:]


def test_bfs_draft_matches_the_reference_expansion():
    rng = np.random.default_rng(0)
    V, k = 50, 8
    adj = rng.integers(0, V, (V, k)).astype(np.int32)
    d = recycling.make()
    roots = np.array([3, 17, 42])
    bfs = jax.jit(recycling.bfs_draft, static_argnums=(2, 3))
    got = np.asarray(bfs(jnp.asarray(adj)[None], jnp.asarray(roots), d.parents, d.slots))
    paths = list(map(tuple, recycling.TEMPLATES["2.2.2"]))
    for b, root in enumerate(roots):
        assert got[b].tolist() == _reference_recycling_draft(paths, adj, root)
    per_row = np.stack([adj, np.roll(adj, 1, 0), np.roll(adj, 2, 0)])
    got = np.asarray(bfs(jnp.asarray(per_row), jnp.asarray(roots), d.parents, d.slots))
    for b, root in enumerate(roots):
        assert got[b].tolist() == _reference_recycling_draft(paths, per_row[b], root)


def test_bfs_draft_on_a_user_tree_not_sorted_by_depth():
    parents = (-1, 0, -1, 1, 0)  # depths 1, 2, 1, 3, 2; slots 0, 0, 1, 0, 1
    adj = jnp.asarray([[1, 2], [3, 4], [0, 1], [2, 2], [4, 0]], jnp.int32)
    d = recycling.make(k=2).configured(4, parents)
    assert d.parents == parents and d.slots == (0, 0, 1, 0, 1)
    got = jax.jit(recycling.bfs_draft, static_argnums=(2, 3))(adj[None], jnp.asarray([2]), d.parents, d.slots)
    # root 2 -> n0 = adj[2,0] = 0, n2 = adj[2,1] = 1; n1 = adj[0,0] = 1, n4 = adj[0,1] = 2; n3 = adj[1,0] = 3
    assert got.tolist() == [[0, 1, 1, 3, 2]]
    with pytest.raises(JaxgenError, match="k >= 3"):
        recycling.make(k=2).configured(4, (-1, -1, -1))


def test_top_k_ids_is_a_stable_descending_sort():
    logits = jnp.asarray([[0.5, 2.0, 2.0, -1.0, 3.0, 0.5]])
    assert recycling.top_k_ids(logits, 4).tolist() == [[4, 1, 2, 0]]
    x = np.random.default_rng(1).normal(size=(3, 5, 40)).astype(np.float32)
    want = np.argsort(-x, axis=-1, kind="stable")[..., :8]
    assert np.array_equal(np.asarray(recycling.top_k_ids(jnp.asarray(x), 8)), want)


def test_update_adjacency_last_occurrence_wins():
    adj = jnp.zeros((6, 2), jnp.int32)
    tokens = jnp.asarray([1, 3, 1, 5])
    cand = jnp.asarray([[9, 9], [3, 4], [7, 8], [1, 2]])
    got = recycling.update_adjacency(adj, tokens, cand)
    assert got.tolist() == [[0, 0], [7, 8], [0, 0], [3, 4], [0, 0], [1, 2]]


def _reference_recycling_update(adj, chunk, logits, k):
    """`adj_matrix[input_ids] = topk(logits, k)` with later rows overwriting earlier ones."""
    adj = adj.copy()
    for tok, row in zip(chunk, logits):
        adj[tok] = np.argsort(-row, kind="stable")[:k]
    return adj


@pytest.mark.parametrize("shared", [True, False])
def test_observe_then_draft_follows_the_reference(shared):
    rng = np.random.default_rng(2)
    V, B, k = 30, 2, 8
    d = recycling.make(max_width=3, max_depth=3, shared=shared)
    cfg = type("Cfg", (), {"vocab_size": V, "mask_id": V - 1})
    state = d.init(None, cfg, jnp.zeros((B, 4), jnp.int32), jnp.full((B,), 4), 16)
    assert state.adj.shape == ((1 if shared else B), V, k) and not np.asarray(state.adj).any()
    chunk = rng.integers(0, 6, (B, len(d.parents) + 1)).astype(np.int32)  # small ids: many repeats
    logits = rng.normal(size=(B, chunk.shape[1], V)).astype(np.float32)
    logits[..., V - 1] = 9.0  # the MASK token is never a candidate
    state = jax.jit(d.observe)(None, state, None, None, jnp.asarray(chunk), jnp.asarray(logits), None, None)
    logits[..., V - 1] = -np.inf
    adj = np.asarray(state.adj)
    if shared:
        want = _reference_recycling_update(np.zeros((V, k), np.int64), chunk.ravel(), logits.reshape(-1, V), k)
        assert np.array_equal(adj[0], want)
    else:
        for b in range(B):
            want = _reference_recycling_update(np.zeros((V, k), np.int64), chunk[b], logits[b], k)
            assert np.array_equal(adj[b], want)
    tokens = jnp.asarray([[0, 1, 2, 3, 0], [4, 5, 0, 0, 0]])
    draft, q, _ = jax.jit(d.draft)(None, state, tokens, jnp.asarray([4, 2]), None)
    assert q is None
    paths = list(recycling.template_paths("2.2.2", 3, 3))
    for b, root in enumerate([3, 5]):
        assert np.asarray(draft[b]).tolist() == _reference_recycling_draft(paths, adj[b % adj.shape[0]], root)


def test_recycling_drafter_is_hashable_and_static():
    d = recycling.make(max_width=2, max_depth=4)
    assert hash(d) == hash(recycling.make(max_width=2, max_depth=4))
    assert d.configured(4, None) is d
    assert {d: 1}[dataclasses.replace(d)] == 1


# ---- lookahead (jacobi) ----

def _lade_mask_and_positions(N, W, G):
    """Lade's step mask over [root, level 0 (W-1), levels 1..N-2 (W each), G guesses of N-1]
    (j_make_causal_mask_multilevel): block 0 = [root, level 0] is causal; level l column j sees
    block-0 columns 0..j and levels 1..l of column j; a guess token sees the root and its own
    n-gram up to itself. Positions relative to the root: block 0 column i: i; level l column j:
    l + j; guess token t: 1 + t."""
    rows = [("b0", i) for i in range(W)] + [(l, j) for l in range(1, N - 1) for j in range(W)]
    rows += [("g", g, t) for g in range(G) for t in range(N - 1)]
    index = {r: i for i, r in enumerate(rows)}
    mask = np.zeros((len(rows), len(rows)), bool)
    pos = np.zeros(len(rows), int)
    for r, i in index.items():
        if r[0] == "b0":
            mask[i, [index[("b0", c)] for c in range(r[1] + 1)]] = True
            pos[i] = r[1]
        elif r[0] == "g":
            mask[i, [index[("b0", 0)]] + [index[("g", r[1], t)] for t in range(r[2] + 1)]] = True
            pos[i] = 1 + r[2]
        else:
            l, j = r
            mask[i, [index[("b0", c)] for c in range(j + 1)] + [index[(m, j)] for m in range(1, l + 1)]] = True
            pos[i] = l + j
    return rows, index, mask, pos


@pytest.mark.parametrize("N,W,G", [(4, 5, 2), (5, 7, 7), (3, 4, 4), (3, 1, 1)])
def test_lookahead_tree_is_lades_mask(N, W, G):
    tree = jacobi.lookahead_tree(N, W, G)
    n = G * (N - 1) + (W - 1) + (N - 2) * W
    assert len(tree.parents) == n
    rows, index, lade_mask, lade_pos = _lade_mask_and_positions(N, W, G)
    ours = [None] * (n + 1)  # chunk column -> lade row
    ours[0] = index[("b0", 0)]
    for g in range(G):
        for t in range(N - 1):
            ours[tree.guesses[g, t] + 1] = index[("g", g, t)]
    for i in range(1, W):
        ours[tree.trunk[i - 1] + 1] = index[("b0", i)]
    for l in range(1, N - 1):
        for j in range(W):
            ours[tree.levels[l - 1, j] + 1] = index[(l, j)]
    chunk_parents = (-1,) + tuple(p + 1 for p in tree.parents)  # the root as node 0
    ours_mask = layouts.ancestors(chunk_parents)
    assert np.array_equal(ours_mask, lade_mask[np.ix_(ours, ours)])
    depth = np.concatenate([[0], recycling.depths(tree.parents)])
    assert np.array_equal(depth, lade_pos[ours])


class _LadePool:
    """lade's update_token_map / append_new_generated_pool with GUESS_SET_SIZE = G (LRU lists)."""

    def __init__(self, G):
        self.G, self.map = G, {}

    def add(self, key, tup):
        lst = self.map.setdefault(key, [])
        if tup in lst:
            lst.remove(tup)
            lst.append(tup)
        elif len(lst) < self.G:
            lst.append(tup)
        else:
            self.map[key] = lst[1:] + [tup]

    def lru_order(self, key):
        return self.map.get(key, [])


def _pool_lru_order(pool, key):
    """Our pool's n-grams under key, least recently used first."""
    grams, count, stamps = (np.asarray(a[key]) for a in (pool.ngrams, pool.count, pool.stamp))
    return [tuple(grams[s].tolist()) for s in np.argsort(stamps, kind="stable") if s < count]


def test_pool_insert_is_lades_lru_by_hand():
    pool = jacobi.empty_pool(8, 2, 2)
    for key, gram in ((1, (2, 3)), (1, (4, 5)), (1, (2, 3)), (1, (6, 7)), (2, (1, 1))):
        pool = jacobi.pool_insert(pool, key, jnp.asarray(gram))
    assert _pool_lru_order(pool, 1) == [(2, 3), (6, 7)]  # (4, 5) was the least recently used
    assert _pool_lru_order(pool, 2) == [(1, 1)]
    assert _pool_lru_order(pool, 3) == []
    pool = jacobi.pool_insert(pool, 2, jnp.asarray([5, 5]), False)
    assert _pool_lru_order(pool, 2) == [(1, 1)]


def test_pool_insert_matches_lade_on_random_streams():
    rng = np.random.default_rng(3)
    G, M, V = 3, 2, 5
    ref, pool = _LadePool(G), jacobi.empty_pool(V, G, M)
    insert = jax.jit(jacobi.pool_insert)
    for _ in range(120):
        key, gram = int(rng.integers(0, V)), tuple(int(x) for x in rng.integers(0, 3, M))
        ref.add(key, gram)
        pool = insert(pool, key, jnp.asarray(gram))
    for key in range(V):
        assert _pool_lru_order(pool, key) == ref.lru_order(key)


def _lade_step(past, lst_token, new, N, W, pool):
    """lade's greedy step bookkeeping once the window is filled (ALWAYS_FWD_ONE = 1)."""
    pool.add(lst_token, tuple(past[l][0] for l in range(1, N - 1)) + (new[0],))
    for i in range(1, W):
        pool.add(past[0][i - 1], tuple(past[l][i] for l in range(1, N - 1)) + (new[i],))
    nxt = [past[1][1:]] + [past[l + 1][:] for l in range(1, N - 2)] + [list(new)]
    return nxt


def test_jacobi_steps_follow_lade(N=4, W=5, G=2):
    """Several observe steps with chosen Jacobi outputs: the pool and the window as lade's."""
    rng = np.random.default_rng(4)
    V, B = 12, 1
    d = jacobi.make(level=N, window=W, guess=G)
    cfg = type("Cfg", (), {"vocab_size": V, "mask_id": None})
    prompt = jnp.asarray(rng.integers(0, V, (B, 9)), jnp.int32)
    state = jax.jit(d.init, static_argnums=(1, 4))(None, cfg, prompt, jnp.asarray([9]), 40)
    state = state.replace(steps=jnp.full((B,), N - 2, jnp.int32))  # past lade's warm-up
    past = [np.asarray(state.trunk[0]).tolist()] + [np.asarray(state.levels[0, l]).tolist() for l in range(N - 2)]
    ref = _LadePool(G)
    tokens = np.zeros((B, 40), np.int32)
    tokens[:, :9] = np.asarray(prompt)
    end = 9
    tree = d.tree
    draft_fn, observe_fn = jax.jit(d.draft), jax.jit(d.observe)
    for _ in range(6):
        root = int(rng.integers(0, 4))  # small ids: keys repeat, guesses come from the pool
        tokens[0, end] = root
        end += 1
        draft, q, state = draft_fn(None, state, jnp.asarray(tokens), jnp.asarray([end]), None)
        assert q is None
        draft = np.asarray(draft[0])
        assert draft[tree.trunk].tolist() == past[0]
        assert [draft[tree.levels[l]].tolist() for l in range(N - 2)] == past[1:]
        want_guesses = ref.lru_order(root)  # the pool fills slots 0, 1, ...: the first len(want) are valid
        assert sorted(map(tuple, draft[tree.guesses][:len(want_guesses)].tolist())) == sorted(want_guesses)
        chunk = np.concatenate([[root], draft])[None]
        new = rng.integers(0, 4, W)
        logits = np.zeros((B, chunk.shape[1], V), np.float32)
        logits[0, tree.levels[-1] + 1, new] = 1.0
        state = observe_fn(None, state, jnp.asarray(tokens), jnp.asarray([end]), jnp.asarray(chunk),
                           jnp.asarray(logits), None, jnp.zeros((B,), jnp.int32))
        past = _lade_step(past, root, new.tolist(), N, W, ref)
    for key in range(V):
        assert _pool_lru_order(jax.tree.map(lambda a: a[0], state.pool), key) == ref.lru_order(key)


def test_jacobi_warm_up_pools_nothing_and_prompt_pool():
    d = jacobi.make(level=3, window=2, guess=2, pool_from_prompt=True)
    cfg = type("Cfg", (), {"vocab_size": 10, "mask_id": 9})
    prompt = jnp.asarray([[1, 2, 3, 1, 2, 4, 0, 0]])
    state = jax.jit(d.init, static_argnums=(1, 4))(None, cfg, prompt, jnp.asarray([6]), 20)
    pool = jax.tree.map(lambda a: a[0], state.pool)
    assert _pool_lru_order(pool, 1) == [(2, 3), (2, 4)]
    assert _pool_lru_order(pool, 2) == [(3, 1)]  # (2, 4, 0) runs past the prompt length
    assert _pool_lru_order(pool, 3) == [(1, 2)]
    assert int(pool.clock) == 4
    # N = 4: the first N - 2 = 2 steps pool nothing (their window holds prompt copies)
    plain = jacobi.make(level=4, window=2, guess=1)
    st = jax.jit(plain.init, static_argnums=(1, 4))(None, cfg, prompt, jnp.asarray([6]), 20)
    tokens = jnp.zeros((1, 20), jnp.int32).at[0, :6].set(prompt[0, :6])
    draft, _, st = jax.jit(plain.draft)(None, st, tokens, jnp.asarray([6]), None)
    chunk = jnp.concatenate([tokens[:, 5:6], draft], axis=1)
    logits = jnp.zeros((1, chunk.shape[1], 10))
    observe = jax.jit(plain.observe)
    st2 = observe(None, st, tokens, jnp.asarray([6]), chunk, logits, None, jnp.zeros((1,), jnp.int32))
    assert int(st2.pool.clock[0]) == 0 and int(st2.steps[0]) == 1  # warm-up: N - 2 = 2 steps
    st3 = observe(None, st2, tokens, jnp.asarray([6]), chunk, logits, None, jnp.zeros((1,), jnp.int32))
    st4 = observe(None, st3, tokens, jnp.asarray([6]), chunk, logits, None, jnp.zeros((1,), jnp.int32))
    assert int(st3.pool.clock[0]) == 0 and int(st4.pool.clock[0]) == 2


def test_jacobi_options_are_checked():
    with pytest.raises(JaxgenError, match="level"):
        jacobi.make(level=2)
    d = jacobi.make(level=3, window=4, guess=4)
    assert len(d.parents) == 15 and d.configured(4, None) is d
    assert d.configured(7, d.parents) is d
    with pytest.raises(JaxgenError, match="fixed"):
        d.configured(4, (-1, 0))
    assert len(jacobi.make().parents) == 55
