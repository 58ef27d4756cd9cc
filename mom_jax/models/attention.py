"""Causal multi-head softmax attention with RoPE (the Transformer++ mixer) and its KV decode cache."""
from __future__ import annotations

import dataclasses

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Decode cache of one attention layer: a key/value buffer of static length S (= max_len).

    Attributes:
      k, v: [B, S, H, d] in the compute dtype; keys are stored after RoPE.  Slots at or beyond
        ``length`` are unused (the masked read ignores them).
      length: [B] int32, tokens written so far per row (= the RoPE position of the next token).
    """
    k: jax.Array
    v: jax.Array
    length: jax.Array


def check_max_len(max_len, needed: int) -> int:
    """Validates a KV-cache length: a positive int >= ``needed`` tokens."""
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"attention cache max_len must be a positive integer, got {max_len!r}")
    if max_len < needed:
        raise ValueError(f"the attention KV cache (max_len={max_len}) is shorter than the "
                         f"{needed} tokens it must hold")
    return max_len


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

    def _attend(self, x):
        """Causal attention over x: [B, T, D] -> (y [B, T, D], k, v [B, T, H, d] after RoPE)."""
        b, t, _ = x.shape
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        qkv = (x @ self.qkv_proj[...].astype(dtype)).reshape(b, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        q, k = rope(q, pos, self.rope_theta), rope(k, pos, self.rope_theta)
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return o.reshape(b, t, -1) @ self.o_proj[...].astype(dtype), k, v

    def __call__(self, x):
        """x: [B, T, D] -> [B, T, D]."""
        return self._attend(x)[0]

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> KVCache:
        """Empty KV cache of ``max_len`` slots per row (``dtype``: use the compute dtype)."""
        check_max_len(max_len, 1)
        shape = (batch_size, max_len, self.num_heads, self.head_dim)
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                       length=jnp.zeros((batch_size,), jnp.int32))

    def prefill(self, x, max_len: int):
        """Like __call__ from an empty cache; also returns the KVCache (``max_len`` slots) after x.

        x: [B, T, D] with T <= max_len.  Returns (y [B, T, D], KVCache with length == T).
        """
        b, t, _ = x.shape
        check_max_len(max_len, t)
        y, k, v = self._attend(x)
        pad = ((0, 0), (0, max_len - t), (0, 0), (0, 0))
        cache = KVCache(k=jnp.pad(k, pad), v=jnp.pad(v, pad), length=jnp.full((b,), t, jnp.int32))
        return y, cache

    def step(self, x, cache: KVCache):
        """Decodes one token per row: x [B, D] -> (y [B, D], KVCache with length + 1).

        The new key/value go to slot ``length[b]`` of each row (RoPE position ``length[b]``); the
        query attends to slots 0..length[b] (scores and softmax in float32).  The caller keeps
        length < S: a write past the end is dropped (``mom_jax.decoding`` checks the budget first).
        """
        b = x.shape[0]
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        qkv = (x @ self.qkv_proj[...].astype(dtype)).reshape(b, 1, 3, self.num_heads, self.head_dim)
        pos = cache.length[:, None]                                              # [B, 1]
        q = rope(qkv[:, :, 0], pos, self.rope_theta)[:, 0]                       # [B, H, d]
        k = rope(qkv[:, :, 1], pos, self.rope_theta)[:, 0]
        v = qkv[:, 0, 2]
        rows = jnp.arange(b)
        k_all = cache.k.at[rows, cache.length].set(k.astype(cache.k.dtype), mode="drop")
        v_all = cache.v.at[rows, cache.length].set(v.astype(cache.v.dtype), mode="drop")
        s = jnp.einsum("bhd,bshd->bhs", q, k_all.astype(dtype),
                       preferred_element_type=jnp.float32) * (self.head_dim ** -0.5)
        seen = jnp.arange(k_all.shape[1])[None, None, :] <= cache.length[:, None, None]
        p = jax.nn.softmax(jnp.where(seen, s, -jnp.inf), axis=-1)
        o = jnp.einsum("bhs,bshd->bhd", p.astype(dtype), v_all.astype(dtype),
                       preferred_element_type=jnp.float32).astype(dtype)
        y = o.reshape(b, -1) @ self.o_proj[...].astype(dtype)
        return y, KVCache(k=k_all, v=v_all, length=cache.length + 1)
