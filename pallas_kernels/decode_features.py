"""Fused feature pass of a one-token decode step: short conv, SiLU, q/k L2-norm, beta and decay.

For each (row, input j, head) one program reads, straight from the layer's projection output and
its decode cache,

    raw q                at proj[row, h*dk : (h+1)*dk]            (all inputs of a row share q)
    raw k | v | b | a    at proj[row, col_off[row, j] + ...]      (input j's projection block)
    conv history         routed conv cache [B, M, W-1, C] at slot slots[row, j], or the shared conv
                         cache [B, W-1, C] for the last input of a row (a MoM layer's shared memory)

and computes what ``RecurrentMixer._step_features`` computes for that input (causal conv + SiLU
rounded to the projection dtype, q = l2norm(q) * q_scale, k = l2norm(k), beta = sigmoid(b), the
gated-delta decay -exp(A_log) softplus(a + dt_bias) or GLA's logsigmoid(a) / 16), and shifts the
conv history in place (``input_output_aliases``).  The XLA path does the same with a gather of the
selected projection blocks and conv buffers, two concatenations, the conv / norm fusions and a
scatter of the buffers (about eight kernels per MoM layer and token; benchmarks/NOTES.md).

The state update itself stays in ``decode_step.step_in_place`` (its grid also splits the value
dimension, which this pass cannot: every program that reads a conv history must see it unshifted,
so one program owns all channels of its (input, head)).

Pallas with Triton lowering (GPU); interpret mode on CPU (tests).  Head dims must be powers of
two (``decode_step.supported``).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mom_jax.layers.common import GLA_GATE_NORMALIZER

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Static description of a mixer's one-token features (hashable).

    update_rule: "gated_delta", "delta", "gla" or "linear".  num_heads, head_dim (dk),
    head_v_dim (dv).  conv_size: W of the short conv, 0 without one.  q_scale: multiplies the
    normalised q.  eps: the L2-norm epsilon (``mom_jax.ops.common.L2NORM_EPS``).
    """
    update_rule: str
    num_heads: int
    head_dim: int
    head_v_dim: int
    conv_size: int
    q_scale: float
    eps: float

    @property
    def key_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def value_dim(self) -> int:
        return self.num_heads * self.head_v_dim

    @property
    def has_beta(self) -> bool:
        return self.update_rule in ("gated_delta", "delta")


def _softplus(x):
    return jnp.maximum(x, 0.0) + jnp.log(1.0 + jnp.exp(-jnp.abs(x)))


def _features_kernel(*refs, spec: FeatureSpec, inputs_per_row: int, num_memories: int,
                     proj_width: int, has_shared: bool, raw_dtype):
    w1 = spec.conv_size - 1 if spec.conv_size else 0
    n_hist = (1 + int(has_shared)) if w1 else 0           # conv histories: routed (, shared)
    off_ref, slot_ref, proj_ref, decay_ref = refs[:4]
    cw_ref = refs[4] if w1 else None
    first = 5 if w1 else 4                                  # the first conv history ref
    hist_in = refs[first:first + n_hist]
    hist_out = refs[first + n_hist:first + 2 * n_hist]      # the same buffers, aliased
    q_ref, k_ref, v_ref, *gate_refs = refs[first + 2 * n_hist:]
    conv_in, shared_in = (tuple(hist_in) + (None, None))[:2]
    conv_out, shared_out = (tuple(hist_out) + (None, None))[:2]

    h, dk, dv = spec.num_heads, spec.head_dim, spec.head_v_dim
    kd, vd = spec.key_dim, spec.value_dim
    p, hd = pl.program_id(0), pl.program_id(1)
    row, j = p // inputs_per_row, p % inputs_per_row
    base = row * proj_width
    col = base + off_ref[p]           # start of this input's k|v|b|a block in the flat projection
    # (column in the projection, column in the conv channels, width) of q, k and v of this head
    parts = ((base + hd * dk, hd * dk, dk), (col + hd * dk, kd + hd * dk, dk),
             (col + kd + hd * dv, 2 * kd + hd * dv, dv))

    def activate(conv_src, conv_dst, first_row):
        outs = []
        for pcol, ccol, width in parts:
            raw = proj_ref[pl.ds(pcol, width)]
            if not w1:
                acc = raw.astype(F32)
            else:
                chans = pl.ds(ccol, width)
                hist = [conv_src[first_row + w, chans] for w in range(w1)]
                acc = raw.astype(F32) * cw_ref[w1, chans]
                for w in range(w1):
                    acc = acc + hist[w].astype(F32) * cw_ref[w, chans]
                for w in range(w1 - 1):
                    conv_dst[first_row + w, chans] = hist[w + 1]
                conv_dst[first_row + w1 - 1, chans] = raw.astype(conv_dst.dtype)
            act = acc * jax.nn.sigmoid(acc)
            outs.append(act.astype(raw_dtype).astype(F32))       # the XLA path rounds here too
        q, k, v = outs
        q = q * jax.lax.rsqrt(jnp.sum(q * q) + spec.eps) * spec.q_scale
        k = k * jax.lax.rsqrt(jnp.sum(k * k) + spec.eps)
        q_ref[...], k_ref[...], v_ref[...] = q, k, v

    if not w1:
        activate(None, None, 0)
    elif not has_shared:
        activate(conv_in, conv_out, (row * num_memories + slot_ref[p]) * w1)
    else:
        @pl.when(j < inputs_per_row - 1)
        def _routed():
            activate(conv_in, conv_out, (row * num_memories + slot_ref[p]) * w1)

        @pl.when(j == inputs_per_row - 1)
        def _shared():
            activate(shared_in, shared_out, row * w1)

    extra = col + kd + vd                        # raw b (H columns), then raw a
    if spec.update_rule == "gla":
        a = proj_ref[pl.ds(extra + hd * dk, dk)].astype(F32)
        gate_refs[0][...] = -_softplus(-a) / GLA_GATE_NORMALIZER
    elif spec.has_beta:
        gate_refs[0][...] = jax.nn.sigmoid(proj_ref[pl.ds(extra + hd, 1)].astype(F32))
        if spec.update_rule == "gated_delta":
            a = proj_ref[pl.ds(extra + h + hd, 1)].astype(F32)
            a_neg, dt_bias = decay_ref[0, pl.ds(hd, 1)], decay_ref[1, pl.ds(hd, 1)]
            gate_refs[1][...] = a_neg * _softplus(a + dt_bias)


def step_features_in_place(proj, col_off, slots, conv, shared_conv, conv_weight, decay_params, *,
                           update_rule: str, num_heads: int, head_dim: int, head_v_dim: int,
                           conv_size: int, q_scale: float, eps: float, interpret: bool = False,
                           num_warps: int = 4):
    """One token's features for J inputs per row, shifting their conv histories in place.

    Args:
      proj: [B, P] raw projections of the token (bf16 or fp32); columns [0, Kd) hold q, and each
        input's k | v | b | a block (widths Kd, Vd, then H for beta and H (gated delta) or Kd (GLA)
        for the decay) starts at ``col_off``.
      col_off: int32 [B, J] column of input j's k|v|b|a block in ``proj``.
      slots: int32 [B, Jr] memory of each routed input (distinct within a row; Jr = J, or J - 1
        with ``shared_conv``: the last input of a row is then the shared memory's).
      conv: [B, M, W-1, 2Kd+Vd] conv histories of M memories (q | k | v channels, oldest first) or
        None without a short conv (spec.conv_size == 0); shared_conv: [B, W-1, 2Kd+Vd] or None.
      conv_weight: [W, 2Kd+Vd] float32 (weight[W-1] multiplies the current token) or None.
      decay_params: [2, H] float32 (-exp(A_log), dt_bias) for "gated_delta"; ignored otherwise.
      update_rule ... eps: the fields of ``FeatureSpec``.
      J = Jr + 1 means the last input of each row is the shared memory's.
    Returns:
      dict(q, k [B, J, H, dk] float32 (normalised, q scaled), v [B, J, H, dv] float32,
           beta [B, J, H] float32 or None, g [B, J, H] float32 (gated delta) or None,
           gk [B, J, H, dk] float32 (GLA) or None, conv, shared_conv (the shifted histories, same
           shapes and dtypes as given; None where not given)).
    """
    spec = FeatureSpec(update_rule, num_heads, head_dim, head_v_dim, conv_size, float(q_scale),
                       float(eps))
    b, pw = proj.shape
    jj = col_off.shape[1]
    jr = slots.shape[1]
    if jj not in (jr, jr + 1):
        raise ValueError(f"step_features_in_place: col_off has {jj} inputs per row, slots {jr}")
    has_shared = jj == jr + 1
    h, dk, dv = spec.num_heads, spec.head_dim, spec.head_v_dim
    w1 = spec.conv_size - 1 if spec.conv_size else 0
    if w1 and (conv is None or (has_shared and shared_conv is None)):
        raise ValueError("step_features_in_place: a short conv needs the conv histories")
    m = conv.shape[1] if w1 else 1
    slot_all = slots.astype(jnp.int32)
    if has_shared:   # the shared input's slot is never read
        slot_all = jnp.concatenate([slot_all, jnp.zeros((b, 1), jnp.int32)], axis=1)
    whole = lambda x: pl.BlockSpec(x.shape, lambda p, hd: (0,) * x.ndim)  # noqa: E731
    decay = (decay_params.astype(F32) if spec.update_rule == "gated_delta"
             else jnp.zeros((2, h), F32))
    args = [col_off.astype(jnp.int32).reshape(-1), slot_all.reshape(-1), proj.reshape(-1), decay]
    aliases, out_shape, out_specs = {}, [], []
    if w1:
        c = conv.shape[-1]
        conv2 = conv.reshape(b * m * w1, c)
        args += [conv_weight.astype(F32), conv2]
        hist = [conv2]
        if has_shared:
            hist.append(shared_conv.reshape(b * w1, c))
            args.append(hist[-1])
        for i, x in enumerate(hist):
            aliases[5 + i] = i
            out_shape.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
            out_specs.append(whole(x))
    in_specs = [whole(x) for x in args]
    vec = lambda d: pl.BlockSpec((None, None, d), lambda p, hd: (p, hd, 0))  # noqa: E731
    for d in (dk, dk, dv):
        out_shape.append(jax.ShapeDtypeStruct((b * jj, h, d), F32))
        out_specs.append(vec(d))
    if spec.update_rule == "gla":
        out_shape.append(jax.ShapeDtypeStruct((b * jj, h, dk), F32))
        out_specs.append(vec(dk))
    else:
        for _ in range(int(spec.has_beta) + int(spec.update_rule == "gated_delta")):
            out_shape.append(jax.ShapeDtypeStruct((b * jj, h, 1), F32))   # beta, then g
            out_specs.append(vec(1))
    outs = pl.pallas_call(
        functools.partial(_features_kernel, spec=spec, inputs_per_row=jj, num_memories=m,
                          proj_width=pw, has_shared=has_shared, raw_dtype=proj.dtype),
        out_shape=tuple(out_shape), grid=(b * jj, h), in_specs=in_specs,
        out_specs=tuple(out_specs), input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="decode_step_features",
    )(*args)
    outs = list(outs)
    new_conv = new_shared = None
    if w1:
        new_conv = outs.pop(0).reshape(conv.shape)
        if has_shared:
            new_shared = outs.pop(0).reshape(shared_conv.shape)
    shape = lambda x: x.reshape((b, jj) + x.shape[1:])   # noqa: E731
    res = dict(q=shape(outs[0]), k=shape(outs[1]), v=shape(outs[2]), beta=None, g=None, gk=None,
               conv=new_conv, shared_conv=new_shared)
    if spec.update_rule == "gla":
        res["gk"] = shape(outs[3])
    elif spec.has_beta:
        res["beta"] = shape(outs[3])[..., 0]
        if spec.update_rule == "gated_delta":
            res["g"] = shape(outs[4])[..., 0]
    return res
