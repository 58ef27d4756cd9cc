"""Times the MoM layer's routed k|v projection of the packed stream: the dense table + gather the
layer uses by default vs the row-grouped Pallas matmul (``pallas_kernels.grouped_matmul``).

Usage (GPU machine):  python -m benchmarks.bench_grouped_matmul [--shapes 8x2048,2x8192]
                          [--memories 4,8] [--configs '{}' '{"block_n": 256}'] [--out x.json]
Per shape and E (top-2, shared memory, chunk 64, D 1024, N = Kd + Vd = 2048, a random routing):
  dense:   x_rows [R, D] @ [D, G*N] (G = E + 1), then the stream gather of the (token, memory)
           rows (``routing.stream_sources``): what ``MoMLayer`` does with routed_projection="dense";
  grouped: the stream gather of x, then ``grouped_matmul`` with each chunk's memory;
  cublas:  one jnp.dot of the stream [B*L, D] @ [D, N], the same FLOPs as grouped (what the
           grouped kernel would take at cuBLAS speed; a reference, not an alternative).
fwd = the projection; fwd+bwd = value_and_grad of sum(out * r) w.r.t. x and the weights.  The
grouped kernels alone (forward, dx, dw) are timed too, with TFLOP/s of the routed FLOPs.  Timing:
``benchmarks.timing.time_fn`` (warm-ups, median of ``--repeats``, ``jax.block_until_ready``).
Checks grouped against dense (max abs error of out, dx, dw relative to their max).
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from benchmarks.timing import time_fn, write_results
from mom_jax import routing
from pallas_kernels import grouped_matmul as gm


def _problem(b, t, e, d=1024, n=2048, topk=2, chunk=64):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    logits = jax.random.normal(k1, (b, t, e), jnp.float32)
    _, idx = routing.route(logits, topk)
    plan = routing.plan_dispatch(idx, e, chunk, True)
    x = jax.random.normal(k2, (b, t, d), jnp.bfloat16)
    w = (jax.random.normal(k3, (e + 1, d, n), jnp.float32) * d ** -0.5).astype(jnp.bfloat16)
    r = jax.random.normal(k4, (b, plan.length, n), jnp.float32)
    return x, w, idx, plan, r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8x2048,2x8192")
    ap.add_argument("--memories", default="4,8")
    ap.add_argument("--configs", nargs="*", default=["{}"], help="JSON GroupedMatmulConfig overrides")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    configs = [gm.GroupedMatmulConfig(**json.loads(c)) for c in args.configs]
    dev = jax.devices()[0].device_kind
    print(f"device: {dev}, jax {jax.__version__}", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        b, t = (int(v) for v in shape.split("x"))
        for e in (int(v) for v in args.memories.split(",")):
            x, w, idx, plan, r = _problem(b, t, e)
            g, d, n = w.shape
            chunk = plan.layout.chunk_size
            x_rows = routing.token_table(x)
            tok_src, tok_inv = routing.stream_sources(plan)
            kv_src, kv_inv = routing.stream_sources(plan, idx)
            groups = plan.layout.chunk_segment.reshape(-1)
            stream_rows = b * plan.length
            flops = 2 * stream_rows * d * n

            def dense(x_rows, w):
                table = x_rows @ jnp.transpose(w, (1, 0, 2)).reshape(d, g * n)
                return routing.gather_table(table.reshape(-1, n), kv_src, kv_inv)

            def grouped(x_rows, w, cfg):
                xs = routing.gather_table(x_rows, tok_src, tok_inv).reshape(stream_rows, d)
                return gm.grouped_matmul(xs, w, groups, chunk, config=cfg).reshape(b, -1, n)

            def cublas(x_rows, w):
                xs = routing.gather_table(x_rows, tok_src, tok_inv)
                return xs @ w[0]

            variants = [("dense", None, dense), ("cublas_same_flops", None, cublas)]
            variants += [("grouped", c, lambda xr, w, c=c: grouped(xr, w, c)) for c in configs]
            ref = None
            for name, cfg, f in variants:
                fwd = jax.jit(f)
                fb = jax.jit(jax.value_and_grad(
                    lambda xr, w, f=f: jnp.sum(f(xr, w).astype(jnp.float32) * r), argnums=(0, 1)))
                got = (fwd(x_rows, w),) + tuple(fb(x_rows, w)[1])
                err = None
                if name != "cublas_same_flops":
                    ref = ref or got
                    err = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - c_.astype(jnp.float32)))
                                 / jnp.max(jnp.abs(c_.astype(jnp.float32))))
                           for a, c_ in zip(got, ref)]
                tf = time_fn(fwd, (x_rows, w), args.repeats)
                tfb = time_fn(fb, (x_rows, w), args.repeats)
                row = dict(shape=shape, memories=e, impl=name,
                           config=None if cfg is None else cfg.__dict__,
                           fwd_ms=tf["median_ms"], fwd_bwd_ms=tfb["median_ms"],
                           rel_err_out_dx_dw=err)
                if cfg is not None:   # the three kernels alone
                    xs = routing.gather_table(x_rows, tok_src, tok_inv).reshape(stream_rows, d)
                    dy = r.reshape(stream_rows, n).astype(jnp.bfloat16)
                    gi = groups.astype(jnp.int32)
                    cfg_m = gm.tile_config(cfg, chunk, jnp.bfloat16)
                    kernels = dict(
                        fwd=(jax.jit(lambda xs, w: gm._fwd_call(xs, w, gi, chunk, cfg_m)), (xs, w)),
                        dx=(jax.jit(lambda dy, w: gm._fwd_call(dy, jnp.swapaxes(w, 1, 2), gi,
                                                                chunk, cfg_m)), (dy, w)),
                        dw=(jax.jit(lambda xs, dy: gm._dw_call(xs, dy, gi, g, chunk, cfg_m,
                                                               jnp.bfloat16)), (xs, dy)))
                    for kname, (kf, kargs) in kernels.items():
                        ms = time_fn(kf, kargs, args.repeats)["median_ms"]
                        row[f"{kname}_kernel_ms"] = ms
                        row[f"{kname}_kernel_TFLOPs"] = flops / ms / 1e9
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n| B x T | E | impl | config | fwd ms | fwd+bwd ms | kernels fwd / dx / dw ms |"
          f"  ({dev})")
    for r_ in rows:
        ker = ("-" if "fwd_kernel_ms" not in r_ else
               " / ".join(f"{r_[k + '_kernel_ms']:.3f}" for k in ("fwd", "dx", "dw")))
        print(f"| {r_['shape']} | {r_['memories']} | {r_['impl']} | {r_['config'] or '-'} | "
              f"{r_['fwd_ms']:.3f} | {r_['fwd_bwd_ms']:.3f} | {ker} |")
    if args.out:
        write_results(args.out, dev, rows=rows)


if __name__ == "__main__":
    main()
