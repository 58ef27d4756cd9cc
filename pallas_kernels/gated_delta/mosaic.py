"""Forward kernel of the chunked gated delta rule in Pallas Mosaic (TPU).

TPU programs run their grid in order on each core, so the chunk axis goes into the grid as the last,
sequential ("arbitrary") dimension and the [dk, BV] float32 state lives in a VMEM scratch buffer
across grid steps: grid = (row, head, value block, chunk).  Per-chunk flags (segment index, run
start, run end) come in as scalar-prefetch operands (SMEM) and drive the block index maps:

  * the initial-state block of a chunk is the one of its segment; at a run start the state is reset
    to it (or to zero);
  * the final-state output block of a chunk is its segment's (for unused chunks: the last used
    segment before it, or the first one of the row), so a segment's block stays resident while its
    chunks are walked and is written at the chunk that ends the run; Pallas writes it back when the
    block index changes.  Segments without chunks get their initial state in the wrapper.

Everything else is the same UT/WY chunk algebra as the Triton kernels (``common``), written with 2-D
[C, 1] / [1, C] vectors so every block is Mosaic-legal: the time-major tensors are transposed to
head-major [B, H, L, d] so that blocks are (C, d) with C a multiple of 8 and d the full head dim (or
a multiple of 128 for value blocks).  The UT transform (T = (I + A)^-1) is computed per chunk inside
the same kernel: with the default BV = dv there is nothing to share between programs.

For the backward (``Config.bwd="pallas"``, the default) the forward also stores the state at the
start of every chunk (``store_states``: h [B, H, Nc, dk, dv] float32), and ``mosaic_bwd`` walks the
chunks in reverse with one Mosaic kernel that recomputes each chunk's UT transform from its inputs
and h.  ``Config.bwd="xla"`` takes the VJP of the chunked XLA form instead (``api._xla_vjp``).

A segment split into several runs of chunks (never produced by the packers) revisits its final-state
block non-consecutively.  On the hardware that is still right (the block is fully rewritten at the end
of every run and the last write-back wins), but the TPU interpreter rejects revisits, so that case is
only tested end to end on the Triton path (the Mosaic backward, which writes d(initial state) per
run, is tested on it from reference chunk-start states).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gated_delta import common as cm

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


def resolve_precision(precision: str, interpret: bool):
    """Config precision name -> TPU matmul precision (interpret mode: always float32)."""
    if interpret:
        return HIGHEST
    return {"ieee": HIGHEST, "tf32x3": HIGHEST, "tf32": jax.lax.Precision.HIGH,
            "bf16": jax.lax.Precision.DEFAULT}[precision]


def _mm(a, b, *, ta=False, tb=False, precision=HIGHEST):
    dims = (((0,) if ta else (1,), (1,) if tb else (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


class ChunkTerms(NamedTuple):
    """The forward quantities of one chunk (``chunk_terms``), all float32.  [C, C]: e_strict
    (e^{G_i - G_j}, i > j, else 0), d_incl (the same for i >= j), kk = K K^T, t = (I + A)^-1,
    p = (Q K^T) * d_incl; [C, 1]: eg = e^G, ekd = e^{G_C - G}; [1, 1]: egl = e^{G_C}; kb =
    diag(b e^G) K, kd = diag(e^{G_C - G}) K [C, dk]; vb = diag(b) V, u = T Vb - W h [C, dv];
    w = T Kb [C, dk]."""
    e_strict: jax.Array
    d_incl: jax.Array
    kk: jax.Array
    t: jax.Array
    p: jax.Array
    eg: jax.Array
    ekd: jax.Array
    egl: jax.Array
    kb: jax.Array
    kd: jax.Array
    vb: jax.Array
    w: jax.Array
    u: jax.Array


def chunk_terms(q, k, v, beta, g_col, g_row, h, *, precision=HIGHEST) -> ChunkTerms:
    """The UT/WY algebra of one chunk from its inputs and the state h [dk, dv] at its start:
    what the forward kernel needs for the output and the state update, and what the backward
    kernel (``mosaic_bwd.chunk_grads``) recomputes.  q, k [C, dk], v [C, dv], beta, g_col [C, 1]
    (G: chunk-local cumulative log-decay), g_row [1, C] (G as a row), all float32, 2-D only (as
    Mosaic wants).  A = K K^T and T in HIGHEST, the other dots in ``precision``."""
    n = q.shape[0]
    row, col = cm.iota2(n, n, 0), cm.iota2(n, n, 1)
    strict, incl = row > col, row >= col
    diff = g_col - g_row
    e_strict = jnp.where(strict, jnp.exp(jnp.where(strict, diff, 0.0)), 0.0)
    d_incl = jnp.where(incl, jnp.exp(jnp.where(incl, diff, 0.0)), 0.0)
    gl = g_row[:, n - 1:n]                                 # [1, 1]
    eg = jnp.exp(g_col)
    ekd = jnp.exp(gl - g_col)
    kk = _mm(k, k, tb=True, precision=HIGHEST)
    t = cm.ut_inverse(beta * kk * e_strict, HIGHEST, keep_2d=True)
    kb, vb = k * (beta * eg), v * beta
    w = _mm(t, kb, precision=precision)
    u = _mm(t, vb, precision=precision) - _mm(w, h, precision=precision)
    p = _mm(q, k, tb=True, precision=precision) * d_incl
    return ChunkTerms(e_strict, d_incl, kk, t, p, eg, ekd, jnp.exp(gl), kb, k * ekd, vb, w, u)


def _kernel(seg_ref, first_ref, last_ref, q_ref, k_ref, v_ref, bcol_ref, gcol_ref, grow_ref,
            *rest, has_init, store_states, precision):
    rest = list(rest)
    init_ref = rest.pop(0) if has_init else None
    o_ref, final_ref = rest.pop(0), rest.pop(0)
    h_ref = rest.pop(0) if store_states else None
    (state_ref,) = rest
    b = pl.program_id(0)
    c = pl.program_id(3)
    used = seg_ref[b, c] >= 0

    @pl.when(first_ref[b, c] != 0)
    def _reset():
        if init_ref is None:
            state_ref[...] = jnp.zeros(state_ref.shape, F32)
        else:
            state_ref[...] = init_ref[...].astype(F32)

    @pl.when(jnp.logical_not(used))
    def _unused():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
        if h_ref is not None:
            h_ref[...] = jnp.zeros(h_ref.shape, h_ref.dtype)

    @pl.when(used)
    def _chunk():
        s0 = state_ref[...]
        if h_ref is not None:
            h_ref[...] = s0
        q = q_ref[...].astype(F32)
        ct = chunk_terms(q, k_ref[...].astype(F32), v_ref[...].astype(F32), bcol_ref[...],
                         gcol_ref[...], grow_ref[pl.ds(c, 1), :], s0, precision=precision)
        o = _mm(q * ct.eg, s0, precision=precision) + _mm(ct.p, ct.u, precision=precision)
        o_ref[...] = o.astype(o_ref.dtype)
        state_ref[...] = ct.egl * s0 + _mm(ct.kd, ct.u, ta=True, precision=precision)

    @pl.when(used & (last_ref[b, c] != 0))
    def _final():
        final_ref[...] = state_ref[...]


def resident_block_index(values, used, *, reverse: bool = False):
    """Per chunk ([B, Nc] int32 ``values``, bool ``used``): the block index an output indexed by
    ``values`` maps the chunk to, so that unused chunks keep the block already resident.

    In walk order (chunk order, or reversed with ``reverse``): a used chunk gets its own value, an
    unused one the value of the last used chunk walked before it, or, before any, of the first used
    chunk of the row; a row without used chunks gets 0 (the wrapper overrides what it writes)."""
    if reverse:
        return jnp.flip(resident_block_index(jnp.flip(values, 1), jnp.flip(used, 1)), 1)
    nc = values.shape[1]
    idx = jnp.where(used, jnp.arange(nc, dtype=jnp.int32)[None], -1)
    last_used = jax.lax.cummax(idx, axis=1)                                 # last used chunk <= c
    first_used = jnp.argmax(used, axis=1).astype(jnp.int32)                # 0 if none
    src = jnp.where(last_used >= 0, last_used, first_used[:, None])
    return jnp.maximum(jnp.take_along_axis(values, src, axis=1), 0)


def final_block_segment(layout):
    """Per chunk, the segment whose final-state block the chunk maps to (see module doc)."""
    seg = layout.chunk_segment.astype(jnp.int32)
    return resident_block_index(seg, seg >= 0)


def head_major_inputs(q, k, v, g, beta, chunk: int):
    """The kernels' operands from the time-major inputs: q, k, v as [B, H, L, d], beta and the
    chunk-local cumulative log-decay G as columns [B, H, L, 1] (b_col, g_col), and G as one row
    per chunk [B, H, Nc, C] (g_row).  g None: G = 0."""
    b, l, h = q.shape[:3]
    head_major = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # noqa: E731
    gcum = jnp.zeros((b, l, h), F32) if g is None else cm.chunk_cumsum(g, chunk)
    gh = jnp.transpose(gcum, (0, 2, 1))                    # [B, H, L]
    b_col = jnp.transpose(beta.astype(F32), (0, 2, 1))[..., None]
    return (head_major(q), head_major(k), head_major(v), b_col, gh[..., None],
            gh.reshape(b, h, l // chunk, chunk))


def gated_delta_fwd(q, k, v, g, beta, layout, init, *, interpret=False, block_v=None,
                    precision=HIGHEST, store_states=False):
    """Same contract as the Triton path: returns (o [B, L, H, dv] float32, final [B, S, H, dk, dv]);
    with ``store_states`` also the state at the start of every chunk, h [B, H, Nc, dk, dv] float32
    (zero on unused chunks), for the backward kernel (``mosaic_bwd``)."""
    b, l, h, dk = q.shape
    dv = v.shape[-1]
    chunk = layout.chunk_size
    s = layout.num_segments
    nc = l // chunk
    bv = dv if block_v is None else block_v
    assert dv % bv == 0 and (bv == dv or bv % 128 == 0), (dv, bv)
    nv = dv // bv
    qh, kh, vh, b_col, g_col, g_row = head_major_inputs(q, k, v, g, beta, chunk)
    seg = layout.chunk_segment.astype(jnp.int32)
    first = layout.chunk_first().astype(jnp.int32)
    last = layout.chunk_last().astype(jnp.int32)
    fseg = final_block_segment(layout)
    # The final-state block index uses fseg; the initial-state block the chunk's own segment.
    seg_for_init = jnp.maximum(seg, 0)

    def seq_spec(d, blocked):
        return pl.BlockSpec((None, None, chunk, d),
                            lambda bi, hi, j, c, *_: (bi, hi, c, j if blocked else 0))

    in_specs = [seq_spec(dk, False), seq_spec(dk, False), seq_spec(bv, True),
                seq_spec(1, False), seq_spec(1, False),
                pl.BlockSpec((None, None, nc, chunk), lambda bi, hi, j, c, *_: (bi, hi, 0, 0))]
    args = [qh, kh, vh, b_col, g_col, g_row]
    if init is not None:
        in_specs.append(pl.BlockSpec(
            (None, None, None, dk, bv),
            lambda bi, hi, j, c, seg_r, fst_r, lst_r, segi_r, fseg_r: (bi, segi_r[bi, c], hi, 0, j)))
        args.append(init.astype(F32))
    out_specs = [
        seq_spec(bv, True),
        pl.BlockSpec((None, None, None, dk, bv),
                     lambda bi, hi, j, c, seg_r, fst_r, lst_r, segi_r, fseg_r: (bi, fseg_r[bi, c], hi, 0, j)),
    ]
    out_shape = [jax.ShapeDtypeStruct((b, h, l, dv), F32),
                 jax.ShapeDtypeStruct((b, s, h, dk, dv), F32)]
    if store_states:
        out_specs.append(pl.BlockSpec((None, None, None, dk, bv),
                                      lambda bi, hi, j, c, *_: (bi, hi, c, 0, j)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, nc, dk, dv), F32))
    kernel = functools.partial(_kernel, has_init=init is not None, store_states=store_states,
                               precision=precision)

    def kernel_wrapper(seg_ref, first_ref, last_ref, _segi_ref, _fseg_ref, *refs):
        kernel(seg_ref, first_ref, last_ref, *refs)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(b, h, nv, nc),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((dk, bv), F32)],
    )
    o, final, *states = pl.pallas_call(
        kernel_wrapper,
        grid_spec=grid_spec,
        out_shape=tuple(out_shape),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="gdn_mosaic_fwd",
    )(seg, first, last, seg_for_init, fseg, *args)
    o = jnp.transpose(o, (0, 2, 1, 3))
    # Segments without chunks: their final state is their initial state (or zero).
    has_chunks = jnp.zeros((b, s), bool).at[
        jnp.arange(b)[:, None], jnp.where(seg >= 0, seg, s)].set(True, mode="drop")
    keep = init.astype(F32) if init is not None else jnp.zeros_like(final)
    final = jnp.where(has_chunks[:, :, None, None, None], final, keep)
    return (o, final, states[0]) if store_states else (o, final)
