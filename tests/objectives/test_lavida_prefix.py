"""LaViDa from a plain-text corpus trains prefix-LM: each row gets a random prompt (never noised,
attending only to itself), equal to the loss of the same batch given that prompt mask."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import objectives
from jaxgen.errors import ConfigError
from jaxgen.objectives import masked_diffusion as md


def test_random_prompt_mask_is_a_prefix_within_the_fraction():
    mask = np.asarray(md.random_prompt_mask(jax.random.key(0), 64, 20, 0.5))
    n = mask.sum(1)
    assert n.min() >= 1 and n.max() <= 10 and len(set(n)) > 3
    np.testing.assert_array_equal(mask, np.arange(20)[None, :] < n[:, None])  # leading runs only


def test_lavida_plain_text_loss_equals_loss_with_the_drawn_prompt(tiny_cfg, tiny_params):
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 250)
    key = jax.random.key(2)
    options = objectives.build_options("lavida", {})
    lavida = objectives.get("lavida").bind(options)
    plain, _ = lavida(tiny_params, tiny_cfg, {"tokens": tokens}, key)
    drawn = md.random_prompt_mask(jax.random.fold_in(key, 1), 4, 16, options.max_prompt_fraction)
    given, _ = lavida(tiny_params, tiny_cfg, {"tokens": tokens, "prompt_mask": drawn}, key)
    full_attention, _ = md.loss(tiny_params, tiny_cfg, {"tokens": tokens}, key, complementary=True)
    np.testing.assert_allclose(plain, given, rtol=1e-6)
    assert not jnp.allclose(plain, full_attention)  # the prompt really changed the objective


def test_max_prompt_fraction_is_checked():
    with pytest.raises(ConfigError, match="max_prompt_fraction=1.5"):
        objectives.build_options("lavida", {"max_prompt_fraction": 1.5})
