"""Top-k memory routing with static shapes: router, packed dispatch plan, combine, aux loss.

The routed tokens of one batch row always fill exactly T*k slots (every token goes to k distinct
memories), so each row of the packed stream has a static length:

  row b = [ memory 0's tokens | memory 1's tokens | ... | memory E-1's | tail | shared memory's T ]

Every memory segment holds the tokens routed to it in time order (position = running count of tokens
routed to that memory, a cumulative sum: stable, no sort) and is padded to whole chunks, so the routed
part has at most T*k + E*(C-1) slots, rounded up to a chunk.  The shared memory's segment (all T tokens)
follows.  Nothing depends on the routing at trace time: a change of routing never recompiles and never
syncs with the host.

Every move between tokens and slots (``dispatch``, ``combine``, ``gather_table``) is a gather whose
VJP is again a gather, through the inverse map (slot -> token and token -> its k (+1) slots are both
known from the plan), never a scatter-add.  Slots read flat tables of token rows that end in a zero
row (``stream_sources``), so building the stream is one plain gather, without a select.
"""
from __future__ import annotations

import dataclasses
import functools

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


def take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """out[b, m] = x[b, idx[b, m]]: x [B, S, ...], idx int32 [B, M] (entries < 0 read row 0).

    One gather of whole rows from x flattened to [B*S, ...] (what ``take_along_axis`` along axis 1
    means here, without the NaN-fill select of its default mode: on GPU, XLA emitted the
    take_along_axis form of the stream gathers as transposing fusions).  Returns [B, M, ...]."""
    b, s = x.shape[:2]
    flat = x.reshape((b * s,) + x.shape[2:])
    rows = jnp.arange(b, dtype=jnp.int32)[:, None] * s + jnp.maximum(idx, 0)
    return jnp.take(flat, rows.reshape(-1), axis=0, mode="clip").reshape(idx.shape + x.shape[2:])


TABLE_ROW_MULTIPLE = 16


def table_rows(num_tokens: int) -> int:
    """Rows of a ``token_table`` of num_tokens tokens: the tokens, then at least one zero row, up
    to a multiple of ``TABLE_ROW_MULTIPLE``.  XLA pads a matmul operand of 16385 rows to 16400
    for cuBLAS on an H100 (a copy of the table, in both directions: ~0.05 ms of a MoM layer's
    fwd+bwd, benchmarks/NOTES.md session 14), so the table is made that size in the first place."""
    return round_up(num_tokens + 1, TABLE_ROW_MULTIPLE)


def token_table(x: jax.Array) -> jax.Array:
    """[B, T, ...] -> [table_rows(B*T), ...]: every token's row, then zero rows (padding slots
    read the first).

    The table ``gather_table`` reads per-token features from.  The MoM layer makes it of its
    input, before the projections (the smallest tensor to copy; a projection of a zero row is
    exactly zero), so that its projections are tables in this layout too.
    """
    flat = x.reshape((-1,) + x.shape[2:])
    zeros = jnp.zeros((table_rows(flat.shape[0]) - flat.shape[0],) + flat.shape[1:], x.dtype)
    return jnp.concatenate([flat, zeros], axis=0)


def stream_sources(plan: DispatchPlan, indices: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
    """Where every slot of the stream reads a table of token (or token x memory) rows, and back.

    Two table layouts, both ending in the rows of all-zero tokens (``token_table``: R =
    ``table_rows(B*T)`` token rows; padding slots read the first zero row):
      indices None: per-token rows, row b*T + t (``token_table``: q, a projection every memory
        shares); zero rows from B*T.  Each row is read by the k (+1 shared) slots of its token.
      indices [B, T, k] (the routing choices): per-(token, memory) rows, row (b*T + t)*G + m with
        G = E (+1 if shared; group E is the shared memory), e.g. an [R, D] x [D, G*N] matmul
        reshaped to [R*G, N]; zero rows from (B*T)*G.  Each row is read by at most one slot (the
        slot of (t, m) if t is routed to m).
    Returns:
      src: int32 [B, L], the table row of each slot (padding slots: the first zero row);
      inv: int32 [R (*G), m], the flat stream slots (b*L + l) reading each table row, -1 for
        unused entries (the inverse map ``gather_table``'s backward needs).
    """
    b, t, _ = plan.positions.shape
    tok, length = plan.slot_token, plan.length
    base = jnp.arange(b, dtype=jnp.int32)[:, None] * t + tok                       # [B, L]
    slot_base = jnp.arange(b, dtype=jnp.int32) * length
    if indices is None:
        readers = token_slots(plan)                                                # [B, T, k+1]
        zero_row, groups = b * t, 1
        src = base
    else:
        groups = plan.num_memories + int(plan.shared)
        readers = memory_slots(indices, plan.positions, plan.num_memories)         # [B, T, E]
        if plan.shared:
            shared = plan.routed_length + jnp.arange(t, dtype=jnp.int32)
            readers = jnp.concatenate(
                [readers, jnp.broadcast_to(shared[None, :, None], (b, t, 1))], axis=2)
        readers = readers[..., None]                                               # [B, T, G, 1]
        zero_row = b * t * groups
        seg = jnp.repeat(plan.layout.chunk_segment, plan.layout.chunk_size, axis=1)
        src = base * groups + seg
    src = jnp.where(tok >= 0, src, zero_row).astype(jnp.int32)
    inv = jnp.where(readers >= 0, readers + slot_base.reshape((b,) + (1,) * (readers.ndim - 1)),
                    -1)
    inv = inv.reshape(b * t * groups, -1)
    zero_rows = (table_rows(b * t) - b * t) * groups
    inv = jnp.concatenate([inv, jnp.full((zero_rows, inv.shape[1]), -1, inv.dtype)], axis=0)
    return src, inv.astype(jnp.int32)


@jax.custom_vjp
def gather_table(table: jax.Array, src: jax.Array, inv: jax.Array) -> jax.Array:
    """out[b, l] = table[src[b, l]], with a gather (not a scatter-add) as VJP.

    A plain row gather: no select (padding slots read zero rows of the table, see
    ``stream_sources``), so XLA writes the stream in one pass in its own layout.

    Args:
      table: [R, ...] any float dtype.
      src: int32 [B, L], rows in [0, R).
      inv: int32 [R, m]: the flat output rows (b*L + l) that read each table row, -1 for unused
        entries; the caller guarantees that b*L + l appears in ``inv[r]`` exactly when
        ``src[b, l] == r`` (rows whose readers need no gradient, like zero rows, may list none).
    Returns:
      [B, L, ...] in table.dtype.  The cotangent of the table, d table[r] = sum_i dout[inv[r, i]],
      is summed in float32 (m > 1) and cast to table.dtype; src and inv get None.
    """
    return jnp.take(table, src.reshape(-1), axis=0, mode="clip").reshape(
        src.shape + table.shape[1:])


def _gather_table_fwd(table, src, inv):
    return gather_table(table, src, inv), inv


def _gather_table_bwd(inv, dout):
    r, m = inv.shape
    extra = dout.shape[2:]
    flat = dout.reshape((-1,) + extra)
    picked = jnp.take(flat, jnp.maximum(inv, 0).reshape(-1), axis=0, mode="clip")
    used = (inv >= 0).reshape((r * m,) + (1,) * len(extra))
    if m == 1:      # at most one reader per table row: a masked gather, no sum
        return jnp.where(used, picked, 0).astype(dout.dtype), None, None
    picked = jnp.where(used, picked.astype(jnp.float32), 0.0).reshape((r, m) + extra)
    return jnp.sum(picked, axis=1).astype(dout.dtype), None, None


gather_table.defvjp(_gather_table_fwd, _gather_table_bwd)


def token_slots(plan: DispatchPlan) -> jax.Array:
    """int32 [B, T, k (+1 if shared)]: every slot that holds token t: its routed slots
    ``positions``, then its shared slot routed_length + t."""
    if not plan.shared:
        return plan.positions
    b, t, _ = plan.positions.shape
    shared = plan.routed_length + jnp.arange(t, dtype=jnp.int32)
    return jnp.concatenate(
        [plan.positions, jnp.broadcast_to(shared[None, :, None], (b, t, 1))], axis=2)


def memory_slots(indices: jax.Array, positions: jax.Array, num_memories: int) -> jax.Array:
    """int32 [B, T, E]: routed slot of (token t, memory m), -1 where t is not routed to m.

    Args:
      indices: int32 [B, T, k] routing choices (distinct per token); positions: int32 [B, T, k]
        (``DispatchPlan.positions``).
    """
    hit = indices[..., None] == jnp.arange(num_memories, dtype=jnp.int32)      # [B, T, k, E]
    return jnp.max(jnp.where(hit, positions[..., None], -1), axis=2).astype(jnp.int32)


def dispatch(x: jax.Array, plan: DispatchPlan) -> jax.Array:
    """Copies token features into the packed stream: [B, T, ...] -> [B, L, ...] (zeros in padding).

    Output in x.dtype.  Backward: dx[b, t] = sum of dout over the k routed slots of t (and its
    shared slot), gathered and summed in float32, cast to x.dtype (no scatter-add).  Makes a
    ``token_table`` copy of x; the MoM layer builds its tables without one.
    """
    return gather_table(token_table(x), *stream_sources(plan))


def _combine_impl(o, weights, positions, routed_length, shared):
    b, t, k = positions.shape
    extra = o.shape[2:]
    picked = take_rows(o, positions.reshape(b, t * k)).reshape((b, t, k) + extra)
    picked = picked.astype(jnp.float32)
    w = weights.astype(jnp.float32).reshape((b, t, k) + (1,) * len(extra))
    y = jnp.sum(picked * w, axis=2)
    if shared:
        y = y + o[:, routed_length:routed_length + t].astype(jnp.float32)
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _combine(o, weights, positions, slot_token, routed_length, shared):
    return _combine_impl(o, weights, positions, routed_length, shared)


def _combine_fwd(o, weights, positions, slot_token, routed_length, shared):
    y = _combine_impl(o, weights, positions, routed_length, shared)
    return y, (o, weights, positions, slot_token)


def _combine_bwd(routed_length, shared, res, dy):
    o, weights, positions, slot_token = res
    b, t, k = positions.shape
    length, extra = o.shape[1], o.shape[2:]
    feat_axes = tuple(range(3, 3 + len(extra)))
    # d weights[b, t, j] = <dy[b, t], o[b, positions[b, t, j]]> (o re-gathered, not saved).
    picked = take_rows(o, positions.reshape(b, t * k)).reshape((b, t, k) + extra)
    picked = picked.astype(jnp.float32)
    dw = jnp.sum(picked * dy[:, :, None], axis=feat_axes).astype(weights.dtype)
    # d o[b, l] = w[b, tok, j] * dy[b, tok] for slot l = positions[b, tok, j]; dy[b, t] for the
    # shared slot routed_length + t; zero in padding.  j is found by comparing positions[b, tok].
    tok = jnp.maximum(slot_token, 0)[..., None]                                   # [B, L, 1]
    hit = (jnp.take_along_axis(positions, tok, axis=1)
           == jnp.arange(length, dtype=jnp.int32)[None, :, None])                  # [B, L, k]
    w_tok = jnp.take_along_axis(weights.astype(jnp.float32), tok, axis=1)         # [B, L, k]
    slot_w = jnp.sum(jnp.where(hit, w_tok, 0.0), axis=2)                          # [B, L]
    if shared:
        slot_w = jnp.where(jnp.arange(length) >= routed_length, 1.0, slot_w)
    dy_slot = take_rows(dy, slot_token)                                           # [B, L, ...]
    slot_w = slot_w.reshape(slot_w.shape + (1,) * len(extra))
    valid = (slot_token >= 0).reshape(slot_token.shape + (1,) * len(extra))
    do = jnp.where(valid, dy_slot * slot_w, 0.0).astype(o.dtype)
    return do, dw, None, None


_combine.defvjp(_combine_fwd, _combine_bwd)


def combine(o: jax.Array, weights: jax.Array, plan: DispatchPlan) -> jax.Array:
    """Inverse of dispatch: y_t = sum_j w_tj o[pos_tj] (+ o of the shared segment at t).

    Args:
      o: [B, L, ...] per-slot outputs (any float dtype); weights: [B, T, k] (any float dtype).
    Returns:
      [B, T, ...] in float32.  Backward by gathers only: d o[b, l] = w[b, t, j] * dy[b, t] for the
      routed slot l of (t, j), dy[b, t] for the shared slot of t, 0 in padding (computed in float32,
      cast to o.dtype); d weights[b, t, j] = sum over the feature axes of dy[b, t] * o[b, pos_tj]
      (float32, cast to weights.dtype).
    """
    return _combine(o, weights, plan.positions, plan.slot_token, plan.routed_length, plan.shared)


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
