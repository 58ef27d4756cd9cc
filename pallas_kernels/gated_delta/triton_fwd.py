"""Forward kernels of the chunked gated delta rule in Pallas with Triton lowering (GPU).

Two launches:
  1. ``ut_transform``: fully parallel over (row, chunk, head); writes T = (I + A)^-1 per chunk as a
     [B, H, L, C] float32 array (row i of a chunk's T at the chunk's i-th token).
  2. ``chunk_recurrence``: grid (row*segment, head, value block); each program walks the chunks of its
     segment in order with the [dk, BV] state in registers, applying the segment's initial state
     (or zero) at the chunk that starts it and writing the segment's final state at the end.
     Per chunk: W = T diag(b e^G) K, U = T diag(b) V - W S, O = diag(e^G) Q S + (D * Q K^T) U,
     S <- e^{G_C} S + (diag(e^{G_C - G}) K)^T U.
Chunks that belong to no segment are not visited: their output stays zero (the stream's contract is
that such slots carry zero k/v/beta, for which the reference's output is zero too).

On CPU the kernels run with ``interpret=True``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gated_delta import common as cm

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


def resolve_precision(precision: str, interpret: bool):
    """Maps a precision name to what ``cm.mm`` takes.  Interpret mode (CPU) always uses float32."""
    if interpret:
        return HIGHEST
    return {
        "ieee": HIGHEST,
        "tf32": jax.lax.Precision.DEFAULT,
        "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
        "bf16": "bf16",
    }[precision]


def _triton_params(num_warps, num_stages):
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# ------------------------------------------------------------------------------------------------
# Kernel 1: T = (I + A)^-1 per chunk
# ------------------------------------------------------------------------------------------------

def _ut_kernel(k_ref, beta_ref, g_ref, t_ref, *, precision):
    k = k_ref[...].astype(F32)
    a = cm.strict_a(k, beta_ref[...].astype(F32), g_ref[...], precision)
    t_ref[...] = cm.ut_inverse(a, precision)


def ut_transform(k, beta_t, gcum_t, chunk: int, *, interpret: bool = False, num_warps: int = 4,
                 precision: str = "tf32x3"):
    """k [B, L, H, dk]; beta_t, gcum_t [B, H, L] -> T [B, H, L, C] float32.

    precision: "tf32x3" (three tf32 tensor-core passes, ~fp32 accuracy) or "ieee" (FMA dots; these
    spill heavily at dk >= 128, see NOTES_kernels.md)."""
    b, l, h, dk = k.shape
    nc = l // chunk
    return pl.pallas_call(
        functools.partial(_ut_kernel, precision=resolve_precision(precision, interpret)),
        out_shape=jax.ShapeDtypeStruct((b, h, l, chunk), F32),
        grid=(b, nc, h),
        in_specs=[
            pl.BlockSpec((None, chunk, None, dk), lambda i, c, j: (i, c, j, 0)),
            pl.BlockSpec((None, None, chunk), lambda i, c, j: (i, j, c)),
            pl.BlockSpec((None, None, chunk), lambda i, c, j: (i, j, c)),
        ],
        out_specs=pl.BlockSpec((None, None, chunk, chunk), lambda i, c, j: (i, j, c, 0)),
        compiler_params=_triton_params(num_warps, 1),
        interpret=interpret,
        name="gdn_ut_transform",
    )(k, beta_t, gcum_t)


# ------------------------------------------------------------------------------------------------
# Kernel 2: sequential walk over a segment's chunks
# ------------------------------------------------------------------------------------------------

def chunk_step(qs, ks, v, beta, gcum, gl, t, states, precision):
    """One chunk of the recurrence with the key dimension split into blocks.

    qs, ks: lists of [C, BK] tiles; states: list of [BK, BV] tiles (the state's key-row blocks).
    Returns (o [C, BV], new state tiles).  Keeping every operand at most [C, 64] / [64, BV] keeps
    registers and shared memory in bounds for dk up to 256 (see NOTES_kernels.md).
    """
    mm = functools.partial(cm.mm, precision=precision)
    eg = jnp.exp(gcum)
    beg = (beta * eg)[:, None]
    u = mm(t, v * beta[:, None])
    for k_b, s_b in zip(ks, states):
        u = u - mm(mm(t, k_b * beg), s_b)                     # U = T Vb - (T Kb) S
    p = None
    o = None
    for q_b, k_b, s_b in zip(qs, ks, states):
        pb = mm(q_b, k_b, tb=True)
        ob = mm(q_b * eg[:, None], s_b)
        p = pb if p is None else p + pb
        o = ob if o is None else o + ob
    o = o + mm(p * cm.causal_decay(gcum), u)
    ekd = jnp.exp(gl - gcum)[:, None]
    egl = jnp.exp(gl)
    new_states = [egl * s_b + mm(k_b * ekd, u, ta=True) for k_b, s_b in zip(ks, states)]
    return o, new_states


def _recurrence_kernel(*refs, chunk, num_segments, has_init, store_h, block_k, precision):
    refs = list(refs)
    h_ref = refs.pop() if store_h else None
    final_ref = refs.pop()
    o_ref = refs.pop()
    refs.pop()  # the zero-filled buffer aliased to o
    init_ref = refs.pop() if has_init else None
    lo_ref, hi_ref, seg_ref, first_ref, q_ref, k_ref, v_ref, beta_ref, g_ref, t_ref = refs
    p = pl.program_id(0)
    s = p % num_segments
    lo = lo_ref[p]
    hi = hi_ref[p]
    dk, bv = final_ref.shape
    kblocks = [pl.ds(i * block_k, block_k) for i in range(dk // block_k)]

    def load_init():
        if init_ref is None:
            return tuple(jnp.zeros((block_k, bv), F32) for _ in kblocks)
        return tuple(init_ref[kb, :].astype(F32) for kb in kblocks)

    def run_chunk(c, states):
        states = jax.lax.cond(first_ref[c] != 0, load_init, lambda: states)
        if h_ref is not None:
            for kb, s_b in zip(kblocks, states):
                h_ref[c, kb, :] = s_b
        rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
        qs = [q_ref[rows, kb].astype(F32) for kb in kblocks]
        ks = [k_ref[rows, kb].astype(F32) for kb in kblocks]
        v = v_ref[rows, :].astype(F32)
        beta = beta_ref[rows].astype(F32)
        gcum = g_ref[rows]
        gl = g_ref[c * chunk + chunk - 1]
        t = t_ref[rows, :]
        o, new_states = chunk_step(qs, ks, v, beta, gcum, gl, t, states, precision)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return tuple(new_states)

    def body(c, states):
        return jax.lax.cond(seg_ref[c] == s, run_chunk, lambda c, st: st, c, states)

    final = jax.lax.fori_loop(lo, hi, body, load_init())
    for kb, s_b in zip(kblocks, final):
        final_ref[kb, :] = s_b


def chunk_recurrence(q, k, v, beta_t, gcum_t, t, init, lo, hi, seg, first, *, chunk: int,
                     num_segments: int, block_v: int, precision: str = "tf32",
                     interpret: bool = False, num_warps: int = 4, num_stages: int = 2,
                     store_h: bool = False, block_k: int = 64):
    """Runs the state walk.  Shapes: q, k [B, L, H, dk]; v [B, L, H, dv]; beta_t, gcum_t [B, H, L];
    t [B, H, L, C]; init [B, S, H, dk, dv] or None; lo, hi [B*S]; seg, first [B, Nc].
    Returns (o [B, L, H, dv] float32, final [B, S, H, dk, dv] float32, h) where h (only with
    store_h, else None) is [B, H, Nc, dk, dv] float32: the state at the start of every visited chunk
    (for the backward pass; entries of unvisited chunks are undefined)."""
    b, l, h, dk = q.shape
    dv = v.shape[-1]
    s = num_segments
    assert dv % block_v == 0
    nv = dv // block_v
    nc = l // chunk
    prec = resolve_precision(precision, interpret)
    row = lambda p: p // s  # noqa: E731
    in_specs = [
        pl.BlockSpec((b * s,), lambda p, i, j: (0,)),
        pl.BlockSpec((b * s,), lambda p, i, j: (0,)),
        pl.BlockSpec((None, nc), lambda p, i, j: (row(p), 0)),
        pl.BlockSpec((None, nc), lambda p, i, j: (row(p), 0)),
        pl.BlockSpec((None, l, None, dk), lambda p, i, j: (row(p), 0, i, 0)),
        pl.BlockSpec((None, l, None, dk), lambda p, i, j: (row(p), 0, i, 0)),
        pl.BlockSpec((None, l, None, block_v), lambda p, i, j: (row(p), 0, i, j)),
        pl.BlockSpec((None, None, l), lambda p, i, j: (row(p), i, 0)),
        pl.BlockSpec((None, None, l), lambda p, i, j: (row(p), i, 0)),
        pl.BlockSpec((None, None, l, chunk), lambda p, i, j: (row(p), i, 0, 0)),
    ]
    args = [lo, hi, seg, first, q, k, v, beta_t, gcum_t, t]
    state_spec = pl.BlockSpec((None, None, None, dk, block_v), lambda p, i, j: (row(p), p % s, i, 0, j))
    if init is not None:
        in_specs.append(state_spec)
        args.append(init)
    o_spec = pl.BlockSpec((None, l, None, block_v), lambda p, i, j: (row(p), 0, i, j))
    in_specs.append(o_spec)
    args.append(jnp.zeros((b, l, h, dv), F32))
    kernel = functools.partial(_recurrence_kernel, chunk=chunk, num_segments=s,
                               has_init=init is not None, store_h=store_h,
                               block_k=min(block_k, dk), precision=prec)
    out_shape = [jax.ShapeDtypeStruct((b, l, h, dv), F32), jax.ShapeDtypeStruct((b, s, h, dk, dv), F32)]
    out_specs = [o_spec, state_spec]
    if store_h:
        out_shape.append(jax.ShapeDtypeStruct((b, h, nc, dk, dv), F32))
        out_specs.append(pl.BlockSpec((None, None, nc, dk, block_v),
                                      lambda p, i, j: (row(p), i, 0, 0, j)))
    outs = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(b * s, h, nv),
        in_specs=in_specs,
        out_specs=tuple(out_specs),
        input_output_aliases={len(args) - 1: 0},
        compiler_params=_triton_params(num_warps, num_stages),
        interpret=interpret,
        name="gdn_chunk_recurrence",
    )(*args)
    return outs[0], outs[1], (outs[2] if store_h else None)
