"""Backward kernel of the chunked gated delta rule in Pallas Mosaic (TPU).

The forward kernel (``mosaic.gated_delta_fwd(..., store_states=True)``) also stores the state at
the start of every chunk, h [B, H, Nc, dk, dv] float32.  One backward kernel then walks the chunks
of each (row, head) in reverse, grid = (row, head, chunk) with the chunk axis "arbitrary" and the
index maps reading chunk Nc - 1 - c at grid step c, and carries dS = dL/d(state after the chunk)
([dk, dv] float32) in a VMEM scratch buffer.  The whole value dimension is one block (BV = dv):
dq, dk, dbeta and dG sum over all value columns (dP = dO U^T, dW = -dU h^T, dT = dU Vb^T), so one
program per chunk gives them complete; with value blocks they would be partial sums over blocks
(an extra [nv, ...] output summed in XLA, and T / A recomputed per block).

Per-chunk flags come in as scalar-prefetch operands (SMEM), as in the forward:
  * seg: the chunk's segment (-1: unused; its outputs are written as zeros);
  * first: the chunk starts a run (its dS0 is the cotangent of the run's initial state);
  * end: 1 if the chunk ends its segment's last run (dS starts from d(final state) of the segment),
    2 if it ends an earlier run of a segment split into several runs (dS starts from zero: that
    run's end state feeds nothing), else 0;
  * dseg: the segment whose d(final state) block is mapped for the chunk (its own; for unused
    chunks the one already resident, so they trigger no extra copy);
  * run: the block of the per-run d(initial state) output the chunk maps to.

d(initial state) is written per *run*, not per segment, into a [B, Nc, H, dk, dv] float32 output
(a row has at most Nc runs): at the chunk that starts run r, block r gets dS0.  Each run's chunks
are consecutive, so every output block is visited in one stretch and written back once; XLA then
adds the runs of each segment (a segment split into several runs gets the sum of their dS0;
``PackedLayout`` packers never split one).  Indexing it by segment instead would need an
accumulation over non-consecutive visits of one output block, which Pallas does not support
(output blocks are not read back from HBM).  Segments without chunks get d(final state) in the
wrapper.

Chunk algebra (``chunk_grads``; notation of ``common``: E, D the strict / inclusive decay masks,
Kb = diag(b e^G) K, Vb = diag(b) V, Kd = diag(e^{G_C - G}) K, P = (Q K^T) * D), recomputing A, T,
W = T Kb and U = T Vb - W h from the inputs and the stored h:
  dU  = P^T dO + Kd dS,            dP = dO U^T,            dW = -dU h^T,
  dQ  = (dP * D) K + diag(e^G) dO h^T,
  dK  = (dP * D)^T Q + diag(e^{G_C - G}) U dS^T            ("direct" part)
        + diag(b e^G) T^T dW + M K + M^T K,                M = diag(b) (E * dA),
  dA  = -strict_lower(T^T dT T^T),  dT = dW Kb^T + dU Vb^T,
  dV  = diag(b) T^T dU,
  db  = rowsum(T^T dU * V) + e^G rowsum(T^T dW * K) + rowsum(E * dA * K K^T),
  dG  = rowsum(Q * dQ) - rowsum(K * dK_direct) + rowsum(T^T dW * Kb) + rowsum(dA * A)
        - colsum(dA * A), plus at the last row (through G_C)
        sum(K * diag(e^{G_C - G}) U dS^T) + e^{G_C} sum(dS * h),
  dS0 = (diag(e^G) Q)^T dO + e^{G_C} dS - W^T dU          (cotangent of h: the carry).
dG is the cotangent of the chunk-local cumulative log-decay G; XLA turns it into dg (the per-token
log-decay) with a reverse cumsum inside each chunk.  All vectors are 2-D ([C, 1] / [1, C]) and
every block is (C, d) / (dk, dv) with full head dims, as Mosaic wants.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gated_delta import common as cm
from pallas_kernels.gated_delta import mosaic

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST
_mm = mosaic._mm


def _row_to_col(x_row):
    """[1, C] -> [C, 1] with elementwise ops and a reduction only (no vector transpose)."""
    n = x_row.shape[1]
    eye = cm.iota2(n, n, 0) == cm.iota2(n, n, 1)
    return jnp.sum(jnp.where(eye, x_row, 0.0), axis=1, keepdims=True)


def _sum2(x):
    """Sum of a 2-D array as a [1, 1] array (reductions stay 2-D)."""
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def chunk_grads(q, k, v, beta, g_col, g_row, h, do, ds, *, precision=HIGHEST):
    """Cotangents of one chunk (see module doc), plain array code usable inside the kernel.

    q, k [C, dk], v [C, dv], beta, g_col [C, 1] (G: chunk-local cumulative log-decay), g_row [1, C]
    (the same G as a row), h [dk, dv] (state at the chunk start), do [C, dv] (cotangent of the
    chunk's output), ds [dk, dv] (cotangent of the state after the chunk); all float32.
    Returns (dq, dk [C, dk], dv [C, dv], dbeta, dG [C, 1], dh [dk, dv]), float32.
    """
    n = q.shape[0]
    strict = cm.iota2(n, n, 0) > cm.iota2(n, n, 1)
    mm = functools.partial(_mm, precision=precision)
    ct = mosaic.chunk_terms(q, k, v, beta, g_col, g_row, h, precision=precision)  # recomputed
    e_strict, d_incl, kk, t, p = ct.e_strict, ct.d_incl, ct.kk, ct.t, ct.p
    eg, ekd, egl, kb, vb, w, u = ct.eg, ct.ekd, ct.egl, ct.kb, ct.vb, ct.w, ct.u
    # Output and state-update part.
    du = mm(p, do, ta=True) + mm(ct.kd, ds)                # [C, dv]
    dpd = mm(do, u, tb=True) * d_incl                      # [C, C]
    dq = mm(dpd, k) + eg * mm(do, h, tb=True)              # [C, dk]
    dk_inter = ekd * mm(u, ds, tb=True)                    # [C, dk]  through Kd
    dk_direct = mm(dpd, q, ta=True) + dk_inter
    dh = mm(q * eg, do, ta=True) + egl * ds - mm(w, du, ta=True)
    # UT / WY part.
    dw = -mm(du, h, tb=True)                               # [C, dk]
    dt = mm(dw, kb, tb=True) + mm(du, vb, tb=True)         # [C, C]
    dkb = mm(t, dw, ta=True)                               # [C, dk]
    dvb = mm(t, du, ta=True)                               # [C, dv]
    da = jnp.where(strict, -mm(mm(t, dt, ta=True), t, tb=True), 0.0)
    dae = da * e_strict
    m = dae * beta                                         # cotangent of K K^T (strictly lower)
    dk_out = dk_direct + dkb * (beta * eg) + mm(m, k) + mm(m, k, ta=True)
    dv_out = dvb * beta
    dbeta = (jnp.sum(dvb * v, axis=1, keepdims=True) + eg * jnp.sum(dkb * k, axis=1, keepdims=True)
             + jnp.sum(dae * kk, axis=1, keepdims=True))
    ra = m * kk                                            # dA * A
    g_last = _sum2(k * dk_inter) + egl * _sum2(ds * h)     # [1, 1], through G_C
    dg = (jnp.sum(q * dq, axis=1, keepdims=True) - jnp.sum(k * dk_direct, axis=1, keepdims=True)
          + jnp.sum(dkb * kb, axis=1, keepdims=True) + jnp.sum(ra, axis=1, keepdims=True)
          - _row_to_col(jnp.sum(ra, axis=0, keepdims=True))
          + jnp.where(cm.iota2(n, 1, 0) == n - 1, g_last, 0.0))
    return dq, dk_out, dv_out, dbeta, dg, dh


def _bwd_kernel(seg_ref, first_ref, end_ref, _dseg_ref, _run_ref, q_ref, k_ref, v_ref, bcol_ref,
                gcol_ref, grow_ref, h_ref, do_ref, dfinal_ref, dq_ref, dk_ref, dv_ref, dbeta_ref,
                dg_ref, *rest, has_init, precision):
    dinit_ref = rest[0] if has_init else None
    ds_ref = rest[-1]
    b = pl.program_id(0)
    c = pl.num_programs(2) - 1 - pl.program_id(2)      # chunks in reverse
    used = seg_ref[b, c] >= 0
    end = end_ref[b, c]

    @pl.when(jnp.logical_not(used))
    def _unused():
        for ref in (dq_ref, dk_ref, dv_ref, dbeta_ref, dg_ref):
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    @pl.when(used & (end == 1))        # the segment's last chunk: dS = d(final state)
    def _final():
        ds_ref[...] = dfinal_ref[...].astype(F32)

    @pl.when(used & (end == 2))        # end of an earlier run of a split segment: dS = 0
    def _run_end():
        ds_ref[...] = jnp.zeros(ds_ref.shape, F32)

    @pl.when(used)
    def _chunk():
        dq, dk, dv, dbeta, dg, dh = chunk_grads(
            q_ref[...].astype(F32), k_ref[...].astype(F32), v_ref[...].astype(F32), bcol_ref[...],
            gcol_ref[...], grow_ref[pl.ds(c, 1), :], h_ref[...], do_ref[...].astype(F32),
            ds_ref[...], precision=precision)
        dq_ref[...] = dq
        dk_ref[...] = dk
        dv_ref[...] = dv
        dbeta_ref[...] = dbeta
        dg_ref[...] = dg
        ds_ref[...] = dh
        if dinit_ref is not None:
            @pl.when(first_ref[b, c] != 0)
            def _run_start():
                dinit_ref[...] = dh


def walk_flags(layout):
    """Scalar-prefetch operands of the backward kernel ([B, Nc] int32 each; see module doc):
    (seg, first, end, dseg, run), and run_segment [B, Nc]: the segment of each run block
    (num_segments where the row has no such run)."""
    seg = layout.chunk_segment.astype(jnp.int32)
    b, nc = seg.shape
    s = layout.num_segments
    used = seg >= 0
    first = layout.chunk_first() & used
    last = layout.chunk_last()
    c_idx = jnp.broadcast_to(jnp.arange(nc, dtype=jnp.int32), (b, nc))
    rows = jnp.arange(b)[:, None]
    seg_last = jnp.full((b, s), -1, jnp.int32).at[rows, jnp.where(used, seg, s)].max(
        c_idx, mode="drop")                                   # last chunk of each segment
    final_end = last & (c_idx == jnp.take_along_axis(seg_last, jnp.maximum(seg, 0), axis=1))
    end = jnp.where(last, jnp.where(final_end, 1, 2), 0).astype(jnp.int32)
    run = jnp.cumsum(first.astype(jnp.int32), axis=1) - 1     # run index of each used chunk
    run_segment = jnp.full((b, nc), s, jnp.int32).at[rows, jnp.where(first, run, nc)].set(
        seg, mode="drop")
    dseg = mosaic.resident_block_index(seg, used, reverse=True)
    run_block = mosaic.resident_block_index(run, used, reverse=True)
    return (seg, first.astype(jnp.int32), end, dseg, run_block), run_segment


def gated_delta_bwd(q, k, v, g, beta, layout, h, do, dfinal, *, has_init, interpret=False,
                    precision=HIGHEST):
    """Gradients of ``mosaic.gated_delta_fwd`` from its inputs, the stored chunk-start states h
    [B, H, Nc, dk, dv] float32 and the cotangents do [B, L, H, dv], dfinal [B, S, H, dk, dv].

    q, k are the kernels' (normalised / scaled) q', k'.  Returns (dq, dk [B, L, H, dk], dv
    [B, L, H, dv], dg [B, L, H] (of the per-token log-decay), dbeta [B, L, H], dinit
    [B, S, H, dk, dv] or None without ``has_init``), all float32."""
    b, l, hh, dk = q.shape
    dv = v.shape[-1]
    chunk = layout.chunk_size
    s = layout.num_segments
    nc = l // chunk
    qh, kh, vh, b_col, g_col, g_row = mosaic.head_major_inputs(q, k, v, g, beta, chunk)
    doh = jnp.transpose(do.astype(F32), (0, 2, 1, 3))
    flags, run_segment = walk_flags(layout)
    rev = lambda ci: nc - 1 - ci  # noqa: E731

    def seq_spec(d):
        return pl.BlockSpec((None, None, chunk, d), lambda bi, hi, ci, *_: (bi, hi, rev(ci), 0))

    def state_spec(block_of):  # [B, X, H, dk, dv] indexed by a per-chunk prefetch operand
        return pl.BlockSpec((None, None, None, dk, dv),
                            lambda bi, hi, ci, *f: (bi, block_of(f)[bi, rev(ci)], hi, 0, 0))

    in_specs = [seq_spec(dk), seq_spec(dk), seq_spec(dv), seq_spec(1), seq_spec(1),
                pl.BlockSpec((None, None, nc, chunk), lambda bi, hi, ci, *_: (bi, hi, 0, 0)),
                pl.BlockSpec((None, None, None, dk, dv),
                             lambda bi, hi, ci, *_: (bi, hi, rev(ci), 0, 0)),
                seq_spec(dv), state_spec(lambda f: f[3])]
    out_specs = [seq_spec(dk), seq_spec(dk), seq_spec(dv), seq_spec(1), seq_spec(1)]
    out_shape = [jax.ShapeDtypeStruct((b, hh, l, d), F32) for d in (dk, dk, dv, 1, 1)]
    if has_init:
        out_specs.append(state_spec(lambda f: f[4]))
        out_shape.append(jax.ShapeDtypeStruct((b, nc, hh, dk, dv), F32))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(flags),
        grid=(b, hh, nc),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((dk, dv), F32)],
    )
    outs = pl.pallas_call(
        functools.partial(_bwd_kernel, has_init=has_init, precision=precision),
        grid_spec=grid_spec,
        out_shape=tuple(out_shape),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="gdn_mosaic_bwd",
    )(*flags, qh, kh, vh, b_col, g_col, g_row, h, doh, dfinal.astype(F32))
    dqh, dkh, dvh, dbeta_h, dg_h = outs[:5]
    time_major = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # noqa: E731
    dg = cm.chunk_cumsum_vjp(dg_h[..., 0], chunk)    # dG (w.r.t. the chunk-local cumsum G) -> dg
    dinit = None
    if has_init:
        rows = jnp.arange(b)[:, None]
        dinit = jnp.zeros((b, s, hh, dk, dv), F32).at[rows, run_segment].add(outs[5], mode="drop")
        # Segments without chunks: the initial state is the final state.
        has_chunks = jnp.zeros((b, s), bool).at[rows, run_segment].set(True, mode="drop")
        dinit = jnp.where(has_chunks[:, :, None, None, None], dinit, dfinal.astype(F32))
    return (time_major(dqh), time_major(dkh), time_major(dvh), jnp.transpose(dg, (0, 2, 1)),
            jnp.transpose(dbeta_h[..., 0], (0, 2, 1)), dinit)
