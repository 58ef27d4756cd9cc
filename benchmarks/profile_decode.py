"""Where does a decode step's time go?  GPU-kernel profile of the jitted decode loop.

  python -m benchmarks.profile_decode [--models mom,transformer] [--batches 1,64] [--block 8]
      [--step_impls auto,xla] [--check] [--out_dir benchmarks/results] [--tiny]

For each (model, batch) it warms up ``Decoder.advance`` (the real while_loop decode), then records a
``jax.profiler`` trace of one block of ``--block`` tokens and reads the trace back
(``jax.profiler.ProfileData``): per step it reports the number of GPU kernels, the summed kernel
time ("busy") vs the wall time (busy / wall << 1 means the step is bound by launches and host
work, not by the GPU), and the kernels that take the most time, grouped by name.  It also counts
the instructions of the compiled while-loop body (fusions, custom calls, copies).
``--step_impls``: the recurrent layers' decode step, "auto" (the fused Pallas step kernel on GPU)
and/or "xla" (gather / update / scatter), profiled side by side.  ``--check``: one decode step of
each model (a float32 copy) with each step implementation from the same random cache ("highest"
matmuls),
max relative difference of the logits and of the new cache.
Writes ``<out_dir>/decode_profile_<device>.json``.  No ml_collections / grain imports.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.bench_decode import TINY, VARIANT, random_cache
from benchmarks.timing import write_results
from experiments.configs import lm_340m
from mom_jax.decoding import Decoder, SamplingConfig
from mom_jax.models import LanguageModel, ModelConfig
from mom_jax.ops import api as ops_api


def set_step_impl(step_impl: str) -> None:
    """"auto": the fused step kernel on GPU (the default); "xla": gather / update / scatter."""
    ops_api.AUTO_STEP_PREFERS_PALLAS = step_impl == "auto"


def check_step(model_kwargs: dict, batch: int = 2) -> dict:
    """Max relative difference between the step implementations (see module doc), on a float32
    copy of the model (in bf16 a one-ulp difference can flip a later layer's top-k routing)."""
    model = LanguageModel(ModelConfig(**dict(model_kwargs, dtype="float32"), remat=False),
                          rngs=nnx.Rngs(0))
    cache = random_cache(model, batch, 64, 16)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (batch,), 0, model.cfg.vocab_size)
    graphdef, params = nnx.split(model)
    outs = {}
    for impl in ("auto", "xla"):
        set_step_impl(impl)
        with jax.default_matmul_precision("highest"):
            outs[impl] = jax.jit(lambda p, t, c: nnx.merge(graphdef, p).step(t, c))(
                params, tokens, cache)
    set_step_impl("auto")

    def rel(a, b):
        a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
    (la, ca), (lx, cx) = outs["auto"], outs["xla"]
    return dict(logits_rel=rel(la, lx),
                cache_rel=max(rel(a, b) for a, b in zip(jax.tree.leaves(ca), jax.tree.leaves(cx))),
                finite=bool(jnp.all(jnp.isfinite(la))))


def body_op_counts(hlo_text: str) -> dict:
    """Counts instruction kinds in the largest while-loop body of an optimised HLO module."""
    comps, cur = {}, None
    for line in hlo_text.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m:
            cur = m.group(1)
            comps[cur] = []
        elif cur is not None:
            comps[cur].append(line)
    bodies = [b.lstrip("%") for b in re.findall(r"body=(%?[\w.\-]+)", hlo_text)]
    if not bodies:
        return {}
    body = max(bodies, key=lambda b: len(comps.get(b, [])))
    ops = collections.Counter()
    for line in comps.get(body, []):
        m = re.search(r"= \S+ ([a-z][\w\-]*)\(", line)
        if m:
            ops[m.group(1)] += 1
    return dict(ops.most_common())


def kernel_events(trace_dir: str):
    """[(name, start_ns, duration_ns)] of the GPU kernels in the newest trace under trace_dir."""
    from jax._src.lib import _profile_data
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    data = _profile_data.ProfileData.from_file(path)
    events, layout = [], []
    for plane in data.planes:
        lines = list(plane.lines)
        layout.append((plane.name, [(line.name, len(list(line.events))) for line in lines]))
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in lines:
            # Kernels run on the stream lines marked Compute (copies may share them).
            if "Stream" not in line.name or "Compute" not in line.name:
                continue
            for ev in line.events:
                events.append((ev.name, ev.start_ns, ev.duration_ns))
    return events, layout


def profile_one(model, dec, batch, block, context=1024):
    room = block * 6 + 8
    cache = random_cache(model, batch, context, room)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (batch,), 0, model.cfg.vocab_size)
    state = dec.from_cache(cache, tokens, context, max_new_tokens=block * 6,
                           sampling=SamplingConfig(temperature=0.0))
    del cache
    stop, sampling, pad_id = dec._request
    state, _ = dec.advance(state, block)      # also computes the Decoder's decode weights
    hlo = dec._advance.lower(dec.params, dec._decode_weights, state, stop,
                             jnp.asarray(block, jnp.int32), sampling=sampling,
                             pad_id=pad_id).compile().as_text()
    state, _ = dec.advance(state, block)
    t0 = time.perf_counter()
    state, steps = dec.advance(state, block)
    wall_unprofiled = (time.perf_counter() - t0) / steps
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            t0 = time.perf_counter()
            state, steps = dec.advance(state, block)
            wall = (time.perf_counter() - t0) / steps
        events, layout = kernel_events(d)
    del state
    by_name = collections.defaultdict(lambda: [0, 0])
    for name, _, dur in events:
        short = re.sub(r"[._]\d+$", "", name)[:80]
        by_name[short][0] += 1
        by_name[short][1] += dur
    busy_ns = sum(d for _, _, d in events)
    span_ns = (max(s + d for _, s, d in events) - min(s for _, s, _ in events)) if events else 0
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:40]
    return dict(
        batch=batch, block=block, steps=steps,
        ms_per_token_unprofiled=1e3 * wall_unprofiled, ms_per_token_profiled=1e3 * wall,
        kernels_per_token=len(events) / steps, gpu_busy_ms_per_token=busy_ns / 1e6 / steps,
        gpu_span_ms_per_token=span_ns / 1e6 / steps,
        body_ops=body_op_counts(hlo), trace_layout=layout,
        top_kernels=[dict(name=n, count_per_token=c / steps, ms_per_token=t / 1e6 / steps)
                     for n, (c, t) in top])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mom,transformer")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--out_dir", default="benchmarks/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--step_impls", default="auto")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    dev = jax.devices()[0].device_kind
    tag = args.tag or re.sub(r"[^a-z0-9]+", "_", dev.lower()).strip("_")
    os.makedirs(args.out_dir, exist_ok=True)
    out = os.path.join(args.out_dir, f"decode_profile_{tag}.json")
    rows = []
    for name in args.models.split(","):
        kw = lm_340m.model_kwargs(VARIANT[name])
        if args.tiny:
            kw.update(TINY)
        model = LanguageModel(ModelConfig(**kw, remat=False), rngs=nnx.Rngs(0))
        if args.check:
            r = dict(model=name, check=check_step(kw))
            rows.append(r)
            print(f"\n== {name} step check (fused kernel vs XLA step): {r['check']}", flush=True)
        for step_impl, b in [(i, int(x)) for x in args.batches.split(",")
                             for i in args.step_impls.split(",")]:
            set_step_impl(step_impl)
            dec = Decoder(model)
            r = dict(model=name, step_impl=step_impl, **profile_one(model, dec, b, args.block))
            rows.append(r)
            print(f"\n== {name} B{b} step={step_impl}: {r['ms_per_token_unprofiled']:.2f} ms/token "
                  f"(profiled {r['ms_per_token_profiled']:.2f}); {r['kernels_per_token']:.0f} "
                  f"kernels/token, GPU busy {r['gpu_busy_ms_per_token']:.2f} ms, span "
                  f"{r['gpu_span_ms_per_token']:.2f} ms", flush=True)
            print("   while body:", r["body_ops"])
            for k in r["top_kernels"][:25]:
                print(f"   {k['ms_per_token']:7.3f} ms {k['count_per_token']:6.1f}x  {k['name']}")
            write_results(out, dev, rows=rows)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
