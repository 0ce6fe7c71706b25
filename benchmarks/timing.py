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


def interleaved_medians(fns: dict, repeats: int, warmup: bool = True) -> dict:
    """Median wall time of each ``fns[name]()``, the variants run interleaved (A B A B ...).

    On a shared machine the load drifts; interleaving exposes every variant to the same
    drift, so the ratios of the medians are fairer than those of back-to-back series.
    Returns ``{name: {"median_s": ..., "times_s": [...]}}``; ``warmup`` runs each once
    first, untimed (leave it off for ahead-of-time compiled functions)."""
    if warmup:
        for fn in fns.values():
            jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t)
    return {name: {"median_s": float(np.median(ts)), "times_s": [round(t, 4) for t in ts]}
            for name, ts in times.items()}
