"""How many tokens each denoising step commits."""
from __future__ import annotations

import numpy as np


def num_transfer_tokens(n: int, steps: int) -> np.ndarray:
    """LLaDA/SDAR schedule: n tokens over `steps`, base n//steps, the first n%steps get one more."""
    counts = np.full((steps,), n // steps, np.int32)
    counts[: n % steps] += 1
    return counts
