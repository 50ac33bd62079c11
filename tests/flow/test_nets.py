"""The AdaLN velocity net: a fresh net is the zero field (its output projections start at zero,
as MAR's head), labels and condition vectors steer it once trained, and bad input is named."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.errors import ConfigError
from jaxgen.flow import nets


def test_fresh_net_is_zero_and_its_inputs_matter_after_a_step():
    spec = nets.NetSpec(dim=3, hidden=16, depth=2, time_dim=8, num_classes=2, cond_dim=4)
    params = jax.jit(nets.init, static_argnums=1)(jax.random.key(0), spec)  # one program, not op by op
    x, cond = jnp.ones((5, 3)), jnp.ones((5, 4))
    np.testing.assert_array_equal(nets.apply(params, spec, x, 0.3, None, cond), 0.0)
    target = jnp.asarray(np.random.RandomState(1).standard_normal((5, 3)), jnp.float32)
    loss = lambda p, label: jnp.mean((nets.apply(p, spec, x, jnp.linspace(0, 1, 5), label, cond) - target) ** 2)

    @jax.jit
    def sgd_step(params, label):
        return jax.tree.map(lambda p, g: p - 0.5 * g, params, jax.grad(loss)(params, label))

    for _ in range(3):
        params = sgd_step(params, jnp.array([0, 1, 0, 1, 2]))

    @jax.jit
    def outputs(params):  # per label 0, 1, 2 (the null label); no label (the null one), condition doubled
        by_label = [nets.apply(params, spec, x, 0.3, jnp.full((5,), label), cond) for label in range(3)]
        return by_label, nets.apply(params, spec, x, 0.3, None, 2 * cond)

    (out0, out1, out2), doubled = outputs(params)
    assert float(jnp.abs(out0 - out1).max()) > 0  # the label embedding is used
    assert float(jnp.abs(doubled - out2).max()) > 0
    assert nets.num_params(params) > 0


def test_bad_input_is_named():
    with pytest.raises(ConfigError, match="time_dim=7 must be even"):
        nets.NetSpec(dim=2, time_dim=7)
    spec = nets.NetSpec(dim=2, hidden=8, depth=1, time_dim=4)
    params = jax.jit(nets.init, static_argnums=1)(jax.random.key(0), spec)
    with pytest.raises(ConfigError, match="3 features but the net was built for dim=2"):
        nets.apply(params, spec, jnp.ones((1, 3)), 0.5)
    with pytest.raises(ConfigError, match="no label embedding"):
        nets.apply(params, spec, jnp.ones((1, 2)), 0.5, jnp.zeros(1, int))
    with pytest.raises(ConfigError, match="no condition vector"):
        nets.apply(params, spec, jnp.ones((1, 2)), 0.5, None, jnp.ones((1, 3)))
