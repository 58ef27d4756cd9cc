"""Backward kernel of the chunked gated delta rule in Pallas with Triton lowering (GPU).

The recurrence is separable over value columns: the state's columns evolve independently, so a
program (row*segment, head, value block j) can walk its segment's chunks *backwards* carrying only
dS_j = dL/dS[:, block j] ([dk, BV]).  The state at each chunk start comes from the forward pass
(``h``).  Per chunk (S0 = h, dS = gradient w.r.t. the state after the chunk), recomputing
W = T Kb (Kb = diag(b e^G) K), u = T Vb - W S0 (Vb = diag(b) V), P = (Q K^T) * D:

  du   = P^T dO + Kd dS                              (Kd = diag(e^{G_C - G}) K)
  dS0  = (diag(e^G) Q)^T dO + e^{G_C} dS - W^T du    (carried to the previous chunk)
  dP   = dO u^T;  dQ = (dP*D) K + diag(e^G) dO S0^T;  dK = (dP*D)^T Q + diag(e^{G_C-G}) u dS^T
  dW   = -du S0^T;  dT = dW Kb^T + du Vb^T;  dKb = T^T dW;  dVb = T^T du;  dV = diag(b) dVb
  dA   = -T^T dT T^T (strictly lower);  A = b_i (K K^T)_ij E_ij  ->  dK += dA' K + dA'^T K, dA' = b*E*dA
  dbeta, dG (w.r.t. the chunk-local cumulative log-decay) collect the remaining terms.

dq, dk, dbeta and dG are sums over value blocks: each program writes its block's share into a
[NV, ...] array and XLA adds them (and turns dG into dg by a reverse cumsum inside each chunk).
dv and d(initial state) are complete per block.  At a chunk that ends the segment's last run,
dS = d(final state); at the end of an earlier run (only for a segment split into several runs) dS = 0;
at a chunk that starts a run, dS0 is added to d(initial state).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gated_delta import common as cm
from pallas_kernels.gated_delta.triton_fwd import _triton_params, resolve_precision

F32 = jnp.float32


def chunk_step_bwd(qs, ks, v, beta, gcum, gl, t, s0s, do, dss, precision):
    """Gradients of one chunk, the key dimension split into blocks (lists of [C, BK] / [BK, BV]).

    Returns (dqs, dks, dv, dbeta, dG, ds0s); dq/dk/dbeta/dG are this value block's shares.  dG is
    w.r.t. the chunk-local cumulative log-decay G (the G_C terms are added at the last position).
    """
    mm = functools.partial(cm.mm, precision=precision)
    c = v.shape[0]
    row, col = cm.iota2(c, c, 0), cm.iota2(c, c, 1)
    strict = row > col
    eg = jnp.exp(gcum)
    egl = jnp.exp(gl)
    beg = (beta * eg)[:, None]
    ekd = jnp.exp(gl - gcum)[:, None]
    vb = v * beta[:, None]
    kbs = [k_b * beg for k_b in ks]

    u = mm(t, vb)
    p = kk = None
    du = None
    for q_b, k_b, kb_b, s0_b, ds_b in zip(qs, ks, kbs, s0s, dss):
        u = u - mm(mm(t, kb_b), s0_b)
        pb, kkb, dub = mm(q_b, k_b, tb=True), mm(k_b, k_b, tb=True), mm(k_b * ekd, ds_b)
        p = pb if p is None else p + pb
        kk = kkb if kk is None else kk + kkb
        du = dub if du is None else du + dub
    dmat = cm.causal_decay(gcum)
    p = p * dmat
    du = du + mm(p, do, ta=True)                      # du = P^T dO + Kd dS
    dp = mm(do, u, tb=True)
    dpd = dp * dmat
    dt = mm(du, vb, tb=True)
    for kb_b, s0_b in zip(kbs, s0s):
        dt = dt - mm(mm(du, s0_b, tb=True), kb_b, tb=True)   # dW = -du S0^T; dT += dW Kb^T
    da = -mm(mm(t, dt, ta=True), t, tb=True)
    e = jnp.exp(jnp.where(strict, gcum[:, None] - gcum[None, :], 0.0))
    dae = jnp.where(strict, da * e, 0.0)
    dkk = dae * beta[:, None]
    dvb = mm(t, du, ta=True)
    dv = dvb * beta[:, None]

    m_p = dp * p
    m_a = dae * kk * beta[:, None]                    # dA * A
    dbeta = jnp.sum(dvb * v, axis=1) + jnp.sum(dae * kk, axis=1)
    dg = (jnp.sum(m_p, axis=1) - jnp.sum(m_p, axis=0)
          + jnp.sum(m_a, axis=1) - jnp.sum(m_a, axis=0))
    g_last = None
    dqs, dks, ds0s = [], [], []
    for q_b, k_b, kb_b, s0_b, ds_b in zip(qs, ks, kbs, s0s, dss):
        w_b = mm(t, kb_b)
        ds0s.append(mm(q_b * eg[:, None], do, ta=True) + egl * ds_b - mm(w_b, du, ta=True))
        do_s0 = mm(do, s0_b, tb=True)
        dqs.append(mm(dpd, k_b) + eg[:, None] * do_s0)
        u_ds = mm(u, ds_b, tb=True)
        dkb = -mm(t, mm(du, s0_b, tb=True), ta=True)    # T^T dW
        dks.append(mm(dpd, q_b, ta=True) + ekd * u_ds + dkb * beg + mm(dkk, k_b)
                   + mm(dkk, k_b, ta=True))
        kd_term = jnp.sum(k_b * ekd * u_ds, axis=1)
        dbeta = dbeta + jnp.sum(dkb * k_b, axis=1) * eg
        dg = dg + jnp.sum(dkb * kb_b, axis=1) + jnp.sum(do_s0 * q_b, axis=1) * eg - kd_term
        gl_b = jnp.sum(kd_term) + egl * jnp.sum(ds_b * s0_b)
        g_last = gl_b if g_last is None else g_last + gl_b
    dg = dg + jnp.where(jax.lax.broadcasted_iota(jnp.int32, (c,), 0) == c - 1, g_last, 0.0)
    return dqs, dks, dv, dbeta, dg, ds0s


def _bwd_kernel(*refs, chunk, num_segments, has_init, block_k, precision):
    refs = list(refs)
    dinit_ref = refs.pop() if has_init else None
    dg_ref, dbeta_ref, dv_ref, dk_ref, dq_ref = (refs.pop() for _ in range(5))
    refs.pop()  # zeros aliased to dv
    if has_init:
        refs.pop()  # zeros aliased to dinit
    (lo_ref, hi_ref, seg_ref, first_ref, last_ref, q_ref, k_ref, v_ref, beta_ref, g_ref, t_ref,
     h_ref, do_ref, dfinal_ref) = refs
    p_id = pl.program_id(0)
    s = p_id % num_segments
    lo = lo_ref[p_id]
    hi = hi_ref[p_id]
    dk_dim, bv = dfinal_ref.shape
    kblocks = [pl.ds(i * block_k, block_k) for i in range(dk_dim // block_k)]

    def run_chunk(c, dss):
        dss = jax.lax.cond(
            c == hi - 1, lambda: tuple(dfinal_ref[kb, :].astype(F32) for kb in kblocks),
            lambda: tuple(jnp.where(last_ref[c] != 0, 0.0, d) for d in dss))
        rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
        qs = [q_ref[rows, kb].astype(F32) for kb in kblocks]
        ks = [k_ref[rows, kb].astype(F32) for kb in kblocks]
        v = v_ref[rows, :].astype(F32)
        beta = beta_ref[rows].astype(F32)
        gcum = g_ref[rows]
        gl = g_ref[c * chunk + chunk - 1]
        t = t_ref[rows, :]
        s0s = [h_ref[c, kb, :] for kb in kblocks]
        do = do_ref[rows, :].astype(F32)
        dqs, dks, dv, dbeta, dg, ds0s = chunk_step_bwd(qs, ks, v, beta, gcum, gl, t, s0s, do,
                                                       list(dss), precision)
        for kb, dq_b, dk_b in zip(kblocks, dqs, dks):
            dq_ref[rows, kb] = dq_b
            dk_ref[rows, kb] = dk_b
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        dbeta_ref[rows] = dbeta
        dg_ref[rows] = dg
        if dinit_ref is not None:
            @pl.when(first_ref[c] != 0)
            def _():
                for kb, d in zip(kblocks, ds0s):
                    dinit_ref[kb, :] = dinit_ref[kb, :] + d
        return tuple(ds0s)

    def body(i, dss):
        c = hi - 1 - i
        return jax.lax.cond(seg_ref[c] == s, run_chunk, lambda c, st: st, c, dss)

    jax.lax.fori_loop(0, hi - lo, body, tuple(jnp.zeros((block_k, bv), F32) for _ in kblocks))


def backward_call(q, k, v, beta_t, gcum_t, t, h, do, dfinal, lo, hi, seg, first, last, *,
                  chunk, num_segments, block_v, has_init, precision="tf32", interpret=False,
                  num_warps=4, num_stages=1, block_k=64):
    """Returns (dq_parts [NV,B,L,H,dk], dk_parts, dv [B,L,H,dv] f32, dbeta_parts [NV,B,H,L],
    dG_parts [NV,B,H,L], dinit [B,S,H,dk,dv] or None).  Parts hold garbage on unvisited chunks."""
    b, l, hh, dk = q.shape
    dv = v.shape[-1]
    s = num_segments
    nv = dv // block_v
    nc = l // chunk
    prec = resolve_precision(precision, interpret)
    row = lambda p: p // s  # noqa: E731
    seq = lambda last_dim, blk: pl.BlockSpec(  # noqa: E731
        (None, l, None, last_dim), lambda p, i, j: (row(p), 0, i, j if blk else 0))
    gate = pl.BlockSpec((None, None, l), lambda p, i, j: (row(p), i, 0))
    flags = pl.BlockSpec((None, nc), lambda p, i, j: (row(p), 0))
    state_spec = pl.BlockSpec((None, None, None, dk, block_v), lambda p, i, j: (row(p), p % s, i, 0, j))
    in_specs = [
        pl.BlockSpec((b * s,), lambda p, i, j: (0,)), pl.BlockSpec((b * s,), lambda p, i, j: (0,)),
        flags, flags, flags,
        seq(dk, False), seq(dk, False), seq(block_v, True), gate, gate,
        pl.BlockSpec((None, None, l, chunk), lambda p, i, j: (row(p), i, 0, 0)),
        pl.BlockSpec((None, None, nc, dk, block_v), lambda p, i, j: (row(p), i, 0, 0, j)),
        seq(block_v, True), state_spec,
    ]
    args = [lo, hi, seg, first, last, q, k, v, beta_t, gcum_t, t, h, do, dfinal]
    n_in = len(args)
    aliases = {}
    if has_init:
        in_specs.append(state_spec)
        args.append(jnp.zeros((b, s, hh, dk, dv), F32))
    in_specs.append(seq(block_v, True))
    args.append(jnp.zeros((b, l, hh, dv), F32))
    part = lambda last_dim: pl.BlockSpec(  # noqa: E731
        (None, None, l, None, last_dim), lambda p, i, j: (j, row(p), 0, i, 0))
    gate_part = pl.BlockSpec((None, None, None, l), lambda p, i, j: (j, row(p), i, 0))
    out_shape = [jax.ShapeDtypeStruct((nv, b, l, hh, dk), F32),
                 jax.ShapeDtypeStruct((nv, b, l, hh, dk), F32),
                 jax.ShapeDtypeStruct((b, l, hh, dv), F32),
                 jax.ShapeDtypeStruct((nv, b, hh, l), F32),
                 jax.ShapeDtypeStruct((nv, b, hh, l), F32)]
    out_specs = [part(dk), part(dk), seq(block_v, True), gate_part, gate_part]
    aliases[len(args) - 1] = 2
    if has_init:
        out_shape.append(jax.ShapeDtypeStruct((b, s, hh, dk, dv), F32))
        out_specs.append(state_spec)
        aliases[n_in] = 5
    kernel = functools.partial(_bwd_kernel, chunk=chunk, num_segments=s, has_init=has_init,
                               block_k=min(block_k, dk), precision=prec)
    outs = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(b * s, hh, nv),
        in_specs=in_specs,
        out_specs=tuple(out_specs),
        input_output_aliases=aliases,
        compiler_params=_triton_params(num_warps, num_stages),
        interpret=interpret,
        name="gdn_chunk_backward",
    )(*args)
    return tuple(outs) + ((None,) if not has_init else ())


# ------------------------------------------------------------------------------------------------
# Split backward: a light sequential walk for dS, then every chunk's gradients in parallel
# ------------------------------------------------------------------------------------------------

def chunk_step_ds(qs, ks, beta, gcum, gl, t, do, dss, precision):
    """Only the state cotangent through one chunk: dS0 = (e^G Q)^T dO + e^{G_C} dS - W^T du with
    du = P^T dO + Kd dS (no u, no S0 needed)."""
    mm = functools.partial(cm.mm, precision=precision)
    eg = jnp.exp(gcum)
    beg = (beta * eg)[:, None]
    ekd = jnp.exp(gl - gcum)[:, None]
    p = du = None
    for q_b, k_b, ds_b in zip(qs, ks, dss):
        pb, dub = mm(q_b, k_b, tb=True), mm(k_b * ekd, ds_b)
        p = pb if p is None else p + pb
        du = dub if du is None else du + dub
    du = du + mm(p * cm.causal_decay(gcum), do, ta=True)
    egl = jnp.exp(gl)
    return [mm(q_b * eg[:, None], do, ta=True) + egl * ds_b - mm(mm(t, k_b * beg), du, ta=True)
            for q_b, k_b, ds_b in zip(qs, ks, dss)]


def _dh_kernel(*refs, chunk, num_segments, has_init, block_k, precision):
    refs = list(refs)
    dinit_ref = refs.pop() if has_init else None
    dh_ref = refs.pop()
    if has_init:
        refs.pop()  # zeros aliased to dinit
    (lo_ref, hi_ref, seg_ref, last_ref, first_ref, q_ref, k_ref, beta_ref, g_ref, t_ref, do_ref,
     dfinal_ref) = refs
    p_id = pl.program_id(0)
    s = p_id % num_segments
    lo = lo_ref[p_id]
    hi = hi_ref[p_id]
    dk_dim, bv = dfinal_ref.shape
    kblocks = [pl.ds(i * block_k, block_k) for i in range(dk_dim // block_k)]

    def run_chunk(c, dss):
        dss = jax.lax.cond(
            c == hi - 1, lambda: tuple(dfinal_ref[kb, :].astype(F32) for kb in kblocks),
            lambda: tuple(jnp.where(last_ref[c] != 0, 0.0, d) for d in dss))
        for kb, d in zip(kblocks, dss):
            dh_ref[c, kb, :] = d
        rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
        qs = [q_ref[rows, kb].astype(F32) for kb in kblocks]
        ks = [k_ref[rows, kb].astype(F32) for kb in kblocks]
        ds0s = chunk_step_ds(qs, ks, beta_ref[rows].astype(F32), g_ref[rows],
                             g_ref[c * chunk + chunk - 1], t_ref[rows, :],
                             do_ref[rows, :].astype(F32), list(dss), precision)
        if dinit_ref is not None:
            @pl.when(first_ref[c] != 0)
            def _():
                for kb, d in zip(kblocks, ds0s):
                    dinit_ref[kb, :] = dinit_ref[kb, :] + d
        return tuple(ds0s)

    def body(i, dss):
        c = hi - 1 - i
        return jax.lax.cond(seg_ref[c] == s, run_chunk, lambda c, st: st, c, dss)

    jax.lax.fori_loop(0, hi - lo, body, tuple(jnp.zeros((block_k, bv), F32) for _ in kblocks))


def dh_call(q, k, beta_t, gcum_t, t, do, dfinal, lo, hi, seg, first, last, *, chunk,
            num_segments, block_v, has_init, precision, interpret, num_warps, block_k):
    """Sequential reverse walk: dh [B, H, Nc, dk, dv] (cotangent of the state after each visited
    chunk) and d(initial state) (None without one)."""
    b, l, hh, dk = q.shape
    dv = do.shape[-1]
    s = num_segments
    nv, nc = dv // block_v, l // chunk
    row = lambda p: p // s  # noqa: E731
    seq = lambda d, blk: pl.BlockSpec(  # noqa: E731
        (None, l, None, d), lambda p, i, j: (row(p), 0, i, j if blk else 0))
    gate = pl.BlockSpec((None, None, l), lambda p, i, j: (row(p), i, 0))
    flags = pl.BlockSpec((None, nc), lambda p, i, j: (row(p), 0))
    state_spec = pl.BlockSpec((None, None, None, dk, block_v), lambda p, i, j: (row(p), p % s, i, 0, j))
    in_specs = [pl.BlockSpec((b * s,), lambda p, i, j: (0,)), pl.BlockSpec((b * s,), lambda p, i, j: (0,)),
                flags, flags, flags, seq(dk, False), seq(dk, False), gate, gate,
                pl.BlockSpec((None, None, l, chunk), lambda p, i, j: (row(p), i, 0, 0)),
                seq(block_v, True), state_spec]
    args = [lo, hi, seg, last, first, q, k, beta_t, gcum_t, t, do, dfinal]
    out_shape = [jax.ShapeDtypeStruct((b, hh, nc, dk, dv), F32)]
    out_specs = [pl.BlockSpec((None, None, nc, dk, block_v), lambda p, i, j: (row(p), i, 0, 0, j))]
    aliases = {}
    if has_init:
        in_specs.append(state_spec)
        args.append(jnp.zeros((b, s, hh, dk, dv), F32))
        aliases[len(args) - 1] = 1
        out_shape.append(jax.ShapeDtypeStruct((b, s, hh, dk, dv), F32))
        out_specs.append(state_spec)
    outs = pl.pallas_call(
        functools.partial(_dh_kernel, chunk=chunk, num_segments=s, has_init=has_init,
                          block_k=min(block_k, dk), precision=resolve_precision(precision, interpret)),
        out_shape=tuple(out_shape), grid=(b * s, hh, nv), in_specs=in_specs,
        out_specs=tuple(out_specs), input_output_aliases=aliases,
        compiler_params=_triton_params(num_warps, 1), interpret=interpret, name="gdn_bwd_state_walk",
    )(*args)
    return outs[0], (outs[1] if has_init else None)


def _chunk_grad_kernel(seg_ref, q_ref, k_ref, v_ref, beta_ref, g_ref, t_ref, h_ref, dh_ref, do_ref,
                       dq_ref, dk_ref, dv_ref, dbeta_ref, dg_ref, *, num_chunks, block_k, precision):
    c = pl.program_id(0) % num_chunks
    dk_dim = q_ref.shape[-1]
    kblocks = [pl.ds(i * block_k, block_k) for i in range(dk_dim // block_k)]

    @pl.when(seg_ref[c] >= 0)
    def _():
        chunk = q_ref.shape[0]
        qs = [q_ref[:, kb].astype(F32) for kb in kblocks]
        ks = [k_ref[:, kb].astype(F32) for kb in kblocks]
        gcum = g_ref[...]
        dqs, dks, dv, dbeta, dg, _ = chunk_step_bwd(
            qs, ks, v_ref[...].astype(F32), beta_ref[...].astype(F32), gcum, g_ref[chunk - 1],
            t_ref[...], [h_ref[kb, :] for kb in kblocks], do_ref[...].astype(F32),
            [dh_ref[kb, :] for kb in kblocks], precision)
        for kb, dq_b, dk_b in zip(kblocks, dqs, dks):
            dq_ref[:, kb] = dq_b
            dk_ref[:, kb] = dk_b
        dv_ref[...] = dv
        dbeta_ref[...] = dbeta
        dg_ref[...] = dg


def chunk_grad_call(q, k, v, beta_t, gcum_t, t, h, dh, do, seg, *, chunk, block_v, precision,
                    interpret, num_warps, block_k):
    """Chunk-parallel gradients: grid (row*chunk, head, value block).  Returns (dq parts, dk parts
    [NV, B, L, H, dk], dv [B, L, H, dv], dbeta parts, dG parts [NV, B, H, L]); unused chunks hold
    garbage (masked by the caller)."""
    b, l, hh, dk = q.shape
    dv = v.shape[-1]
    nv, nc = dv // block_v, l // chunk
    ci = lambda p: (p // nc, p % nc)  # noqa: E731
    tok = lambda d, blk: pl.BlockSpec(  # noqa: E731
        (None, chunk, None, d), lambda p, i, j: (*ci(p), i, j if blk else 0))
    gate = pl.BlockSpec((None, None, chunk), lambda p, i, j: (p // nc, i, p % nc))
    st = pl.BlockSpec((None, None, None, dk, block_v), lambda p, i, j: (p // nc, i, p % nc, 0, j))
    in_specs = [pl.BlockSpec((None, nc), lambda p, i, j: (p // nc, 0)),
                tok(dk, False), tok(dk, False), tok(block_v, True), gate, gate,
                pl.BlockSpec((None, None, chunk, chunk), lambda p, i, j: (p // nc, i, p % nc, 0)),
                st, st, tok(block_v, True)]
    part = lambda d: pl.BlockSpec(  # noqa: E731
        (None, None, chunk, None, d), lambda p, i, j: (j, p // nc, p % nc, i, 0))
    gpart = pl.BlockSpec((None, None, None, chunk), lambda p, i, j: (j, p // nc, i, p % nc))
    out_shape = (jax.ShapeDtypeStruct((nv, b, l, hh, dk), F32),
                 jax.ShapeDtypeStruct((nv, b, l, hh, dk), F32),
                 jax.ShapeDtypeStruct((b, l, hh, dv), F32),
                 jax.ShapeDtypeStruct((nv, b, hh, l), F32),
                 jax.ShapeDtypeStruct((nv, b, hh, l), F32))
    out_specs = (part(dk), part(dk), tok(block_v, True), gpart, gpart)
    return pl.pallas_call(
        functools.partial(_chunk_grad_kernel, num_chunks=nc, block_k=min(block_k, dk),
                          precision=resolve_precision(precision, interpret)),
        out_shape=out_shape, grid=(b * nc, hh, nv), in_specs=in_specs, out_specs=out_specs,
        compiler_params=_triton_params(num_warps, 1), interpret=interpret, name="gdn_bwd_chunk_grads",
    )(seg, q, k, v, beta_t, gcum_t, t, h, dh, do)


def backward(res, do, dfinal, *, num_segments, chunk, has_g, config, interpret):
    """Gradients (dq, dk, dv, dg, dbeta, dinit) for ``api._gated_delta_core`` from its residuals."""
    from mom_jax.ops.common import PackedLayout  # noqa: PLC0415

    q, k, v, g, beta, init, chunk_segment, extra = res
    (qp, kp, vp, beta_t, gcum_t, t, h, lo, hi, seg, first) = extra
    b, l, hh, dk = q.shape
    dv = v.shape[-1]
    dkp, dvp = qp.shape[-1], vp.shape[-1]
    layout = PackedLayout(chunk_segment, num_segments, chunk)
    last = layout.chunk_last().astype(jnp.int32)
    block_v = min(dvp, config.bwd_block_v or config.block_v or 64)
    has_init = init is not None
    do_p = cm.pad_last(do.astype(F32), dvp)
    dfinal_p = cm.pad_last(dfinal.astype(F32), dvp)
    if dkp != dk:
        dfinal_p = jnp.pad(dfinal_p, [(0, 0)] * 3 + [(0, dkp - dk), (0, 0)])
    if config.bwd == "pallas_fused":
        dq_p, dk_p, dv_, dbeta_p, dg_p, dinit = backward_call(
            qp, kp, vp, beta_t, gcum_t, t, h, do_p, dfinal_p, lo, hi, seg, first, last,
            chunk=chunk, num_segments=num_segments, block_v=block_v, has_init=has_init,
            precision=config.precision, interpret=interpret, num_warps=config.bwd_num_warps,
            block_k=config.block_k)
    else:
        dh, dinit = dh_call(
            qp, kp, beta_t, gcum_t, t, do_p, dfinal_p, lo, hi, seg, first, last, chunk=chunk,
            num_segments=num_segments, block_v=block_v, has_init=has_init,
            precision=config.precision, interpret=interpret, num_warps=config.num_warps,
            block_k=config.block_k)
        dq_p, dk_p, dv_, dbeta_p, dg_p = chunk_grad_call(
            qp, kp, vp, beta_t, gcum_t, t, h, dh, do_p, seg, chunk=chunk, block_v=block_v,
            precision=config.precision, interpret=interpret, num_warps=config.bwd_num_warps,
            block_k=config.block_k)
    used = jnp.repeat(chunk_segment >= 0, chunk, axis=1)            # [B, L]
    dv_ = jnp.where(used[:, :, None, None], dv_, 0.0)
    dq = jnp.sum(jnp.where(used[None, :, :, None, None], dq_p, 0.0), axis=0)[..., :dk]
    dk_ = jnp.sum(jnp.where(used[None, :, :, None, None], dk_p, 0.0), axis=0)[..., :dk]
    used_t = used[None, :, None, :]
    dbeta = jnp.transpose(jnp.sum(jnp.where(used_t, dbeta_p, 0.0), axis=0), (0, 2, 1))
    dgc = jnp.sum(jnp.where(used_t, dg_p, 0.0), axis=0)              # [B, H, L] w.r.t. G
    dgc = dgc.reshape(b, hh, l // chunk, chunk)
    dg = jnp.flip(jnp.cumsum(jnp.flip(dgc, -1), axis=-1), -1).reshape(b, hh, l)
    dg = jnp.transpose(dg, (0, 2, 1))
    dv_ = dv_[..., :dv]
    if has_init:
        empty = (hi <= lo).reshape(b, num_segments)[:, :, None, None, None]
        dinit = jnp.where(empty, dfinal.astype(F32), dinit[..., :dk, :dv])
    return (dq.astype(q.dtype), dk_.astype(k.dtype), dv_.astype(v.dtype),
            dg.astype(g.dtype) if has_g else None, dbeta.astype(beta.dtype), dinit)
