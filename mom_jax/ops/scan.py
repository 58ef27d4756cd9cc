"""Token-by-token ``lax.scan`` recurrences: the ground truth for every chunked form and kernel.

One recurrence covers the four update rules.  Per head, with state S in R^{dk x dv} (float32):

  decay:   S <- exp(g_t) * S                      (scalar log-decay g_t, gated delta rule)
           S <- diag(exp(gk_t)) S                 (per-key-channel log-decay gk_t, GLA)
  write:   S <- S + beta_t k_t (v_t - S^T k_t)^T  (delta rules; equals (I - b k k^T) S + b k v^T)
           S <- S + k_t v_t^T                     (GLA / linear attention)
  read:    o_t = S^T q_t                          (after the write)

At a token that starts a segment the state is first replaced by that segment's initial state (zero when
none is given); after every token the segment's final state is overwritten, so at the end it holds the
state after the segment's last token.  Segments with no tokens keep their initial state.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def recurrent_scan(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    g: jax.Array | None = None,
    gk: jax.Array | None = None,
    beta: jax.Array | None = None,
    delta: bool,
    token_start: jax.Array,
    token_segment: jax.Array,
    num_segments: int,
    initial_state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Runs the recurrence one token at a time.

    Args:
      q, k: [B, T, H, dk] (already normalised and scaled as the caller wants).
      v: [B, T, H, dv].
      g: optional [B, T, H] scalar log-decay.  gk: optional [B, T, H, dk] per-channel log-decay.
      beta: [B, T, H] write strength (delta rules only).
      delta: use the delta-rule write (needs beta) instead of the additive write.
      token_start: bool [B, T], the token starts a segment (state reset).
      token_segment: int32 [B, T], segment index of the token within its row; -1 = belongs to none
        (its state starts from zero and no final state is recorded).
      num_segments: static S.
      initial_state: optional [B, S, H, dk, dv].

    Returns:
      o: [B, T, H, dv] float32; final: [B, S, H, dk, dv] float32.
    """
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    f32 = jnp.float32
    init = (jnp.zeros((b, num_segments, h, dk, dv), f32) if initial_state is None
            else jnp.asarray(initial_state, f32))  # a NumPy array can't be indexed by tracers
    zeros_g = jnp.zeros((b, t, h), f32)
    xs = (
        jnp.moveaxis(q.astype(f32), 1, 0), jnp.moveaxis(k.astype(f32), 1, 0),
        jnp.moveaxis(v.astype(f32), 1, 0),
        jnp.moveaxis((zeros_g if g is None else g).astype(f32), 1, 0),
        jnp.moveaxis((jnp.zeros((b, t, h, dk), f32) if gk is None else gk.astype(f32)), 1, 0),
        jnp.moveaxis((zeros_g if beta is None else beta).astype(f32), 1, 0),
        jnp.moveaxis(token_start, 1, 0), jnp.moveaxis(token_segment.astype(jnp.int32), 1, 0),
    )
    rows = jnp.arange(b)

    def step(carry, x):
        state, final = carry
        q_t, k_t, v_t, g_t, gk_t, b_t, start_t, seg_t = x
        seg_safe = jnp.maximum(seg_t, 0)
        seg_init = jnp.where((seg_t >= 0)[:, None, None, None], init[rows, seg_safe], 0.0)
        state = jnp.where(start_t[:, None, None, None], seg_init, state)
        state, o_t = recurrent_step(state, q_t, k_t, v_t, g=g_t, gk=gk_t,
                                    beta=b_t if delta else None)
        write = jax.nn.one_hot(seg_t, num_segments, dtype=bool) & (seg_t >= 0)[:, None]
        final = jnp.where(write[:, :, None, None, None], state[:, None], final)
        return (state, final), o_t

    (_, final), o = jax.lax.scan(step, (jnp.zeros((b, h, dk, dv), f32), init), xs)
    return jnp.moveaxis(o, 0, 1), final


def recurrent_step(state, q, k, v, *, g=None, gk=None, beta=None):
    """One token of the recurrence for any leading batch shape (used by the scan and by decoding).

    Args:
      state: [..., dk, dv] float32; q, k: [..., dk]; v: [..., dv]; g: [...] scalar log-decay or None;
      gk: [..., dk] per-channel log-decay or None; beta: [...] (delta write) or None (additive write).
    Returns:
      (new state [..., dk, dv] float32, o [..., dv] float32).
    """
    f32 = jnp.float32
    state = state.astype(f32)
    q, k, v = q.astype(f32), k.astype(f32), v.astype(f32)
    if g is not None:
        state = state * jnp.exp(g.astype(f32))[..., None, None]
    if gk is not None:
        state = state * jnp.exp(gk.astype(f32))[..., :, None]
    if beta is not None:
        kv_old = jnp.einsum("...kv,...k->...v", state, k)
        u = beta.astype(f32)[..., None] * (v - kv_old)
    else:
        u = v
    state = state + k[..., :, None] * u[..., None, :]
    return state, jnp.einsum("...kv,...k->...v", state, q)
