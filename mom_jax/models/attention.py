"""Causal multi-head softmax attention with RoPE (the Transformer++ mixer)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rope(x, positions, theta: float):
    """Rotary embedding (rotate-half form).  x: [B, T, H, d] (d even); positions: [B, T] int."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = positions.astype(jnp.float32)[..., None, None] * inv_freq                # [B, T, 1, d/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class CausalSelfAttention(nnx.Module):
    """Bias-free q/k/v/o projections, RoPE, causal ``jax.nn.dot_product_attention`` (cuDNN on GPU)."""

    def __init__(self, hidden_size: int, *, num_heads: int, head_dim: int, rope_theta: float = 1e4,
                 init_std: float = 0.02, dtype=None, rngs: nnx.Rngs):
        if head_dim % 2:
            raise ValueError(f"attention head_dim must be even for RoPE, got {head_dim}")
        self.num_heads, self.head_dim, self.rope_theta, self.dtype = (
            num_heads, head_dim, rope_theta, dtype)
        init = nnx.initializers.normal(init_std)
        inner = num_heads * head_dim
        self.qkv_proj = nnx.Param(init(rngs.params(), (hidden_size, 3 * inner)))
        self.o_proj = nnx.Param(init(rngs.params(), (inner, hidden_size)))

    def __call__(self, x):
        """x: [B, T, D] -> [B, T, D]."""
        b, t, _ = x.shape
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        qkv = (x @ self.qkv_proj[...].astype(dtype)).reshape(b, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        q, k = rope(q, pos, self.rope_theta), rope(k, pos, self.rope_theta)
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return o.reshape(b, t, -1) @ self.o_proj[...].astype(dtype)
