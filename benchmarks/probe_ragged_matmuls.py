"""Matmul kernels for the MoM stream's routed k|v projection, alone, on the GPU (session 12 probe).

Usage (H100):  PYTHONPATH=. python benchmarks/probe_ragged_matmuls.py OUT.json

For E = 4 and 8 (top-2, shared memory, B8 T2048, chunk 64, D 1024, N 2048, a random routing) the
stream has M = B*L rows (51200 / 53248); each pass (forward, dx, dw) is 2*M*D*N FLOPs.  Timed
(``benchmarks.timing.time_fn``, median of 20):
  cublas_*:       jnp.dot of the same FLOPs (one weight): what any grouped kernel would take at
                  cuBLAS speed on this shape;
  xla_ragged_fwd: ``lax.ragged_dot`` on the rows sorted by group (sizes = chunks per group x 64);
  mgpu_ragged / mgpu_transposed_dw: the Mosaic-GPU ragged-dot kernels that ship with jax
                  (``jax.experimental.pallas.ops.gpu``; forward and dx, and dw) at a few tilings,
                  on the same sorted rows, errors against ``lax.ragged_dot``;
  triton_grouped: ``pallas_kernels.grouped_matmul``'s forward and dw kernels (no sort: the
                  group is read per chunk) at two more tilings.
"""
from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as rd
from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu as trd

from benchmarks.timing import time_fn
from mom_jax import routing
from pallas_kernels import grouped_matmul as gm


def main(out_path):
    rows = []

    def log(**r):
        rows.append(r)
        print(json.dumps(r), flush=True)

    for e in (4, 8):
        b, t, d, n, c = 8, 2048, 1024, 2048, 64
        k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
        _, idx = routing.route(jax.random.normal(k1, (b, t, e)), 2)
        plan = routing.plan_dispatch(idx, e, c, True)
        groups = plan.layout.chunk_segment.reshape(-1)
        g = e + 1
        key = jnp.where(groups < 0, g, groups)          # padding chunks: one more (last) group
        sizes = jnp.sum(key[None] == jnp.arange(g + 1)[:, None], axis=1) * c
        m = groups.shape[0] * c
        x = jax.random.normal(k2, (m, d), jnp.bfloat16)
        w = (jax.random.normal(k3, (g + 1, d, n)) * d ** -0.5).astype(jnp.bfloat16)
        dy = jax.random.normal(k4, (m, n), jnp.bfloat16)
        flops = 2 * m * d * n
        log(E=e, m=m, sizes=[int(s) for s in sizes])
        for name, f, args in [("cublas_fwd", lambda x, w: x @ w[0], (x, w)),
                              ("cublas_dx", lambda dy, w: dy @ w[0].T, (dy, w)),
                              ("cublas_dw", lambda x, dy: x.T @ dy, (x, dy)),
                              ("xla_ragged_fwd", lambda x, w: jax.lax.ragged_dot(x, w, sizes),
                               (x, w))]:
            ms = time_fn(jax.jit(f), args, 20)["median_ms"]
            log(E=e, impl=name, ms=ms, tflops=flops / ms / 1e9)
        ref = jax.jit(lambda x, w: jax.lax.ragged_dot(x, w, sizes))(x, w).astype(jnp.float32)
        for bm, bn, steps, gbn in [(128, 128, 4, 1), (128, 256, 4, 1), (128, 256, 3, 2),
                                   (64, 256, 4, 1), (128, 128, 5, 4), (192, 128, 4, 2)]:
            cfg = dict(block_m=bm, block_n=bn, block_k=64, max_concurrent_steps=steps,
                       grid_block_n=gbn)
            f = jax.jit(lambda x, w, cfg=cfg: rd.ragged_dot(x, w, group_sizes=sizes, **cfg))
            err = float(jnp.max(jnp.abs(f(x, w).astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
            ms = time_fn(f, (x, w), 20)["median_ms"]
            cfg_x = {**cfg, "grid_block_n": 1 if d % (bn * gbn) else gbn}
            fx = jax.jit(lambda dy, w, cfg=cfg_x: rd.ragged_dot(dy, w, group_sizes=sizes,
                                                                transpose_rhs=True, **cfg))
            msx = time_fn(fx, (dy, w), 20)["median_ms"]
            log(E=e, impl="mgpu_ragged", cfg=cfg, fwd_ms=ms, fwd_tflops=flops / ms / 1e9, err=err,
                dx_ms=msx, dx_tflops=flops / msx / 1e9)
        ref_w = jax.jit(lambda x, dy: trd.ref_transposed_ragged_dot(
            x.astype(jnp.float32), dy.astype(jnp.float32), sizes))(x, dy)
        for bm, bn, bk, steps, gbn in [(128, 128, 64, 4, 1), (128, 256, 64, 3, 1),
                                       (64, 128, 128, 4, 1), (128, 128, 128, 3, 2)]:
            cfg = dict(block_m=bm, block_n=bn, block_k=bk, max_concurrent_steps=steps,
                       grid_block_n=gbn)
            f = jax.jit(lambda x, dy, cfg=cfg: trd.transposed_ragged_dot(x, dy, group_sizes=sizes,
                                                                         **cfg))
            got = f(x, dy).astype(jnp.float32)
            err = float(jnp.max(jnp.abs(got - ref_w)) / jnp.max(jnp.abs(ref_w)))
            ms = time_fn(f, (x, dy), 20)["median_ms"]
            log(E=e, impl="mgpu_transposed_dw", cfg=cfg, ms=ms, tflops=flops / ms / 1e9, err=err)
        for cfg in [gm.GroupedMatmulConfig(block_m=128, block_n=256, num_warps=8, num_stages=2,
                                           dw_block_n=256, dw_num_warps=8, dw_num_stages=2),
                    gm.GroupedMatmulConfig(block_m=128, block_n=128, num_warps=8, num_stages=4,
                                           dw_num_stages=4)]:
            f = jax.jit(lambda x, w, cfg=cfg: gm._fwd_call(x, w[:g], groups, c, cfg))
            ms = time_fn(f, (x, w), 20)["median_ms"]
            fw = jax.jit(lambda x, dy, cfg=cfg: gm._dw_call(x, dy, groups, g, c, cfg, jnp.bfloat16))
            msw = time_fn(fw, (x, dy), 20)["median_ms"]
            log(E=e, impl="triton_grouped", cfg=cfg.__dict__, fwd_ms=ms,
                fwd_tflops=flops / ms / 1e9, dw_ms=msw, dw_tflops=flops / msw / 1e9)
    with open(out_path, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
