"""Timing helpers: alternate the contenders, report medians and compile time separately."""
from __future__ import annotations

import statistics
import time

import jax
import numpy as np


def block(x):
    return jax.block_until_ready(x)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def alternate(contenders: dict, repeats: int) -> dict[str, list[float]]:
    """Run each contender once per round, `repeats` rounds, so drift hits all of them alike."""
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(timed(fn)[1])
    return times


def median(xs) -> float:
    return float(statistics.median(xs))


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Measured XLA float32 matmul throughput on the default device (GFLOP/s, median)."""
    a = jax.random.normal(jax.random.key(0), (n, n), np.float32)
    f = jax.jit(lambda x: x @ x)
    block(f(a))
    times = [timed(lambda: block(f(a)))[1] for _ in range(repeats)]
    return 2 * n ** 3 / median(times) / 1e9
