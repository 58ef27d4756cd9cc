"""Top-k memory routing with static shapes: router, packed dispatch plan, combine, aux loss.

The routed tokens of one batch row always fill exactly T*k slots (every token goes to k distinct
memories), so each row of the packed stream has a static length:

  row b = [ memory 0's tokens | memory 1's tokens | ... | memory E-1's | tail | shared memory's T ]

Every memory segment holds the tokens routed to it in time order (position = running count of tokens
routed to that memory, a cumulative sum: stable, no sort) and is padded to whole chunks, so the routed
part has at most T*k + E*(C-1) slots, rounded up to a chunk.  The shared memory's segment (all T tokens)
follows.  Nothing depends on the routing at trace time: a change of routing never recompiles and never
syncs with the host.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mom_jax.ops.common import PackedLayout, round_up


def route(router_logits: jax.Array, topk: int) -> tuple[jax.Array, jax.Array]:
    """Top-k softmax routing with renormalised weights.

    Args:
      router_logits: [..., E] (any float dtype; softmax in float32).
    Returns:
      weights [..., k] float32 (sum to 1; differentiable), indices [..., k] int32 (not differentiable).
      Ties are broken towards the lower memory index (``lax.top_k``).
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, indices = jax.lax.top_k(probs, topk)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, indices.astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DispatchPlan:
    """Where every routed token sits in the packed stream of its row.

    Attributes (B rows, T tokens, k choices, E memories, L slots per row, C chunk size):
      positions: int32 [B, T, k]; slot of token t's j-th choice in row b.
      counts: int32 [B, E]; tokens routed to each memory.
      segment_offsets: int32 [B, E (+1 if shared)]; first slot of each memory segment (the shared
        segment's is routed_length).
      slot_token: int32 [B, L]; token held by each slot, -1 for padding.
      slot_rank: int32 [B, L]; index of the slot within its segment (its position in the memory's
        sub-sequence); meaningless for padding.
      layout: PackedLayout of the stream; segments 0..E-1 are the routed memories, E the shared one.
      routed_length, num_memories, shared: static.
    """
    positions: jax.Array
    counts: jax.Array
    segment_offsets: jax.Array
    slot_token: jax.Array
    slot_rank: jax.Array
    layout: PackedLayout
    routed_length: int = dataclasses.field(metadata=dict(static=True))
    num_memories: int = dataclasses.field(metadata=dict(static=True))
    shared: bool = dataclasses.field(metadata=dict(static=True))

    @property
    def length(self) -> int:
        return self.slot_token.shape[1]

    @property
    def valid(self) -> jax.Array:
        """bool [B, L]: the slot holds a token."""
        return self.slot_token >= 0

    def segment_lengths(self) -> jax.Array:
        """int32 [B, S]: tokens in each segment (the shared one holds all T)."""
        if not self.shared:
            return self.counts
        t = self.positions.shape[1]
        return jnp.concatenate([self.counts, jnp.full((self.counts.shape[0], 1), t, jnp.int32)], 1)


def routed_length(seq_len: int, topk: int, num_memories: int, chunk_size: int) -> int:
    """Static number of routed slots per row: T*k tokens plus worst-case chunk padding."""
    return round_up(seq_len * topk + num_memories * (chunk_size - 1), chunk_size)


def plan_dispatch(indices: jax.Array, num_memories: int, chunk_size: int,
                  shared: bool) -> DispatchPlan:
    """Builds the packed layout for routing decisions ``indices`` [B, T, k] (distinct per token)."""
    b, t, k = indices.shape
    e, c = num_memories, chunk_size
    routed = jnp.any(indices[..., None] == jnp.arange(e, dtype=jnp.int32), axis=2)  # [B, T, E]
    routed_i = routed.astype(jnp.int32)
    counts = jnp.sum(routed_i, axis=1)                                    # [B, E]
    rank = jnp.cumsum(routed_i, axis=1) - 1                               # [B, T, E]
    padded = round_up(counts, c)
    offsets = jnp.cumsum(padded, axis=1) - padded                         # exclusive, [B, E]
    positions = (jnp.take_along_axis(offsets[:, None, :], indices, axis=2)
                 + jnp.take_along_axis(rank, indices, axis=2))            # [B, T, k]

    l_routed = routed_length(t, k, e, c)
    l_total = l_routed + (round_up(t, c) if shared else 0)
    rows = jnp.arange(b)[:, None, None]
    tok = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :, None], (b, t, k))
    slot_token = jnp.full((b, l_total), -1, jnp.int32).at[rows, positions].set(tok)
    slot_rank = jnp.zeros((b, l_total), jnp.int32).at[rows, positions].set(
        jnp.take_along_axis(rank, indices, axis=2))

    # Segment of each routed chunk: the last memory whose segment starts at or before it.
    nc_routed = l_routed // c
    chunk_start = jnp.arange(nc_routed, dtype=jnp.int32) * c
    seg = jnp.sum(offsets[:, None, :] <= chunk_start[None, :, None], axis=2) - 1   # [B, Nc_r]
    seg = jnp.clip(seg, 0, e - 1)
    seg_end = jnp.take_along_axis(offsets + padded, seg, axis=1)
    chunk_segment = jnp.where(chunk_start[None] < seg_end, seg, -1)
    seg_offsets = offsets
    if shared:
        nc_shared = (l_total - l_routed) // c
        chunk_segment = jnp.concatenate(
            [chunk_segment, jnp.full((b, nc_shared), e, jnp.int32)], axis=1)
        ts = jnp.arange(t, dtype=jnp.int32)
        slot_token = slot_token.at[:, l_routed:l_routed + t].set(ts)
        slot_rank = slot_rank.at[:, l_routed:l_routed + t].set(ts)
        seg_offsets = jnp.concatenate([offsets, jnp.full((b, 1), l_routed, jnp.int32)], axis=1)
    layout = PackedLayout(chunk_segment.astype(jnp.int32), e + int(shared), c)
    return DispatchPlan(positions.astype(jnp.int32), counts, seg_offsets.astype(jnp.int32),
                        slot_token, slot_rank, layout, l_routed, e, shared)


def dispatch(x: jax.Array, plan: DispatchPlan) -> jax.Array:
    """Copies token features into the packed stream: [B, T, ...] -> [B, L, ...] (zeros in padding)."""
    idx = jnp.maximum(plan.slot_token, 0)
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    out = jnp.take_along_axis(x, idx, axis=1)
    return jnp.where(plan.valid.reshape(plan.valid.shape + (1,) * (x.ndim - 2)), out, 0)


def combine(o: jax.Array, weights: jax.Array, plan: DispatchPlan) -> jax.Array:
    """Inverse of dispatch: y_t = sum_j w_tj o[pos_tj] (+ o of the shared segment at t).

    Args:
      o: [B, L, ...] per-slot outputs; weights: [B, T, k].
    Returns:
      [B, T, ...] in float32.
    """
    b, t, k = plan.positions.shape
    extra = o.shape[2:]
    pos = plan.positions.reshape(b, t * k, *([1] * len(extra)))
    picked = jnp.take_along_axis(o, pos, axis=1).reshape((b, t, k) + extra).astype(jnp.float32)
    w = weights.astype(jnp.float32).reshape((b, t, k) + (1,) * len(extra))
    y = jnp.sum(picked * w, axis=2)
    if plan.shared:
        y = y + o[:, plan.routed_length:plan.routed_length + t].astype(jnp.float32)
    return y


def load_balancing_loss(router_logits, topk: int, mask: jax.Array | None = None) -> jax.Array:
    """Switch-style aux loss over the router logits of all layers.

    L = E * sum_{j, e} f[j, e] * P[e], where f[j, e] is the fraction of tokens whose j-th choice is e
    and P[e] the mean router probability of e, both over every token of every layer.

    Args:
      router_logits: [..., E] array, or a sequence of such arrays (one per layer, same leading shape).
      mask: optional bool [...] (the leading shape of one layer's logits); False tokens are excluded.
    Returns:
      scalar float32.
    """
    if isinstance(router_logits, (list, tuple)):
        layers = [jnp.asarray(x) for x in router_logits]
    else:
        layers = [jnp.asarray(router_logits)]
    e = layers[0].shape[-1]
    logits = jnp.stack([x.reshape(-1, e) for x in layers]).astype(jnp.float32)    # [Lyr, N, E]
    probs = jax.nn.softmax(logits, axis=-1)
    _, idx = jax.lax.top_k(probs, topk)
    choice = jax.nn.one_hot(idx, e, dtype=jnp.float32)                            # [Lyr, N, k, E]
    if mask is None:
        m = jnp.ones(logits.shape[:2], jnp.float32)
    else:
        m = jnp.broadcast_to(mask.reshape(1, -1).astype(jnp.float32), logits.shape[:2])
    denom = jnp.maximum(jnp.sum(m), 1.0)
    f = jnp.einsum("ln,lnke->ke", m, choice) / denom
    p = jnp.einsum("ln,lne->e", m, probs) / denom
    return e * jnp.sum(f * p[None, :])
