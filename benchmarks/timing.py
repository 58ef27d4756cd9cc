"""Shared timing helper for the benchmark scripts."""
from __future__ import annotations

import statistics
import time

import jax


def time_fn(fn, args, repeats: int) -> dict:
    """First call (compilation) + 3 warm-up calls, then ``repeats`` timed calls, each ended by
    ``jax.block_until_ready``.  Returns dict(median_ms, min_ms, max_ms, n)."""
    jax.block_until_ready(fn(*args))
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "n": repeats}
