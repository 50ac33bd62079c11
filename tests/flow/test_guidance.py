"""Classifier-free guidance: w = 0 is conditional, the (1 + w) v_c - w v_u mix inside the interval,
conditional only outside it, one batched call = two calls, and it runs inside a jitted solve."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.errors import JaxgenError
from jaxgen.flow import guidance, solve

NULL = 0
E = jax.random.normal(jax.random.key(1), (4, 3))  # class embeddings; class 0 is "no condition"


def cond_field(x, t, c):
    t = t if jnp.ndim(t) == 0 else t[:, None]
    return jnp.tanh(x + E[c]) * (1 + t) - x


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(0), (5, 3))


def test_guidance_formula_and_interval(x):
    c = jnp.array([1, 2, 3, 1, 2])
    vc, vu = cond_field(x, 0.5, c), cond_field(x, 0.5, jnp.zeros_like(c))
    for w, batched in ((0.0, True), (1.5, True), (-0.5, False)):
        g = guidance.guide(cond_field, c, NULL, w, (0.2, 0.8), batched=batched)
        np.testing.assert_allclose(np.asarray(g(x, 0.5)), np.asarray((1 + w) * vc - w * vu), atol=1e-6)
        np.testing.assert_allclose(np.asarray(g(x, 0.9)), np.asarray(cond_field(x, 0.9, c)), atol=1e-6)
    g = guidance.guide(cond_field, c, NULL, 2.0, (0.2, 0.8))
    np.testing.assert_allclose(np.asarray(g(x, 0.0)), np.asarray(cond_field(x, 0.0, c)), atol=1e-6)
    # vector t (one time per row): each row guided by its own t
    t = jnp.array([0.1, 0.5, 0.9, 0.3, 0.85])
    rows = jnp.stack([guidance.guide(cond_field, c[i:i + 1], NULL, 2.0, (0.2, 0.8))(x[i:i + 1], t[i])[0]
                      for i in range(5)])
    np.testing.assert_allclose(np.asarray(g(x, t)), np.asarray(rows), atol=1e-6)


def test_guided_solve_jits_with_traced_scale(x):
    c = jnp.array([1, 2, 3, 1, 2])
    run = jax.jit(lambda x, w: solve(guidance.guide(cond_field, c, NULL, w, (0.0, 0.5)), x, (0.0, 1.0), "midpoint",
                                     0.1))
    np.testing.assert_allclose(np.asarray(run(x, 0.0)),
                               np.asarray(solve(lambda x, t: cond_field(x, t, c), x, (0.0, 1.0), "midpoint", 0.1)),
                               atol=1e-5)
    assert float(jnp.abs(run(x, 3.0) - run(x, 0.0)).max()) > 1e-2
    with pytest.raises(JaxgenError, match="t_lo <= t_hi"):
        guidance.guide(cond_field, c, NULL, 1.0, (0.8, 0.2))
