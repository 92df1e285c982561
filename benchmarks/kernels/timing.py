"""The one timing rule of the kernel checks: median wall milliseconds of ``fn(*args)`` after warm-up calls,
each call waited for (``jax.block_until_ready``)."""

from __future__ import annotations

import statistics
import time

import jax


def median_ms(fn, args, warmup: int = 3, repeats: int = 30) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
