"""With `attention_impl="pallas"` (interpret mode on CPU) the samplers' greedy tokens equal the
XLA reference's: AR (decode over a per-row cache), LLaDA with the dual cache, SDAR dynamic and
TiDAR (the verify_draft chunk)."""
import dataclasses

import jax
import numpy as np
import pytest

from jaxgen.samplers import ar, block_diffusion, masked_diffusion, tidar

PROMPT = np.array([[256, 10, 20, 30, 40, 50], [256, 60, 70, 80, 90, 100]], np.int32)
RUNS = {
    "ar": lambda p, c: ar.generate(p, c, PROMPT, jax.random.key(0), gen_length=6),
    "llada_dual": lambda p, c: masked_diffusion.generate(p, c, PROMPT, jax.random.key(0), gen_length=8, steps=8,
                                                         block_length=4, cache="dual", threshold=0.5),
    "sdar_dynamic": lambda p, c: block_diffusion.generate(p, c, PROMPT, jax.random.key(0), gen_length=8,
                                                          block_length=4, denoising_steps=4, threshold=0.5),
    "tidar": lambda p, c: tidar.generate(p, c, PROMPT, jax.random.key(0), gen_length=8, draft_length=3),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_pallas_attention_gives_the_reference_tokens(name, tiny_cfg, tiny_params):
    xla = RUNS[name](tiny_params, dataclasses.replace(tiny_cfg, attention_impl="xla"))
    pallas = RUNS[name](tiny_params, dataclasses.replace(tiny_cfg, attention_impl="pallas"))
    np.testing.assert_array_equal(pallas.tokens, xla.tokens)
    assert int(pallas.nfe) == int(xla.nfe)


def test_pallas_attention_gives_the_reference_training_gradients(tiny_cfg, tiny_params):
    """A block-diffusion loss (dual_stream layout, scanned layers) differentiates through the
    Pallas forward and backward kernels to the reference's gradients."""
    from jaxgen import objectives
    batch = {"tokens": np.random.RandomState(1).randint(0, 250, (2, 16)).astype(np.int32)}  # no compile
    loss = objectives.get("block_diffusion").bind(objectives.build_options("block_diffusion", {"block_size": 4}))
    grad = lambda impl: jax.grad(lambda p: loss(p, dataclasses.replace(tiny_cfg, attention_impl=impl), batch,
                                                jax.random.key(2))[0])(tiny_params)
    for got, want in zip(jax.tree.leaves(grad("pallas")), jax.tree.leaves(grad("xla"))):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
