"""Common base of the recurrent mixers (MoM and its single-memory baselines).

Holds the configuration checks, the parameters every mixer shares (q projection, short convs, decay
parameters, output head) and the feature maps used identically by the chunked forward and by the
one-token decode step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mom_jax import ops
from mom_jax.layers import common as lc
from mom_jax.ops import common as oc


class RecurrentMixer(nnx.Module):
    """Base class; subclasses add their key/value/beta/decay projections and the forward pass."""

    def _init_common(self, hidden_size, *, num_heads, head_dim, expand_v, update_rule,
                     use_output_gate, use_short_conv, conv_size, norm_eps, chunk_size, impl, dtype,
                     rngs: nnx.Rngs):
        d = lc.positive_int("hidden_size", hidden_size)
        h = lc.positive_int("num_heads", num_heads)
        if head_dim is None:
            if d % h:
                raise ValueError(f"hidden_size ({d}) is not divisible by num_heads ({h}); "
                                 f"pass head_dim explicitly")
            head_dim = d // h
        dk = lc.positive_int("head_dim", head_dim)
        dv_f = dk * expand_v
        if not expand_v > 0 or dv_f != int(dv_f):
            raise ValueError(f"head_dim * expand_v must be a positive integer, got {dk} * {expand_v}")
        if update_rule not in ops.UPDATE_RULES:
            raise ValueError(f"update_rule must be one of {ops.UPDATE_RULES}, got {update_rule!r}")
        lc.positive_int("conv_size", conv_size)
        lc.positive_int("chunk_size", chunk_size)
        oc.check_impl(impl)
        if not norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {norm_eps!r}")

        self.hidden_size, self.num_heads, self.head_dim = d, h, dk
        self.head_v_dim = int(dv_f)
        self.key_dim, self.value_dim = h * dk, h * self.head_v_dim
        self.update_rule = update_rule
        self.use_short_conv, self.conv_size = use_short_conv, conv_size
        self.norm_eps, self.chunk_size, self.impl, self.dtype = norm_eps, chunk_size, impl, dtype

        self.q_proj = nnx.Param(lc.xavier_uniform(rngs.params(), (d, self.key_dim)))
        if update_rule == "gated_delta":
            a_log, dt_bias = lc.decay_params(rngs.params(), h)
            self.A_log, self.dt_bias = nnx.Param(a_log), nnx.Param(dt_bias)
        if use_short_conv:
            self.q_conv = nnx.Param(lc.conv_init(rngs.params(), (conv_size, self.key_dim)))
            self.k_conv = nnx.Param(lc.conv_init(rngs.params(), (conv_size, self.key_dim)))
            self.v_conv = nnx.Param(lc.conv_init(rngs.params(), (conv_size, self.value_dim)))
        self.head = lc.OutputHead(d, h, self.head_v_dim, use_output_gate=use_output_gate,
                                  norm_eps=norm_eps, rngs=rngs)

    def _projection_parts(self):
        """(name, width) of the key/value/beta/decay projections, in their concatenation order."""
        parts = [("k", self.key_dim), ("v", self.value_dim)]
        if self.update_rule in ("gated_delta", "delta"):
            parts.append(("b", self.num_heads))
        if self.update_rule == "gated_delta":
            parts.append(("a", self.num_heads))
        elif self.update_rule == "gla":
            parts.append(("a", self.key_dim))
        return parts

    def _concat_weights(self, name_template: str, dtype) -> jax.Array:
        """Concatenates the k|v|b|a weights named ``name_template.format(part)`` on the output axis."""
        return jnp.concatenate([getattr(self, name_template.format(n))[...] for n, _ in
                                self._projection_parts()], -1).astype(dtype)

    def _conv_weight(self) -> jax.Array | None:
        """[W, 2*Kd + Vd] weights of the q|k|v depthwise convs (None without short conv)."""
        if not self.use_short_conv:
            return None
        return jnp.concatenate([self.q_conv[...], self.k_conv[...], self.v_conv[...]], -1)

    @property
    def conv_width(self) -> int:
        """Channels of the conv buffers: the raw q|k|v projections."""
        return 2 * self.key_dim + self.value_dim

    @property
    def conv_history(self) -> int:
        """W-1 raw inputs kept per memory for decoding (0 without short conv)."""
        return self.conv_size - 1 if self.use_short_conv else 0

    def _check(self, x, *, rank: int = 3):
        lc.check_input(x, self.hidden_size, type(self).__name__, rank=rank)

    @property
    def q_scale(self) -> float:
        """Scale of the L2-normalised queries: dk ** -0.5."""
        return self.head_dim ** -0.5

    def _split_features(self, qkv, extra, valid=None, *, qk_normalised: bool = False):
        """Post-activation q, k, v and raw b|a -> (q, k, v, g, beta) per head; g and beta masked
        where not valid.

        qkv: (q [..., Kd], k [..., Kd], v [..., Vd]), zero where not valid (the callers' raw
        inputs are zero there and the conv restarts: no select, which XLA on GPU emitted as
        transpose -> select -> transpose, benchmarks/NOTES.md sessions 7 and 9); extra:
        [..., nb+na] raw; valid: bool [...] or None.
        qk_normalised: q, k are already the features (``_activate_stream``'s: l2norm(q) *
          q_scale, l2norm(k) per head) and stay as given; else they are SiLU outputs and are
          normalised here (the decode step).
        Returns q, k: [..., H, dk] (L2-normalised, q scaled by dk**-0.5; float32 unless given
        normalised); v: [..., H, dv]; g: [..., H] (gated delta) / [..., H, dk] (GLA) float32 or
        None; beta: [..., H] float32 or None.
        """
        kd, h = self.key_dim, self.num_heads
        q, k, v = qkv
        lead = q.shape[:-1]
        q = q.reshape(lead + (h, self.head_dim))
        k = k.reshape(lead + (h, self.head_dim))
        v = v.reshape(lead + (h, self.head_v_dim))
        if not qk_normalised:
            q = oc.l2norm(q) * self.q_scale
            k = oc.l2norm(k)
        beta = g = None
        col = 0
        if self.update_rule in ("gated_delta", "delta"):
            beta = jax.nn.sigmoid(extra[..., col:col + h].astype(jnp.float32))
            col += h
        if self.update_rule == "gated_delta":
            g = lc.gated_delta_log_decay(extra[..., col:col + h], self.A_log[...],
                                         self.dt_bias[...])
        elif self.update_rule == "gla":
            g = lc.gla_log_decay(extra[..., col:col + kd]).reshape(lead + (h, self.head_dim))
        if valid is not None:
            def mask(x):
                return None if x is None else jnp.where(
                    valid.reshape(valid.shape + (1,) * (x.ndim - valid.ndim)), x, 0)
            g, beta = mask(g), mask(beta)
        return q, k, v, g, beta

    def _activate_stream(self, qkv_raw, rank):
        """The features of a packed stream: short conv (restarting where rank == 0; zero output
        where rank < 0) + SiLU, or SiLU alone, then the q/k L2-norm per head:
        [B, L, 2Kd+Vd] (or its parts along the channels, e.g. the MoM layer's q | k|v) ->
        (q' = l2norm(q) * q_scale [B, L, Kd], k' = l2norm(k) [B, L, Kd], v [B, L, Vd]) in
        qkv_raw's dtype.  The Pallas conv kernel where ``ops.resolve_conv_impl(self.impl)``
        picks it: it reads the parts as they are and writes the three as separate arrays (no
        concatenation or split copies either way) and normalises the float32 tile before
        rounding it, its backward applying the norm's Jacobian in the pass that applies SiLU's
        (the norm's own XLA passes, 0.4 ms of a MoM layer's fwd+bwd on an H100, are gone:
        benchmarks/NOTES.md session 11)."""
        splits = (self.key_dim, 2 * self.key_dim)
        head_norm = (self.head_dim, (self.q_scale, 1.0, None))
        if self.use_short_conv:
            return lc.short_conv_packed(qkv_raw, self._conv_weight(), rank, impl=self.impl,
                                        splits=splits, head_norm=head_norm)
        if isinstance(qkv_raw, (list, tuple)):
            qkv_raw = jnp.concatenate(qkv_raw, axis=-1)
        return oc.head_norm_parts(
            jnp.split(jax.nn.silu(qkv_raw.astype(jnp.float32)), splits, axis=-1), head_norm,
            qkv_raw.dtype)

    def _recurrence(self, q, k, v, g, beta, layout, initial_state, output_final_state):
        """The update rule over a packed stream, from the normalised q', k' of
        ``_activate_stream`` (so the op neither normalises nor scales them).  o comes back in
        v's dtype (the layer's compute dtype; the Pallas output kernel writes it directly)."""
        return ops.packed_recurrence(self.update_rule, q, k, v, g=g, beta=beta, layout=layout,
                                     initial_state=initial_state,
                                     output_final_state=output_final_state, impl=self.impl,
                                     out_dtype=v.dtype)

    def _step_features(self, conv_buf, qkv_raw, extra, conv_weight):
        """Short conv step (or SiLU) and feature maps of one token for one or more memories.

        conv_buf: [..., W-1, C]; qkv_raw: [..., C]; extra: [..., nb+na]; conv_weight: [W, C] or
        None.  Returns ((q, k, v, g, beta) as in ``_split_features``, new conv buffer).
        """
        if self.use_short_conv:
            qkv, conv_buf = lc.short_conv_step(conv_buf, qkv_raw, conv_weight)
        else:
            qkv = jax.nn.silu(qkv_raw)
        kd = self.key_dim
        return self._split_features(jnp.split(qkv, [kd, 2 * kd], axis=-1), extra), conv_buf

    def _update(self, state, features, slots=None, shared_state=None):
        """The recurrent update of one token (``ops.decode_step``): state [B, M, H, dk, dv],
        features of J memories per row ([B, J, ...]; the last one the shared memory's when
        ``shared_state`` is given).  Returns (new state, new shared state or None,
        o [B, J, H, dv] float32)."""
        q, k, v, g, beta = features
        return ops.decode_step(state, q, k, v, slots=slots,
                               g=g if self.update_rule == "gated_delta" else None,
                               gk=g if self.update_rule == "gla" else None, beta=beta,
                               shared_state=shared_state, impl=self.impl)

    def _decay_params(self) -> jax.Array | None:
        """[2, H] float32 (-exp(A_log), dt_bias) of the gated-delta decay (None for other rules)."""
        if self.update_rule != "gated_delta":
            return None
        return jnp.stack([-jnp.exp(self.A_log[...].astype(jnp.float32)),
                          self.dt_bias[...].astype(jnp.float32)])

    def _fused_step_kernel(self):
        """The fused feature pass (``ops.step_features_kernel``) when the decode step runs the
        Pallas kernels (``ops.resolve_step_impl``), else None (the XLA step)."""
        if ops.resolve_step_impl(self.impl, self.head_dim, self.head_v_dim) != "pallas":
            return None
        return ops.step_features_kernel()

    def _fused_step(self, kernel, raw, col_off, slots, conv, shared_conv, weights, state,
                    shared_state=None):
        """Features and update of one token for J inputs per row with the fused kernels.

        raw: [B, P] projections (q in columns [0, Kd)); col_off: int32 [B, J] column of each
        input's k|v|b|a block; slots: int32 [B, Jr] memory of each routed input; conv:
        [B, M, W-1, C] and shared_conv [B, W-1, C] (or None) conv histories; weights:
        ``decode_weights`` (uses "conv", "decay"); state [B, M, H, dk, dv] float32, shared_state
        [B, H, dk, dv] or None (J = Jr + 1 when given).  Returns (o [B, J, H, dv] float32, state,
        shared state, conv, shared conv), the caches updated in place where the caller's buffers
        allow it.
        """
        has_conv = self.conv_history > 0
        f = kernel(raw, col_off, slots, conv if has_conv else None,
                   shared_conv if has_conv and shared_state is not None else None, weights["conv"],
                   weights["decay"], update_rule=self.update_rule, num_heads=self.num_heads,
                   head_dim=self.head_dim, head_v_dim=self.head_v_dim,
                   conv_size=self.conv_size if has_conv else 0, q_scale=self.q_scale,
                   eps=oc.L2NORM_EPS, interpret=jax.default_backend() == "cpu")
        state, shared_state, o = ops.decode_step(state, f["q"], f["k"], f["v"], slots=slots,
                                                 g=f["g"], gk=f["gk"], beta=f["beta"],
                                                 shared_state=shared_state, impl=self.impl)
        if has_conv:
            conv, shared_conv = f["conv"], f["shared_conv"]
        return o, state, shared_state, conv, shared_conv

    @staticmethod
    def _conv_tail(qkv_raw, offsets, lengths, history: int):
        """Last ``history`` raw inputs of each segment (zeros before its start).

        qkv_raw: [B, L, C]; offsets, lengths: int32 [B, S].  Returns [B, S, history, C].
        """
        b, s = lengths.shape
        rel = lengths[..., None] - history + jnp.arange(history, dtype=jnp.int32)   # [B, S, W-1]
        src = jnp.clip(offsets[..., None] + rel, 0, qkv_raw.shape[1] - 1)
        buf = jnp.take_along_axis(qkv_raw, src.reshape(b, s * history)[..., None], axis=1)
        buf = buf.reshape(b, s, history, qkv_raw.shape[-1])
        return jnp.where((rel >= 0)[..., None], buf, 0)
