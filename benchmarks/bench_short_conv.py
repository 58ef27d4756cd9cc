"""Times the short conv (+ SiLU) of the layers' packed streams: XLA shifted adds vs the Pallas kernel.

Usage (GPU machine):  python -m benchmarks.bench_short_conv [--shapes 8x6400x3072,8x2048x3072]
                          [--configs '{}' '{"block_l": 64}'] [--head-norm 256] [--skip-xla]
                          [--out benchmarks/results/x.json]
--head-norm D: the MoM layer's call instead (x comes as two parts, q and k|v, and leaves as the
q|k|v thirds, q and k L2-normalised per head of D channels, q scaled by D**-0.5:
``short_conv([q, kv], ..., splits=, head_norm=)``, the loss summed over the parts without
concatenating them); its feature passes run on head tiles (``short_conv.head_tiles``:
block_c = D, block_l = block_l * block_c / D), so ``--configs '{"block_l": 128}'`` times
[32, D] head tiles.  --skip-xla: the kernel configs only (errors relative to the first).
Shapes are B x L x C: 8x6400x3072 is the MoM layer's stream at B8 T2048 (E4 top-2 + shared, D=1024:
q|k|v = 3072 channels), 8x2048x3072 the Gated DeltaNet layer's.  Segments start at random slots
(mean length 64).  bf16 x, float32 weight.  fwd = the conv; fwd+bwd = value_and_grad of
sum(out * r) w.r.t. x and the weight.  Timing: ``benchmarks.timing.time_fn`` (3 warm-ups, median of
``--repeats``, ``jax.block_until_ready``), fwd+bwd also queued (``timing.time_queued``).  Also
checks the kernel against the XLA conv (max abs error of each output, dx and dw relative to their
max).  Memory traffic of the ideal fwd: read x, write out
(2 bytes each); of the ideal bwd: read x and dy, write dx.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from benchmarks.timing import time_fn, time_queued, write_results
from mom_jax.layers import common as lc
from pallas_kernels import short_conv as sc


def _inputs(b, l, c, w=4):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k1, (b, l, c), jnp.bfloat16)
    weight = jax.random.normal(k2, (w, c), jnp.float32) * 0.5
    starts = jax.random.bernoulli(k3, 1 / 64, (b, l)).at[:, 0].set(True)
    pos = jnp.arange(l)[None]
    rank = (pos - jax.lax.cummax(jnp.where(starts, pos, 0), axis=1)).astype(jnp.int32)
    r = jax.random.normal(k4, (b, l, c), jnp.float32)
    return x, weight, rank, r


def _fns(conv, rank, rs):
    """Jitted (fwd, fwd+bwd) of conv(xs, w, rank) (xs: a tuple of parts); the loss is
    sum_i sum(out_i * rs[i]) over the output parts (one output: rs has one entry)."""
    def outs(xs, w):
        out = conv(xs, w, rank)
        return out if isinstance(out, list) else [out]

    loss = lambda xs, w: sum(jnp.sum(o.astype(jnp.float32) * r)  # noqa: E731
                             for o, r in zip(outs(xs, w), rs))
    return jax.jit(outs), jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8x6400x3072,8x2048x3072")
    ap.add_argument("--configs", nargs="*", default=["{}"], help="JSON ConvConfig overrides")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--head-norm", type=int, default=0,
                    help="head dim D: time the layers' call (q/k normalised per head); 0: off")
    ap.add_argument("--skip-xla", action="store_true", help="time the kernel configs only")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    configs = [sc.ConvConfig(**json.loads(c)) for c in args.configs]
    dev = jax.devices()[0].device_kind
    print(f"device: {dev}, jax {jax.__version__}", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        b, l, c = (int(v) for v in shape.split("x"))
        x, w, rank, r = _inputs(b, l, c)
        gbytes = b * l * c * 2 / 1e9
        kw, xs, rs = {}, (x,), [r]
        if args.head_norm:
            if c % 3 or (c // 3) % args.head_norm:
                raise SystemExit(f"--head-norm {args.head_norm}: C = {c} must be 3 parts of "
                                 f"whole heads")
            kw = dict(splits=(c // 3, 2 * c // 3),
                      head_norm=(args.head_norm, (args.head_norm ** -0.5, 1.0, None)))
            xs = (x[..., :c // 3], x[..., c // 3:])          # q, k|v: the layer's input parts
            rs = jnp.split(r, kw["splits"], axis=-1)
        variants = [] if args.skip_xla else [("xla", None, lambda xs, w, rk: lc.short_conv_packed(
            jnp.concatenate(xs, axis=-1), w, rk, impl="xla", **kw))]
        for cfg in configs:
            variants.append(("pallas", cfg, lambda xs, w, rk, cfg=cfg: sc.short_conv(
                list(xs), w, rk, config=cfg, **kw)))
        ref = None   # (outs..., dxs..., dw) of the first variant (the XLA conv unless skipped)
        for name, cfg, conv in variants:
            fwd, fb = _fns(conv, rank, rs)
            grads = fb(xs, w)[1]
            got = (*fwd(xs, w), *grads[0], grads[1])
            ref = ref or got
            err = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b_.astype(jnp.float32)))
                         / jnp.max(jnp.abs(b_.astype(jnp.float32)))) for a, b_ in zip(got, ref)]
            tf, tfb = time_fn(fwd, (xs, w), args.repeats), time_fn(fb, (xs, w), args.repeats)
            row = dict(shape=shape, impl=name, config=None if cfg is None else cfg.__dict__,
                       fwd_ms=tf["median_ms"], fwd_bwd_ms=tfb["median_ms"],
                       fwd_bwd_queued_ms=time_queued(fb, (xs, w))["queued_median_ms"],
                       fwd_GBps=2 * gbytes / tf["median_ms"] * 1e3,
                       rel_err_outs_dxs_dw=err)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n| B x L x C | impl | config | fwd ms | fwd+bwd ms | queued | fwd GB/s |  ({dev})")
    for r_ in rows:
        print(f"| {r_['shape']} | {r_['impl']} | {r_['config'] or '-'} | {r_['fwd_ms']:.3f} | "
              f"{r_['fwd_bwd_ms']:.3f} | {r_['fwd_bwd_queued_ms']:.3f} | {r_['fwd_GBps']:.0f} |")
    if args.out:
        write_results(args.out, dev, rows=rows)


if __name__ == "__main__":
    main()
