"""Ragged batches: each row of a right-padded batch decodes as it would alone (greedy)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.samplers import ar, block_diffusion, masked_diffusion

LENGTHS = (5, 8, 3)
GEN = 8


def ragged_prompt(cfg):
    """[3, 8] right-padded prompts (padding: the pad id) and their lengths."""
    raw = np.array(jax.random.randint(jax.random.key(7), (len(LENGTHS), max(LENGTHS)), 0, 256))
    for row, n in enumerate(LENGTHS):
        raw[row, n:] = cfg.pad_id
    return jnp.asarray(raw, jnp.int32), np.asarray(LENGTHS)


def assert_rows_as_alone(decode, prompt, lengths):
    batched = np.asarray(decode(prompt, lengths).tokens)
    for row, n in enumerate(lengths):
        alone = np.asarray(decode(prompt[row:row + 1, :n], None).tokens[0])
        np.testing.assert_array_equal(batched[row, : n + GEN], alone, err_msg=f"row {row} (prompt length {n})")
    return batched


def test_ar_ragged_rows_equal_rows_alone(tiny_cfg, tiny_params):
    prompt, lengths = ragged_prompt(tiny_cfg)
    decode = lambda p, n: ar.generate(tiny_params, tiny_cfg, p, jax.random.key(0), max_new_tokens=GEN,
                                      prompt_lengths=n)
    batched = assert_rows_as_alone(decode, prompt, lengths)
    assert (batched[2, 3 + GEN:] == tiny_cfg.pad_id).all()  # after a short row's output: padding


@pytest.mark.parametrize("remasking,fuse", [("low_confidence_dynamic", False), ("low_confidence_static", True)])
def test_block_diffusion_ragged_rows_equal_rows_alone(remasking, fuse, tiny_cfg, tiny_params):
    prompt, lengths = ragged_prompt(tiny_cfg)
    decode = lambda p, n: block_diffusion.generate(
        tiny_params, tiny_cfg, p, jax.random.key(0), gen_length=GEN, block_length=4, denoising_steps=4,
        remasking=remasking, threshold=0.3 if remasking == "low_confidence_dynamic" else None, fuse_block_write=fuse,
        prompt_lengths=n)
    assert_rows_as_alone(decode, prompt, lengths)


@pytest.mark.parametrize("cache,rule", [(None, {}), ("dual", {"threshold": 0.3})])
def test_masked_diffusion_ragged_rows_equal_rows_alone(cache, rule, tiny_cfg, tiny_params):
    prompt, lengths = ragged_prompt(tiny_cfg)
    decode = lambda p, n: masked_diffusion.generate(
        tiny_params, tiny_cfg, p, jax.random.key(0), gen_length=GEN, steps=4, block_length=4, cache=cache,
        prompt_lengths=n, **rule)
    batched = assert_rows_as_alone(decode, prompt, lengths)
    assert (batched[2, 3 + GEN:] == tiny_cfg.mask_id).all()


def test_masked_diffusion_ragged_needs_a_cache_without_a_static_window(tiny_cfg, tiny_params):
    prompt, lengths = ragged_prompt(tiny_cfg)
    with pytest.raises(ValueError, match="cache=None or 'dual'"):
        masked_diffusion.generate(tiny_params, tiny_cfg, prompt, jax.random.key(0), gen_length=GEN, steps=4,
                                  block_length=4, cache="prefix", prompt_lengths=lengths)


@pytest.mark.parametrize("bad,match", [([3, 4], "3 integers"), ([0, 2, 2], "holds 0"), ([2, 9, 2], "holds 9"),
                                       ([1.5, 2, 2], "integers")])
def test_bad_prompt_lengths_are_refused(bad, match, tiny_cfg, tiny_params):
    prompt = jnp.zeros((3, 8), jnp.int32)
    for call in (lambda: ar.generate(tiny_params, tiny_cfg, prompt, jax.random.key(0), 4, prompt_lengths=bad),
                 lambda: block_diffusion.generate(tiny_params, tiny_cfg, prompt, jax.random.key(0), gen_length=4,
                                                  prompt_lengths=bad)):
        with pytest.raises(ValueError, match=match):
            call()
