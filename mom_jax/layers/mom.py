"""The Mixture-of-Memories layer (Flax NNX), its decode cache, prefill and one-token step.

Math (DESIGN.md §1): a router sends each token to the top-k of E memories; memory m sees only the
tokens routed to it, in time order, with its own key/value/beta/decay projections; queries, convs,
A_log and dt_bias are shared; an always-on shared memory sees every token.  All memories of a layer
run as ONE packed stream (``mom_jax.routing``) through one call of the update rule.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mom_jax import ops, routing
from mom_jax.layers import common as lc
from mom_jax.layers.base import RecurrentMixer
from mom_jax.ops import common as oc

ROUTED_PROJECTIONS = ("auto", "grouped", "dense", "ragged")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoMCache:
    """Decode cache of one MoM layer (constant size in the number of tokens seen).

    Attributes:
      routed_state: [B, E, H, dk, dv] float32 recurrent states of the routed memories.
      routed_conv: [B, E, W-1, 2*Kd + Vd] last W-1 raw (pre-conv) q|k|v projections along each
        memory's own sub-sequence (zeros before its first token); width 0 without short conv.
      shared_state: [B, H, dk, dv] float32 or None.
      shared_conv: [B, W-1, 2*Kd + Vd] or None.
    """
    routed_state: jax.Array
    routed_conv: jax.Array
    shared_state: jax.Array | None
    shared_conv: jax.Array | None


class MoMLayer(RecurrentMixer):
    """Mixture-of-Memories sequence mixer.

    Args:
      hidden_size: D.
      num_heads: H.  head_dim: dk (default D // H, which must divide).  expand_v: dv = dk * expand_v.
      num_memories: E routed memories.  topk: memories per token (1 <= topk <= E).
      shared_memory: add the always-on shared memory.
      update_rule: "gated_delta" (default), "delta", "gla" (per-key-channel decay) or "linear".
      single_kv_proj: one k/v/beta/decay projection for all memories (memories keep separate states).
      use_output_gate: gated RMSNorm with SiLU(x W_g) (else plain RMSNorm).
      use_short_conv, conv_size: depthwise causal conv + SiLU on q, k, v along each memory's
        sub-sequence (zero history at its start); without it q, k, v get SiLU only.
      norm_eps: RMSNorm epsilon.  chunk_size: chunk of the packed stream and the chunked kernels.
      impl: "auto" | "pallas" | "xla" | "scan" implementation of the update rule.
      routed_projection: how the routed memories' k|v|b|a projections are computed (only the
        training / prefill stream; decoding projects one token densely):
        "grouped": the k|v columns of the packed stream itself by one Pallas matmul whose weight
          is picked per chunk (``pallas_kernels.grouped_matmul``): only the routed FLOPs, no sort;
          Triton (GPU; interpret mode on CPU); b|a and q as per-token tables;
        "dense": project every token with every memory, then gather the routed rows ((E+1)/(k+1)
          times the k|v FLOPs; XLA, any backend);
        "ragged": ``lax.ragged_dot`` over the tokens sorted by memory (slower than dense on H100,
          benchmarks/NOTES.md; kept for comparison);
        "auto" (default): "grouped" where ``ops.resolve_grouped_matmul_impl(impl)`` picks the
          kernel (GPU with impl auto/pallas, CPU with impl pallas), else "dense".  H100, B8
          T2048 fwd+bwd: grouped = dense at E4, 0.9 ms (9%) faster at E8.
      dtype: compute dtype of the matmuls (default: the input's); parameters stay float32.

    Parameters (weights are [in, out]): q_proj [D, Kd]; gate [D, E]; k_proj/v_proj/b_proj/a_proj
    [E, D, .] (absent with single_kv_proj); shared_k/v/b/a [D, .] (shared memory, or the single
    projection); A_log, dt_bias [H] (gated delta); q_conv/k_conv/v_conv [W, .]; head.g_proj,
    head.o_norm [dv], head.o_proj.
    """

    def __init__(self, hidden_size: int, *, num_heads: int = 4, head_dim: int | None = None,
                 expand_v: float = 1.0, num_memories: int = 4, topk: int = 2,
                 shared_memory: bool = True, update_rule: str = "gated_delta",
                 single_kv_proj: bool = False, use_output_gate: bool = True,
                 use_short_conv: bool = True, conv_size: int = 4, norm_eps: float = 1e-6,
                 chunk_size: int = 64, impl: str = "auto", routed_projection: str = "auto",
                 dtype=None, rngs: nnx.Rngs):
        e = lc.positive_int("num_memories", num_memories)
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be an integer >= 1, got {topk!r}")
        if topk > e:
            raise ValueError(f"topk ({topk}) cannot exceed num_memories ({e})")
        if routed_projection not in ROUTED_PROJECTIONS:
            raise ValueError(f"routed_projection must be one of {ROUTED_PROJECTIONS}, "
                             f"got {routed_projection!r}")
        if routed_projection == "grouped" and chunk_size & (chunk_size - 1):
            raise ValueError(f"routed_projection='grouped' needs a power-of-two chunk_size, "
                             f"got {chunk_size}")
        self._init_common(hidden_size, num_heads=num_heads, head_dim=head_dim, expand_v=expand_v,
                          update_rule=update_rule, use_output_gate=use_output_gate,
                          use_short_conv=use_short_conv, conv_size=conv_size, norm_eps=norm_eps,
                          chunk_size=chunk_size, impl=impl, dtype=dtype, rngs=rngs)
        self.num_memories, self.topk, self.shared_memory = e, topk, shared_memory
        self.single_kv_proj, self.routed_projection = single_kv_proj, routed_projection
        d = self.hidden_size
        self.gate = nnx.Param(lc.xavier_uniform(rngs.params(), (d, e)))
        for name, width in self._projection_parts():
            if not single_kv_proj:
                setattr(self, f"{name}_proj",
                        nnx.Param(lc.xavier_uniform(rngs.params(), (e, d, width))))
            if shared_memory or single_kv_proj:
                setattr(self, f"shared_{name}", nnx.Param(lc.xavier_uniform(rngs.params(), (d, width))))

    def projection_weight(self, dtype) -> jax.Array:
        """[D, Kd + G*N] every input projection but the router's, cast to ``dtype``: q | each
        routed memory's k|v|b|a (E blocks of N columns; none with single_kv_proj) | the shared
        projection's k|v|b|a (with shared_memory or single_kv_proj).  The one layout of both the
        training stream's projection table (``_stream_raw``) and the decode step's
        (``decode_weights``); ``_kvba_columns`` gives its block offsets."""
        parts = [self.q_proj[...].astype(dtype)]
        if not self.single_kv_proj:
            w_mem = self._memory_weights(dtype)                                    # [E, D, N]
            parts.append(jnp.transpose(w_mem, (1, 0, 2)).reshape(self.hidden_size, -1))
        if self.shared_memory or self.single_kv_proj:
            parts.append(self._concat_weights("shared_{}", dtype))
        return jnp.concatenate(parts, axis=-1)

    def _kvba_columns(self) -> tuple[int, int, int]:
        """(n, routed, shared) of ``projection_weight``'s layout: the k|v|b|a width N, the first
        column of routed memory 0's block (memory m's is routed + m*N; with single_kv_proj every
        memory reads the shared block) and the first column of the shared block."""
        n = sum(width for _, width in self._projection_parts())
        kd = self.key_dim
        if self.single_kv_proj:
            return n, kd, kd
        return n, kd, kd + self.num_memories * n

    def _memory_weights(self, dtype) -> jax.Array:
        """[E, D, N] concatenated k|v|b|a weights of the routed memories ([1, D, N] single_kv_proj)."""
        if self.single_kv_proj:
            return self._concat_weights("shared_{}", dtype)[None]
        return self._concat_weights("{}_proj", dtype)

    def _stream_raw(self, xc, idx, plan: routing.DispatchPlan):
        """The raw (pre-conv) streams: q|k|v as the parts (q [B, L, Kd], k|v [B, L, Kd+Vd]) and
        b|a [B, L, nb+na], zero in padding (the conv reads the two parts as they are).

        xc: [B, T, D] compute dtype; idx: [B, T, k] routing choices.  The projections run on the
        tokens plus zero tokens (``routing.token_table`` layout: [R, D]), so every slot,
        padding included, is a plain row gather (``routing.gather_table``) from the projections.
        """
        dtype = xc.dtype
        kd = self.key_dim
        x_rows = routing.token_table(xc)                                          # [R, D]
        token_src, token_inv = routing.stream_sources(plan)
        projection = self._resolved_projection()
        if projection == "ragged":
            q = routing.gather_table(x_rows @ self.q_proj[...].astype(dtype), token_src, token_inv)
            kvba = self._ragged_raw(xc, idx, plan)
        elif projection == "grouped":
            return self._grouped_raw(x_rows, idx, plan, (token_src, token_inv))
        else:
            # q and every memory's k|v|b|a in one matmul (``projection_weight``): the backward
            # then reads one cotangent table for both dx and dW (as two matmuls, XLA gathered the
            # stream cotangent twice: +0.3 ms on H100).  With single_kv_proj, k|v|b|a is a
            # per-token table like q's; else the (token, memory) table [R * G, N] of
            # ``routing.stream_sources`` (G = E memories, then the shared one).
            n = self._kvba_columns()[0]
            table = x_rows @ self.projection_weight(dtype)
            q_table, kv_table = jnp.split(table, [kd], axis=1)
            kv_sources = ((token_src, token_inv) if self.single_kv_proj
                          else routing.stream_sources(plan, idx))
            q = routing.gather_table(q_table, token_src, token_inv)
            kvba = routing.gather_table(kv_table.reshape(-1, n), *kv_sources)
        kv, extra = jnp.split(kvba, [self.key_dim + self.value_dim], axis=-1)   # VJP: one concat
        return (q, kv), extra

    def _resolved_projection(self) -> str:
        """routed_projection with "auto" resolved; "dense" with single_kv_proj (one weight)."""
        if self.single_kv_proj:
            return "dense"
        if self.routed_projection != "auto":
            return self.routed_projection
        return "grouped" if ops.resolve_grouped_matmul_impl(self.impl) == "pallas" else "dense"

    def _grouped_raw(self, x_rows, idx, plan: routing.DispatchPlan, token_sources):
        """``_stream_raw`` with routed_projection="grouped": the k|v part of every slot is its
        token's row of x times its memory's k|v weight, computed on the stream (``x_rows``
        gathered into it) by ``pallas_kernels.grouped_matmul`` with each chunk's segment as the
        group (the routed memories, then the shared one).  q and the beta / decay columns stay
        per-token tables (one matmul with [W_q | every memory's b|a], gathered like the dense
        path's; narrow for the gated delta rule, Kd wide per memory for GLA's decay).
        x_rows: [R, D] (``routing.token_table``); token_sources: its
        ``routing.stream_sources(plan)``.  Returns ((q, k|v), b|a) as ``_stream_raw``."""
        if ops.resolve_grouped_matmul_impl("pallas") != "pallas":
            raise ValueError(f"routed_projection='grouped' runs a Triton kernel (GPU, or CPU in "
                             f"interpret mode); not available on {jax.default_backend()}: use "
                             f"'auto' or 'dense'")
        grouped_matmul = ops.grouped_matmul_kernel()
        dtype = x_rows.dtype
        kd, nkv = self.key_dim, self.key_dim + self.value_dim
        b, length = plan.slot_token.shape
        w_mem = self._memory_weights(dtype)                                        # [E, D, N]
        if self.shared_memory:
            w_mem = jnp.concatenate([w_mem, self._concat_weights("shared_{}", dtype)[None]], 0)
        groups, d, n = w_mem.shape
        nx = n - nkv            # beta / decay columns per memory (none for linear attention)
        w_extra = jnp.transpose(w_mem[:, :, nkv:], (1, 0, 2)).reshape(d, groups * nx)
        table = x_rows @ jnp.concatenate([self.q_proj[...].astype(dtype), w_extra], axis=1)
        q_table, extra_table = jnp.split(table, [kd], axis=1)
        q = routing.gather_table(q_table, *token_sources)
        extra = (routing.gather_table(extra_table.reshape(-1, nx),
                                      *routing.stream_sources(plan, idx)) if nx
                 else jnp.zeros((b, length, 0), dtype))
        xs = routing.gather_table(x_rows, *token_sources).reshape(b * length, d)
        kv = grouped_matmul(xs, w_mem[:, :, :nkv], plan.layout.chunk_segment.reshape(-1),
                            self.chunk_size)
        return (q, kv.reshape(b, length, nkv)), extra

    def _ragged_raw(self, x, idx, plan: routing.DispatchPlan):
        """k|v|b|a raw stream [B, L, N] (zero in padding) through one grouped matmul
        (``lax.ragged_dot``) over the routed tokens sorted by (memory, row, time), then the shared
        memory's projection.  x: [B, T, D] compute dtype; idx: [B, T, k]."""
        b, t, d = x.shape
        k, e, lr = self.topk, self.num_memories, plan.routed_length
        w_mem = self._memory_weights(x.dtype)
        counts = plan.counts                                                # [B, E]
        per_mem = jnp.sum(counts, axis=0)                                   # [E]
        start = (jnp.cumsum(per_mem) - per_mem)[None, :] + jnp.cumsum(counts, 0) - counts
        seg_off = plan.segment_offsets[:, :e]
        rank = plan.positions - jnp.take_along_axis(seg_off[:, None, :], idx, axis=2)
        mm_pos = jnp.take_along_axis(start[:, None, :], idx, axis=2) + rank   # [B, T, k]
        src_tok = jnp.broadcast_to(
            jnp.arange(b * t, dtype=jnp.int32).reshape(b, t, 1), (b, t, k))
        inv = jnp.zeros((b * t * k,), jnp.int32).at[mm_pos.reshape(-1)].set(src_tok.reshape(-1))
        y_mm = jax.lax.ragged_dot(x.reshape(b * t, d)[inv], w_mem, per_mem.astype(jnp.int32))
        rows = jnp.arange(b)[:, None, None]
        slot_mm = jnp.zeros((b, lr), jnp.int32).at[rows, plan.positions].set(mm_pos)
        out = jnp.where(plan.valid[:, :lr, None], y_mm[slot_mm], 0)
        if self.shared_memory:
            shared = x @ self._concat_weights("shared_{}", x.dtype)                # [B, T, N]
            out = jnp.concatenate([out, oc.pad_time(shared, plan.length - lr)], axis=1)
        return out

    def _forward(self, x, output_final_state: bool):
        dtype = self.dtype or x.dtype
        xc = x.astype(dtype)
        router_logits = self.router_logits(x)
        weights, idx = routing.route(router_logits, self.topk)
        plan = routing.plan_dispatch(idx, self.num_memories, self.chunk_size, self.shared_memory)

        qkv_raw, extra = self._stream_raw(xc, idx, plan)
        qkv = self._activate_stream(qkv_raw, plan.slot_rank)
        # Padding slots are zero in qkv (zero raw inputs, rank 0: the conv restarts there).
        q, k, v, g, beta = self._split_features(qkv, extra, plan.valid, qk_normalised=True)
        o, final = self._recurrence(q, k, v, g, beta, plan.layout, None, output_final_state)
        y = routing.combine(o, weights, plan)                                    # [B, T, H, dv]
        out = self.head(y, xc)
        if not output_final_state:
            return out, router_logits, None
        e = self.num_memories
        buf = self._conv_tail(jnp.concatenate(qkv_raw, axis=-1), plan.segment_offsets,
                              plan.segment_lengths(), self.conv_history)
        cache = MoMCache(routed_state=final[:, :e], routed_conv=buf[:, :e],
                         shared_state=final[:, e] if self.shared_memory else None,
                         shared_conv=buf[:, e] if self.shared_memory else None)
        return out, router_logits, cache

    def router_logits(self, x: jax.Array) -> jax.Array:
        """x [..., D] (any float dtype) -> router logits [..., E] float32, in full float32
        precision on every backend.  The default float32 matmul of a GPU rounds to TF32 (of a TPU
        to bfloat16), and the top-k choice is discrete: near-tie tokens then change memories.
        On an H100 that made a bf16 MoM layer differ from the float32 token-by-token reference by
        2.9e-2 (relative, y) instead of 7.3e-3 (benchmarks/NOTES.md session 14).  Costs nothing:
        E columns."""
        return jnp.dot(x.astype(jnp.float32), self.gate[...].astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)

    def __call__(self, x):
        """x: [B, T, D] -> (y [B, T, D] in the compute dtype, router_logits [B, T, E] float32)."""
        self._check(x)
        y, logits, _ = self._forward(x, output_final_state=False)
        return y, logits

    def prefill(self, x):
        """Like __call__ from an empty cache; returns (y, router_logits, MoMCache after the last token)."""
        self._check(x)
        return self._forward(x, output_final_state=True)

    def init_cache(self, batch_size: int, dtype=jnp.float32) -> MoMCache:
        """Empty cache (no tokens seen).  ``dtype`` is the conv buffers' (use the compute dtype)."""
        e, h, dk, dv = self.num_memories, self.num_heads, self.head_dim, self.head_v_dim
        w1, f32 = self.conv_history, jnp.float32
        return MoMCache(
            routed_state=jnp.zeros((batch_size, e, h, dk, dv), f32),
            routed_conv=jnp.zeros((batch_size, e, w1, self.conv_width), dtype),
            shared_state=jnp.zeros((batch_size, h, dk, dv), f32) if self.shared_memory else None,
            shared_conv=(jnp.zeros((batch_size, w1, self.conv_width), dtype)
                         if self.shared_memory else None))

    def decode_weights(self, dtype) -> dict:
        """The weights ``step`` uses, cast to ``dtype`` and concatenated once.

        Decoding loops compute this outside the loop and pass it to every ``step`` (XLA does not
        hoist the concatenation out of a while loop by itself: it cost ~0.9 ms per token in the
        340M model).  Returns dict(proj=``projection_weight`` [D, Kd + G*N], conv=[W, 2Kd+Vd] or
        None, decay=[2, H] (-exp(A_log), dt_bias) or None).
        """
        conv = self._conv_weight()
        return dict(proj=self.projection_weight(dtype),
                    conv=None if conv is None else conv.astype(jnp.float32),
                    decay=self._decay_params())

    def _xla_step(self, raw, idx, cache: MoMCache, w: dict):
        """``step``'s features and update with XLA ops (gathers, the conv / feature fusions,
        ``ops.decode_step``, scatters).  raw: [B, Kd + G*N] the token's projections
        (``projection_weight`` layout).  Returns (o [B, J, H, dv] float32, new cache fields)."""
        b, k, e, kd = raw.shape[0], self.topk, self.num_memories, self.key_dim
        nkv = self.key_dim + self.value_dim
        n, routed_col, shared_col = self._kvba_columns()
        rows = jnp.arange(b)[:, None]
        q_raw = raw[:, :kd]
        shared = raw[:, shared_col:shared_col + n]
        if self.single_kv_proj:
            kvba = jnp.broadcast_to(shared[:, None], (b, k, n))
        else:
            kvba = raw[:, routed_col:routed_col + e * n].reshape(b, e, n)[rows, idx]  # [B, k, N]
        # The k routed memories and the shared one go through the conv and feature maps together.
        mem_raw, bufs = kvba, cache.routed_conv[rows, idx]
        if self.shared_memory:
            mem_raw = jnp.concatenate([kvba, shared[:, None]], axis=1)
            bufs = jnp.concatenate([bufs, cache.shared_conv[:, None]], axis=1)
        qkv_raw = jnp.concatenate(
            [jnp.broadcast_to(q_raw[:, None], mem_raw.shape[:2] + (kd,)), mem_raw[..., :nkv]], -1)
        feats, bufs = self._step_features(bufs, qkv_raw, mem_raw[..., nkv:], w["conv"])
        state, s_state, o = self._update(cache.routed_state, feats, slots=idx,
                                         shared_state=cache.shared_state)
        new = dict(routed_state=state,
                   routed_conv=cache.routed_conv.at[rows, idx].set(
                       bufs[:, :k].astype(cache.routed_conv.dtype)),
                   shared_state=None, shared_conv=None)
        if self.shared_memory:
            new.update(shared_state=s_state,
                       shared_conv=bufs[:, k].astype(cache.shared_conv.dtype))
        return o, new

    def step(self, x, cache: MoMCache, weights: dict | None = None):
        """Decodes one token per row.

        Args:
          x: [B, D] the layer input of the new token; cache: MoMCache; weights: ``decode_weights``
            (computed here when None).
        Returns:
          (y [B, D], router_logits [B, E] float32, new cache).  Only the top-k selected memories
          (and the shared one) change; every other memory's state and conv buffer is left as is.
        """
        self._check(x, rank=2)
        dtype = self.dtype or x.dtype
        w = self.decode_weights(dtype) if weights is None else weights
        xc = x.astype(dtype)
        b, k = x.shape[0], self.topk
        router_logits = self.router_logits(x)
        weights_k, idx = routing.route(router_logits, k)                          # [B, k]
        raw = xc @ w["proj"]                                                    # [B, Kd + G*N]
        kernel = self._fused_step_kernel()
        if kernel is not None:
            # Column of each input's k|v|b|a block (``projection_weight`` layout): the k routed
            # memories' (every one the shared block with single_kv_proj), then the shared one's.
            n, routed_col, shared_col = self._kvba_columns()
            col_off = (jnp.full((b, k), routed_col, jnp.int32) if self.single_kv_proj
                       else routed_col + idx * n)
            if self.shared_memory:
                col_off = jnp.concatenate([col_off, jnp.full((b, 1), shared_col, jnp.int32)],
                                          axis=1)
            o, state, s_state, conv, s_conv = self._fused_step(
                kernel, raw, col_off, idx, cache.routed_conv, cache.shared_conv, w,
                cache.routed_state, cache.shared_state)
            new = dict(routed_state=state, routed_conv=conv, shared_state=s_state,
                       shared_conv=s_conv)
        else:
            o, new = self._xla_step(raw, idx, cache, w)
        y = jnp.sum(o[:, :k] * weights_k[..., None, None], axis=1)                # [B, H, dv]
        if self.shared_memory:
            y = y + o[:, k]
        return self.head(y, xc), router_logits, MoMCache(**new)
