"""Single-memory baselines built from the same pieces as MoM: Gated DeltaNet and GLA layers.

A single-memory layer is the MoM layer's shared memory alone: no router, every token writes the one
state.  ``GatedDeltaNetLayer`` uses the gated delta rule; ``GLALayer`` uses gated linear attention with
a per-key-channel decay logsigmoid(x W_a) / 16 (a full-rank gate projection, where fla's GLA uses a
rank-16 one).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mom_jax.layers import common as lc
from mom_jax.layers.base import RecurrentMixer
from mom_jax.ops import common as oc


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RecurrentCache:
    """Decode cache of a single-memory layer: state [B, H, dk, dv] float32, conv [B, W-1, 2Kd+Vd]."""
    state: jax.Array
    conv: jax.Array


class SingleMemoryLayer(RecurrentMixer):
    """One recurrent memory with the MoM layer's projections, convs and output head.

    Arguments as in MoMLayer (without the routing ones).  Parameters: q_proj, k_proj, v_proj,
    b_proj / a_proj (as the update rule needs), A_log, dt_bias, q/k/v_conv, head.
    """

    def __init__(self, hidden_size: int, *, num_heads: int = 4, head_dim: int | None = None,
                 expand_v: float = 1.0, update_rule: str = "gated_delta",
                 use_output_gate: bool = True, use_short_conv: bool = True, conv_size: int = 4,
                 norm_eps: float = 1e-6, chunk_size: int = 64, impl: str = "auto", dtype=None,
                 rngs: nnx.Rngs):
        self._init_common(hidden_size, num_heads=num_heads, head_dim=head_dim, expand_v=expand_v,
                          update_rule=update_rule, use_output_gate=use_output_gate,
                          use_short_conv=use_short_conv, conv_size=conv_size, norm_eps=norm_eps,
                          chunk_size=chunk_size, impl=impl, dtype=dtype, rngs=rngs)
        for name, width in self._projection_parts():
            setattr(self, f"{name}_proj",
                    nnx.Param(lc.xavier_uniform(rngs.params(), (self.hidden_size, width))))

    def _forward(self, x, output_final_state: bool):
        b, t, _ = x.shape
        dtype = self.dtype or x.dtype
        xc = x.astype(dtype)
        layout = oc.rows_layout(b, t, self.chunk_size)
        length = layout.num_chunks * self.chunk_size
        w = jnp.concatenate([self.q_proj[...].astype(dtype), self._concat_weights("{}_proj", dtype)], -1)
        raw = oc.pad_time(xc @ w, length)                                  # [B, L, Kd + N]
        nqkv = self.conv_width
        qkv_raw, extra = jnp.split(raw, [nqkv], axis=-1)    # one split: its VJP is a concat
        pos = jnp.arange(length, dtype=jnp.int32)
        valid = jnp.broadcast_to(pos < t, (b, length))
        # rank -1 on the padding after the last token: the conv output there is exactly zero.
        rank = jnp.where(valid, pos, -1)
        qkv = self._activate_stream(qkv_raw, rank)
        q, k, v, g, beta = self._split_features(qkv, extra, valid, qk_normalised=True)
        o, final = self._recurrence(q, k, v, g, beta, layout, None, output_final_state)
        out = self.head(o[:, :t], xc)
        if not output_final_state:
            return out, None
        buf = self._conv_tail(qkv_raw, jnp.zeros((b, 1), jnp.int32), jnp.full((b, 1), t, jnp.int32),
                              self.conv_history)
        return out, RecurrentCache(state=final[:, 0], conv=buf[:, 0])

    def __call__(self, x):
        """x: [B, T, D] -> y [B, T, D] (compute dtype)."""
        self._check(x)
        return self._forward(x, output_final_state=False)[0]

    def prefill(self, x):
        """Like __call__ from an empty cache; returns (y, RecurrentCache after the last token)."""
        self._check(x)
        return self._forward(x, output_final_state=True)

    def init_cache(self, batch_size: int, dtype=jnp.float32) -> RecurrentCache:
        return RecurrentCache(
            state=jnp.zeros((batch_size, self.num_heads, self.head_dim, self.head_v_dim), jnp.float32),
            conv=jnp.zeros((batch_size, self.conv_history, self.conv_width), dtype))

    def decode_weights(self, dtype) -> dict:
        """Weights of ``step`` cast and concatenated once (see ``MoMLayer.decode_weights``):
        dict(proj=[D, Kd + N] q | k|v|b|a, conv=[W, 2Kd+Vd] float32 or None, decay=[2, H] or
        None)."""
        conv = self._conv_weight()
        return dict(proj=jnp.concatenate([self.q_proj[...].astype(dtype),
                                          self._concat_weights("{}_proj", dtype)], -1),
                    conv=None if conv is None else conv.astype(jnp.float32),
                    decay=self._decay_params())

    def step(self, x, cache: RecurrentCache, weights: dict | None = None):
        """x: [B, D] one token per row -> (y [B, D], new cache).  weights: ``decode_weights``."""
        self._check(x, rank=2)
        dtype = self.dtype or x.dtype
        w = self.decode_weights(dtype) if weights is None else weights
        xc = x.astype(dtype)
        raw = xc @ w["proj"]                                                     # [B, Kd + N]
        kernel = self._fused_step_kernel()
        if kernel is not None:   # the single memory is input 0 / slot 0 of a one-memory cache
            b = x.shape[0]
            o, state, _, conv, _ = self._fused_step(
                kernel, raw, jnp.full((b, 1), self.key_dim, jnp.int32),
                jnp.zeros((b, 1), jnp.int32), cache.conv[:, None], None, w, cache.state[:, None])
        else:
            feats, conv = self._step_features(cache.conv[:, None], raw[:, None, :self.conv_width],
                                              raw[:, None, self.conv_width:], w["conv"])
            state, _, o = self._update(cache.state[:, None], feats)
        return self.head(o[:, 0], xc), RecurrentCache(state=state[:, 0],
                                                       conv=conv[:, 0].astype(cache.conv.dtype))


class GatedDeltaNetLayer(SingleMemoryLayer):
    """Gated DeltaNet (Yang et al. 2024): a single gated-delta-rule memory."""

    def __init__(self, hidden_size: int, **kwargs):
        if kwargs.setdefault("update_rule", "gated_delta") != "gated_delta":
            raise ValueError("GatedDeltaNetLayer always uses update_rule='gated_delta'")
        super().__init__(hidden_size, **kwargs)


class GLALayer(SingleMemoryLayer):
    """Gated linear attention: a single memory with per-key-channel decay (no short conv by default)."""

    def __init__(self, hidden_size: int, **kwargs):
        if kwargs.setdefault("update_rule", "gla") != "gla":
            raise ValueError("GLALayer always uses update_rule='gla'")
        kwargs.setdefault("use_short_conv", False)
        super().__init__(hidden_size, **kwargs)
