"""Forward kernels of the chunked gated delta rule in Pallas with Triton lowering (GPU).

Three launches (notation of ``common``; Kb = diag(b e^G) K, Vb = diag(b) V):
  1. ``ut_transform`` (chunk-parallel, grid (B, Nc, H)): T = (I + A)^-1, W = T Kb, U = T Vb, by
     "split" (the default; two launches: ``_ut_inverse_kernel``, T alone on 16 x 16 blocks in one
     warp, then ``_wu_kernel``, W and U from the stored T) or "masked" (``_ut_kernel``, one launch
     on whole C x C tiles).
  2. ``state_walk`` (grid (B*S, H, dv/BV)): each program walks the chunks of its segment in order
     with the [dk, BV] float32 state S (held as dk/BK tiles) in registers, applying the segment's
     initial state (or zero) at the chunk that starts a run and writing the segment's final state at
     the end.  Per chunk only the state work: h = S (stored), v_new = U - W S (stored),
     S <- e^{G_C} S + K^T (diag(e^{G_C - G}) v_new).
  3. ``chunk_output`` (chunk-parallel, grid (B*Nc, H)): O = diag(e^G) Q h + (D * Q K^T) v_new.
Chunks that belong to no segment are not visited by the walk and get O = 0 (the stream's contract
is that such slots carry zero k/v/beta, for which the reference's output is zero too).

On CPU the kernels run with ``interpret=True``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gated_delta import common as cm
from pallas_kernels.gated_delta import triton_common as tc

F32 = jnp.float32
resolve_precision = tc.resolve_precision  # kept importable from here


# ------------------------------------------------------------------------------------------------
# Kernel 1: T = (I + A)^-1, W = T Kb, U = T Vb per chunk
# ------------------------------------------------------------------------------------------------

def _ut_kernel(k_ref, v_ref, beta_ref, g_ref, *out_refs, with_t, ut_precision, precision, block_k,
               block_v):
    """The "masked" UT kernel: A = strict(K K^T * gating) as one [C, C] tile, T = ``cm.ut_inverse``
    (15 masked full-tile substitution steps, then merges), W = T Kb and U = T Vb as [C, C] x
    [C, block] dots.  Refs: k [C, dk], v [C, dv], beta, g [C]; outputs ([T [C, C]], W, U)."""
    t_ref, w_ref, u_ref = out_refs if with_t else (None, *out_refs)
    c, dk = k_ref.shape
    rows = pl.ds(0, c)
    beta = beta_ref[...].astype(F32)
    gates = tc.Gates.load(g_ref, rows, c - 1)
    kk = tc.fori_blocks(dk, block_k, lambda col, kk: kk + cm.mm(k_ref[:, col], k_ref[:, col],
                                                                 ut_precision, tb=True),
                        jnp.zeros((c, c), F32))
    t = cm.ut_inverse(cm.strict_a_from_kk(kk, beta, gates.gcum), ut_precision)
    if t_ref is not None:
        t_ref[...] = t
    _apply_t(t, k_ref, v_ref, beta, gates.eg, w_ref, u_ref, precision, block_k, block_v)


def _apply_t(t, k_ref, v_ref, beta, eg, w_ref, u_ref, precision, block_k, block_v):
    """W = T diag(b e^G) K and U = T diag(b) V as [C, C] x [C, block] dots, stored block by block.
    t: [C, C] float32; beta, eg: [C] float32."""
    beg = (beta * eg)[:, None]

    def key_block(col, carry):
        w_ref[:, col] = cm.mm(t, k_ref[:, col] * beg, precision).astype(w_ref.dtype)
        return carry

    def value_block(col, carry):
        u_ref[:, col] = cm.mm(t, v_ref[:, col] * beta[:, None], precision).astype(u_ref.dtype)
        return carry

    tc.fori_blocks(k_ref.shape[1], block_k, key_block, 0)
    tc.fori_blocks(v_ref.shape[1], block_v, value_block, 0)


def _ut_inverse_kernel(k_ref, beta_ref, g_ref, t_ref, *, ut_precision, gram_block_k):
    """First kernel of the "split" UT transform: T = (I + A)^-1 only, on s x s blocks (s = 16,
    n = C/s row blocks read straight from the refs), all row blocks together:
      1. the n(n+1)/2 Gram blocks K_i K_j^T (j <= i) in one loop over dk;
      2. the n diagonal inverses T_ii by forward substitution in ONE loop of s - 1 steps
         (``cm.diag_block_inverses`` on the list: n independent chains per step; run 5's
         one-launch "blocked" kernel ran them one after the other, see NOTES_kernels.md);
      3. T_ij = -T_ii sum_m A_im T_mj (``cm.block_row_of_inverse``), row block by row block.
    Writes T [C, C] float32 (zero above the diagonal).  Refs: k [C, dk], beta, g [C]."""
    c, dk = k_ref.shape
    s = min(cm.SUB_BLOCK, c)
    n = c // s
    rows = [pl.ds(i * s, s) for i in range(n)]
    upper = cm.iota2(s, s, 1) > cm.iota2(s, s, 0)
    zeros = jnp.zeros((s, s), F32)
    pairs = [(i, j) for i in range(n) for j in range(i + 1)]

    def gram_block(col, accs):
        ks = [k_ref[rows[i], col] for i in range(n)]
        return tuple(acc + cm.mm(ks[i], ks[j], ut_precision, tb=True)
                     for (i, j), acc in zip(pairs, accs))

    kk = dict(zip(pairs, tc.fori_blocks(dk, gram_block_k, gram_block, (zeros,) * len(pairs))))
    betas = [beta_ref[rows[i]].astype(F32) for i in range(n)]
    gs = [g_ref[rows[i]] for i in range(n)]
    a_ts = [jnp.where(upper, betas[i][None, :] * kk[(i, i)] *          # A_ii^T, strictly upper
                      jnp.exp(jnp.where(upper, gs[i][None, :] - gs[i][:, None], 0.0)), 0.0)
            for i in range(n)]
    t = {(i, i): x for i, x in enumerate(cm.diag_block_inverses(a_ts))}
    for i in range(n):
        a_row = [betas[i][:, None] * jnp.exp(gs[i][:, None] - gs[j][None, :]) * kk[(i, j)]
                 for j in range(i)]
        t.update({(i, j): x for j, x in enumerate(
            cm.block_row_of_inverse(a_row, t, i, ut_precision))})
        for j in range(n):
            t_ref[rows[i], pl.ds(j * s, s)] = t[(i, j)] if j <= i else zeros


def _wu_kernel(k_ref, v_ref, beta_ref, g_ref, t_ref, w_ref, u_ref, *, precision, block_k,
               block_v):
    """Second kernel of the "split" UT transform: W = T Kb, U = T Vb from the stored T, as
    [C, C] x [C, block] dots (M = C rows: the work splits over the program's warps).
    Refs: k [C, dk], v [C, dv], beta, g [C], t [C, C]; outputs w [C, dk], u [C, dv]."""
    rows = pl.ds(0, k_ref.shape[0])
    _apply_t(t_ref[...], k_ref, v_ref, beta_ref[rows].astype(F32), jnp.exp(g_ref[rows]), w_ref,
             u_ref, precision, block_k, block_v)


UT_KERNELS = {"masked": _ut_kernel, "split": (_ut_inverse_kernel, _wu_kernel)}  # split: 2 launches


def ut_transform(k, v, beta_t, gcum_t, chunk: int, *, interpret: bool = False, num_warps: int = 4,
                 ut_precision: str = "tf32x3", precision: str = "bf16", with_t: bool = True,
                 block_k: int = 64, block_v: int = 64, kernel: str = "split",
                 gram_block_k: int = 16, wu_num_warps: int = 4):
    """k [B, L, H, dk]; v [B, L, H, dv]; beta_t, gcum_t [B, H, L] float32 ->
    (T [B, H, L, C] float32 or None, W [B, L, H, dk], U [B, L, H, dv] float32).

    W is stored in ``tc.operand_dtype(precision)`` (it is only a dot operand later).
    ut_precision: dots of A = K K^T and of the inverse, "tf32x3" (three tf32 tensor-core passes,
    ~fp32 accuracy) or "ieee" (FMA dots; these spill heavily at dk >= 128, see NOTES_kernels.md).
    precision: dots W = T Kb and U = T Vb.
    kernel: "split" (two launches: ``_ut_inverse_kernel`` writes T with ``num_warps`` warps,
    ``_wu_kernel`` reads it back for W and U with ``wu_num_warps``) or "masked" (``_ut_kernel``:
    whole C x C tiles, ``cm.ut_inverse``, ``num_warps``); same outputs up to rounding.
    gram_block_k: (split) key columns per step of the K_i K_j^T loop."""
    if kernel not in UT_KERNELS:
        raise ValueError(f"unknown UT kernel {kernel!r}; one of {sorted(UT_KERNELS)}")
    b, l, h, dk = k.shape
    dv = v.shape[-1]
    nc = l // chunk
    tok = lambda d: pl.BlockSpec((None, chunk, None, d), lambda i, c, j: (i, c, j, 0))  # noqa: E731
    gate = pl.BlockSpec((None, None, chunk), lambda i, c, j: (i, j, c))
    tmat = pl.BlockSpec((None, None, chunk, chunk), lambda i, c, j: (i, j, c, 0))
    t_shape = jax.ShapeDtypeStruct((b, h, l, chunk), F32)
    wu_shapes = [jax.ShapeDtypeStruct((b, l, h, dk), tc.operand_dtype(precision, interpret)),
                 jax.ShapeDtypeStruct((b, l, h, dv), F32)]
    ut_prec = resolve_precision(ut_precision, interpret)
    prec = resolve_precision(precision, interpret)
    blocks = dict(block_k=min(block_k, dk), block_v=min(block_v, dv))
    if kernel == "split":
        inverse_kernel, wu_kernel = UT_KERNELS[kernel]
        t = pl.pallas_call(
            functools.partial(inverse_kernel, ut_precision=ut_prec,
                              gram_block_k=min(gram_block_k, dk)),
            out_shape=t_shape, grid=(b, nc, h), in_specs=[tok(dk), gate, gate], out_specs=tmat,
            compiler_params=tc.triton_params(num_warps, 1), interpret=interpret,
            name="gdn_ut_inverse")(k, beta_t, gcum_t)
        w, u = pl.pallas_call(
            functools.partial(wu_kernel, precision=prec, **blocks),
            out_shape=tuple(wu_shapes), grid=(b, nc, h),
            in_specs=[tok(dk), tok(dv), gate, gate, tmat], out_specs=(tok(dk), tok(dv)),
            compiler_params=tc.triton_params(wu_num_warps, 1), interpret=interpret,
            name="gdn_ut_apply")(k, v, beta_t, gcum_t, t)
        return (t if with_t else None), w, u
    out_shape, out_specs = list(wu_shapes), [tok(dk), tok(dv)]
    if with_t:
        out_shape.insert(0, t_shape)
        out_specs.insert(0, tmat)
    outs = pl.pallas_call(
        functools.partial(UT_KERNELS[kernel], with_t=with_t, ut_precision=ut_prec,
                          precision=prec, **blocks),
        out_shape=tuple(out_shape),
        grid=(b, nc, h),
        in_specs=[tok(dk), tok(dv), gate, gate],
        out_specs=tuple(out_specs),
        compiler_params=tc.triton_params(num_warps, 1),
        interpret=interpret,
        name="gdn_ut_transform",
    )(k, v, beta_t, gcum_t)
    return tuple(outs) if with_t else (None, *outs)


# ------------------------------------------------------------------------------------------------
# Kernel 2: sequential walk over a segment's chunks (state work only)
# ------------------------------------------------------------------------------------------------

def state_step(ks, ws, u_pre, gates: tc.Gates, states, precision):
    """One chunk of the state recurrence, the key dimension split into blocks.

    ks, ws: lists of [C, BK] tiles of K and W = T Kb; u_pre: [C, BV] U = T Vb (float32);
    states: list of [BK, BV] float32 tiles of S.  Returns (v_new = U - W S [C, BV] float32,
    new state tiles S' = e^{G_C} S + K^T (diag(e^{G_C - G}) v_new))."""
    mm = functools.partial(cm.mm, precision=precision)
    v_new = u_pre
    for w_b, s_b in zip(ws, states):
        v_new = v_new - mm(w_b, s_b)
    vd = v_new * gates.ekd[:, None]
    return v_new, [gates.egl * s_b + mm(k_b, vd, ta=True) for k_b, s_b in zip(ks, states)]


def _walk_kernel(*refs, chunk, num_segments, has_init, block_k, precision):
    refs = list(refs)
    final_ref, vnew_ref, h_ref = refs.pop(), refs.pop(), refs.pop()
    init_ref = refs.pop() if has_init else None
    lo_ref, hi_ref, seg_ref, first_ref, k_ref, w_ref, u_ref, g_ref = refs
    p = pl.program_id(0)
    s = p % num_segments
    dk, bv = final_ref.shape
    kb = tc.blocks(dk, block_k)

    def load_init():
        if init_ref is None:
            return tuple(jnp.zeros((block_k, bv), F32) for _ in kb)
        return tuple(init_ref[col, :].astype(F32) for col in kb)

    nc = first_ref.shape[0]
    hi = hi_ref[p]

    # h[c] (the state at the start of chunk c) is stored where it is computed, not from the
    # loop-carried tiles (storing those made Triton carry them in two layouts, and spill): the
    # initial state at a run start, else the new state of chunk c - 1, stored by that chunk's step.
    def run_chunk(c, states):
        def start():
            init = load_init()
            for col, s_b in zip(kb, init):
                h_ref[c, col, :] = s_b.astype(h_ref.dtype)
            return init

        mine = seg_ref[c] == s
        states = jax.lax.cond(mine & (first_ref[c] != 0), start, lambda: states)
        rows = tc.chunk_rows(c, chunk)
        gates = tc.Gates.load(g_ref, rows, c * chunk + chunk - 1)
        v_new, new_states = state_step(tc.tiles(k_ref, rows, kb), tc.tiles(w_ref, rows, kb),
                                       u_ref[rows, :], gates, states, precision)

        @pl.when(mine)
        def _():
            vnew_ref[rows, :] = v_new.astype(vnew_ref.dtype)

        @pl.when(mine & (c + 1 < hi) & (first_ref[jnp.minimum(c + 1, nc - 1)] == 0))
        def _():
            for col, s_b in zip(kb, new_states):
                h_ref[c + 1, col, :] = s_b.astype(h_ref.dtype)

        return tuple(jnp.where(mine, n, o) for n, o in zip(new_states, states))

    final = tc.walk_segment(lo_ref[p], hi, run_chunk, load_init())
    for col, s_b in zip(kb, final):
        final_ref[col, :] = s_b


def state_walk(k, w, u, gcum_t, init, lo, hi, seg, first, *, chunk: int, num_segments: int,
               block_v: int, precision: str = "bf16", interpret: bool = False, num_warps: int = 4,
               num_stages: int = 2, block_k: int = 64):
    """Runs the state walk.  Shapes: k, w [B, L, H, dk]; u [B, L, H, dv] float32; gcum_t [B, H, L];
    init [B, S, H, dk, dv] or None; lo, hi [B*S]; seg, first [B, Nc] (``cm.segment_ranges``).
    Returns (h [B, H, Nc, dk, dv], v_new [B, L, H, dv], final [B, S, H, dk, dv] float32): h is the
    state at the start of every visited chunk and v_new = U - W h, both in
    ``tc.operand_dtype(precision)``; entries of unvisited chunks are undefined."""
    b, l, h, dk = k.shape
    dv = u.shape[-1]
    s = num_segments
    assert dv % block_v == 0
    nc = l // chunk
    sp = tc.WalkSpecs(b, s, l, chunk)
    in_specs = [sp.ranges(), sp.ranges(), sp.flags(), sp.flags(), sp.seq(dk), sp.seq(dk),
                sp.seq_v(block_v), sp.gate()]
    args = [lo, hi, seg, first, k, w, u, gcum_t]
    if init is not None:
        in_specs.append(sp.segment_state(dk, block_v))
        args.append(init)
    op_dtype = tc.operand_dtype(precision, interpret)
    outs = pl.pallas_call(
        functools.partial(_walk_kernel, chunk=chunk, num_segments=s, has_init=init is not None,
                          block_k=min(block_k, dk),
                          precision=resolve_precision(precision, interpret)),
        out_shape=(jax.ShapeDtypeStruct((b, h, nc, dk, dv), op_dtype),
                   jax.ShapeDtypeStruct((b, l, h, dv), op_dtype),
                   jax.ShapeDtypeStruct((b, s, h, dk, dv), F32)),
        grid=(b * s, h, dv // block_v),
        in_specs=in_specs,
        out_specs=(sp.per_chunk_states(dk, block_v), sp.seq_v(block_v),
                   sp.segment_state(dk, block_v)),
        compiler_params=tc.triton_params(num_warps, num_stages),
        interpret=interpret,
        name="gdn_state_walk",
    )(*args)
    return outs


# ------------------------------------------------------------------------------------------------
# Kernel 3: outputs of every chunk in parallel
# ------------------------------------------------------------------------------------------------

def _output_kernel(seg_ref, q_ref, k_ref, g_ref, h_ref, vnew_ref, o_ref, *, block_k, block_v,
                   precision):
    chunk, dk = q_ref.shape
    kb = tc.blocks(dk, block_k)
    rows = pl.ds(0, chunk)

    @tc.used_chunk(seg_ref, (o_ref,))
    def _():
        mm = functools.partial(cm.mm, precision=precision)
        gates = tc.Gates.load(g_ref, rows, chunk - 1)
        qs, p = tc.causal_qk(q_ref, k_ref, rows, kb, gates, mm)
        def value_block(vcol, carry):
            o = mm(p, vnew_ref[:, vcol])
            inter = None
            for q_b, kcol in zip(qs, kb):
                part = mm(q_b, h_ref[kcol, vcol])
                inter = part if inter is None else inter + part
            o_ref[:, vcol] = (o + gates.eg[:, None] * inter).astype(o_ref.dtype)
            return carry

        tc.fori_blocks(o_ref.shape[1], block_v, value_block, 0)


def chunk_output(q, k, gcum_t, h, v_new, seg, *, chunk: int, precision: str = "bf16",
                 interpret: bool = False, num_warps: int = 4, block_k: int = 64,
                 block_v: int = 64):
    """q, k [B, L, H, dk]; gcum_t [B, H, L]; h [B, H, Nc, dk, dv]; v_new [B, L, H, dv];
    seg [B, Nc] -> o [B, L, H, dv] float32 (zero on chunks of no segment)."""
    b, l, hh, dk = q.shape
    dv = v_new.shape[-1]
    sp = tc.ChunkSpecs(b, l, chunk)
    return pl.pallas_call(
        functools.partial(_output_kernel, block_k=min(block_k, dk), block_v=min(block_v, dv),
                          precision=resolve_precision(precision, interpret)),
        out_shape=jax.ShapeDtypeStruct((b, l, hh, dv), F32),
        grid=(b * (l // chunk), hh),
        in_specs=[sp.seg(), sp.tok(dk), sp.tok(dk), sp.gate(), sp.state(dk, dv), sp.tok(dv)],
        out_specs=sp.tok(dv),
        compiler_params=tc.triton_params(num_warps, 1),
        interpret=interpret,
        name="gdn_chunk_output",
    )(seg, q, k, gcum_t, h, v_new)
