"""Forward kernels of the chunked gated delta rule in Pallas with Triton lowering (GPU).

Three stages (notation of ``common``; Kb = diag(b e^G) K, Vb = diag(b) V):
  1. ``ut_transform`` (chunk-parallel, grid (B, Nc, H)): T = (I + A)^-1, W = T Kb, U = T Vb, by
     "split" (the default; three launches as flash-linear-attention splits its own: ``ut_gram``,
     A from whole-chunk dots on all warps; ``ut_inverse``, T alone on 16 x 16 blocks in one warp;
     ``ut_apply``, W and U from the stored T) or "masked" (``_ut_kernel``, one launch on whole
     C x C tiles).
  2. ``state_walk`` (grid (B*S, H, dv/BV)): each program walks the chunks of its segment in order
     with the [dk, BV] float32 state S (held as dk/BK tiles) in registers, applying the segment's
     initial state (or zero) at the chunk that starts a run and writing the segment's final state at
     the end.  Per chunk only the state work: h = S (stored), v_new = U - W S (stored),
     S <- e^{G_C} S + K^T (diag(e^{G_C - G}) v_new).
  3. ``chunk_output`` (chunk-parallel, grid (B*Nc, H)): O = diag(e^G) Q h + (D * Q K^T) v_new.
Chunks that belong to no segment are not visited by the walk and get O = 0 (the stream's contract
is that such slots carry zero k/v/beta, for which the reference's output is zero too).

The op's q/k L2-norm (``l2norm=True`` / an ``rk`` argument): the kernels dot the raw q, k and apply
the inverse norms as row / column scales of the float32 results.  ``ut_gram`` takes
rk = 1 / sqrt(|k|^2 + eps) from the diagonal of each chunk's K K^T and returns it ([B, L, H]);
W = T diag(b e^G rk) K, the walk's K^T diag(e^{G_C - G} rk) v_new and the output's Q K^T take it;
``chunk_output`` computes rq from its q tiles, folds rq and the q scale into its rows and
returns rq.

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

def _ut_kernel(k_ref, v_ref, beta_ref, g_ref, *out_refs, with_t, l2norm, gram_precision,
               ut_precision, precision, block_k, block_v):
    """The "masked" UT kernel: A = strict(K' K'^T * gating) as one [C, C] tile, T =
    ``cm.ut_inverse`` (15 masked full-tile substitution steps, then merges), W = T Kb and U = T Vb
    as [C, C] x [C, block] dots.  K' = diag(rstd_k) K with ``l2norm`` (rstd_k from the Gram
    diagonal, also written), else K.  Refs: k [C, dk], v [C, dv], beta, g [C]; outputs
    ([T [C, C]], W, U[, rstd_k [C]])."""
    out_refs = list(out_refs)
    rk_ref = out_refs.pop() if l2norm else None
    t_ref, w_ref, u_ref = out_refs if with_t else (None, *out_refs)
    c, dk = k_ref.shape
    rows = pl.ds(0, c)
    beta = beta_ref[...].astype(F32)
    gates = tc.Gates.load(g_ref, rows, c - 1)
    kk = tc.fori_blocks(dk, block_k, lambda col, kk: kk + cm.mm(k_ref[:, col], k_ref[:, col],
                                                                 gram_precision, tb=True),
                        jnp.zeros((c, c), F32))
    rk = None
    if l2norm:
        rk = tc.gram_rstd(kk)
        rk_ref[...] = rk
        kk = kk * (rk[:, None] * rk[None, :])
    t = cm.ut_inverse(cm.strict_a_from_kk(kk, beta, gates.gcum), ut_precision)
    if t_ref is not None:
        t_ref[...] = t.astype(t_ref.dtype)
    _apply_t(t, k_ref, v_ref, beta, gates.eg, w_ref, u_ref, precision, block_k, block_v, rk)


def _apply_t(t, k_ref, v_ref, beta, eg, w_ref, u_ref, precision, block_k, block_v, rk=None):
    """W = T diag(b e^G rk) K and U = T diag(b) V as [C, C] x [C, block] dots, stored block by
    block.  t: [C, C]; beta, eg: [C] float32; rk: [C] float32 inverse key norms or None (1)."""
    beg = (beta * eg if rk is None else beta * eg * rk)[:, None]

    def key_block(col, carry):
        w_ref[:, col] = cm.mm(t, k_ref[:, col] * beg, precision).astype(w_ref.dtype)
        return carry

    def value_block(col, carry):
        u_ref[:, col] = cm.mm(t, v_ref[:, col] * beta[:, None], precision).astype(u_ref.dtype)
        return carry

    tc.fori_blocks(k_ref.shape[1], block_k, key_block, 0)
    tc.fori_blocks(v_ref.shape[1], block_v, value_block, 0)


def _gram_kernel(k_ref, beta_ref, g_ref, a_ref, *rk_ref, precision, block_k):
    """First kernel of the "split" UT transform: A = strict(b_i e^{G_i - G_j} K' K'^T) [C, C]
    float32 as whole-chunk [C, C] dots over key blocks (M = C rows: the work splits over the
    warps).  With an rk output (the op's L2-norm): rstd_k = 1 / sqrt(diag(K K^T) + eps) is written
    there and K' = diag(rstd_k) K, else K' = K.
    Refs: k [C, dk], beta, g [C]; outputs a [C, C][, rk [C] float32]."""
    c, dk = k_ref.shape
    rows = pl.ds(0, c)
    kk = tc.fori_blocks(dk, block_k, lambda col, kk: kk + cm.mm(k_ref[:, col], k_ref[:, col],
                                                                 precision, tb=True),
                        jnp.zeros((c, c), F32))
    if rk_ref:
        rk = tc.gram_rstd(kk)
        rk_ref[0][...] = rk
        kk = kk * (rk[:, None] * rk[None, :])
    a_ref[...] = cm.strict_a_from_kk(kk, beta_ref[rows].astype(F32), g_ref[rows])


def _ut_inverse_kernel(a_ref, t_ref, *, ut_precision):
    """Second kernel of the "split" UT transform: T = (I + A)^-1 from the stored A, on s x s blocks
    (s = 16, n = C/s row blocks read straight from the ref), all row blocks together:
      1. the n diagonal inverses T_ii by forward substitution in ONE loop of s - 1 steps
         (``cm.diag_block_inverses`` on the list: n independent chains per step);
      2. T_ij = -T_ii sum_m A_im T_mj (``cm.block_row_of_inverse``), row block by row block, each
         row's A blocks loaded where they are used.
    Only [s, s] tiles: one warp does it (more warps would replicate the M = 16 dots).
    Refs: a [C, C] float32 (strictly lower); output t [C, C] (zero above the diagonal)."""
    c = a_ref.shape[0]
    s = min(cm.SUB_BLOCK, c)
    n = c // s
    rows = [pl.ds(i * s, s) for i in range(n)]
    zeros = jnp.zeros((s, s), F32)
    t = {(i, i): x for i, x in enumerate(
        cm.diag_block_inverses([a_ref[rows[i], rows[i]].T for i in range(n)]))}
    for i in range(n):
        a_row = [a_ref[rows[i], rows[j]] for j in range(i)]
        t.update({(i, j): x for j, x in enumerate(
            cm.block_row_of_inverse(a_row, t, i, ut_precision))})
        for j in range(n):
            t_ref[rows[i], rows[j]] = (t[(i, j)] if j <= i else zeros).astype(t_ref.dtype)


def _wu_kernel(k_ref, v_ref, beta_ref, g_ref, t_ref, *refs, precision, block_k, block_v):
    """Third kernel of the "split" UT transform: W = T Kb, U = T Vb from the stored T, as
    [C, C] x [C, block] dots (M = C rows: the work splits over the program's warps).
    Refs: k [C, dk], v [C, dv], beta, g [C], t [C, C][, rk [C] inverse key norms]; outputs
    w [C, dk], u [C, dv]."""
    *rk_ref, w_ref, u_ref = refs
    rows = pl.ds(0, k_ref.shape[0])
    rk = rk_ref[0][rows] if rk_ref else None
    _apply_t(t_ref[...], k_ref, v_ref, beta_ref[rows].astype(F32), jnp.exp(g_ref[rows]), w_ref,
             u_ref, precision, block_k, block_v, rk)


UT_KERNELS = {"masked": _ut_kernel,                                     # one launch
              "split": (_gram_kernel, _ut_inverse_kernel, _wu_kernel)}  # three launches


def _ut_specs(chunk: int):
    """Block specs of the UT kernels, grid (B, Nc, H): a chunk of a [B, L, H, d] sequence, of a
    [B, H, L] gate, of a [B, H, L, C] per-chunk matrix (A or T), of a [B, L, H] per-token vector
    (the inverse key norms)."""
    tok = lambda d: pl.BlockSpec((None, chunk, None, d), lambda i, c, j: (i, c, j, 0))  # noqa: E731
    gate = pl.BlockSpec((None, None, chunk), lambda i, c, j: (i, j, c))
    tmat = pl.BlockSpec((None, None, chunk, chunk), lambda i, c, j: (i, j, c, 0))
    rowvec = pl.BlockSpec((None, chunk, None), lambda i, c, j: (i, c, j))
    return tok, gate, tmat, rowvec


def _gram_precision(k, ut_precision: str, interpret: bool):
    """Dots of A = K K^T: bfloat16 operands when K is stored in bfloat16 (then bf16 x bf16 products
    are exact in the float32 accumulator: tf32x3 would give the same A, three times slower), else
    ``ut_precision``."""
    return resolve_precision("bf16" if k.dtype == jnp.bfloat16 else ut_precision, interpret)


def ut_gram(k, beta_t, gcum_t, chunk: int, *, interpret: bool = False, num_warps: int = 4,
            ut_precision: str = "tf32x3", block_k: int = 64, l2norm: bool = False,
            num_stages: int = 1):
    """A per chunk: k [B, L, H, dk]; beta_t, gcum_t [B, H, L] float32 -> (a [B, H, L, C] float32,
    rk [B, L, H] float32 or None).  A_ij = b_i e^{G_i - G_j} k'_i.k'_j for j < i (rows of chunk c
    at [.., cC:(c+1)C, :]), else 0; with ``l2norm`` k' = k * rk, rk = 1 / sqrt(|k|^2 + eps) (the
    op's key L2-norm, computed here from the Gram diagonal), else k' = k and rk is None.
    num_stages: pipelining of the key-block loop (``tc.par_stages``)."""
    b, l, h, dk = k.shape
    bk = min(block_k, dk)
    tok, gate, tmat, rowvec = _ut_specs(chunk)
    out_shape, out_specs = [jax.ShapeDtypeStruct((b, h, l, chunk), F32)], [tmat]
    if l2norm:
        out_shape.append(jax.ShapeDtypeStruct((b, l, h), F32))
        out_specs.append(rowvec)
    outs = pl.pallas_call(
        functools.partial(_gram_kernel, precision=_gram_precision(k, ut_precision, interpret),
                          block_k=bk),
        out_shape=tuple(out_shape), grid=(b, l // chunk, h),
        in_specs=[tok(dk), gate, gate], out_specs=tuple(out_specs),
        compiler_params=tc.triton_params(num_warps, tc.par_stages(num_stages,
                                                                  (chunk, bk, k.dtype))),
        interpret=interpret,
        name="gdn_ut_gram")(k, beta_t, gcum_t)
    return outs[0], (outs[1] if l2norm else None)


def ut_inverse(a, chunk: int, *, t_dtype=F32, interpret: bool = False, num_warps: int = 1,
               ut_precision: str = "tf32x3"):
    """T = (I + A)^-1 per chunk: a [B, H, L, C] float32 (``ut_gram``) -> t [B, H, L, C] in t_dtype
    (zero above each chunk's diagonal)."""
    b, h, l, _ = a.shape
    _, _, tmat, _ = _ut_specs(chunk)
    return pl.pallas_call(
        functools.partial(_ut_inverse_kernel,
                          ut_precision=resolve_precision(ut_precision, interpret)),
        out_shape=jax.ShapeDtypeStruct(a.shape, t_dtype), grid=(b, l // chunk, h),
        in_specs=[tmat], out_specs=tmat,
        compiler_params=tc.triton_params(num_warps, 1), interpret=interpret,
        name="gdn_ut_inverse")(a)


def ut_apply(k, v, beta_t, gcum_t, t, chunk: int, *, rk=None, u_dtype=F32,
             interpret: bool = False, num_warps: int = 4, precision: str = "bf16",
             block_k: int = 64, block_v: int = 64, num_stages: int = 1):
    """W = T Kb, U = T Vb per chunk: k [B, L, H, dk]; v [B, L, H, dv]; beta_t, gcum_t [B, H, L];
    t [B, H, L, C]; rk [B, L, H] float32 inverse key norms (Kb = diag(b e^G rk) K) or None ->
    (W [B, L, H, dk] in ``tc.operand_dtype(precision)``, U [B, L, H, dv] in u_dtype).
    num_stages: pipelining of the key- and value-block loops (``tc.par_stages``)."""
    b, l, h, dk = k.shape
    dv = v.shape[-1]
    bk, bv = min(block_k, dk), min(block_v, dv)
    tok, gate, tmat, rowvec = _ut_specs(chunk)
    args, in_specs = [k, v, beta_t, gcum_t, t], [tok(dk), tok(dv), gate, gate, tmat]
    if rk is not None:
        args.append(rk)
        in_specs.append(rowvec)
    return pl.pallas_call(
        functools.partial(_wu_kernel, precision=resolve_precision(precision, interpret),
                          block_k=bk, block_v=bv),
        out_shape=(jax.ShapeDtypeStruct((b, l, h, dk), tc.operand_dtype(precision, interpret)),
                   jax.ShapeDtypeStruct((b, l, h, dv), u_dtype)),
        grid=(b, l // chunk, h), in_specs=in_specs,
        out_specs=(tok(dk), tok(dv)),
        compiler_params=tc.triton_params(num_warps, tc.par_stages(
            num_stages, (chunk, bk, k.dtype), (chunk, bv, v.dtype))),
        interpret=interpret,
        name="gdn_ut_apply")(*args)


def ut_transform(k, v, beta_t, gcum_t, chunk: int, *, interpret: bool = False, num_warps: int = 4,
                 ut_precision: str = "tf32x3", precision: str = "bf16", with_t: bool = True,
                 block_k: int = 64, block_v: int = 64, kernel: str = "split",
                 wu_num_warps: int = 4, l2norm: bool = False, num_stages: int = 1):
    """k [B, L, H, dk]; v [B, L, H, dv]; beta_t, gcum_t [B, H, L] float32 ->
    (T [B, H, L, C] or None, W [B, L, H, dk], U [B, L, H, dv], rk [B, L, H] float32 or None).

    l2norm: the op's key L2-norm in the kernels: the keys are k' = k * rk with
    rk = 1 / sqrt(|k|^2 + eps) from the diagonal of each chunk's Gram matrix (returned for the
    later kernels, which scale by it where k' enters); else k' = k and rk is None.

    T, W and U are stored in ``tc.operand_dtype(precision)`` (bfloat16 with bf16 dots).  T and W
    are only ever bf16 dot operands then; U enters v_new = U - W S elementwise, and v_new is
    itself stored in bfloat16 and rounded to it as a dot operand, so rounding U adds an error of
    the same size (flash-linear-attention stores its u in the input dtype too).
    A = K K^T takes K as given: with bfloat16 K its products are exact (``_gram_precision``).
    ut_precision: dots of the inverse (and of A for float32 K), "tf32x3" (three tf32 tensor-core
    passes, ~fp32 accuracy) or "ieee" (FMA dots; these spill heavily at dk >= 128, see
    NOTES_kernels.md).  precision: dots W = T Kb and U = T Vb.
    kernel: "split" (three launches: ``ut_gram`` A with ``wu_num_warps`` warps, ``ut_inverse`` T
    with ``num_warps``, ``ut_apply`` W and U with ``wu_num_warps``) or "masked" (``_ut_kernel``:
    whole C x C tiles, ``cm.ut_inverse``, ``num_warps``); same outputs up to rounding.
    num_stages: pipelining of the column-block loops of ``ut_gram`` and ``ut_apply`` ("split")."""
    if kernel not in UT_KERNELS:
        raise ValueError(f"unknown UT kernel {kernel!r}; one of {sorted(UT_KERNELS)}")
    b, l, h, dk = k.shape
    dv = v.shape[-1]
    store_dtype = tc.operand_dtype(precision, interpret)
    blocks = dict(block_k=min(block_k, dk), block_v=min(block_v, dv))
    if kernel == "split":
        a, rk = ut_gram(k, beta_t, gcum_t, chunk, interpret=interpret, num_warps=wu_num_warps,
                        ut_precision=ut_precision, block_k=blocks["block_k"], l2norm=l2norm,
                        num_stages=num_stages)
        t = ut_inverse(a, chunk, t_dtype=store_dtype, interpret=interpret, num_warps=num_warps,
                       ut_precision=ut_precision)
        w, u = ut_apply(k, v, beta_t, gcum_t, t, chunk, rk=rk, u_dtype=store_dtype,
                        interpret=interpret, num_warps=wu_num_warps, precision=precision,
                        num_stages=num_stages, **blocks)
        return (t if with_t else None), w, u, rk
    tok, gate, tmat, rowvec = _ut_specs(chunk)
    out_shape = [jax.ShapeDtypeStruct((b, l, h, dk), store_dtype),
                 jax.ShapeDtypeStruct((b, l, h, dv), store_dtype)]
    out_specs = [tok(dk), tok(dv)]
    if with_t:
        out_shape.insert(0, jax.ShapeDtypeStruct((b, h, l, chunk), store_dtype))
        out_specs.insert(0, tmat)
    if l2norm:
        out_shape.append(jax.ShapeDtypeStruct((b, l, h), F32))
        out_specs.append(rowvec)
    outs = pl.pallas_call(
        functools.partial(UT_KERNELS[kernel], with_t=with_t, l2norm=l2norm,
                          gram_precision=_gram_precision(k, ut_precision, interpret),
                          ut_precision=resolve_precision(ut_precision, interpret),
                          precision=resolve_precision(precision, interpret), **blocks),
        out_shape=tuple(out_shape),
        grid=(b, l // chunk, h),
        in_specs=[tok(dk), tok(dv), gate, gate],
        out_specs=tuple(out_specs),
        compiler_params=tc.triton_params(num_warps, 1),
        interpret=interpret,
        name="gdn_ut_transform",
    )(k, v, beta_t, gcum_t)
    outs = list(outs)
    rk = outs.pop() if l2norm else None
    return (*outs, rk) if with_t else (None, *outs, rk)


# ------------------------------------------------------------------------------------------------
# Kernel 2: sequential walk over a segment's chunks (state work only)
# ------------------------------------------------------------------------------------------------

def state_step(ks, ws, u_pre, gates: tc.Gates, states, precision, rk=None):
    """One chunk of the state recurrence, the key dimension split into blocks.

    ks, ws: lists of [C, BK] tiles of K and W = T Kb; u_pre: [C, BV] U = T Vb;
    states: list of [BK, BV] float32 tiles of S; rk: [C] float32 inverse key norms (the keys are
    diag(rk) K) or None.  Returns (v_new = U - W S [C, BV] float32, new state tiles
    S' = e^{G_C} S + K^T (diag(e^{G_C - G} rk) v_new))."""
    mm = functools.partial(cm.mm, precision=precision)
    v_new = u_pre.astype(F32)
    for w_b, s_b in zip(ws, states):
        v_new = v_new - mm(w_b, s_b)
    vd = v_new * (gates.ekd if rk is None else gates.ekd * rk)[:, None]
    return v_new, [gates.egl * s_b + mm(k_b, vd, ta=True) for k_b, s_b in zip(ks, states)]


def _walk_kernel(*refs, chunk, num_segments, has_init, has_rk, block_k, precision):
    refs = list(refs)
    final_ref, vnew_ref, h_ref = refs.pop(), refs.pop(), refs.pop()
    init_ref = refs.pop() if has_init else None
    rk_ref = refs.pop() if has_rk else None
    order_ref, lo_ref, hi_ref, *row_refs = refs
    p, row, s = tc.walk_program(order_ref, num_segments)
    seg_ref, first_ref, k_ref, w_ref, u_ref, g_ref, h_ref, vnew_ref = (
        tc.RowView(r, row) for r in (*row_refs, h_ref, vnew_ref))
    rk_ref = None if rk_ref is None else tc.RowView(rk_ref, row)
    init_ref = None if init_ref is None else tc.RowView(init_ref, row, s)
    final_ref = tc.RowView(final_ref, row, s)
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
                                       u_ref[rows, :], gates, states, precision,
                                       None if rk_ref is None else rk_ref[rows])

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
               num_stages: int = 2, block_k: int = 64, rk=None, longest_first: bool = True):
    """Runs the state walk.  Shapes: k, w [B, L, H, dk]; u [B, L, H, dv]; gcum_t [B, H, L];
    init [B, S, H, dk, dv] or None; lo, hi [B*S]; seg, first [B, Nc] (``cm.segment_ranges``);
    rk [B, L, H] float32 inverse key norms (the keys are k * rk, ``ut_transform``) or None.
    longest_first: launch the longest walks first (``tc.WalkSpecs``), else in row order.
    Returns (h [B, H, Nc, dk, dv], v_new [B, L, H, dv], final [B, S, H, dk, dv] float32): h is the
    state at the start of every visited chunk and v_new = U - W h, both in
    ``tc.operand_dtype(precision)``; entries of unvisited chunks are undefined."""
    b, l, h, dk = k.shape
    dv = u.shape[-1]
    s = num_segments
    assert dv % block_v == 0
    nc = l // chunk
    sp = tc.WalkSpecs(b, s, l, chunk)
    in_specs = [sp.ranges(), sp.ranges(), sp.ranges(), sp.flags(), sp.flags(), sp.seq(dk),
                sp.seq(dk), sp.seq_v(block_v), sp.gate()]
    args = [tc.walk_order(lo, hi, longest_first), lo, hi, seg, first, k, w, u, gcum_t]
    if rk is not None:
        in_specs.append(sp.row_vector())
        args.append(rk)
    if init is not None:
        in_specs.append(sp.segment_state(dk, block_v))
        args.append(init)
    op_dtype = tc.operand_dtype(precision, interpret)
    outs = pl.pallas_call(
        functools.partial(_walk_kernel, chunk=chunk, num_segments=s, has_init=init is not None,
                          has_rk=rk is not None, block_k=min(block_k, dk),
                          precision=resolve_precision(precision, interpret)),
        out_shape=(jax.ShapeDtypeStruct((b, h, nc, dk, dv), op_dtype),
                   jax.ShapeDtypeStruct((b, l, h, dv), op_dtype),
                   jax.ShapeDtypeStruct((b, s, h, dk, dv), F32)),
        grid=sp.grid(h, dv // block_v),
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

def _output_kernel(seg_ref, q_ref, k_ref, g_ref, h_ref, vnew_ref, *refs, l2norm, q_scale,
                   block_k, block_v, precision):
    """O = diag(e^G) Q' h + (D * Q' K'^T) v_new for one chunk, Q' = diag(s rq) Q and
    K' = diag(rk) K with ``l2norm`` (rq = 1 / sqrt(|q|^2 + eps) computed here and written, rk
    read), else Q' = s Q and K' = K; s = q_scale.  Refs: seg [Nc], q, k [C, dk], g [C],
    h [dk, dv], v_new [C, dv][, rk [C]]; outputs o [C, dv][, rq [C]] (zero on unused chunks)."""
    if l2norm:
        rk_ref, o_ref, rq_ref = refs
    else:
        (o_ref,), rk_ref, rq_ref = refs, None, None
    chunk, dk = q_ref.shape
    kb = tc.blocks(dk, block_k)
    rows = pl.ds(0, chunk)

    @tc.used_chunk(seg_ref, (o_ref,) if rq_ref is None else (o_ref, rq_ref))
    def _():
        mm = functools.partial(cm.mm, precision=precision)
        gates = tc.Gates.load(g_ref, rows, chunk - 1)
        qs, p = tc.causal_qk(q_ref, k_ref, rows, kb, gates, mm)
        q_row = jnp.full((chunk,), q_scale, F32)      # row scale of Q' = diag(s rq) Q
        if l2norm:
            rq = tc.tiles_rstd(qs)
            rq_ref[...] = rq
            q_row = q_row * rq
            p = p * (q_row[:, None] * rk_ref[rows][None, :])
        elif q_scale != 1.0:
            p = p * q_scale
        inter_row = (gates.eg * q_row)[:, None]

        def value_block(vcol, carry):
            o = mm(p, vnew_ref[:, vcol])
            inter = None
            for q_b, kcol in zip(qs, kb):
                part = mm(q_b, h_ref[kcol, vcol])
                inter = part if inter is None else inter + part
            o_ref[:, vcol] = (o + inter_row * inter).astype(o_ref.dtype)
            return carry

        tc.fori_blocks(o_ref.shape[1], block_v, value_block, 0)


def chunk_output(q, k, gcum_t, h, v_new, seg, *, chunk: int, precision: str = "bf16",
                 interpret: bool = False, num_warps: int = 4, block_k: int = 64,
                 block_v: int = 64, out_dtype=F32, rk=None, q_scale: float = 1.0,
                 num_stages: int = 1):
    """q, k [B, L, H, dk]; gcum_t [B, H, L]; h [B, H, Nc, dk, dv]; v_new [B, L, H, dv];
    seg [B, Nc]; rk [B, L, H] float32 inverse key norms (``ut_transform`` with l2norm) or None ->
    (o [B, L, H, dv] in out_dtype (computed in float32, rounded as it is stored; zero on chunks of
    no segment), rq [B, L, H] float32 inverse query norms (zero on unused chunks) or None).

    The queries are q * q_scale, and with rk given (the op's L2-norm) q * rq * q_scale and the
    keys k * rk: the norms and the scale enter as row / column scales of the float32 dot
    results, the dots take q and k as stored.  num_stages: pipelining of the value-block loop
    (``tc.par_stages``)."""
    b, l, hh, dk = q.shape
    dv = v_new.shape[-1]
    bv = min(block_v, dv)
    sp = tc.ChunkSpecs(b, l, chunk)
    l2norm = rk is not None
    in_specs = [sp.seg(), sp.tok(dk), sp.tok(dk), sp.gate(), sp.state(dk, dv), sp.tok(dv)]
    args = [seg, q, k, gcum_t, h, v_new]
    out_shape, out_specs = [jax.ShapeDtypeStruct((b, l, hh, dv), out_dtype)], [sp.tok(dv)]
    if l2norm:
        in_specs.append(sp.row_vector())
        args.append(rk)
        out_shape.append(jax.ShapeDtypeStruct((b, l, hh), F32))
        out_specs.append(sp.row_vector())
    outs = pl.pallas_call(
        functools.partial(_output_kernel, l2norm=l2norm, q_scale=float(q_scale),
                          block_k=min(block_k, dk), block_v=bv,
                          precision=resolve_precision(precision, interpret)),
        out_shape=tuple(out_shape),
        grid=(b * (l // chunk), hh),
        in_specs=in_specs,
        out_specs=tuple(out_specs),
        compiler_params=tc.triton_params(num_warps, tc.par_stages(
            num_stages, (chunk, bv, v_new.dtype), (dk, bv, h.dtype))),
        interpret=interpret,
        name="gdn_chunk_output",
    )(*args)
    return outs[0], (outs[1] if l2norm else None)
