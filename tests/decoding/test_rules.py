"""Commit rules and schedules alone, on stub confidences, against their definitions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.decoding import rules
from jaxgen.decoding.schedules import num_transfer_tokens

CONF = jnp.asarray([[0.95, 0.20, 0.91, 0.50, 0.99, 0.10],
                    [0.30, 0.30, 0.40, 0.05, 0.60, 0.70]])
CAND = jnp.asarray([[True, True, True, True, False, True],
                    [True, True, False, True, True, False]])


def mask(rows):
    out = np.zeros(CONF.shape, bool)
    for r, cols in enumerate(rows):
        out[r, list(cols)] = True
    return out


def test_scheduled_takes_the_k_most_confident_candidates_ties_to_the_left():
    np.testing.assert_array_equal(rules.scheduled(CONF, CAND, 2), mask([{0, 2}, {4, 0}]))
    np.testing.assert_array_equal(rules.scheduled(CONF, CAND, jnp.asarray([1, 3])), mask([{0}, {4, 0, 1}]))


def test_best_plus_above_is_best_and_every_candidate_over_the_threshold():
    np.testing.assert_array_equal(rules.best_plus_above(CONF, CAND, 0.9), mask([{0, 2}, {4}]))
    np.testing.assert_array_equal(rules.best_plus_above(CONF, CAND, 0.95, inclusive=False), mask([{0}, {4}]))
    np.testing.assert_array_equal(rules.best_plus_above(CONF, CAND, 0.95), mask([{0}, {4}]))
    none = jnp.zeros_like(CAND)
    assert not np.asarray(rules.best_plus_above(CONF, none, 0.0)).any()


def test_factor_rule_stops_at_the_first_rank_below_its_floor():
    """Sorted candidates of row 0: .95 .91 .5 .2 .1; the n-th (from 1) must reach 1 - f/(n+1), the
    first always passes. f=0.3: .91 >= .9, .5 < .925 -> commit 2; f=0.2: .91 < .933 -> 1.
    Row 1: .6 .3 .3 .05; .3 < .9 -> 1."""
    np.testing.assert_array_equal(rules.factor(CONF, CAND, 0.3), mask([{0, 2}, {4}]))
    np.testing.assert_array_equal(rules.factor(CONF, CAND, 0.2), mask([{0}, {4}]))
    # when only the last candidate fails, all are committed (the reference's quirk)
    two = jnp.asarray([[0.9, 0.1]])
    np.testing.assert_array_equal(rules.factor(two, jnp.ones((1, 2), bool), 0.2), [[True, True]])


def test_dynamic_uses_the_threshold_only_with_enough_candidates_above_it():
    np.testing.assert_array_equal(rules.dynamic(CONF, CAND, 2, 0.9), mask([{0, 2}, {4, 0}]))
    np.testing.assert_array_equal(rules.dynamic(CONF, CAND, 1, 0.25), mask([{0, 2, 3}, {0, 1, 4}]))


def test_sequential_first_hitting_and_ddpm():
    np.testing.assert_array_equal(rules.sequential(CAND, 2), mask([{0, 1}, {0, 1}]))
    hits = np.stack([np.asarray(rules.first_hitting(CAND, jax.random.key(i))) for i in range(200)])
    assert (hits.sum(-1) == 1).all() and not (hits & ~np.asarray(CAND)).any()
    assert (hits.sum(0) > 0).sum() == int(CAND.sum())  # every candidate gets hit sometimes
    assert np.asarray(rules.ddpm(CAND, jax.random.key(0), 3, 4)).tolist() == np.asarray(CAND).tolist()  # last step
    early = np.stack([np.asarray(rules.ddpm(CAND, jax.random.key(i), 0, 4)) for i in range(400)])
    np.testing.assert_allclose(early.sum(0)[np.asarray(CAND)] / 400, 0.25, atol=0.08)  # (t - s) / t = 1/4


@pytest.mark.parametrize("n,steps,expected", [(8, 4, [2, 2, 2, 2]), (10, 4, [3, 3, 2, 2]), (3, 3, [1, 1, 1])])
def test_num_transfer_tokens(n, steps, expected):
    assert num_transfer_tokens(n, steps).tolist() == expected
