"""Chunked pure-XLA forms of the recurrences (``impl="xla"``), on a chunk-aligned packed stream.

Inside a chunk of C tokens everything is dense matrix algebra; across chunks a ``lax.scan`` passes the
[dk, dv] state.  A chunk that starts a segment takes that segment's initial state instead of the carry.

Delta rules (WY / UT form).  With G_i = sum_{t<=i} g_t inside the chunk and the carried state S0, the
update  S_i = exp(g_i)(I - b_i k_i k_i^T) S_{i-1} + b_i k_i v_i^T  is  S_i = exp(g_i) S_{i-1} + k_i u_i^T
with u_i = b_i (v_i - exp(g_i) S_{i-1}^T k_i).  Unrolled over the chunk this is the unit-lower-triangular
system (I + A) U = diag(b) V - diag(b exp(G)) K S0 with A_ij = b_i exp(G_i - G_j) k_i.k_j (j < i), so

  T = (I + A)^-1,  W = T diag(b exp(G)) K,  U' = T diag(b) V,  U = U' - W S0,
  O = diag(exp(G)) Q S0 + (tril(exp(G_i - G_j)) * Q K^T) U,
  S_C = exp(G_C) S0 + (diag(exp(G_C - G)) K)^T U.

Everything except the three products with S0 is computed for all chunks in parallel before the scan.

GLA / linear attention (additive write, per-channel decay Gk):
  O = (Q * exp(Gk)) S0 + A V with A_ij = sum_d q_id k_jd exp(Gk_id - Gk_jd) (j <= i),
  S_C = diag(exp(Gk_C)) S0 + (K * exp(Gk_C - Gk))^T V.
The intra-chunk term is formed from the [C, C, dk] decay tensor; it only ever exponentiates
non-positive numbers, so it is stable for any decay (at the cost of C*C*dk work per chunk).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mom_jax.ops.common import PackedLayout

_F32 = jnp.float32


def _to_chunks(x: jax.Array, c: int) -> jax.Array:
    """[B, L, H, ...] -> [Nc, B, H, C, ...] (chunk axis first, for the scan)."""
    b, l, h = x.shape[:3]
    x = x.reshape((b, l // c, c, h) + x.shape[3:])
    return jnp.moveaxis(jnp.moveaxis(x, 3, 2), 1, 0)


def _from_chunks(x: jax.Array) -> jax.Array:
    """[Nc, B, H, C, d] -> [B, Nc*C, H, d]."""
    nc, b, h, c, d = x.shape
    return jnp.moveaxis(x, 0, 1).transpose(0, 1, 3, 2, 4).reshape(b, nc * c, h, d)


def _scan_chunks(step_fn, per_chunk, layout: PackedLayout, init_state, state_shape,
                 output_final_state: bool):
    """Runs ``step_fn(S0, chunk_tensors) -> (o_chunk, S_out)`` over the chunks of every row.

    Handles segment starts (initial state or zero), unused chunks, and final-state collection.
    Returns (o [Nc, B, H, C, dv], final [B, S, H, dk, dv] or None).
    """
    b = state_shape[0]
    s = layout.num_segments
    seg = layout.chunk_segment.T  # [Nc, B]
    first = layout.chunk_first().T
    last = layout.chunk_last().T
    init = (jnp.zeros((b, s) + state_shape[1:], _F32) if init_state is None
            else jnp.asarray(init_state, _F32))  # a NumPy array can't be indexed by tracers
    rows = jnp.arange(b)

    def step(carry, xs):
        state, final = carry
        seg_c, first_c, last_c, chunk = xs
        seg_safe = jnp.maximum(seg_c, 0)
        if init_state is None:
            start_state = jnp.zeros_like(state)
        else:
            start_state = jnp.where((seg_c >= 0)[:, None, None, None], init[rows, seg_safe], 0.0)
        state = jnp.where(first_c[:, None, None, None], start_state, state)
        o_c, state = step_fn(state, chunk)
        if output_final_state:
            write = jax.nn.one_hot(seg_c, s, dtype=bool) & last_c[:, None]
            final = jnp.where(write[:, :, None, None, None], state[:, None], final)
        return (state, final), o_c

    carry0 = (jnp.zeros(state_shape, _F32), init if output_final_state else jnp.zeros((), _F32))
    (_, final), o = jax.lax.scan(step, carry0, (seg, first, last, per_chunk))
    return o, (final if output_final_state else None)


def delta_chunked(q, k, v, g, beta, layout: PackedLayout, *, initial_state=None,
                  output_final_state=False):
    """Chunked (gated) delta rule on a packed stream.

    Args:
      q, k: [B, L, H, dk] normalised/scaled; v: [B, L, H, dv]; g: [B, L, H] log-decay or None
      (delta rule); beta: [B, L, H].  L = layout.num_chunks * layout.chunk_size.
      initial_state: [B, S, H, dk, dv] or None.
    Returns (o [B, L, H, dv] float32, final [B, S, H, dk, dv] float32 or None).
    """
    c = layout.chunk_size
    bsz, _, h, dk = q.shape
    dv = v.shape[-1]
    qc, kc, vc = (_to_chunks(x.astype(_F32), c) for x in (q, k, v))
    bc = _to_chunks(beta.astype(_F32), c)  # [Nc, B, H, C]
    if g is None:
        gcum = jnp.zeros_like(bc)
    else:
        gcum = jnp.cumsum(_to_chunks(g.astype(_F32), c), axis=-1)
    incl = jnp.tril(jnp.ones((c, c), bool))
    strict = jnp.tril(jnp.ones((c, c), bool), -1)
    diff = gcum[..., :, None] - gcum[..., None, :]
    decay = jnp.where(incl, jnp.exp(jnp.where(incl, diff, 0.0)), 0.0)  # [.., C, C]
    kk = jnp.einsum("...id,...jd->...ij", kc, kc)
    a = jnp.where(strict, bc[..., :, None] * kk * decay, 0.0)
    eye = jnp.eye(c, dtype=_F32)
    t_inv = jax.lax.linalg.triangular_solve(
        eye + a, jnp.broadcast_to(eye, a.shape), left_side=True, lower=True, unit_diagonal=True)
    w = t_inv @ ((bc * jnp.exp(gcum))[..., None] * kc)       # [.., C, dk]
    u_pre = t_inv @ (bc[..., None] * vc)                      # [.., C, dv]
    p = jnp.einsum("...id,...jd->...ij", qc, kc) * decay      # [.., C, C]
    q_dec = qc * jnp.exp(gcum)[..., None]
    k_dec = kc * jnp.exp(gcum[..., -1:] - gcum)[..., None]
    g_last = jnp.exp(gcum[..., -1])                           # [.., ] per chunk

    def step(s0, chunk):
        w_c, u_c, p_c, qd_c, kd_c, gl_c = chunk
        u = u_c - w_c @ s0
        o = qd_c @ s0 + p_c @ u
        s1 = gl_c[..., None, None] * s0 + jnp.swapaxes(kd_c, -1, -2) @ u
        return o, s1

    o, final = _scan_chunks(step, (w, u_pre, p, q_dec, k_dec, g_last), layout, initial_state,
                            (bsz, h, dk, dv), output_final_state)
    return _from_chunks(o), final


def additive_chunked(q, k, v, gk, layout: PackedLayout, *, initial_state=None,
                     output_final_state=False):
    """Chunked GLA (gk: [B, L, H, dk] log-decay) or linear attention (gk None) on a packed stream.

    Returns (o [B, L, H, dv] float32, final [B, S, H, dk, dv] float32 or None).
    """
    c = layout.chunk_size
    bsz, _, h, dk = q.shape
    dv = v.shape[-1]
    qc, kc, vc = (_to_chunks(x.astype(_F32), c) for x in (q, k, v))
    incl = jnp.tril(jnp.ones((c, c), bool))
    if gk is None:
        attn = jnp.where(incl, jnp.einsum("...id,...jd->...ij", qc, kc), 0.0)
        q_dec, k_dec = qc, kc
        decay_last = jnp.ones(qc.shape[:-2] + (dk,), _F32)
    else:
        gcum = jnp.cumsum(_to_chunks(gk.astype(_F32), c), axis=-2)   # [.., C, dk]
        diff = gcum[..., :, None, :] - gcum[..., None, :, :]           # [.., C, C, dk]
        mask3 = incl[..., None]
        pair_decay = jnp.where(mask3, jnp.exp(jnp.where(mask3, diff, 0.0)), 0.0)
        attn = jnp.einsum("...id,...jd,...ijd->...ij", qc, kc, pair_decay)
        q_dec = qc * jnp.exp(gcum)
        k_dec = kc * jnp.exp(gcum[..., -1:, :] - gcum)
        decay_last = jnp.exp(gcum[..., -1, :])

    def step(s0, chunk):
        a_c, v_c, qd_c, kd_c, dl_c = chunk
        o = qd_c @ s0 + a_c @ v_c
        s1 = dl_c[..., :, None] * s0 + jnp.swapaxes(kd_c, -1, -2) @ v_c
        return o, s1

    o, final = _scan_chunks(step, (attn, vc, q_dec, k_dec, decay_last), layout, initial_state,
                            (bsz, h, dk, dv), output_final_state)
    return _from_chunks(o), final
