"""The shared verification rules (`jaxgen.decoding.verify`) on synthetic distributions: greedy
tree walks against brute force, the tree walk over a chain against the chain rule draw for
draw, and the output distribution of one verify step against p (no model involved)."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.decoding import verify

TREE = (-1, -1, 0, 0, 1, 3, -1)  # three root children, depth 3


def test_tree_tables():
    t = verify.tree_tables(TREE)
    assert t.depth == 3 and list(t.depth_C) == [0, 1, 1, 2, 2, 2, 3, 1]
    assert t.path_CD[6].tolist() == [1, 4, 6] and t.path_CD[5].tolist() == [2, 5, -1]
    assert t.children_CK.tolist()[0] == [1, 2, 7] and t.children_CK.tolist()[1] == [3, 4, -1]


def brute_force_greedy(target, draft, parents):
    """The deepest node (lowest index on ties) whose every ancestor-or-self matches."""
    best, best_depth = 0, 0
    for i in range(len(parents)):
        node, ok, depth = i, True, 0
        while node >= 0:
            parent_row = parents[node] + 1
            ok &= draft[node] == target[parent_row]
            node, depth = parents[node], depth + 1
        if ok and depth > best_depth:
            best, best_depth = i + 1, depth
    return best, best_depth


def test_tree_greedy_is_the_deepest_matching_path():
    rng = np.random.RandomState(0)
    targets, drafts = rng.randint(0, 3, (300, len(TREE) + 1)), rng.randint(0, 3, (300, len(TREE)))
    paths, accepted, nexts = jax.jit(jax.vmap(lambda t, d: verify.tree_greedy(t, d, TREE)))(targets, drafts)
    for target, draft, path, a, nxt in zip(targets, drafts, np.asarray(paths), np.asarray(accepted), nexts):
        best, depth = brute_force_greedy(target, draft, TREE)
        assert int(a) == depth and int(nxt) == target[best]
        assert list(path) == list(verify.tree_tables(TREE).path_CD[best])


def test_tree_walk_over_a_chain_makes_the_chain_draws():
    N, V, S = 5, 6, 500
    chain = verify.chain(N)
    rng = np.random.RandomState(0)
    softmax = lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    p, q = softmax(2 * rng.randn(S, N + 1, V)), softmax(2 * rng.randn(S, N, V))
    draft = rng.randint(0, V, (S, N))
    both = lambda p, d, q, k: (verify.chain_sample(p, d, q, k), verify.tree_sample(p, d, q, k, chain))
    (a, nxt), (path, a_tree, nxt_tree) = jax.jit(jax.vmap(both))(p, draft, q, jax.random.split(jax.random.key(0), S))
    np.testing.assert_array_equal(a, a_tree)
    np.testing.assert_array_equal(nxt, nxt_tree)
    np.testing.assert_array_equal(path, jax.vmap(lambda x: verify.chain_path(x, N))(a))
    assert 0 < float(jnp.mean(a)) < N  # both outcomes occur


def first_token(path, a, nxt, draft):
    return jnp.where(a > 0, draft[jnp.maximum(path[0] - 1, 0)], nxt)


def test_one_step_of_a_tree_of_point_masses_emits_tokens_distributed_as_p():
    """The first two emitted tokens of one verify step of a deterministic drafter's tree (fixed
    node tokens, repeats among siblings), over many keys, against p (chains make the same draws:
    test above; trees with a drafter's q, on a model: tests/samplers/test_speculative.py)."""
    V = 4
    p_root = np.array([0.5, 0.3, 0.15, 0.05])
    p_next = np.array([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.25] * 4, [0.05, 0.05, 0.1, 0.8]])
    draft = jnp.asarray([1, 0, 1, 3, 0, 2, 1])  # root children 1, 0, 1 (a repeat); deeper: 3, 0, 2, 1

    def one(key):
        p_CV = jnp.concatenate([jnp.asarray(p_root)[None], jnp.asarray(p_next)[draft]])  # p after a node: by token
        path, a, nxt = verify.verify_draft(TREE, draft, p_CV, None, key, greedy=False)
        second = jnp.where(a > 1, draft[jnp.maximum(path[1] - 1, 0)], nxt)
        return first_token(path, a, nxt, draft), jnp.where(a > 0, second, -1)

    x1, x2 = map(np.asarray, jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(1), 60000)))
    np.testing.assert_allclose(np.bincount(x1, minlength=V) / len(x1), p_root, atol=0.01)
    from_step = x2 >= 0  # a second token out of the same step follows p(. | x1)
    for tok in range(V):
        rows = from_step & (x1 == tok)
        if rows.sum() > 3000:
            np.testing.assert_allclose(np.bincount(x2[rows], minlength=V) / rows.sum(), p_next[tok], atol=0.025)
    assert from_step.mean() > 0.3


def test_residual_falls_back_to_p_when_p_equals_q():
    p = jnp.array([0.25, 0.25, 0.5])
    np.testing.assert_allclose(verify.residual(p, p, 0), p)
    np.testing.assert_allclose(verify.residual(p, None, 2), [0.5, 0.5, 0.0])
    np.testing.assert_allclose(verify.residual(jnp.array([1.0, 0, 0]), None, 0), [1.0, 0, 0])


def test_chain_greedy():
    a, nxt = verify.chain_greedy(jnp.array([3, 4, 5, 6]), jnp.array([3, 4, 1]))
    assert (int(a), int(nxt)) == (2, 5)
    a, nxt = verify.chain_greedy(jnp.array([3, 4, 5, 6]), jnp.array([3, 4, 5]))
    assert (int(a), int(nxt)) == (3, 6)
    assert verify.chain(4) == (-1, 0, 1, 2) and verify.is_chain((-1, 0)) and not verify.is_chain((-1, -1))
