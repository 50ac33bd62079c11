"""Learn2PD (arXiv 2509.25188): the options of fitting a commit filter to a masked-diffusion run.

Not a language-model loss: `jaxgen train --objective learn2pd init_from=RUN` rolls out RUN's
decodes and fits the filter (`jaxgen.training.filter_fit`); `jaxgen.samplers.learn2pd` applies it.
"""
from __future__ import annotations

import dataclasses

from jaxgen.errors import ConfigError
from jaxgen.objectives.options import Options
from jaxgen.objectives.registry import FILTER, register


@dataclasses.dataclass(frozen=True)
class Learn2PDOptions(Options):
    filter_gen_length: int = 64  # answer tokens decoded per rollout; the prompt is the rest of seq_len
    filter_block_length: int = 16  # the decode block (and the filter's input width)
    filter_rollouts: int = 256  # reference decodes: 80% fit the filter, 10% early-stop it, 10% test it

    def __post_init__(self):
        super().__post_init__()
        gen, block = self.filter_gen_length, self.filter_block_length
        if gen <= 0 or block <= 0 or gen % block:
            raise ConfigError(f"filter_gen_length={gen} must be a positive multiple of filter_block_length={block}")
        if self.filter_rollouts < 3:
            raise ConfigError(f"filter_rollouts={self.filter_rollouts} must be >= 3 (fit, early-stopping and "
                              "test rollouts)")

    def check_train(self, tcfg) -> None:
        super().check_train(tcfg)
        if not tcfg.init_from:
            raise ConfigError("objective=learn2pd trains a filter for a masked-diffusion model: set "
                              "init_from=<its jaxgen train folder>")
        if self.filter_gen_length >= tcfg.seq_len:
            raise ConfigError(f"filter_gen_length={self.filter_gen_length} must be shorter than seq_len="
                              f"{tcfg.seq_len} (the rest of each corpus row is the prompt)")


register("learn2pd", None, Learn2PDOptions, trains=FILTER)
