"""Decode loops. Each module's `generate(params, cfg, prompt, key, ...)` is jitted end to end and
returns a `SamplerOutput` with `.tokens` [B, P + N] and `.nfe`."""
from jaxgen.samplers import ar, block_diffusion, masked_diffusion, speculative  # noqa: F401
from jaxgen.decoding.loop import SamplerOutput  # noqa: F401
