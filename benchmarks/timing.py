"""Shared timing helper of the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import time

import jax
import numpy as np


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one untimed warm-up call;
    each call is waited for with ``jax.block_until_ready``."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))
