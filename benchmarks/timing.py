"""Shared helpers of the benchmark scripts: timing, and the JSON results file."""
from __future__ import annotations

import json
import statistics
import time

import jax


def _warm_up(fn, args) -> None:
    """The first call (compilation) and 3 warm-up calls, each waited for."""
    for _ in range(4):
        jax.block_until_ready(fn(*args))


def time_fn(fn, args, repeats: int) -> dict:
    """First call (compilation) + 3 warm-up calls, then ``repeats`` timed calls, each ended by
    ``jax.block_until_ready``.  Returns dict(median_ms, min_ms, max_ms, n)."""
    _warm_up(fn, args)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "n": repeats}


def time_queued(fn, args, rounds: int = 10, calls: int = 10) -> dict:
    """Per-call time with the calls queued back to back: after a compile call and 3 warm-ups,
    ``rounds`` times issue ``calls`` calls and block once on the last; per-call time = the round's
    time / calls.  The GPU then runs the calls without waiting for the host between them (as a
    training loop, or a CUDA-event timer such as ``triton.testing.do_bench``, sees it); the fixed
    host round trip that ``time_fn`` charges to every call is paid once per round.
    Returns dict(queued_median_ms, queued_min_ms, queued_rounds, queued_calls)."""
    _warm_up(fn, args)
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) * 1e3 / calls)
    return {"queued_median_ms": statistics.median(ts), "queued_min_ms": min(ts),
            "queued_rounds": rounds, "queued_calls": calls}


def write_results(path: str, device: str, **fields) -> None:
    """Writes {"device": device, "jax": jax version, **fields} (e.g. rows=[...]) as indented JSON
    to ``path``: the results file of every benchmark script."""
    with open(path, "w") as f:
        json.dump(dict(device=device, jax=jax.__version__, **fields), f, indent=1)
