"""What the variants share: a hashable velocity of a net spec (so `solve` reuses its compiled
program across calls: params travel as traced `args`) and uniform time grids."""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxgen.errors import ConfigError
from jaxgen.flow import nets


@dataclasses.dataclass(frozen=True)
class NetVelocity:
    """velocity(x, t, params[, cond]) = nets.apply(params, net, x, t, cond_BC=cond)."""

    net: nets.NetSpec

    def __call__(self, x, t, params, cond_BC=None):
        return nets.apply(params, self.net, x, t, cond_BC=cond_BC)


def uniform_grid(steps: int, start: float = 0.0, end: float = 1.0) -> np.ndarray:
    """float32 [steps + 1] uniform grid from start to end (both exact)."""
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"steps={steps!r} must be an integer >= 1 (solver steps)")
    g = np.linspace(start, end, steps + 1).astype(np.float32)
    g[0], g[-1] = np.float32(start), np.float32(end)
    return g
