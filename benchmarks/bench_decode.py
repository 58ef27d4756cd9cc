"""Decode latency / memory and prefill throughput: 340M MoM vs 340M Transformer++ (KV cache).

  python -m benchmarks.bench_decode [--contexts 1024,4096,16384,32768] [--batches 1,64]
      [--models mom,transformer] [--deadline_s 240] [--out_dir benchmarks/results] [--tiny]

What is timed (be precise about it):
* decode: the real jitted decode loop (``mom_jax.decoding.Decoder.advance``: a lax.while_loop of
  ``LanguageModel.step`` + greedy choice + bookkeeping) run for ``--block`` tokens per call; per-token
  latency = median over ``--reps`` calls (after 2 warm-up calls) of call time / block.  The cache
  "at context N" is built directly with the right shapes and random contents (NOT by a prefill of
  N tokens, which would take minutes at batch 64 x 32k): for MoM the cache shapes do not depend on
  N at all (the state of a recurrent layer is the same size after 1k or 32k tokens), so its decode
  step is literally the same computation at every context; for the Transformer++ the KV cache has
  N + room slots, ``length`` = N, so each step reads N keys/values per layer.
* memory: exact bytes of the cache pytree (``cache_gib``), and the device's bytes in use with
  params + cache + decode state resident (``in_use_gib``, from ``memory_stats``).  Configurations
  whose cache would not fit in 85% of the device are skipped and reported (not run).
* prefill: ``LanguageModel.prefill(tokens [1, N], last_only=True)`` jitted (chunked kernels for
  MoM, cuDNN/XLA attention for the Transformer), median of 3 after a warm-up; tokens/s = N / time.
Everything runs in the model's bf16 compute dtype with float32 parameters (lm_340m.model_kwargs).
Results go to ``<out_dir>/decode_<device>.json`` after every measurement (a deadline stops starting
new measurements so a time-limited run still leaves its data), and a plot ``decode_<device>.png``
(latency and memory vs context) if matplotlib is available.
This script imports neither ml_collections nor grain (the GPU machine has neither).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.timing import write_results
from experiments.configs import lm_340m
from mom_jax.decoding import Decoder, SamplingConfig
from mom_jax.models import LanguageModel, ModelConfig
from mom_jax.models.attention import KVCache

VARIANT = {"mom": "mom", "transformer": "transformer"}
TINY = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=2, head_dim=32,
            attn_num_heads=4, attn_head_dim=16)


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def random_cache(model: LanguageModel, batch: int, context: int, room: int, seed: int = 0):
    """A model cache of the shapes the model has after ``context`` tokens, random contents.

    Recurrent states ~ N(0, 0.02^2) (float32), conv buffers ~ N(0, 1) (compute dtype); attention KV
    caches with ``context + room`` slots, the first ``context`` random, ``length = context``.
    Built on device by one jitted function per configuration (nothing crosses the host).
    """
    max_len = context + room if model.has_attention else None
    shapes = jax.eval_shape(lambda: model.init_cache(batch, max_len))

    @jax.jit
    def fill(key):
        out = []
        for i, layer_shape in enumerate(shapes):
            k_i = jax.random.fold_in(key, i)
            if isinstance(layer_shape, KVCache):
                s = layer_shape.k
                kv = jax.random.normal(k_i, (2,) + s.shape, jnp.float32).astype(s.dtype)
                slot = jnp.arange(s.shape[1])[None, None, :, None, None]
                kv = jnp.where(slot < context, kv, 0)
                out.append(KVCache(k=kv[0], v=kv[1], length=jnp.full((batch,), context, jnp.int32)))
                continue
            leaves, treedef = jax.tree.flatten(layer_shape)
            filled = []
            for j, s in enumerate(leaves):
                scale = 0.02 if s.dtype == jnp.float32 and len(s.shape) >= 4 else 1.0
                filled.append((scale * jax.random.normal(jax.random.fold_in(k_i, j), s.shape,
                                                         jnp.float32)).astype(s.dtype))
            out.append(jax.tree.unflatten(treedef, filled))
        return tuple(out)

    return fill(jax.random.PRNGKey(seed))


def mem_in_use() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_in_use", 0) / 2**30


def mem_limit() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit", 0) / 2**30


def predicted_cache_gib(model: LanguageModel, batch: int, context: int, room: int) -> float:
    max_len = context + room if model.has_attention else None
    return tree_bytes(jax.eval_shape(lambda: model.init_cache(batch, max_len))) / 2**30


def bench_decode(model, dec, name, batch, context, block, reps):
    room = block * (reps + 3) + 8
    cache = random_cache(model, batch, context, room)
    cache_gib = tree_bytes(cache) / 2**30
    tokens = jax.random.randint(jax.random.PRNGKey(1), (batch,), 0, model.cfg.vocab_size)
    state = dec.from_cache(cache, tokens, context, max_new_tokens=block * (reps + 3),
                           sampling=SamplingConfig(temperature=0.0))
    del cache
    t0 = time.perf_counter()
    state, _ = dec.advance(state, block)          # compiles
    compile_s = time.perf_counter() - t0
    state, _ = dec.advance(state, block)
    in_use = mem_in_use()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        state, steps = dec.advance(state, block)   # int(steps) syncs with the device
        times.append((time.perf_counter() - t0) / steps)
    ok = bool(np.all(np.asarray(state.num_generated) == block * (reps + 2)))
    del state
    med = statistics.median(times)
    return dict(kind="decode", model=name, batch=batch, context=context, block=block,
                ms_per_token=1e3 * med, ms_per_token_min=1e3 * min(times),
                tokens_per_s=batch / med, cache_gib=cache_gib, in_use_gib=in_use,
                first_call_s=compile_s, counts_ok=ok)


def bench_prefill(model, name, context, reps=3):
    graphdef, params = nnx.split(model)

    @jax.jit
    def prefill(params, tokens):
        m = nnx.merge(graphdef, params)
        logits, cache = m.prefill(tokens, max_len=context, last_only=True)
        return logits, cache

    tokens = jax.random.randint(jax.random.PRNGKey(2), (1, context), 0, model.cfg.vocab_size)
    t0 = time.perf_counter()
    out = jax.block_until_ready(prefill(params, tokens))
    compile_s = time.perf_counter() - t0
    finite = bool(jnp.all(jnp.isfinite(out[0])))
    del out
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(prefill(params, tokens))
        times.append(time.perf_counter() - t0)
        del out
    med = statistics.median(times)
    return dict(kind="prefill", model=name, batch=1, context=context, ms=1e3 * med,
                tokens_per_s=context / med, first_call_s=compile_s, finite=finite)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not available: no plot (data in the JSON)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    dec = [r for r in rows if r.get("kind") == "decode" and "ms_per_token" in r]
    for (model, batch) in sorted({(r["model"], r["batch"]) for r in dec}):
        rs = sorted((r for r in dec if r["model"] == model and r["batch"] == batch),
                    key=lambda r: r["context"])
        ctx = [r["context"] for r in rs]
        style = "-o" if model == "mom" else "--s"
        axes[0].plot(ctx, [r["ms_per_token"] for r in rs], style, label=f"{model} B{batch}")
        axes[1].plot(ctx, [r["cache_gib"] for r in rs], style, label=f"{model} B{batch}")
    for ax, yl in zip(axes, ["decode latency per token (ms)", "decode cache (GiB)"]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"340M MoM vs Transformer++ decoding ({jax.devices()[0].device_kind})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mom,transformer")
    ap.add_argument("--contexts", default="1024,4096,16384,32768")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--prefill_contexts", default="1024,4096,16384,32768")
    ap.add_argument("--block", type=int, default=32, help="decode tokens per timed call")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--deadline_s", type=float, default=240.0,
                    help="start no new measurement after this many seconds")
    ap.add_argument("--out_dir", default="benchmarks/results")
    ap.add_argument("--tag", default="", help="file name tag (default: the device kind)")
    ap.add_argument("--tiny", action="store_true", help="tiny model dims (CPU smoke test)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    dev = jax.devices()[0].device_kind
    tag = args.tag or re.sub(r"[^a-z0-9]+", "_", dev.lower()).strip("_")
    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, f"decode_{tag}.json")
    print(f"device: {dev}, jax {jax.__version__}; memory limit {mem_limit():.1f} GiB", flush=True)
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    models = {}
    for name in args.models.split(","):
        kw = lm_340m.model_kwargs(VARIANT[name])
        if args.tiny:
            kw.update(TINY)
        mc = ModelConfig(**kw, remat=False)
        model = LanguageModel(mc, rngs=nnx.Rngs(0))
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        models[name] = (model, Decoder(model), n_params)
        print(f"{name}: {n_params / 1e6:.0f}M params", flush=True)
    rows = []

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_results(json_path, dev, args=vars(args), rows=rows)

    # Priority order (a deadline may cut the tail): decode B1, decode larger batches, prefill.
    plan = [("decode", name, b, c) for b in batches for name in models for c in contexts]
    plan += [("prefill", name, 1, c) for c in [int(x) for x in args.prefill_contexts.split(",") if x]
             for name in models]
    limit = mem_limit()
    for kind, name, batch, ctx in plan:
        elapsed = time.perf_counter() - t_start
        base = dict(kind=kind, model=name, batch=batch, context=ctx)
        if elapsed > args.deadline_s:
            record(dict(base, skipped=f"deadline ({elapsed:.0f}s > {args.deadline_s:.0f}s)"))
            continue
        model, dec, _ = models[name]
        if kind == "decode":
            need = predicted_cache_gib(model, batch, ctx, args.block * (args.reps + 3) + 8)
            if limit and need > 0.85 * limit - 4:
                record(dict(base, skipped=f"cache {need:.1f} GiB does not fit "
                                          f"({limit:.0f} GiB device)", cache_gib=need))
                continue
        try:
            row = (bench_decode(model, dec, name, batch, ctx, args.block, args.reps)
                   if kind == "decode" else bench_prefill(model, name, ctx))
        except Exception as e:  # keep measuring the others; report the failure
            row = dict(base, error=f"{type(e).__name__}: {str(e)[:300]}")
        record(row)
    png = os.path.join(args.out_dir, f"decode_{tag}.png")
    if plot(rows, png):
        print(f"plot: {png}")
    print(f"\n| model | batch | context | ms/token | tokens/s | cache GiB | in use GiB |  ({dev})")
    for r in rows:
        if r["kind"] == "decode" and "ms_per_token" in r:
            print(f"| {r['model']} | {r['batch']} | {r['context']} | {r['ms_per_token']:.2f} | "
                  f"{r['tokens_per_s']:,.0f} | {r['cache_gib']:.2f} | {r['in_use_gib']:.1f} |")
    print("\n| model | context | prefill ms | tokens/s |")
    for r in rows:
        if r["kind"] == "prefill" and "ms" in r:
            print(f"| {r['model']} | {r['context']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} |")
    for r in rows:
        if "skipped" in r or "error" in r:
            print(f"not measured: {r['kind']} {r['model']} B{r['batch']} ctx {r['context']}: "
                  f"{r.get('skipped') or r.get('error')}")
    print(f"total {time.perf_counter() - t_start:.0f}s; results: {json_path}")


if __name__ == "__main__":
    main()
