"""Token proposals against independent NumPy definitions (sorting, cumsum)."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.decoding.propose import filter_top_k_top_p, margin, neg_entropy, nucleus_keep, order_keys, top_two


def sorted_cumsum_filter(logits, top_k, top_p, inclusive=False):
    """HF's definition, float64: sort, keep the top k, then the sorted entries whose preceding
    mass is < top_p (<= with `inclusive`), plus every tie of the smallest entry kept."""
    keep = np.zeros(logits.shape, bool)
    for r, row in enumerate(np.asarray(logits, np.float64)):
        order = np.argsort(-row, kind="stable")
        k = min(top_k, len(row)) if top_k > 0 else len(row)
        kth = row[order[k - 1]]
        kept = np.where(row >= kth, row, -np.inf)
        probs = np.exp(kept[order] - kept[order[0]])
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        inside = before <= top_p if inclusive else before < top_p
        cutoff = row[order][inside].min() if top_p < 1 else kth
        keep[r] = (row >= kth) & (row >= cutoff)
    return keep


def test_top_k_top_p_filters_match_the_sorting_definition():
    rng = np.random.RandomState(0)
    logits = (rng.randn(6, 300) * np.array([0.3, 1, 3, 8, 1, 1])[:, None]).astype(np.float32)
    logits[4, rng.choice(300, 40, replace=False)] = logits[4].max()  # a tie group at the top
    logits[5, :50] = -np.inf  # forbidden entries (the mask token)
    logits[5, 50:60] = 2.5  # ties in the middle
    for top_k, top_p in [(0, 0.9), (0, 0.5), (5, 1.0), (7, 0.6), (0, 1e-6), (400, 0.99)]:
        ours = np.isfinite(np.asarray(filter_top_k_top_p(jnp.asarray(logits), jnp.int32(top_k), jnp.float32(top_p))))
        np.testing.assert_array_equal(ours, sorted_cumsum_filter(logits, top_k, top_p), err_msg=f"{top_k} {top_p}")
    for top_p in (0.9, 0.5, 1e-6):
        ours = np.asarray(nucleus_keep(jnp.asarray(logits), top_p, inclusive=True))
        np.testing.assert_array_equal(ours, sorted_cumsum_filter(logits, 0, top_p, inclusive=True))


def test_top_two_counts_ties_twice():
    x = jnp.asarray([[0.1, 0.5, 0.2, 0.5], [0.7, 0.1, 0.2, 0.0], [-jnp.inf, 1.0, -jnp.inf, -jnp.inf]])
    first, second = top_two(x)
    np.testing.assert_array_equal(first, np.float32([0.5, 0.7, 1.0]))
    np.testing.assert_array_equal(second, np.float32([0.5, 0.2, -np.inf]))


def test_order_keys_order_like_floats_with_signed_zero_equal():
    x = np.float32([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf])
    keys = np.asarray(order_keys(jnp.asarray(x)))
    assert (np.diff(keys[[0, 1, 2, 3, 5, 6, 7]]) > 0).all() and keys[3] == keys[4]


def test_margin_and_entropy_scores():
    probs = jnp.asarray([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    np.testing.assert_allclose(margin(probs), [0.5, 0.0], atol=1e-7)
    expected = [np.sum(p * np.log(p + 1e-10)) for p in np.asarray(probs)]
    np.testing.assert_allclose(neg_entropy(probs), expected, rtol=1e-6)
