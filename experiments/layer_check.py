"""A short, honest demonstration of the MoM layer on random data (CPU, well under a minute or two).

It builds one MoM layer (gated delta rule memories, top-k routing, shared memory) and checks, printing
each result:
  1. forward of the fast path (one packed stream, chunked) against the token-by-token scan;
  2. gradients of every parameter and of the input against the scan's;
  3. prefill of the first tokens + one-token decode steps against the full forward;
  4. that a jitted call compiles once although the routing changes between inputs;
and reports the router's load per memory and the jitted forward / forward+backward times.

  python -m experiments.layer_check [--hidden=64 --heads=2 --head_dim=32 --memories=4 --topk=2 ...]
"""
from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from mom_jax.layers import MoMLayer
from mom_jax.routing import load_balancing_loss

FLAGS = flags.DEFINE_integer("hidden", 64, "model width D")
flags.DEFINE_integer("heads", 2, "number of heads H")
flags.DEFINE_integer("head_dim", 32, "key head dim dk (= value head dim)")
flags.DEFINE_integer("memories", 4, "routed memories E")
flags.DEFINE_integer("topk", 2, "memories per token")
flags.DEFINE_bool("shared_memory", True, "add the always-on shared memory")
flags.DEFINE_enum("update_rule", "gated_delta", ["gated_delta", "delta", "gla", "linear"],
                  "memory update rule")
flags.DEFINE_integer("batch", 2, "batch size")
flags.DEFINE_integer("seq_len", 192, "sequence length")
flags.DEFINE_integer("prefill", 128, "tokens to prefill before decoding the rest one by one")
flags.DEFINE_integer("chunk_size", 32, "chunk size of the packed stream")
flags.DEFINE_integer("seed", 0, "random seed")
F = flags.FLAGS


def rel(a, b) -> float:
    return float(jnp.linalg.norm(jnp.ravel(a - b)) / jnp.linalg.norm(jnp.ravel(b)))


def check(name: str, value: float, tol: float, results: list) -> None:
    ok = bool(np.isfinite(value) and value <= tol)
    results.append(ok)
    print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {value:.2e} (tolerance {tol:.0e})", flush=True)


def main(argv):
    del argv
    if not 0 < F.prefill < F.seq_len:
        raise app.UsageError(f"--prefill must be in (0, --seq_len={F.seq_len}), got {F.prefill}")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    # A check of the math in float32: full-precision matmuls everywhere (a GPU's default float32
    # matmuls round operands to TF32, ~5e-4 relative, which the tolerances below are not for).
    with jax.default_matmul_precision("highest"):
        _check_layer()


def _check_layer():
    layer = MoMLayer(F.hidden, num_heads=F.heads, head_dim=F.head_dim, num_memories=F.memories,
                     topk=F.topk, shared_memory=F.shared_memory, update_rule=F.update_rule,
                     chunk_size=F.chunk_size, impl="xla", rngs=nnx.Rngs(F.seed))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    print(f"MoM layer: D={F.hidden} H={F.heads} dk={F.head_dim} E={F.memories} top-{F.topk} "
          f"shared={F.shared_memory} rule={F.update_rule}; {n_params:,} parameters")
    x = jax.random.normal(jax.random.PRNGKey(F.seed + 1), (F.batch, F.seq_len, F.hidden))
    graphdef, params = nnx.split(layer)
    results: list[bool] = []

    def run(p, x, impl):
        m = nnx.merge(graphdef, p)
        m.impl = impl
        return m(x)

    print("1. forward, packed chunked path vs token-by-token scan")
    y_fast, logits = jax.jit(lambda p, x: run(p, x, "xla"))(params, x)
    y_ref, _ = jax.jit(lambda p, x: run(p, x, "scan"))(params, x)
    check("relative error", rel(y_fast, y_ref), 1e-4, results)

    print("2. gradients (all parameters and the input)")
    r = jax.random.normal(jax.random.PRNGKey(F.seed + 2), y_fast.shape)

    def loss(p, x, impl):
        return jnp.sum(run(p, x, impl)[0] * r)
    g_fast = jax.jit(jax.grad(lambda p, x: loss(p, x, "xla"), argnums=(0, 1)))(params, x)
    g_ref = jax.jit(jax.grad(lambda p, x: loss(p, x, "scan"), argnums=(0, 1)))(params, x)
    worst = max(rel(a, b) for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)))
    check(f"worst relative error over {len(jax.tree.leaves(g_fast))} gradients", worst, 1e-3,
          results)

    print(f"3. prefill {F.prefill} tokens, then decode {F.seq_len - F.prefill} one at a time")
    y_pre, _, cache = layer.prefill(x[:, :F.prefill])
    step = jax.jit(lambda c, xt: layer.step(xt, c))
    outs = [y_pre]
    for t in range(F.prefill, F.seq_len):
        yt, _, cache = step(cache, x[:, t])
        outs.append(yt[:, None])
    check("relative error vs forward", rel(jnp.concatenate(outs, 1), y_fast), 1e-4, results)
    cache_mb = sum(a.nbytes for a in jax.tree.leaves(cache)) / 2**20
    print(f"     decode cache: {cache_mb:.2f} MiB, independent of the number of tokens")

    print("4. one compilation for any routing")
    traces = []

    @jax.jit
    def fwd(p, x):
        traces.append(1)
        return run(p, x, "xla")
    for s in range(3):
        fwd(params, 2.0 * jax.random.normal(jax.random.PRNGKey(100 + s), x.shape))[0].block_until_ready()
    check("traces after 3 differently-routed inputs minus 1", float(len(traces) - 1), 0.0, results)

    load = np.bincount(np.asarray(jax.lax.top_k(logits, F.topk)[1]).ravel(), minlength=F.memories)
    print(f"router load per memory (fraction of routed slots): "
          f"{np.round(load / load.sum(), 3).tolist()}; aux loss "
          f"{float(load_balancing_loss(logits, F.topk)):.3f} (1 slot-balanced = {F.topk})")

    grad_fn = jax.jit(jax.grad(lambda p, x: loss(p, x, "xla")))
    for name, fn in (("forward", lambda: fwd(params, x)[0]), ("forward+backward",
                                                               lambda: grad_fn(params, x))):
        jax.block_until_ready(fn())
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            ts.append(time.perf_counter() - t0)
        print(f"jitted {name}: median {1e3 * float(np.median(ts)):.1f} ms "
              f"({F.batch}x{F.seq_len} tokens, {jax.devices()[0].device_kind})")
    print(f"(compilations of the jitted forward: {len(traces)})")
    print(f"\n{sum(results)} passed, {len(results) - sum(results)} failed")
    if not all(results):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
