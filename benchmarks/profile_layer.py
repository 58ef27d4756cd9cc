"""Where does the MoM layer's forward+backward time go?  GPU-kernel profile of one jitted call.

  python -m benchmarks.profile_layer [--memories 4] [--shape 8x2048] [--impl auto] [--conv pallas]
                                    [--what fwdbwd|fwd] [--kernel-config JSON]
                                    [--projection auto|grouped|dense|ragged] [--out F]

Builds the layer of ``bench_layer`` (D=1024, 4 heads x 256, top-2, shared memory, ``--projection``
routed projections (default auto: grouped on the GPU), bf16), warms up ``value_and_grad``
(``bench_layer.layer_fns``;
``--what fwd``: the forward alone), with ``--kernel-config`` fields over the Pallas kernels'
default ``Config``, records a ``jax.profiler`` trace of ``--calls`` calls and reads it back
(``profile_decode.kernel_events``): GPU kernels grouped by name (count and ms per call, largest
first) and by kind -- the Pallas gated delta kernels (``gdn_*``), the Pallas short-conv kernels
(``short_conv_*``), the Pallas grouped matmul (``grouped_matmul*``), matmuls (cuBLAS / cutlass /
XLA gemm fusions), everything else (XLA fusions: gathers, scatters, elementwise, reductions) --
against the wall time of a call and its GPU span (busy time plus the gaps between kernels); the
slowest kernels one by one with their HLO result types (which array a fusion writes).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.bench_layer import conv_impl, layer_fns
from benchmarks.profile_decode import kernel_events
from benchmarks.timing import write_results
from mom_jax.layers import GatedDeltaNetLayer, MoMLayer
from mom_jax.layers.mom import ROUTED_PROJECTIONS as MOM_PROJECTIONS
from pallas_kernels import gated_delta as gd_kernels
from pallas_kernels import short_conv


def kind_of(name: str) -> str:
    low = name.lower()
    if low.startswith("gdn_") or "gdn_" in low:
        return "pallas gated delta kernels"
    if "grouped_matmul" in low:
        return "pallas grouped matmul kernels"
    if "short_conv" in low:
        return "pallas short-conv kernels"
    if any(s in low for s in ("gemm", "cutlass", "cublas", "sm90_xmma", "nvjet", "dot")):
        return "matmuls"
    return "other XLA kernels"


def profile(layer, batch: int, seq: int, dim: int, calls: int, what: str = "fwdbwd") -> dict:
    fwd, fwd_bwd, args = layer_fns(layer, batch, seq, dim)
    return profile_calls(fwd_bwd if what == "fwdbwd" else fwd, args, calls)


def hlo_result_types(fn, args) -> dict:
    """{kernel name: result type} of the fusions and custom calls in ``fn``'s optimized HLO (the
    GPU kernel of instruction ``a.3`` is named ``a_3``)."""
    types = {}
    for line in fn.lower(*args).compile().as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.+?) (?:fusion|custom-call)\(", line)
        if m:
            types[m.group(1).replace(".", "_").replace("-", "_")] = m.group(2)[:120]
    return types


def call_spans_ms(events, calls: int) -> list[float]:
    """GPU span of each call (first kernel start to last kernel end, ms): the events sorted by
    start and cut at the calls - 1 widest gaps (the host waits between the timed calls)."""
    events = sorted(events, key=lambda e: e[1])
    gaps = sorted(range(1, len(events)),
                  key=lambda i: events[i][1] - events[i - 1][1] - events[i - 1][2])[-(calls - 1):]
    cuts = [0, *sorted(gaps), len(events)] if calls > 1 else [0, len(events)]
    return [round((max(s + d for _, s, d in events[a:b]) - events[a][1]) / 1e6, 4)
            for a, b in zip(cuts, cuts[1:])]


def profile_calls(fn, args, calls: int) -> dict:
    """GPU-kernel profile of ``fn(*args)`` (jitted): 3 warm-up calls, the wall time of ``calls``
    calls, then a ``jax.profiler`` trace of ``calls`` more, read back as kernels grouped by name
    and by ``kind_of`` (ms per call), each call's GPU span (first kernel start to last end: busy
    time plus the gaps between kernels), and the 40 slowest kernels one by one with their HLO
    result types."""
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(calls):
        jax.block_until_ready(fn(*args))
    wall_ms = 1e3 * (time.perf_counter() - t0) / calls
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        events, _ = kernel_events(d)
    types = hlo_result_types(fn, args)
    by_name = collections.defaultdict(lambda: [0, 0])
    by_kind = collections.defaultdict(lambda: [0, 0])
    by_kernel = collections.defaultdict(lambda: [0, 0])
    for name, _, dur in events:
        short = re.sub(r"[._]\d+$", "", name)[:90]
        for table, key in ((by_name, short), (by_kind, kind_of(short)), (by_kernel, name)):
            table[key][0] += 1
            table[key][1] += dur
    per_call = lambda t: round(t / 1e6 / calls, 4)  # noqa: E731
    spans = call_spans_ms(events, calls) if events else [None]
    return dict(
        wall_ms_per_call=round(wall_ms, 3), kernels_per_call=len(events) / calls,
        gpu_busy_ms_per_call=per_call(sum(d for _, _, d in events)),
        gpu_span_ms_per_call=sorted(spans)[len(spans) // 2],
        by_kind={k: dict(count=c / calls, ms=per_call(t)) for k, (c, t) in
                 sorted(by_kind.items(), key=lambda kv: -kv[1][1])},
        top_kernels=[dict(name=n, count=c / calls, ms=per_call(t)) for n, (c, t) in
                     sorted(by_name.items(), key=lambda kv: -kv[1][1])[:40]],
        slowest_kernels=[dict(name=n, ms=per_call(t), hlo_type=types.get(n, "?")) for n, (c, t)
                         in sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:40]])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="mom,gdn", help="comma list: mom, gdn")
    ap.add_argument("--memories", type=int, default=4)
    ap.add_argument("--shape", default="8x2048", help="BxT")
    ap.add_argument("--impl", default="auto")
    ap.add_argument("--projection", default="auto", choices=MOM_PROJECTIONS,
                    help="MoMLayer routed_projection")
    ap.add_argument("--chunk-size", type=int, default=64, help="the layers' chunk_size")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--conv", default="pallas", help="short conv: pallas (kernel where the impl "
                    "picks it) or xla")
    ap.add_argument("--what", default="fwdbwd", choices=("fwdbwd", "fwd"))
    ap.add_argument("--kernel-config", default="{}",
                    help="JSON fields of pallas_kernels.gated_delta.Config over its defaults")
    ap.add_argument("--conv-config", default="{}",
                    help="JSON fields of pallas_kernels.short_conv.ConvConfig over its defaults")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    short_conv.set_default_config(short_conv.ConvConfig(**json.loads(args.conv_config)))
    gd_kernels.set_default_config(dataclasses.replace(gd_kernels.get_default_config(),
                                                      **json.loads(args.kernel_config)))
    b, t = (int(v) for v in args.shape.split("x"))
    d, h, dk = 1024, 4, 256
    dev = jax.devices()[0].device_kind
    print(f"device: {dev}, jax {jax.__version__}", flush=True)
    results = {}
    for name in args.layers.split(","):
        if name == "mom":
            layer = MoMLayer(d, num_heads=h, head_dim=dk, num_memories=args.memories, topk=2,
                             routed_projection=args.projection, impl=args.impl, dtype=jnp.bfloat16,
                             chunk_size=args.chunk_size, rngs=nnx.Rngs(0))
        elif name == "gdn":
            layer = GatedDeltaNetLayer(d, num_heads=h, head_dim=dk, impl=args.impl,
                                       dtype=jnp.bfloat16, chunk_size=args.chunk_size,
                                       rngs=nnx.Rngs(0))
        else:
            raise SystemExit(f"--layers: unknown layer {name!r} (mom, gdn)")
        with conv_impl(args.conv):
            r = profile(layer, b, t, d, args.calls, args.what)
        results[name] = r
        print(f"\n{name} B{b} T{t}: wall {r['wall_ms_per_call']} ms/call, GPU busy "
              f"{r['gpu_busy_ms_per_call']} ms, GPU span {r['gpu_span_ms_per_call']} ms, "
              f"{r['kernels_per_call']:.0f} kernels")
        for k, v in r["by_kind"].items():
            print(f"  {k:28s} {v['ms']:8.3f} ms  ({v['count']:.0f} kernels)")
        for row in r["top_kernels"][:25]:
            print(f"    {row['ms']:8.3f} ms  x{row['count']:<4.0f} {row['name']}")
        print("  slowest kernels, one by one (HLO result type):")
        for row in r["slowest_kernels"]:
            print(f"    {row['ms']:8.3f} ms  {row['name']}  {row['hlo_type']}")
    if args.out:
        write_results(args.out, dev, shape=args.shape, impl=args.impl, projection=args.projection,
                      conv=args.conv, what=args.what, kernel_config=args.kernel_config,
                      conv_config=args.conv_config,
                      chunk_size=args.chunk_size,
                      results=results)


if __name__ == "__main__":
    main()
