"""Times the MoM layer (and the Gated DeltaNet layer) forward and forward+backward.

Usage (GPU machine):  python -m benchmarks.bench_layer [--impls xla,pallas] [--projections auto,dense]
                          [--shapes 8x2048,2x8192] [--out benchmarks/results/x.json]
                          [--kernel-configs '{}' '{"ut_kernel": "masked"}'] [--conv-impls pallas,xla]
                          [--chunk-sizes 64,128]
Several impls run side by side in one process (same card, same inputs); with --kernel-configs, the
pallas impl once per kernel configuration (JSON fields of ``pallas_kernels.gated_delta.Config``
over the defaults); with --conv-impls, the pallas impl once with the short-conv kernel and once
with the XLA conv.

Method: jit once, 3 warm-up calls (benchmarks/timing.py), then ``--repeats`` timed calls, each ended by
``jax.block_until_ready``; the median is reported (min and max too).  fwd+bwd is also timed queued
(``timing.time_queued``: 10 rounds of 10 calls issued back to back, one wait per round), the
per-call time a training loop sees: the host round trip ``time_fn`` charges to every call (the
launch of the first kernel, the wait for the last) is paid once per round.  Inputs are random normal
(never zeros).  fwd+bwd = value_and_grad of sum(y * r) with a fixed random r, w.r.t. all parameters
and the input.  The card and versions are printed and stored with the numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.timing import time_fn, time_queued, write_results
from mom_jax.layers import GatedDeltaNetLayer, MoMLayer
from mom_jax.ops import api as ops_api
from pallas_kernels import gated_delta as gd_kernels
from pallas_kernels import short_conv


def layer_fns(layer, batch: int, seq: int, dim: int, dtype=jnp.bfloat16):
    """Jitted (fwd, fwd_bwd) of an NNX layer and their arguments (params, x [B, T, D] random).
    fwd_bwd = value_and_grad of sum(y * r), r [B, T, D] random float32, w.r.t. params and x."""
    graphdef, params = nnx.split(layer)
    kx, kr = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (batch, seq, dim), dtype)
    r = jax.random.normal(kr, (batch, seq, dim), jnp.float32)

    def apply(p, x):
        out = nnx.merge(graphdef, p)(x)
        return out[0] if isinstance(out, tuple) else out

    def loss(p, x):
        return jnp.sum(apply(p, x).astype(jnp.float32) * r)

    return jax.jit(apply), jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (params, x)


@contextlib.contextmanager
def conv_impl(name: str):
    """Traces inside use the short-conv kernel ("pallas", where ``ops.resolve_conv_impl`` picks
    it) or, with "xla", the XLA conv everywhere (the kernel unregistered for the duration)."""
    if name not in ("pallas", "xla"):
        raise ValueError(f"conv impl must be 'pallas' or 'xla', got {name!r}")
    saved = dict(ops_api._PALLAS_CONV)
    if name == "xla":
        ops_api._PALLAS_CONV.clear()
    try:
        yield
    finally:
        ops_api._PALLAS_CONV.update(saved)


def bench_layer(layer, batch: int, seq: int, dim: int, repeats: int, dtype=jnp.bfloat16):
    fwd, fwd_bwd, args = layer_fns(layer, batch, seq, dim, dtype)
    t0 = time.perf_counter()
    jax.block_until_ready(fwd_bwd(*args))
    compile_s = time.perf_counter() - t0
    f = time_fn(fwd, args, repeats)
    fb = time_fn(fwd_bwd, args, repeats)
    fbq = time_queued(fwd_bwd, args)
    return dict(fwd_ms=f["median_ms"], fwd_min_ms=f["min_ms"], fwd_max_ms=f["max_ms"],
                fwd_bwd_ms=fb["median_ms"], fwd_bwd_min_ms=fb["min_ms"],
                fwd_bwd_max_ms=fb["max_ms"], fwd_bwd_queued_ms=fbq["queued_median_ms"],
                first_call_s=compile_s)


def check_correctness(impl: str):
    """fp32 MoM layer on the device: ``impl`` vs the token-by-token scan; prints rel. error."""
    layer = MoMLayer(256, num_heads=2, head_dim=64, num_memories=4, topk=2, impl=impl,
                     rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 300, 256), jnp.float32)
    y_fast = layer(x)[0]
    layer.impl = "scan"
    y_ref = layer(x)[0]
    rel = float(jnp.linalg.norm(y_fast - y_ref) / jnp.linalg.norm(y_ref))
    print(f"correctness (fp32, {impl} vs scan, MoM layer B2 T300): rel err {rel:.2e}, "
          f"finite={bool(jnp.all(jnp.isfinite(y_fast)))}", flush=True)
    return rel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impls", default="xla", help="comma list, timed side by side")
    ap.add_argument("--projections", default="auto,dense", help="MoM routed_projection values")
    ap.add_argument("--memories", default="4,8", help="MoM E values")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="")
    ap.add_argument("--quick", action="store_true", help="one small config (smoke test)")
    ap.add_argument("--shapes", default="8x2048,2x8192", help="comma list of BxT")
    ap.add_argument("--kernel-configs", nargs="*", default=["{}"],
                    help="JSON Config overrides for impl=pallas, each timed side by side")
    ap.add_argument("--conv-config", default="{}",
                    help="JSON fields of pallas_kernels.short_conv.ConvConfig over its defaults "
                    "(the conv kernel's tiling for the whole run)")
    ap.add_argument("--chunk-sizes", default="64",
                    help="comma list of the layers' chunk_size (stream chunk and kernel chunk)")
    ap.add_argument("--conv-impls", default="pallas",
                    help="short conv with impl=pallas: comma list of pallas (kernel), xla")
    args = ap.parse_args()
    conv_impls = args.conv_impls.split(",")
    for c in conv_impls:
        with conv_impl(c):   # bad names fail here
            pass
    base_config = gd_kernels.get_default_config()
    short_conv.set_default_config(short_conv.ConvConfig(**json.loads(args.conv_config)))
    kernel_configs = [json.loads(c) for c in args.kernel_configs]
    for c in kernel_configs:
        dataclasses.replace(base_config, **c)   # unknown fields / bad values fail here
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}", flush=True)
    d, h, dk = 1024, 4, 256
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    chunk_sizes = [int(v) for v in args.chunk_sizes.split(",")]
    configs = []
    for b, t in shapes:
        for c in chunk_sizes:
            for e in [int(v) for v in args.memories.split(",")]:
                for proj in args.projections.split(","):
                    configs.append(("MoM", dict(num_memories=e, topk=2, routed_projection=proj,
                                                chunk_size=c), b, t))
            configs.append(("GatedDeltaNet", dict(chunk_size=c), b, t))
    if args.quick:
        d, h, dk, configs = 256, 2, 64, [("MoM", dict(num_memories=4, topk=2), 2, 512)]
    impls = args.impls.split(",")
    for impl in impls:
        check_correctness(impl)
    rows = []
    for name, kw, b, t in configs:
        for impl in impls:
            variants = ([(kc, conv) for kc in kernel_configs for conv in conv_impls]
                        if impl == "pallas" else [({}, "xla")])
            for kc, conv in variants:
                gd_kernels.set_default_config(dataclasses.replace(base_config, **kc))
                cls = MoMLayer if name == "MoM" else GatedDeltaNetLayer
                layer = cls(d, num_heads=h, head_dim=dk, impl=impl, dtype=jnp.bfloat16,
                            rngs=nnx.Rngs(0), **kw)
                with conv_impl(conv):
                    res = bench_layer(layer, b, t, d, args.repeats)
                row = dict(layer=name, batch=b, seq=t, hidden=d, heads=h, head_dim=dk, impl=impl,
                           **{"chunk_size": layer.chunk_size, **kw}, **res)
                if impl == "pallas":
                    row.update(kernel_config=json.dumps(kc), conv=conv,
                               conv_config=args.conv_config)
                rows.append(row)
                print(json.dumps(row), flush=True)
            gd_kernels.set_default_config(base_config)
    print(f"\n| layer | E | proj | chunk | B x T | impl | kernel config | conv | fwd ms | "
          f"fwd+bwd ms | queued |  ({dev.device_kind})")
    for r in rows:
        print(f"| {r['layer']} | {r.get('num_memories', '-')} | {r.get('routed_projection', '-')} "
              f"| {r['chunk_size']} | {r['batch']}x{r['seq']} | {r['impl']} | "
              f"{r.get('kernel_config', '-')} | {r.get('conv', 'xla')} | "
              f"{r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_queued_ms']:.2f} |")
    if args.out:
        write_results(args.out, dev.device_kind, rows=rows)


if __name__ == "__main__":
    main()
