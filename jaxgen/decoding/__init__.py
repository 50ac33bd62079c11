"""The machinery every sampler shares: the decode loop (`loop`), token proposals (`propose`),
commit rules (`rules`), schedules, logits processors and argument checks."""
from jaxgen.decoding import checks, loop, processors, propose, rules, schedules  # noqa: F401
from jaxgen.decoding.loop import DecodeState, Recipe, SamplerOutput, run  # noqa: F401
