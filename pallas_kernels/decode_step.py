"""Fused one-token recurrent step for decoding, updating selected memories of a cache in place.

One launch does, for every (row, selected memory, head, value block), what ``mom_jax.ops.scan.
recurrent_step`` does for one token:

    S <- diag(exp(gk)) S            (decay: per head scalar g broadcast over dk, or per key channel)
    u  = beta (v - S^T k)           (delta rules; u = v for the additive rules)
    S <- S + k u^T,   o = S^T q

reading the memory's [dk, BV] state tile straight from the cache at the routed slot and writing it
back to the same place (``input_output_aliases``), so the untouched memories are never read or
copied.  A MoM layer's shared memory can ride in the same launch (its own state array, the last of
the J inputs of a row).  The XLA alternative (gather the k selected states, update, scatter them
back) runs several kernels per layer and moves each selected state through HBM three times; at
batch 64 those kernels were most of the MoM decode step (benchmarks/NOTES.md, "Decode step").

Pallas with Triton lowering (GPU); on CPU the kernel runs in interpret mode (tests).  Needs dk and
the value block to be powers of two (``supported``); otherwise use the XLA step.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32


def _pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _block_v(dv: int) -> int:
    return min(dv, 32)


def supported(dk: int, dv: int) -> bool:
    """Whether the kernel handles these head dims (Triton tiles must be powers of two)."""
    return _pow2(dk) and _pow2(_block_v(dv)) and dv % _block_v(dv) == 0


def _update_tile(s_in_ref, s_out_ref, r, cols, q, k, v, beta, decay):
    s = s_in_ref[r, :, cols].astype(F32)                          # [dk, BV]
    if decay is not None:
        s = s * (jnp.exp(decay)[:, None] if decay.ndim else jnp.exp(decay))
    u = v if beta is None else beta * (v - jnp.sum(k[:, None] * s, axis=0))
    s = s + k[:, None] * u[None, :]
    s_out_ref[r, :, cols] = s
    return jnp.sum(q[:, None] * s, axis=0)                         # [BV]


def _step_kernel(*refs, slots_per_row, num_memories, num_heads, block_v, delta, decay_kind,
                 has_shared):
    slot_ref, q_ref, k_ref, v_ref, beta_ref, decay_ref, state_in_ref = refs[:7]
    refs = refs[7:]
    shared_in_ref = None
    if has_shared:
        shared_in_ref, refs = refs[0], refs[1:]
    state_ref, shared_ref, o_ref = (refs if has_shared else (refs[0], None, refs[1]))
    p, h, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row, j = p // slots_per_row, p % slots_per_row
    cols = pl.ds(vb * block_v, block_v)
    q = q_ref[...].astype(F32)
    k = k_ref[...].astype(F32)
    v = v_ref[...].astype(F32)
    beta = beta_ref[p * num_heads + h] if delta else None
    decay = None
    if decay_kind == "head":
        decay = decay_ref[p * num_heads + h]
    elif decay_kind == "channel":
        decay = decay_ref[...].astype(F32)

    def routed():
        r = (row * num_memories + slot_ref[p]) * num_heads + h
        o_ref[...] = _update_tile(state_in_ref, state_ref, r, cols, q, k, v, beta, decay)

    if not has_shared:
        routed()
        return
    pl.when(j < slots_per_row - 1)(routed)

    @pl.when(j == slots_per_row - 1)
    def _shared():
        o_ref[...] = _update_tile(shared_in_ref, shared_ref, row * num_heads + h, cols, q, k, v,
                                  beta, decay)


def step_in_place(state, slots, q, k, v, beta, decay, shared_state=None, *,
                  interpret: bool = False, num_warps: int = 4):
    """One token through the selected memories of ``state`` (and ``shared_state``), in place.

    Args:
      state: [B, M, H, dk, dv] float32 cache of M memories per row (updated in place when the
        caller's jit can reuse its buffer, e.g. a donated decode-loop carry).
      slots: int32 [B, Jr], memory index of each routed update of a row (distinct within a row).
      q, k: [B, J, H, dk] (any float dtype); v: [B, J, H, dv]; J = Jr, or Jr + 1 with
        ``shared_state`` (the last input of each row then goes to the shared memory).
      beta: [B, J, H] write strength (delta rules) or None (additive write, u = v).
      decay: log-decay, [B, J, H] (per head) or [B, J, H, dk] (per key channel), or None.
      shared_state: [B, H, dk, dv] float32 or None.
    Returns:
      (new state [B, M, H, dk, dv] float32 -- equal to ``state`` outside the selected slots --,
       new shared state [B, H, dk, dv] or None, o [B, J, H, dv] float32).
    """
    b, m, hh, dk, dv = state.shape
    jr = slots.shape[1]
    has_shared = shared_state is not None
    j = jr + int(has_shared)
    if q.shape[:3] != (b, j, hh):
        raise ValueError(f"step_in_place: q {q.shape} needs [B, J, H] = {[b, j, hh]}")
    bv = _block_v(dv)
    if not supported(dk, dv):
        raise ValueError(f"decode step kernel needs power-of-two head dims, got dk={dk}, dv={dv}")
    decay_kind = "none" if decay is None else ("head" if decay.ndim == 3 else "channel")
    flat = lambda x: x.astype(F32).reshape(-1)                    # noqa: E731
    rows = lambda x: x.reshape((b * j,) + x.shape[2:])            # noqa: E731
    beta_a = flat(beta) if beta is not None else jnp.zeros((1,), F32)   # (1,): unread placeholder
    decay_a = {"none": lambda: jnp.zeros((1,), F32), "head": lambda: flat(decay),
               "channel": lambda: rows(decay.astype(F32))}[decay_kind]()
    slots_a = slots.astype(jnp.int32)
    if has_shared:  # the shared input's slot is unused
        slots_a = jnp.concatenate([slots_a, jnp.zeros((b, 1), jnp.int32)], axis=1)
    grid = (b * j, hh, dv // bv)
    whole = lambda x: pl.BlockSpec(x.shape, lambda p, h, vb: (0,) * x.ndim)  # noqa: E731
    vec_k = pl.BlockSpec((None, None, dk), lambda p, h, vb: (p, h, 0))
    vec_v = pl.BlockSpec((None, None, bv), lambda p, h, vb: (p, h, vb))
    state3 = state.astype(F32).reshape(b * m * hh, dk, dv)
    args = [slots_a.reshape(-1), rows(q), rows(k), rows(v), beta_a, decay_a, state3]
    in_specs = [whole(args[0]), vec_k, vec_k, vec_v, whole(beta_a),
                vec_k if decay_kind == "channel" else whole(decay_a), whole(state3)]
    out_shape = [jax.ShapeDtypeStruct(state3.shape, F32)]
    out_specs = [whole(state3)]
    aliases = {6: 0}
    if has_shared:
        shared3 = shared_state.astype(F32).reshape(b * hh, dk, dv)
        args.append(shared3)
        in_specs.append(whole(shared3))
        out_shape.append(jax.ShapeDtypeStruct(shared3.shape, F32))
        out_specs.append(whole(shared3))
        aliases[7] = 1
    out_shape.append(jax.ShapeDtypeStruct((b * j, hh, dv), F32))
    out_specs.append(vec_v)
    outs = pl.pallas_call(
        functools.partial(_step_kernel, slots_per_row=j, num_memories=m, num_heads=hh,
                          block_v=bv, delta=beta is not None, decay_kind=decay_kind,
                          has_shared=has_shared),
        out_shape=tuple(out_shape), grid=grid, in_specs=in_specs, out_specs=tuple(out_specs),
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="recurrent_decode_step",
    )(*args)
    new_state = outs[0].reshape(b, m, hh, dk, dv)
    new_shared = outs[1].reshape(b, hh, dk, dv) if has_shared else None
    return new_state, new_shared, outs[-1].reshape(b, j, hh, dv)
