"""Training objectives: `loss(params, cfg, batch, key, **options) -> (loss, metrics)`.

batch: {"tokens": [B, L] int32, optional "loss_mask": [B, L] (1 = real token),
optional "prompt_mask": [B, L] (SFT: True on the prompt, which is never noised)}.

Each objective module registers itself (`registry.register(name, loss, Options)`) with a frozen
dataclass of its knobs; `settings` puts those knobs in a TrainConfig (`configure`,
`apply_overrides`) and binds them to the loss (`loss_for`). `cfg` is the model description of
the objective's family (`jaxgen.training.families`): a ModelConfig for the language-model
objectives, a velocity net's NetSpec for `flow` (continuous data, batch {"x", "label"}).
"""
from __future__ import annotations

from jaxgen.objectives import ar, block_diffusion, flow, learn2pd, masked_diffusion, nbdiff, tidar, wedlm  # noqa: F401
from jaxgen.objectives.options import Options  # noqa: F401
from jaxgen.objectives.registry import get, names, register  # noqa: F401
from jaxgen.objectives.settings import (apply_overrides, build_options, check_options_read, configure,  # noqa: F401
                                        loss_for, options_of, overrides_for, split_overrides)
