"""Backward kernels of the chunked gated delta rule in Pallas with Triton lowering (GPU).

Forward per chunk (``triton_fwd``; S0 = h the state at the chunk start, Kb = diag(b e^G) K,
Vb = diag(b) V, W = T Kb, U = T Vb, P = (Q K^T) * D, Kd = diag(e^{G_C - G}) K):
  v_new = U - W S0,  O = diag(e^G) Q S0 + P v_new,  S_C = e^{G_C} S0 + Kd^T v_new.
Backward, with dS the cotangent of the state after the chunk, in four launches:
  0. ``dv_local`` (chunk-parallel): P^T dO, the intra-chunk part of du (stored in the operand
     dtype), and (``Config.bwd_qdo``) Q^T diag(e^G) dO per chunk: both independent of dS, so
     kept out of the walk.
  1. ``state_grad_walk`` (sequential, grid (B*S, H, dv/BV)): walks each segment's chunks backwards
     carrying dS ([dk, BV] float32 tiles), stores dh = dS and
       du   = P^T dO + Kd dS                             (cotangent of v_new, i.e. of U)
     per chunk, and carries dS0 = Q^T diag(e^G) dO + e^{G_C} dS - W^T du to the previous chunk.
     The state's value columns evolve independently, so a value block needs nothing from others.
  2. ``dqkw`` (chunk-parallel, grid (B*Nc, H, dk/BK)): loops over the value blocks inside the
     program and accumulates dP = dO v_new^T, dO h^T, v_new dh^T, du h^T; then
       dQ = (dP*D) K + diag(e^G) dO h^T,   dK_direct = (dP*D)^T Q + diag(e^{G_C-G}) v_new dh^T,
       dW = -du h^T,
     and this key block's share of dG (w.r.t. the chunk-local cumulative log-decay G):
       sum_d Q*dQ - sum_d K*dK_direct, plus at the last position
       sum K*diag(e^{G_C-G}) v_new dh^T + e^{G_C} sum dh*h;
     and its share of the row sums <dQ, Q> and <dK_direct, K> (the L2-norm Jacobian's,
     ``api._qk_out``).
  3. ``wy_bwd`` (chunk-parallel, grid (B*Nc, H)): the UT/WY part.  dT = dW Kb^T + du Vb^T,
     dA = -T^T dT T^T (strictly lower), dKb = T^T dW, dVb = T^T du, dV = diag(b) dVb,
     dK = dK_direct + diag(b e^G) dKb + dA' K + dA'^T K
          (dA' = diag(b) (E * dA), E_ij = e^{G_i - G_j}),
     dbeta = sum_d dVb*V + e^G sum_d dKb*K + rowsum(E*dA*KK^T),
     dG += sum_d dKb*Kb + rowsum(dA*A) - colsum(dA*A), and the rest of the row sums <dK, K>.
     The row sums over d are taken as colsum(T * du V^T), colsum(T * dW K^T) and from dA' * KK^T,
     so that no loaded tile feeds both a dot and a reduction (``triton_common.par_stages``).
XLA then adds the dG shares and turns dG into dg by a reverse cumsum inside each chunk.

At a chunk that ends the segment's last run dS = d(final state); at the end of an earlier run (only
for a segment split into several runs) dS = 0; at a chunk that starts a run, dS0 is added to
d(initial state).  Kernels 0, 2 and 3 write zeros on chunks of no segment.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gated_delta import common as cm
from pallas_kernels.gated_delta import triton_common as tc

F32 = jnp.float32
resolve_precision = tc.resolve_precision


# ------------------------------------------------------------------------------------------------
# Kernel 1: sequential reverse walk for the state cotangents
# ------------------------------------------------------------------------------------------------

def state_grad_step(ks, ws, dv_local, gates: tc.Gates, dss, precision, *, qs=None, do=None,
                    qdos=None):
    """Cotangents through one chunk, the key dimension split into blocks.

    ks, ws: lists of [C, BK] tiles of K, W; dv_local: [C, BV] P^T dO (from ``dv_local``); dss:
    list of [BK, BV] float32 tiles of dS; either qs ([C, BK] tiles of Q) and do ([C, BV]), or
    qdos: the [BK, BV] tiles of Q^T diag(e^G) dO precomputed by ``dv_local``.
    Returns (du [C, BV] float32, dS0 tiles)."""
    mm = functools.partial(cm.mm, precision=precision)
    kds = None
    for k_b, ds_b in zip(ks, dss):
        part = mm(k_b, ds_b)
        kds = part if kds is None else kds + part
    du = gates.ekd[:, None] * kds + dv_local.astype(F32)
    if qdos is None:
        doe = do * gates.eg[:, None]
        qdos = [mm(q_b, doe, ta=True) for q_b in qs]
    ds0s = [qd + gates.egl * ds_b - mm(w_b, du, ta=True) for qd, w_b, ds_b in zip(qdos, ws, dss)]
    return du, ds0s


def _walk_kernel(*refs, chunk, num_segments, has_init, with_qdo, block_k, precision):
    refs = list(refs)
    dinit_ref = refs.pop() if has_init else None
    du_ref, dh_ref = refs.pop(), refs.pop()
    if has_init:
        refs.pop()  # zeros aliased to dinit
    order_ref, lo_ref, hi_ref, *row_refs = refs
    p_id, row, s = tc.walk_program(order_ref, num_segments)
    dfinal_ref = tc.RowView(row_refs.pop(7), row, s)   # [B, S, dk, BV]: at the walk's segment
    (seg_ref, last_ref, first_ref, k_ref, w_ref, g_ref, dvl_ref, *q_or_qdo) = (
        tc.RowView(r, row) for r in row_refs)
    du_ref, dh_ref = tc.RowView(du_ref, row), tc.RowView(dh_ref, row)
    dinit_ref = None if dinit_ref is None else tc.RowView(dinit_ref, row, s)
    lo, hi = lo_ref[p_id], hi_ref[p_id]
    dk, bv = dfinal_ref.shape
    kb = tc.blocks(dk, block_k)

    # dh[c] (the cotangent of the state after chunk c) is stored where it is computed, not from
    # the loop-carried tiles (storing those made Triton carry them in two layouts, and spill):
    # dfinal at the segment's last chunk, zero at the end of an earlier run, and otherwise dS0 of
    # chunk c + 1 (same run), stored by that chunk's step.
    def run_chunk(c, dss):
        def at_end():
            d = tuple(dfinal_ref[col, :].astype(F32) for col in kb)
            for col, d_b in zip(kb, d):
                dh_ref[c, col, :] = d_b.astype(dh_ref.dtype)
            return d

        def at_run_end():
            for col in kb:
                dh_ref[c, col, :] = jnp.zeros((block_k, bv), dh_ref.dtype)
            return tuple(jnp.zeros((block_k, bv), F32) for _ in kb)

        mine = seg_ref[c] == s
        dss = jax.lax.cond(c == hi - 1, at_end,
                           lambda: jax.lax.cond(mine & (last_ref[c] != 0), at_run_end,
                                                lambda: dss))
        rows = tc.chunk_rows(c, chunk)
        gates = tc.Gates.load(g_ref, rows, c * chunk + chunk - 1)
        if with_qdo:
            (qdo_ref,) = q_or_qdo
            extra = dict(qdos=[qdo_ref[c, col, :] for col in kb])
        else:
            q_ref, do_ref = q_or_qdo
            extra = dict(qs=tc.tiles(q_ref, rows, kb), do=do_ref[rows, :])
        du, ds0s = state_grad_step(tc.tiles(k_ref, rows, kb), tc.tiles(w_ref, rows, kb),
                                   dvl_ref[rows, :], gates, list(dss), precision, **extra)

        @pl.when(mine)
        def _():
            du_ref[rows, :] = du.astype(du_ref.dtype)

        @pl.when(mine & (first_ref[c] == 0))
        def _():
            for col, d in zip(kb, ds0s):
                dh_ref[c - 1, col, :] = d.astype(dh_ref.dtype)

        if dinit_ref is not None:
            @pl.when(mine & (first_ref[c] != 0))
            def _():
                for col, d in zip(kb, ds0s):
                    dinit_ref[col, :] = dinit_ref[col, :] + d
        return tuple(jnp.where(mine, n, o) for n, o in zip(ds0s, dss))

    tc.walk_segment(lo, hi, run_chunk, tuple(jnp.zeros((block_k, bv), F32) for _ in kb),
                    reverse=True)


def state_grad_walk(k, w, gcum_t, dv_local, dfinal, lo, hi, seg, first, last, *, q=None, do=None,
                    qdo=None, chunk, num_segments, block_v, has_init, precision, interpret,
                    num_warps, block_k, num_stages=2, longest_first=True):
    """k, w [B, L, H, dk]; gcum_t [B, H, L]; dv_local [B, L, H, dv]; dfinal [B, S, H, dk, dv]
    float32; lo, hi [B*S]; seg, first, last [B, Nc]; either q [B, L, H, dk] and do [B, L, H, dv],
    or qdo [B, H, Nc, dk, dv] (Q^T diag(e^G) dO per chunk, from ``dv_local``); longest_first:
    launch the longest walks first (``tc.WalkSpecs``), else in row order.
    Returns (dh [B, H, Nc, dk, dv] (cotangent of the state after each visited chunk),
    du [B, L, H, dv] (cotangent of v_new), both in ``tc.operand_dtype(precision)`` and undefined
    on unvisited chunks, d(initial state) [B, S, H, dk, dv] float32 or None)."""
    b, l, hh, dk = k.shape
    dv = dv_local.shape[-1]
    s = num_segments
    nc = l // chunk
    sp = tc.WalkSpecs(b, s, l, chunk)
    in_specs = [sp.ranges(), sp.ranges(), sp.ranges(), sp.flags(), sp.flags(), sp.flags(),
                sp.seq(dk), sp.seq(dk), sp.gate(), sp.seq_v(block_v), sp.segment_state(dk, block_v)]
    args = [tc.walk_order(lo, hi, longest_first), lo, hi, seg, last, first, k, w, gcum_t,
            dv_local, dfinal]
    if qdo is not None:
        in_specs.append(sp.per_chunk_states(dk, block_v))
        args.append(qdo)
    else:
        in_specs += [sp.seq(dk), sp.seq_v(block_v)]
        args += [q, do]
    op_dtype = tc.operand_dtype(precision, interpret)
    out_shape = [jax.ShapeDtypeStruct((b, hh, nc, dk, dv), op_dtype),
                 jax.ShapeDtypeStruct((b, l, hh, dv), op_dtype)]
    out_specs = [sp.per_chunk_states(dk, block_v), sp.seq_v(block_v)]
    aliases = {}
    if has_init:
        in_specs.append(sp.segment_state(dk, block_v))
        args.append(jnp.zeros((b, s, hh, dk, dv), F32))
        aliases[len(args) - 1] = 2
        out_shape.append(jax.ShapeDtypeStruct((b, s, hh, dk, dv), F32))
        out_specs.append(sp.segment_state(dk, block_v))
    outs = pl.pallas_call(
        functools.partial(_walk_kernel, chunk=chunk, num_segments=s, has_init=has_init,
                          with_qdo=qdo is not None, block_k=min(block_k, dk),
                          precision=resolve_precision(precision, interpret)),
        out_shape=tuple(out_shape), grid=sp.grid(hh, dv // block_v), in_specs=in_specs,
        out_specs=tuple(out_specs), input_output_aliases=aliases,
        compiler_params=tc.triton_params(num_warps, num_stages), interpret=interpret,
        name="gdn_bwd_state_walk",
    )(*args)
    return outs[0], outs[1], (outs[2] if has_init else None)


# ------------------------------------------------------------------------------------------------
# Kernel 0 (before the walk): the intra-chunk part of du, chunk-parallel
# ------------------------------------------------------------------------------------------------

def _dv_local_kernel(seg_ref, q_ref, k_ref, g_ref, do_ref, dvl_ref, *qdo_ref, block_k, block_v,
                     precision):
    chunk, dk = q_ref.shape
    qdo_ref = qdo_ref[0] if qdo_ref else None

    @tc.used_chunk(seg_ref, (dvl_ref,))
    def _():
        mm = functools.partial(cm.mm, precision=precision)
        rows = pl.ds(0, chunk)
        kb = tc.blocks(dk, block_k)
        gates = tc.Gates.load(g_ref, rows, chunk - 1)
        qs, p = tc.causal_qk(q_ref, k_ref, rows, kb, gates, mm)

        def value_block(vcol, carry):
            do_j = do_ref[:, vcol]
            dvl_ref[:, vcol] = mm(p, do_j, ta=True).astype(dvl_ref.dtype)
            if qdo_ref is not None:
                doe = do_j * gates.eg[:, None]
                for q_b, kcol in zip(qs, kb):
                    qdo_ref[kcol, vcol] = mm(q_b, doe, ta=True).astype(qdo_ref.dtype)
            return carry

        tc.fori_blocks(do_ref.shape[1], block_v, value_block, 0)


def dv_local(q, k, gcum_t, do, seg, *, chunk, precision, interpret, num_warps, block_k, block_v,
             with_qdo: bool = False, num_stages: int = 1):
    """q, k [B, L, H, dk]; gcum_t [B, H, L]; do [B, L, H, dv]; seg [B, Nc] ->
    P^T dO [B, L, H, dv] with P = (Q K^T) * D per chunk (zero on chunks of no segment), and with
    ``with_qdo`` also Q^T diag(e^G) dO per chunk, [B, H, Nc, dk, dv] (undefined on chunks of no
    segment; else None), both in ``tc.operand_dtype(precision)``.  P^T dO enters
    du = Kd dS + P^T dO elementwise, and du is itself stored in that dtype (and rounded to it as
    a dot operand), so rounding P^T dO adds an error of the same size (flash-linear-attention
    stores it in dO's dtype too).  num_stages: pipelining of the value-block loop
    (``tc.par_stages``)."""
    b, l, hh, dk = q.shape
    dv = do.shape[-1]
    bv = min(block_v, dv)
    sp = tc.ChunkSpecs(b, l, chunk)
    op_dtype = tc.operand_dtype(precision, interpret)
    out_shape = [jax.ShapeDtypeStruct((b, l, hh, dv), op_dtype)]
    out_specs = [sp.tok(dv)]
    if with_qdo:
        out_shape.append(jax.ShapeDtypeStruct((b, hh, l // chunk, dk, dv), op_dtype))
        out_specs.append(sp.state(dk, dv))
    outs = pl.pallas_call(
        functools.partial(_dv_local_kernel, block_k=min(block_k, dk), block_v=bv,
                          precision=resolve_precision(precision, interpret)),
        out_shape=tuple(out_shape), grid=(b * (l // chunk), hh),
        in_specs=[sp.seg(), sp.tok(dk), sp.tok(dk), sp.gate(), sp.tok(dv)],
        out_specs=tuple(out_specs),
        compiler_params=tc.triton_params(num_warps, tc.par_stages(num_stages,
                                                                  (chunk, bv, do.dtype))),
        interpret=interpret,
        name="gdn_bwd_dv_local",
    )(seg, q, k, gcum_t, do)
    return outs[0], (outs[1] if with_qdo else None)


# ------------------------------------------------------------------------------------------------
# Kernel 2: dq, the direct part of dk, dW and their dG share, per (chunk, key block)
# ------------------------------------------------------------------------------------------------

def _dqkw_kernel(seg_ref, q_ref, k_ref, g_ref, h_ref, dh_ref, vnew_ref, do_ref, du_ref,
                 dq_ref, dkd_ref, dw_ref, dg_ref, rq_ref, rkd_ref, *, block_v, precision,
                 blocks_first):
    chunk = q_ref.shape[0]

    @tc.used_chunk(seg_ref, (dq_ref, dkd_ref, dw_ref, dg_ref, rq_ref, rkd_ref), blocks_first)
    def _():
        mm = functools.partial(cm.mm, precision=precision)
        rows = pl.ds(0, chunk)
        gates = tc.Gates.load(g_ref, rows, chunk - 1)
        bk = q_ref.shape[1]

        # A loaded tile that feeds a dot feeds nothing else (``tc.par_stages``): sum dh*h is
        # the trace of the accumulated dh h^T, taken after the loop.
        def value_block(vcol, acc):
            do_j, vn_j, du_j = do_ref[:, vcol], vnew_ref[:, vcol], du_ref[:, vcol]
            h_j, dh_j = h_ref[:, vcol], dh_ref[:, vcol]
            parts = (mm(do_j, vn_j, tb=True), mm(do_j, h_j, tb=True), mm(vn_j, dh_j, tb=True),
                     mm(du_j, h_j, tb=True), mm(dh_j, h_j, tb=True))
            return tuple(a + b for a, b in zip(acc, parts))

        zeros = lambda n, m: jnp.zeros((n, m), F32)  # noqa: E731
        dp, do_h, vn_dh, du_h, dh_h = tc.fori_blocks(
            do_ref.shape[1], block_v, value_block,
            (zeros(chunk, chunk), zeros(chunk, bk), zeros(chunk, bk), zeros(chunk, bk),
             zeros(bk, bk)))
        hdh = jnp.sum(tc.diagonal(dh_h))                  # sum dh * h over this key block
        dpd = dp * gates.causal()
        q = q_ref[...]
        k = k_ref[...]
        dq = mm(dpd, k) + gates.eg[:, None] * do_h
        dk_inter = gates.ekd[:, None] * vn_dh
        dkd = mm(dpd, q, ta=True) + dk_inter
        dq_ref[...] = dq.astype(dq_ref.dtype)
        dkd_ref[...] = dkd
        dw_ref[...] = (-du_h).astype(dw_ref.dtype)
        kf = k.astype(F32)
        g_last = jnp.sum(kf * dk_inter) + gates.egl * hdh
        q_dq = jnp.sum(q.astype(F32) * dq, axis=1)        # this key block's share of <dq, q>
        k_dkd = jnp.sum(kf * dkd, axis=1)                 # ... and of <dK_direct, k>
        rq_ref[...] = q_dq
        rkd_ref[...] = k_dkd
        dg_ref[...] = q_dq - k_dkd + jnp.where(tc.last_row_mask(chunk), g_last, 0.0)


def dqkw(q, k, gcum_t, h, dh, v_new, do, du, seg, *, chunk, precision, interpret, num_warps,
         block_k, block_v, blocks_first=False, dq_dtype=F32, num_stages: int = 1):
    """q, k [B, L, H, dk]; gcum_t [B, H, L]; h, dh [B, H, Nc, dk, dv]; v_new, do, du [B, L, H, dv];
    seg [B, Nc]; blocks_first: launch a chunk's key-block programs side by side
    (``tc.blocks_first``: each reads the chunk's whole dO, v_new and du).  Returns (dq
    [B, L, H, dk] in dq_dtype (computed in float32), dK_direct [B, L, H, dk] float32,
    dW [B, L, H, dk] (``tc.operand_dtype``), dG shares [dk/BK, B, H, L] float32, shares of the
    row sums <dq, q> and <dK_direct, k> [dk/BK, B, H, L] float32 each (for the L2-norm
    Jacobian)); zero on chunks of no segment.  num_stages: pipelining of the value-block loop
    (``tc.par_stages``)."""
    b, l, hh, dk = q.shape
    dv = do.shape[-1]
    bk, bv = min(block_k, dk), min(block_v, dv)
    nk = dk // bk
    sp = tc.ChunkSpecs(b, l, chunk)
    out_shape = (jax.ShapeDtypeStruct((b, l, hh, dk), dq_dtype),
                 jax.ShapeDtypeStruct((b, l, hh, dk), F32),
                 jax.ShapeDtypeStruct((b, l, hh, dk), tc.operand_dtype(precision, interpret)),
                 jax.ShapeDtypeStruct((nk, b, hh, l), F32),
                 jax.ShapeDtypeStruct((nk, b, hh, l), F32),
                 jax.ShapeDtypeStruct((nk, b, hh, l), F32))
    grid = (b * (l // chunk), hh, nk)
    in_specs = [sp.seg(), sp.tok(bk, True), sp.tok(bk, True), sp.gate(),
                sp.state(bk, dv, key_blocked=True), sp.state(bk, dv, key_blocked=True),
                sp.tok(dv), sp.tok(dv), sp.tok(dv)]
    out_specs = (sp.tok(bk, True), sp.tok(bk, True), sp.tok(bk, True), sp.gate_part(),
                 sp.gate_part(), sp.gate_part())
    if blocks_first:
        grid, in_specs, out_specs = tc.blocks_first(grid, in_specs, out_specs)
    return pl.pallas_call(
        functools.partial(_dqkw_kernel, block_v=bv,
                          precision=resolve_precision(precision, interpret),
                          blocks_first=blocks_first),
        out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        compiler_params=tc.triton_params(num_warps, tc.par_stages(
            num_stages, (chunk, bv, do.dtype), (chunk, bv, v_new.dtype), (chunk, bv, du.dtype),
            (bk, bv, h.dtype), (bk, bv, dh.dtype))),
        interpret=interpret, name="gdn_bwd_dqkw",
    )(seg, q, k, gcum_t, h, dh, v_new, do, du)


# ------------------------------------------------------------------------------------------------
# Kernel 3: the UT / WY part per chunk
# ------------------------------------------------------------------------------------------------

def _wy_kernel(seg_ref, k_ref, v_ref, beta_ref, g_ref, t_ref, dw_ref, du_ref, dkd_ref,
               dk_ref, dv_ref, dbeta_ref, dg_ref, rk_ref, *, block_k, block_v, precision):
    chunk, dk = k_ref.shape

    @tc.used_chunk(seg_ref, (dk_ref, dv_ref, dbeta_ref, dg_ref, rk_ref))
    def _():
        mm = functools.partial(cm.mm, precision=precision)
        rows = pl.ds(0, chunk)
        gates = tc.Gates.load(g_ref, rows, chunk - 1)
        beta = beta_ref[...].astype(F32)
        beg = (beta * gates.eg)[:, None]
        t = t_ref[...]

        # A loaded tile that feeds a dot feeds nothing else (``tc.par_stages``): the row sums of
        # T^T dW * K and T^T du * V come from N = dW K^T and M = du V^T after the loops, as
        # column sums of T * N and T * M; <dK - dK_direct, K> from K K^T (``dqkw`` sums
        # <dK_direct, K>).
        def key_block_a(col, carry):  # N = dW K^T;  K K^T
            n, kk = carry
            k_b = k_ref[:, col]
            return n + mm(dw_ref[:, col], k_b, tb=True), kk + mm(k_b, k_b, tb=True)

        cc = jnp.zeros((chunk, chunk), F32)
        n, kk = tc.fori_blocks(dk, block_k, key_block_a, (cc, cc))

        def value_block(vcol, m):  # M = du V^T;  dV = diag(b) T^T du
            du_j = du_ref[:, vcol]
            dvb = mm(t, du_j, ta=True)
            dv_ref[:, vcol] = (dvb * beta[:, None]).astype(dv_ref.dtype)
            return m + mm(du_j, v_ref[:, vcol], tb=True)

        m = tc.fori_blocks(v_ref.shape[1], block_v, value_block, cc)
        dt = n * beg[:, 0][None, :] + m * beta[None, :]  # dW Kb^T + du Vb^T
        tf = t.astype(F32)
        dkbk = jnp.sum(tf * n, axis=0)                    # sum_d (T^T dW) * K
        da = -mm(mm(t, dt, ta=True), t, tb=True)
        dae = da * cm.strict_decay(gates.gcum)            # E * dA, strictly lower
        m_a = dae * kk * beta[:, None]                    # dA * A
        dbeta = jnp.sum(tf * m, axis=0) + jnp.sum(dae * kk, axis=1) + dkbk * gates.eg
        dg = jnp.sum(m_a, axis=1) - jnp.sum(m_a, axis=0) + dkbk * beg[:, 0]
        dkk = dae * beta[:, None]
        dkk_kk = dkk * kk
        k_dk = beg[:, 0] * dkbk + jnp.sum(dkk_kk, axis=1) + jnp.sum(dkk_kk, axis=0)

        def key_block_b(col, carry):
            k_b = k_ref[:, col]
            dkb = mm(t, dw_ref[:, col], ta=True)           # T^T dW
            dk_b = dkd_ref[:, col] + dkb * beg + mm(dkk, k_b) + mm(dkk, k_b, ta=True)
            dk_ref[:, col] = dk_b.astype(dk_ref.dtype)
            return carry

        tc.fori_blocks(dk, block_k, key_block_b, 0)
        dbeta_ref[...] = dbeta
        dg_ref[...] = dg
        rk_ref[...] = k_dk


def wy_bwd(k, v, beta_t, gcum_t, t, dw, du, dk_direct, seg, *, chunk, precision, interpret,
           num_warps, block_k, block_v, dv_dtype=F32, dk_dtype=F32, num_stages: int = 1):
    """k [B, L, H, dk]; v [B, L, H, dv]; beta_t, gcum_t [B, H, L]; t [B, H, L, C];
    dw [B, L, H, dk]; du [B, L, H, dv]; dk_direct [B, L, H, dk] float32 (its buffer is reused for
    dk when dk_dtype is float32); seg [B, Nc].  Returns (dk [B, L, H, dk] in dk_dtype,
    dv [B, L, H, dv] in dv_dtype (the op's v dtype: written once, not as float32 and cast by
    XLA), dbeta [B, H, L] float32, dG share [B, H, L] float32, the row sums <dk - dK_direct, k>
    [B, H, L] float32 (``dqkw`` sums the rest of <dk, k>, for the L2-norm Jacobian)), all zero
    on chunks of no segment.  num_stages: pipelining of the key- and value-block loops
    (``tc.par_stages``, a stage counted as the tiles of all three loops)."""
    b, l, hh, dk = k.shape
    dv = v.shape[-1]
    bk, bv = min(block_k, dk), min(block_v, dv)
    sp = tc.ChunkSpecs(b, l, chunk)
    out_shape = (jax.ShapeDtypeStruct((b, l, hh, dk), dk_dtype),
                 jax.ShapeDtypeStruct((b, l, hh, dv), dv_dtype),
                 jax.ShapeDtypeStruct((b, hh, l), F32),
                 jax.ShapeDtypeStruct((b, hh, l), F32),
                 jax.ShapeDtypeStruct((b, hh, l), F32))
    return pl.pallas_call(
        functools.partial(_wy_kernel, block_k=bk, block_v=bv,
                          precision=resolve_precision(precision, interpret)),
        out_shape=out_shape, grid=(b * (l // chunk), hh),
        in_specs=[sp.seg(), sp.tok(dk), sp.tok(dv), sp.gate(), sp.gate(), sp.tmat(), sp.tok(dk),
                  sp.tok(dv), sp.tok(dk)],
        out_specs=(sp.tok(dk), sp.tok(dv), sp.gate(), sp.gate(), sp.gate()),
        input_output_aliases={8: 0} if jnp.dtype(dk_dtype) == F32 else {},
        compiler_params=tc.triton_params(num_warps, tc.par_stages(
            num_stages, (chunk, bk, k.dtype), (chunk, bk, dw.dtype), (chunk, bk, F32),
            (chunk, bv, v.dtype), (chunk, bv, du.dtype))),
        interpret=interpret, name="gdn_bwd_wy",
    )(seg, k, v, beta_t, gcum_t, t, dw, du, dk_direct)


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------

def _bwd_walk_stages(config, chunk: int, dk: int, block_v: int, itemsize: int,
                     smem_budget: int | None = None) -> int:
    """Pipelining stages of the dS walk: ``config.bwd_num_stages`` if set, else
    ``config.num_stages`` if set, else 2 -- but no more than fit ``smem_budget`` bytes of shared
    memory with its buffered chunk tiles (k, W and q, or k, W and the [dk, BV] Q^T e^G dO tile;
    None: ``tc.tile_smem_budget()`` of the device; ``tc.stages_within_budget``).  Two stages at
    dk 256 with bf16 tiles need 196 KB: 1 stage on GPUs without that much, 2 on an H100 (session
    10: MoM E4 B2 T8192 fwd+bwd 10.2 -> 9.4-9.6 ms, B8 T2048 equal, GatedDeltaNet equal or
    faster)."""
    if config.bwd_num_stages is not None:
        return config.bwd_num_stages
    stages = 2 if config.num_stages is None else config.num_stages
    per_stage = (2 * chunk * dk + dk * block_v if config.bwd_qdo else 3 * chunk * dk) * itemsize
    return tc.stages_within_budget(stages, per_stage, smem_budget)


def backward(res, do, dfinal, *, num_segments, chunk, has_g, config, interpret,
             dqk_dtypes=(F32, F32)):
    """Gradients (dq, dk, dv, dg, dbeta, dinit, rowdots) for ``api._gated_delta_core`` from its
    residuals (q, k, v, g, beta, init, chunk_segment, extra).

    dq, dk are w.r.t. the kernels' q', k' (normalised / scaled, head dim padded; ``api._core_bwd``
    builds them and passes them first in ``extra``): [B, L, H, dkp] in ``dqk_dtypes`` (float32
    unless nothing but a cast follows); ``api._qk_out`` slices them and applies the q scale and
    the L2-norm Jacobian, with rowdots = (<dq, q>, <dk, k>) [B, L, H] float32 summed by the dq/dk/dW and WY
    kernels.  dv [B, L, H, dv] in v's dtype, dg [B, L, H] (None without g), dbeta [B, L, H],
    dinit [B, S, H, dk, dv] float32 (None without init)."""
    from mom_jax.ops.common import PackedLayout  # noqa: PLC0415

    q, k, v, g, beta, init, chunk_segment, extra = res
    (qp, kp, vp, beta_t, gcum_t, t, w, h, v_new, lo, hi, seg, first) = extra
    b, l, hh, dk = q.shape
    dv = v.shape[-1]
    dkp, dvp = qp.shape[-1], vp.shape[-1]
    layout = PackedLayout(chunk_segment, num_segments, chunk)
    last = layout.chunk_last().astype(jnp.int32)
    block_v = config.walk_block_v(dkp, dvp, b * num_segments * hh, backward=True)
    par_block_v = min(dvp, config.par_block_v)
    block_k = min(dkp, config.block_k)
    has_init = init is not None
    do_p = cm.pad_last(do.astype(tc.operand_dtype(config.precision, interpret)), dvp)
    dfinal_p = cm.pad_last(dfinal.astype(F32), dvp)
    if dkp != dk:
        dfinal_p = jnp.pad(dfinal_p, [(0, 0)] * 3 + [(0, dkp - dk), (0, 0)])
    common = dict(chunk=chunk, precision=config.precision, interpret=interpret, block_k=block_k)
    par = dict(num_warps=config.bwd_par_warps(), block_v=par_block_v)
    dvl, qdo = dv_local(qp, kp, gcum_t, do_p, seg, with_qdo=config.bwd_qdo,
                        num_stages=config.par_stages("dv_local"), **par, **common)
    walk_in = dict(qdo=qdo) if config.bwd_qdo else dict(q=qp, do=do_p)
    dh, du, dinit = state_grad_walk(
        kp, w, gcum_t, dvl, dfinal_p, lo, hi, seg, first, last, num_segments=num_segments,
        block_v=block_v, has_init=has_init, num_warps=config.walk_warps(dkp, block_v),
        num_stages=_bwd_walk_stages(config, chunk, dkp, block_v, qp.dtype.itemsize),
        longest_first=config.longest_first, **walk_in, **common)
    dq, dk_direct, dw, dg_qk, rq, rkd = dqkw(qp, kp, gcum_t, h, dh, v_new, do_p, du, seg,
                                             blocks_first=config.blocks_first,
                                             num_stages=config.par_stages("dqkw"),
                                             dq_dtype=dqk_dtypes[0], **par, **common)
    dk_, dv_, dbeta, dg_wy, rk = wy_bwd(kp, vp, beta_t, gcum_t, t, dw, du, dk_direct, seg, **par,
                                        dv_dtype=v.dtype, dk_dtype=dqk_dtypes[1],
                                        num_stages=config.par_stages("wy"), **common)
    dg = cm.chunk_cumsum_vjp(jnp.sum(dg_qk, axis=0) + dg_wy, chunk)   # dG (w.r.t. G) -> dg
    dg = jnp.transpose(dg, (0, 2, 1))
    dbeta = jnp.transpose(dbeta, (0, 2, 1))
    if has_init:
        empty = (hi <= lo).reshape(b, num_segments)[:, :, None, None, None]
        dinit = jnp.where(empty, dfinal.astype(F32), dinit[..., :dk, :dv])
    rowdots = (jnp.transpose(jnp.sum(rq, axis=0), (0, 2, 1)),
               jnp.transpose(jnp.sum(rkd, axis=0) + rk, (0, 2, 1)))
    return (dq, dk_, dv_[..., :dv].astype(v.dtype), dg.astype(g.dtype) if has_g else None,
            dbeta.astype(beta.dtype), dinit, rowdots)
