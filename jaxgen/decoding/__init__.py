"""The machinery every sampler shares: the decode loop (`loop`), token proposals (`propose`),
commit rules (`rules`), schedules, logits processors and argument checks.

Naming across samplers (one scheme; the references' own names are kept where their values are
the reference's vocabulary):

- `gen_length`: tokens generated after the prompt (`ar.generate` keeps `max_new_tokens`,
  Hugging Face's name and the README's);
- `block_length`: the decode block; `steps`: total denoising forwards over all blocks
  (LLaDA, Dream, LaViDa); `denoising_steps`: forwards per block (SDAR's name);
- `remasking`: which positions a step commits (LLaDA, SDAR, LaViDa values); `alg`: Dream's and
  NBDiff's own option of the same role, with their values;
- `threshold`, `factor`, `temperature`, `top_k`, `top_p`, `mask_id`, `eos_id`, and
  `prompt_lengths` ([B] ints for a right-padded ragged prompt).
"""
from jaxgen.decoding import checks, dkv, loop, processors, propose, rules, schedules  # noqa: F401
from jaxgen.decoding.loop import DecodeState, Recipe, SamplerOutput, run  # noqa: F401
