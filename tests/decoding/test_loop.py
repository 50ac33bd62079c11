"""The decode skeleton on a stub model: step order, forward counting, stopping, the step bound."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.decoding import loop


def counting_recipe(finish_at, after=None):
    """Row b writes token = step + 1 at column `step` and is done once it has written finish_at[b]
    tokens; the 'model' returns the step index as logits."""
    finish_at = jnp.asarray(finish_at)

    def forward(state):
        return jnp.full(state.tokens.shape[:1], state.step, jnp.float32), None, 1

    def update(state, proposal, commit, _):
        tokens = state.tokens.at[:, state.step].set(jnp.where(commit, proposal, state.tokens[:, state.step]))
        return state.replace(tokens=tokens, done=state.done | (state.step + 1 >= finish_at))

    return loop.Recipe(forward=forward, propose=lambda logits, s: logits.astype(jnp.int32) + 1,
                       rule=lambda proposal, s: ~s.done, update=update, after=after)


def test_rows_stop_independently_and_the_loop_ends_when_all_are_done():
    state = loop.run(counting_recipe([2, 5]), loop.new_state(jnp.zeros((2, 8), jnp.int32)), max_steps=8)
    np.testing.assert_array_equal(state.tokens, [[1, 2, 0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 0, 0, 0]])
    assert int(state.step) == 5 and int(state.nfe) == 5


def test_max_steps_bounds_the_loop_under_jit():
    run = jax.jit(lambda s: loop.run(counting_recipe([9, 9]), s, max_steps=3))
    state = run(loop.new_state(jnp.zeros((2, 8), jnp.int32), nfe=1))
    assert int(state.step) == 3 and int(state.nfe) == 4  # the initial forward (a prefill) counts too
    assert jax.tree.structure(state) == jax.tree.structure(loop.new_state(jnp.zeros((2, 8), jnp.int32), nfe=1))


def test_after_runs_between_steps_and_sees_the_updated_state():
    seen = lambda s: s.replace(carry=s.carry + s.tokens[:, s.step - 1])
    state = loop.run(counting_recipe([3, 3], after=seen),
                     loop.new_state(jnp.zeros((2, 4), jnp.int32), carry=jnp.zeros((2,), jnp.int32)), max_steps=4)
    np.testing.assert_array_equal(state.carry, [6, 6])  # 1 + 2 + 3


def test_sampler_output_passes_through_jit_unchanged():
    out = loop.SamplerOutput(tokens=jnp.arange(6).reshape(2, 3), nfe=jnp.int32(4))
    back = jax.jit(lambda o: o.replace(nfe=o.nfe + 1))(out)
    np.testing.assert_array_equal(back.tokens, out.tokens)
    assert int(back.nfe) == 5


def test_step_key_and_take_at():
    key = jax.random.key(3)
    assert (jax.random.key_data(loop.step_key(key, 1, 2)) ==
            jax.random.key_data(jax.random.fold_in(jax.random.fold_in(key, 1), 2))).all()
    x = jnp.arange(24).reshape(2, 3, 4)
    np.testing.assert_array_equal(loop.take_at(x, jnp.array([2, 0])), [x[0, 2], x[1, 0]])
