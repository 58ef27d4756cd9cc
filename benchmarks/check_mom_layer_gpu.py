"""GPU correctness check of the MoM layer at the benchmark size: impl="pallas" against impl="xla".

  PYTHONPATH=. python3 benchmarks/check_mom_layer_gpu.py [--shapes 8x2048,2x8192]
                                                        [--projection grouped]

MoM layer D1024, 4 heads x 256, E4 top-2, shared memory, routed projections as --projection says
on the Pallas side (default dense; the XLA side is always dense), float32
parameters and inputs x [B, T, 1024] ~ N(0, 1), at each B x T of --shapes.  Both impls run with the
matmuls outside the kernels at "highest" precision (otherwise TF32 router logits send some tokens
to other memories and the comparison measures routing flips, not the kernels); the Pallas kernels'
own dots are bf16 as always.  Prints the relative error ||a - b|| / ||b|| of y and of every
gradient of sum(y * r) (r random) w.r.t. the parameters and x, and whether all are finite.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mom_jax.layers import MoMLayer  # noqa: E402
import pallas_kernels  # noqa: E402,F401  (registers the kernels)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8x2048,2x8192", help="comma list of BxT")
    ap.add_argument("--projection", default="dense",
                    help="routed_projection of the Pallas side (the XLA side: always dense)")
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    for b, t in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
        layer = MoMLayer(1024, num_heads=4, head_dim=256, num_memories=4, topk=2,
                         routed_projection=args.projection, impl="pallas", rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(layer)
        x = jax.random.normal(jax.random.PRNGKey(1), (b, t, 1024), jnp.float32)
        r = jax.random.normal(jax.random.PRNGKey(2), (b, t, 1024), jnp.float32)

        def loss(p, x, impl):
            model = nnx.merge(graphdef, p)
            model.impl = impl
            if impl == "xla":
                model.routed_projection = "dense"
            y = model(x)[0]
            return jnp.sum(y * r), y

        out = {}
        for impl in ("pallas", "xla"):
            with jax.default_matmul_precision("highest"):
                f = jax.jit(jax.value_and_grad(lambda p, x, impl=impl: loss(p, x, impl),
                                               argnums=(0, 1), has_aux=True))
                (_, y), grads = f(params, x)
            out[impl] = (y, jax.tree.leaves(grads))
        y_rel = rel(out["pallas"][0], out["xla"][0])
        g_rels = [rel(a, c) for a, c in zip(out["pallas"][1], out["xla"][1])]
        finite = all(bool(jnp.all(jnp.isfinite(a))) for a in (out["pallas"][0], *out["pallas"][1]))
        print(f"MoM B{b} T{t} ({args.projection}): y rel {y_rel:.2e}; grads rel max "
              f"{max(g_rels):.2e} median {np.median(g_rels):.2e} ({len(g_rels)} leaves); "
              f"finite {finite}", flush=True)


if __name__ == "__main__":
    main()
