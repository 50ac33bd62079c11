"""The machinery every sampler shares: the decode loop (`loop`), token proposals (`propose`),
commit rules (`rules`), draft verification (`verify`) and drafters (`drafters`, speculative
decoding), schedules, logits processors and argument checks.

Naming across samplers (one scheme; the references' own names are kept where their values are
the reference's vocabulary):

- `gen_length`: tokens generated after the prompt, in every sampler (`ar.generate` also takes
  `max_new_tokens=`, Hugging Face's name and the README's, as an alias: passing both is an
  error; the registry leaves aliases out of the options, so the CLI has one `--gen-length`);
- `block_length`: the decode block; `steps`: total denoising forwards over all blocks
  (LLaDA, Dream, LaViDa); `denoising_steps`: forwards per block (SDAR's name);
- `remasking`: which positions a step commits (LLaDA, SDAR, LaViDa values); `alg`: Dream's and
  NBDiff's own option of the same role, with their values;
- `threshold`, `factor`, `temperature`, `top_k`, `top_p`, `mask_id`, `eos_id`, and
  `prompt_lengths` ([B] ints for a right-padded ragged prompt).

An option that does not apply to the mode a call chooses is refused (`checks.check_not_given`),
never dropped; options that only some modes read default to None ("the documented default") so
that an explicit value can be told apart.
"""
from jaxgen.decoding import checks, dkv, drafters, loop, processors, propose, rules, schedules, verify  # noqa: F401
from jaxgen.decoding.loop import DecodeState, Recipe, SamplerOutput, run  # noqa: F401
