"""Gated delta rule kernel: Pallas (Triton lowering) vs the chunked XLA form, forward and fwd+bwd.

Usage (GPU machine):
  PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_gated_delta_kernel.py --out DIR
      [--shapes 8,2048,4,256,256 ...] [--repeats 30] [--breakdown] [--profile] [--sweep]
      [--budget-s 300]
      [--ut-kernels split,masked]

What it does, in one process:
  1. correctness at every shape: Pallas output (bf16 q/k/v, the timed path) against the float32
     token-by-token scan (highest matmul precision), relative error ||a-b||/||b||, NaN check; Pallas
     gradients of q, k, v, g, beta against the float32 chunked XLA form's gradients (same inputs);
  2. timing: jit once, 3 warm-up calls, then --repeats calls each ended by jax.block_until_ready;
     median (min, max) in ms, Pallas and XLA side by side, fwd and fwd+bwd (value_and_grad of
     sum(o * r), r random, w.r.t. q, k, v, g, beta); also the floor of such a timed call (a
     jitted x + 1 on 8 floats: dispatch and synchronisation, no real GPU work); for Pallas also
     the queued time (``timing.time_queued``: 10 rounds of 10 calls issued back to back, one
     block per round, median per-call time: the host round trip is not in every call);
  3. --breakdown: every Pallas kernel timed alone (forward: UT transform, state walk, outputs;
     backward: P^T dO, dS walk, dq/dk/dW, WY part) at --breakdown-shapes (default: all);
  3b. --profile: a ``jax.profiler`` trace of 5 Pallas fwd and 5 fwd+bwd calls per shape, read back
     as GPU kernels by name (ms per call: every kernel, including XLA's glue around the Pallas
     ones; ``profile_layer.profile_calls``);
  4. --sweep: kernel configurations (--variants, JSON Config fields) at --sweep-shapes (indices),
     until --budget-s seconds since the start have passed.
--ut-kernels split,masked runs 1-3 once per UT kernel (``Config.ut_kernel``; default: the one in
--config) in the same process, side by side: correctness, fwd and fwd+bwd timing, and (with
--breakdown) every kernel alone, the UT kernel also without its T output (the inference forward).
The XLA rows and the references are computed once per shape.
Inputs are random (never zeros): q, k, v ~ N(0,1) in bf16, g = log_sigmoid(N(0,1)*1.5 + 2.5) (fp32),
beta = sigmoid(N(0,1)).  The API L2-normalises q, k and scales q by dk**-0.5 for both impls.
Results: DIR/bench_gated_delta_kernel.json and .md (written after every measurement).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.profile_layer import profile_calls  # noqa: E402
from benchmarks.timing import time_fn, time_queued  # noqa: E402
from mom_jax import ops  # noqa: E402
from mom_jax.ops import common as ops_common  # noqa: E402
from mom_jax.ops import scan as ops_scan  # noqa: E402
import pallas_kernels  # noqa: E402,F401
from pallas_kernels.gated_delta import api as gd_api  # noqa: E402

DEFAULT_SHAPES = ["8,2048,4,256,256", "8,2048,16,128,128", "2,16384,16,128,128"]
T0 = time.time()


def rel_err(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make_inputs(shape, seed=0):
    b, t, h, dk, dv = shape
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (b, t, h, dk), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, t, h, dk), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, t, h, dv), jnp.bfloat16)
    g = jax.nn.log_sigmoid(1.5 * jax.random.normal(ks[3], (b, t, h)) + 2.5)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h)))
    r = jax.random.normal(ks[5], (b, t, h, dv), jnp.float32)
    return (q, k, v, g, beta), r


def make_fns(impl, r):
    def fwd(q, k, v, g, beta):
        return ops.gated_delta_rule(q, k, v, g, beta, impl=impl)[0]

    def loss(q, k, v, g, beta):
        return jnp.sum(fwd(q, k, v, g, beta).astype(jnp.float32) * r)

    return jax.jit(fwd), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def breakdown(shape, config, repeats):
    """Times every Pallas kernel alone (inputs prepared as the API does; one segment per row):
    forward UT transform (T, W, U; ``config.ut_kernel``; also without T, as the inference forward
    runs it: ut_transform_no_t, and for "split" each of its three launches: ut_gram, ut_inverse,
    ut_apply; these are not part of the sums), state walk (h, v_new), outputs; backward
    P^T dO, dS walk, dq/dk/dW, WY part.  The forward kernels take the raw q, k and apply the
    L2-norm and the q scale themselves (as the op does); the backward ones take q, k normalised."""
    from mom_jax.ops.common import rows_layout  # noqa: PLC0415
    from pallas_kernels.gated_delta import common as cm  # noqa: PLC0415
    from pallas_kernels.gated_delta import triton_bwd, triton_common, triton_fwd  # noqa: PLC0415
    (q, k, v, g, beta), r = make_inputs(shape)
    b, t, h, dk, dv = shape
    chunk = 64
    layout = rows_layout(b, t, chunk)
    interp = gd_api._interpret()
    op = triton_common.operand_dtype(config.precision, interp)
    qp, kp, vp, beta_t, gcum_t, _ = gd_api._prepare(q, k, v, g, beta, None, chunk, op)
    qn = (ops_common.l2norm(q) * dk ** -0.5).astype(op)   # the backward kernels' q', k'
    kn = ops_common.l2norm(k).astype(op)
    do = r.astype(op)
    lo, hi, seg, first = cm.segment_ranges(layout)
    last = layout.chunk_last().astype(jnp.int32)
    bv = config.walk_block_v(dk, dv, b * h)
    bvb = config.walk_block_v(dk, dv, b * h, backward=True)
    pbv = min(dv, config.par_block_v)
    bk = min(dk, config.block_k)
    prec = dict(precision=config.precision, interpret=interp)
    par = dict(chunk=chunk, num_warps=config.par_num_warps, block_k=bk, block_v=pbv, **prec)
    bpar = dict(par, num_warps=config.bwd_par_warps())
    out = {}

    def timed(name, fn, *args):
        f = jax.jit(fn)
        out[name + "_ms"] = time_fn(f, args, repeats)["median_ms"]
        return f(*args)

    ut = dict(ut_precision=config.ut_precision, num_warps=config.ut_warps(), block_k=bk,
              block_v=pbv, kernel=config.ut_kernel, wu_num_warps=config.par_num_warps,
              num_stages=config.par_stages("ut"), **prec)
    tm, w, u, rk = timed("ut_transform", lambda kk, vv, bb, gg: triton_fwd.ut_transform(
        kk, vv, bb, gg, chunk, l2norm=True, **ut), kp, vp, beta_t, gcum_t)
    timed("ut_transform_no_t", lambda kk, vv, bb, gg: triton_fwd.ut_transform(
        kk, vv, bb, gg, chunk, with_t=False, l2norm=True, **ut), kp, vp, beta_t, gcum_t)
    if config.ut_kernel == "split":  # its three launches alone (not part of the sums)
        a, _ = timed("ut_gram", lambda kk, bb, gg: triton_fwd.ut_gram(
            kk, bb, gg, chunk, num_warps=config.par_num_warps, ut_precision=config.ut_precision,
            block_k=bk, interpret=interp, l2norm=True, num_stages=config.par_stages("ut")),
            kp, beta_t, gcum_t)
        timed("ut_inverse", lambda aa: triton_fwd.ut_inverse(
            aa, chunk, t_dtype=op, num_warps=config.ut_warps(),
            ut_precision=config.ut_precision, interpret=interp), a)
        timed("ut_apply", lambda kk, vv, bb, gg, tt, rr: triton_fwd.ut_apply(
            kk, vv, bb, gg, tt, chunk, rk=rr, u_dtype=op, num_warps=config.par_num_warps,
            block_k=bk, block_v=pbv, num_stages=config.par_stages("ut"), **prec),
            kp, vp, beta_t, gcum_t, tm, rk)
    hs, v_new, _ = timed("state_walk", lambda kk, ww, uu, gg, rr: triton_fwd.state_walk(
        kk, ww, uu, gg, None, lo, hi, seg, first, chunk=chunk, num_segments=1, block_v=bv,
        num_warps=config.walk_warps(dk, bv),
        num_stages=config.walk_stages(dk, b * h * dv // bv, chunk, bv, jnp.dtype(op).itemsize),
        block_k=bk, rk=rr, **prec),
        kp, w, u, gcum_t, rk)
    timed("chunk_output", lambda *a: triton_fwd.chunk_output(
        *a[:5], seg, rk=a[5], q_scale=dk ** -0.5, num_stages=config.par_stages("output"), **par),
        qp, kp, gcum_t, hs, v_new, rk)
    qp, kp = qn, kn
    dvl, qdo = timed("bwd_dv_local", lambda *a: triton_bwd.dv_local(
        *a, seg, with_qdo=config.bwd_qdo, num_stages=config.par_stages("dv_local"), **bpar),
        qp, kp, gcum_t, do)
    dfinal = jax.random.normal(jax.random.PRNGKey(3), (b, 1, h, dk, dv), jnp.float32)
    stages = triton_bwd._bwd_walk_stages(config, chunk, dk, bvb, jnp.dtype(op).itemsize)
    walk_in = (qdo,) if config.bwd_qdo else (qp, do)
    dh, du, _ = timed("bwd_state_walk", lambda kk, ww, gg, dd, df, *qa: triton_bwd.state_grad_walk(
        kk, ww, gg, dd, df, lo, hi, seg, first, last, chunk=chunk, num_segments=1, block_v=bvb,
        has_init=False, num_warps=config.walk_warps(dk, bvb), block_k=bk, num_stages=stages,
        **(dict(qdo=qa[0]) if config.bwd_qdo else dict(q=qa[0], do=qa[1])), **prec),
        kp, w, gcum_t, dvl, dfinal, *walk_in)
    _, dkd, dw, *_ = timed("bwd_dqkw", lambda *a: triton_bwd.dqkw(
        *a, seg, num_stages=config.par_stages("dqkw"), **bpar),
                          qp, kp, gcum_t, hs, dh, v_new, do, du)
    timed("bwd_wy", lambda *a: triton_bwd.wy_bwd(
        *a, seg, dv_dtype=v.dtype, num_stages=config.par_stages("wy"), **bpar),
          kp, vp, beta_t, gcum_t, tm, dw, du, dkd)
    out["fwd_kernels_ms"] = sum(out[n + "_ms"] for n in ("ut_transform", "state_walk",
                                                          "chunk_output"))
    out["bwd_kernels_ms"] = sum(out[n + "_ms"] for n in ("bwd_dv_local", "bwd_state_walk",
                                                          "bwd_dqkw", "bwd_wy"))
    return {k_: round(v_, 4) for k_, v_ in out.items()}


def scan_reference(inputs):
    q, k, v, g, beta = inputs
    b, t, h, dk = q.shape
    with jax.default_matmul_precision("highest"):
        qn = ops_common.l2norm(q) * dk ** -0.5
        kn = ops_common.l2norm(k)
        start = jnp.zeros((b, t), bool).at[:, 0].set(True)
        segment = jnp.zeros((b, t), jnp.int32)
        f = jax.jit(lambda *a: ops_scan.recurrent_scan(
            a[0], a[1], a[2], g=a[3], beta=a[4], delta=True, token_start=start,
            token_segment=segment, num_segments=1)[0])
        return f(qn, kn, v.astype(jnp.float32), g, beta)


class Results:
    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.data = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                     "jax": jax.__version__, "config": dataclasses.asdict(gd_api.get_default_config()),
                     "correctness": [], "timing": [], "breakdown": [], "profile": [],
                     "sweep": [], "errors": []}
        os.makedirs(out_dir, exist_ok=True)

    def add(self, kind, row):
        row = dict(row, elapsed_s=round(time.time() - T0, 1))
        self.data[kind].append(row)
        print(kind, json.dumps(row), flush=True)
        self.save()

    def save(self):
        with open(os.path.join(self.out_dir, "bench_gated_delta_kernel.json"), "w") as f:
            json.dump(self.data, f, indent=1)
        lines = [f"# gated delta rule kernel, {self.data['device']} (jax {self.data['jax']})", "",
                 f"Timed-call floor (a jitted x + 1 on 8 floats, same timing): "
                 f"{self.data.get('call_floor_ms', '-')} ms.", "",
                 "| B,T,H,dk,dv | UT kernel | pallas fwd ms | queued | xla fwd ms | "
                 "pallas fwd+bwd ms | queued | xla fwd+bwd ms |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        by, xla = {}, {}
        for r in self.data["timing"]:
            if r["impl"] == "xla":
                xla[(r["shape"], r["what"])] = r["median_ms"]
            else:
                d = by.setdefault((r["shape"], r.get("ut_kernel", "-")), {})
                d[r["what"]] = r["median_ms"]
                d[r["what"] + "_queued"] = r.get("queued_median_ms")
        for (shape, utk), d in by.items():
            cells = [d.get("fwd"), d.get("fwd_queued"), xla.get((shape, "fwd")), d.get("fwdbwd"),
                     d.get("fwdbwd_queued"), xla.get((shape, "fwdbwd"))]
            lines.append(f"| {shape} | {utk} | "
                         + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
        lines += ["", "| B,T,H,dk,dv | UT kernel | o vs fp32 scan | grads vs fp32 XLA "
                  "(q,k,v,g,beta) | NaN |", "| --- | --- | --- | --- | --- |"]
        for r in self.data["correctness"]:
            lines.append(f"| {r['shape']} | {r.get('ut_kernel', '-')} | "
                         f"{r.get('o_rel_vs_scan', '-')} | {r.get('grad_rel', '-')} | "
                         f"{r.get('nan', '-')} |")
        if self.data["breakdown"]:
            keys = [k_ for k_ in self.data["breakdown"][0] if k_.endswith("_ms")]
            lines += ["", "| B,T,H,dk,dv | UT kernel | " + " | ".join(k_[:-3] for k_ in keys)
                      + " |", "| --- | --- |" + " --- |" * len(keys)]
            for r in self.data["breakdown"]:
                lines.append(f"| {r['shape']} | {r.get('ut_kernel', '-')} | "
                             + " | ".join(f"{r.get(k_, '-')}" for k_ in keys) + " |")
        for r in self.data["profile"]:
            lines += ["", f"GPU-kernel profile, {r['shape']} {r['what']} ({r['ut_kernel']}): wall "
                      f"{r['wall_ms_per_call']} ms/call, GPU busy {r['gpu_busy_ms_per_call']} ms, "
                      f"{r['kernels_per_call']:.0f} kernels", "", "| kernel | count | ms |",
                      "| --- | --- | --- |"]
            lines += [f"| {k['name']} | {k['count']:g} | {k['ms']} |" for k in r["top_kernels"]]
        if self.data["sweep"]:
            lines += ["", "| config | shape | fwd ms | fwd+bwd ms |", "| --- | --- | --- | --- |"]
            for r in self.data["sweep"]:
                lines.append(f"| {r['config']} | {r['shape']} | {r.get('fwd_ms', '-')} | "
                             f"{r.get('fwdbwd_ms', '-')} |")
        with open(os.path.join(self.out_dir, "bench_gated_delta_kernel.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--check-shapes", nargs="*", type=int, default=None)
    ap.add_argument("--skip-xla", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="time each kernel alone")
    ap.add_argument("--profile", action="store_true",
                    help="GPU-kernel profile (jax.profiler) of the Pallas fwd and fwd+bwd calls")
    ap.add_argument("--breakdown-shapes", nargs="*", type=int, default=None,
                    help="indices into --shapes (default: all)")
    ap.add_argument("--config", default="{}", help="JSON Config fields for the main runs")
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--variants", nargs="*", default=[
        '{"bwd_qdo": false}', '{"bwd_num_stages": 1}', '{"block_v": 64}',
        '{"block_v": 16, "num_warps": 4}', '{"par_num_warps": 4}'])
    ap.add_argument("--sweep-shapes", nargs="*", type=int, default=[0, 2])
    ap.add_argument("--ut-kernels", "--ut_kernels", dest="ut_kernels", default=None,
                    help="comma-separated Config.ut_kernel values to run side by side, e.g. "
                         "split,masked (default: the --config one)")
    args = ap.parse_args()
    gd_api.set_default_config(dataclasses.replace(gd_api.get_default_config(),
                                                  **json.loads(args.config)))
    base = gd_api.get_default_config()
    ut_kernels = args.ut_kernels.split(",") if args.ut_kernels else [base.ut_kernel]
    ut_configs = {k_: dataclasses.replace(base, ut_kernel=k_) for k_ in ut_kernels}  # validates
    res = Results(args.out)
    print("device:", res.data["device"], "backend:", res.data["backend"], flush=True)
    # What one timed call costs with (almost) no GPU work: jit dispatch + block_until_ready.
    res.data["call_floor_ms"] = round(time_fn(jax.jit(lambda x: x + 1), (jnp.ones((8,)),),
                                              args.repeats)["median_ms"], 4)
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]

    for si, shape in enumerate(shapes):
        name = ",".join(map(str, shape))
        inputs, r = make_inputs(shape)
        xf, xg = make_fns("xla", r)
        check = not args.no_check and (args.check_shapes is None or si in args.check_shapes)
        refs = {}  # the fp32 scan output and fp32 XLA gradients, once per shape

        def reference(key):
            if key not in refs:
                if key == "o":
                    refs["o"] = scan_reference(inputs)
                    refs["xla_o_rel"] = round(rel_err(xf(*inputs), refs["o"]), 6)
                else:
                    f32_inputs = tuple(x.astype(jnp.float32) for x in inputs)
                    with jax.default_matmul_precision("highest"):
                        refs["grads"] = make_fns("xla", r)[1](*f32_inputs)[1]
            return refs[key]

        for utk, config in ut_configs.items():
            gd_api.set_default_config(config)
            pf, pg = make_fns("pallas", r)  # new jit: traced with this config
            if check:
                try:
                    row = {"shape": name, "ut_kernel": utk}
                    o = pf(*inputs)
                    row["nan"] = bool(jnp.isnan(o).any())
                    row["o_rel_vs_scan"] = round(rel_err(o, reference("o")), 6)
                    row["xla_o_rel_vs_scan"] = refs["xla_o_rel"]
                    _, gp = pg(*inputs)
                    row["grad_rel"] = [round(rel_err(a, b), 6)
                                       for a, b in zip(gp, reference("grads"))]
                    row["grad_nan"] = bool(any(bool(jnp.isnan(a).any()) for a in gp))
                    res.add("correctness", row)
                except Exception as e:  # noqa: BLE001
                    res.add("errors", {"shape": name, "ut_kernel": utk, "stage": "check",
                                       "error": repr(e)[:2000]})
                    traceback.print_exc()
            for what, fn in (("fwd", pf), ("fwdbwd", pg)):
                try:
                    res.add("timing", dict(shape=name, impl="pallas", ut_kernel=utk, what=what,
                                           **time_fn(fn, inputs, args.repeats),
                                           **time_queued(fn, inputs)))
                    if args.profile:
                        res.add("profile", dict(shape=name, ut_kernel=utk, what=what,
                                                **profile_calls(fn, inputs, 5)))
                except Exception as e:  # noqa: BLE001
                    res.add("errors", {"shape": name, "impl": "pallas", "ut_kernel": utk,
                                       "what": what, "error": repr(e)[:2000]})
                    traceback.print_exc()
        gd_api.set_default_config(base)
        refs.clear()
        for what, fn in (() if args.skip_xla else (("fwd", xf), ("fwdbwd", xg))):
            try:
                res.add("timing", dict(shape=name, impl="xla", what=what,
                                       **time_fn(fn, inputs, args.repeats)))
            except Exception as e:  # noqa: BLE001
                res.add("errors", {"shape": name, "impl": "xla", "what": what,
                                   "error": repr(e)[:2000]})
                traceback.print_exc()

    if args.breakdown:
        for i in (range(len(shapes)) if args.breakdown_shapes is None else args.breakdown_shapes):
            if i >= len(shapes):
                continue
            name = ",".join(map(str, shapes[i]))
            for utk, config in ut_configs.items():
                try:
                    res.add("breakdown", dict(shape=name, ut_kernel=utk,
                                              **breakdown(shapes[i], config, args.repeats)))
                except Exception as e:  # noqa: BLE001
                    res.add("errors", {"shape": name, "ut_kernel": utk, "stage": "breakdown",
                                       "error": repr(e)[:1500]})
                    traceback.print_exc()

    if args.sweep:
        variants = [json.loads(v) for v in args.variants]
        sweep_shapes = [shapes[i] for i in args.sweep_shapes if i < len(shapes)]
        for var in variants:
            for shape in sweep_shapes:
                if time.time() - T0 > args.budget_s:
                    res.add("errors", {"stage": "sweep", "error": "time budget reached"})
                    break
                name = ",".join(map(str, shape))
                gd_api.set_default_config(dataclasses.replace(base, **var))
                inputs, r = make_inputs(shape)
                pf, pg = make_fns("pallas", r)
                row = {"config": json.dumps(var), "shape": name}
                try:
                    o = pf(*inputs)
                    row["nan"] = bool(jnp.isnan(o).any())
                    row["fwd_ms"] = round(time_fn(pf, inputs, args.repeats)["median_ms"], 4)
                    row["fwdbwd_ms"] = round(time_fn(pg, inputs, args.repeats)["median_ms"], 4)
                except Exception as e:  # noqa: BLE001
                    row["error"] = repr(e)[:1500]
                res.add("sweep", row)
        gd_api.set_default_config(base)
    print(open(os.path.join(args.out, "bench_gated_delta_kernel.md")).read())


if __name__ == "__main__":
    main()
