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
