"""Pipelining stages of the chunk-parallel gated delta kernels: accuracy, run-to-run determinism
and speed, per stage count (``Config.par_num_stages``, applied to every chunk-parallel kernel).

Usage (GPU machine):
  PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/check_par_stages.py --out FILE.json
      [--stages 1,2,3] [--check-shapes 0,1] [--shapes 8,2048,4,256,256 ...]

Per shape and stage count: with the shape in --check-shapes, the Pallas gradients of
(q, k, v, g, beta) against the float32 chunked XLA form (relative error, as
``bench_gated_delta_kernel``), whether three runs of the same compiled fwd+bwd give bitwise
identical gradients (a race in a pipelined loop shows up as differences), NaN, and the output
against the float32 scan; at every shape fwd and fwd+bwd queued time (``timing.time_queued``).
Session 15 found 2-3 stages racing where a loop reduced a tile that it also fed to a dot
(benchmarks/NOTES_kernels.md, sessions 15-16); this is the check that caught it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_gated_delta_kernel import (DEFAULT_SHAPES, make_fns,  # noqa: E402
                                                 make_inputs, rel_err, scan_reference)
from benchmarks.timing import time_queued, write_results  # noqa: E402
from pallas_kernels.gated_delta import api as gd_api  # noqa: E402


def check(inputs, r, ref_grads, o_ref, runs: int = 3) -> dict:
    """Accuracy and determinism of the current default config's fwd+bwd."""
    pf, pg = make_fns("pallas", r)
    grads = [jax.block_until_ready(pg(*inputs)[1]) for _ in range(runs)]
    return dict(
        grad_rel=[round(rel_err(a, b), 6) for a, b in zip(grads[0], ref_grads)],
        bitwise_same_runs=all(bool(jnp.array_equal(a, b))
                              for g in grads[1:] for a, b in zip(g, grads[0])),
        nan=any(bool(jnp.isnan(a).any()) for a in grads[0]),
        o_rel_vs_scan=round(rel_err(pf(*inputs), o_ref), 6))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="results JSON file")
    ap.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES)
    ap.add_argument("--stages", default="1,2,3", help="comma list of par_num_stages values")
    ap.add_argument("--check-shapes", default="0,1",
                    help="comma list of indices into --shapes to check (others: timing only)")
    args = ap.parse_args()
    stages = [int(s) for s in args.stages.split(",")]
    checked = {int(i) for i in args.check_shapes.split(",") if i}
    device = jax.devices()[0].device_kind
    print("device:", device, flush=True)
    rows, t0 = [], time.time()
    for si, name in enumerate(args.shapes):
        shape = tuple(int(x) for x in name.split(","))
        inputs, r = make_inputs(shape)
        refs = None
        if si in checked:
            f32 = tuple(x.astype(jnp.float32) for x in inputs)
            with jax.default_matmul_precision("highest"):
                refs = (make_fns("xla", r)[1](*f32)[1], scan_reference(inputs))
        for s in stages:
            gd_api.set_default_config(dataclasses.replace(gd_api.Config(), par_num_stages=s))
            row = dict(shape=name, par_num_stages=s)
            if refs is not None:
                row.update(check(inputs, r, *refs))
            pf, pg = make_fns("pallas", r)
            for what, fn in (("fwd", pf), ("fwdbwd", pg)):
                row[what + "_queued_ms"] = round(time_queued(fn, inputs)["queued_median_ms"], 4)
            row["elapsed_s"] = round(time.time() - t0, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
            write_results(args.out, device, rows=rows)


if __name__ == "__main__":
    main()
