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

def chunk_step(q, k, v, beta, gcum, gl, t, state, precision):
    """One chunk of the recurrence.  Returns (o [C, BV], new state [dk, BV], u [C, BV])."""
    eg = jnp.exp(gcum)
    w = cm.mm(t, k * (beta * eg)[:, None], precision)                  # [C, dk]
    u = cm.mm(t, v * beta[:, None], precision) - cm.mm(w, state, precision)
    p = cm.mm(q, k, precision, tb=True) * cm.causal_decay(gcum)
    o = cm.mm(q * eg[:, None], state, precision) + cm.mm(p, u, precision)
    kd = k * jnp.exp(gl - gcum)[:, None]
    new_state = jnp.exp(gl) * state + cm.mm(kd, u, precision, ta=True)
    return o, new_state, u


def _recurrence_kernel(*refs, chunk, num_segments, has_init, store_h, precision):
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

    def load_init():
        if init_ref is None:
            return jnp.zeros((dk, bv), F32)
        return init_ref[...].astype(F32)

    def run_chunk(c, state):
        state = jax.lax.cond(first_ref[c] != 0, load_init, lambda: state)
        if h_ref is not None:
            h_ref[c] = state
        rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
        q = q_ref[rows, :].astype(F32)
        k = k_ref[rows, :].astype(F32)
        v = v_ref[rows, :].astype(F32)
        beta = beta_ref[rows].astype(F32)
        gcum = g_ref[rows]
        gl = g_ref[c * chunk + chunk - 1]
        t = t_ref[rows, :]
        o, new_state, _ = chunk_step(q, k, v, beta, gcum, gl, t, state, precision)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return new_state

    def body(c, state):
        return jax.lax.cond(seg_ref[c] == s, run_chunk, lambda c, st: st, c, state)

    final = jax.lax.fori_loop(lo, hi, body, load_init())
    final_ref[...] = final


def chunk_recurrence(q, k, v, beta_t, gcum_t, t, init, lo, hi, seg, first, *, chunk: int,
                     num_segments: int, block_v: int, precision: str = "tf32",
                     interpret: bool = False, num_warps: int = 4, num_stages: int = 2,
                     store_h: bool = False):
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
                               has_init=init is not None, store_h=store_h, precision=prec)
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
