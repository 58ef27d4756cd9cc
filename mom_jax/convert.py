"""Weight import/export between flash-linear-attention's ``MomAttention`` and ``MoMLayer``.

Name mapping (fla ``state_dict`` key -> MoMLayer parameter; torch Linear weights are [out, in] and are
transposed to our [in, out]; depthwise conv weights [C, 1, W] become [W, C]):

  q_proj.weight          -> q_proj           [D, Kd]
  gate.weight            -> gate             [D, E]
  k_proj.{m}.weight      -> k_proj[m]        [E, D, Kd]   (v_proj / b_proj / a_proj alike)
  shared_k.weight        -> shared_k         [D, Kd]      (shared_v / shared_b / shared_a alike;
                                                           with single_kv_proj these are the one
                                                           projection every memory uses)
  A_log, dt_bias         -> A_log, dt_bias   [H]
  q_conv1d.weight        -> q_conv           [W, Kd]      (k_conv1d -> k_conv, v_conv1d -> v_conv)
  g_proj.weight          -> head.g_proj      [D, Vd]
  o_norm.weight          -> head.o_norm      [dv]
  o_proj.weight          -> head.o_proj      [Vd, D]

Sizes are inferred from the arrays: D and Kd from q_proj, E from gate, H from A_log, dk = Kd / H,
dv from o_norm, W from q_conv1d; shared memory from the presence of shared_k (with k_proj.*);
single_kv_proj from shared_k without k_proj.*; output gate from g_proj; short conv from q_conv1d.
"""
from __future__ import annotations

import re
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mom_jax.layers.mom import MoMLayer

_PARTS = ("k", "v", "b", "a")


def _array(sd, key):
    if key not in sd:
        raise KeyError(f"state dict has no {key!r} (keys: {sorted(sd)[:12]}...)")
    return np.asarray(sd[key], dtype=np.float32)


def mom_layer_from_torch_state_dict(state_dict: Mapping[str, np.ndarray], *, topk: int,
                                    norm_eps: float = 1e-6, shared_memory: bool | None = None,
                                    **layer_kwargs) -> MoMLayer:
    """Builds a MoMLayer from a ``MomAttention.state_dict()`` given as name -> NumPy array.

    Args:
      state_dict: fla parameter names to arrays (torch tensors converted with ``.cpu().numpy()``).
      topk: memories per token (not stored in the weights).
      norm_eps: the output RMSNorm's epsilon (fla's MomAttention default is 1e-5).
      shared_memory: only needed with single_kv_proj, where the weights cannot tell.
      **layer_kwargs: passed to MoMLayer (e.g. impl, dtype, chunk_size).
    Returns:
      the MoMLayer; calling it on x [B, T, D] returns (y, router_logits).
    """
    sd = {k: v for k, v in state_dict.items()}
    for key in sd:
        if key.endswith("bias") and key != "dt_bias":
            raise ValueError(f"{key!r}: biased projections/convs are not supported by MoMLayer")
    q_w = _array(sd, "q_proj.weight")
    key_dim, d = q_w.shape
    e = _array(sd, "gate.weight").shape[0]
    h = _array(sd, "A_log").shape[0]
    if key_dim % h:
        raise ValueError(f"q_proj has {key_dim} outputs, not divisible by {h} heads (A_log)")
    dk = key_dim // h
    dv = _array(sd, "o_norm.weight").shape[0]
    routed = "k_proj.0.weight" in sd
    single_kv_proj = not routed and "shared_k.weight" in sd
    if not routed and not single_kv_proj:
        raise KeyError("state dict has neither k_proj.{m}.weight nor shared_k.weight")
    if single_kv_proj:
        if shared_memory is None:
            raise ValueError("single_kv_proj weights do not say whether the shared memory is on: "
                             "pass shared_memory=True/False")
    else:
        present = "shared_k.weight" in sd
        if shared_memory is not None and shared_memory != present:
            raise ValueError(f"shared_memory={shared_memory} but the state dict "
                             f"{'has' if present else 'lacks'} shared_k.weight")
        shared_memory = present
    use_short_conv = "q_conv1d.weight" in sd
    conv_size = _array(sd, "q_conv1d.weight").shape[-1] if use_short_conv else 4
    layer = MoMLayer(d, num_heads=h, head_dim=dk, expand_v=dv / dk, num_memories=e, topk=topk,
                     shared_memory=shared_memory, update_rule="gated_delta",
                     single_kv_proj=single_kv_proj, use_output_gate="g_proj.weight" in sd,
                     use_short_conv=use_short_conv, conv_size=conv_size, norm_eps=norm_eps,
                     rngs=nnx.Rngs(0), **layer_kwargs)

    used = set()

    def take(key):
        used.add(key)
        return _array(sd, key)

    def assign(param, value, key):
        if tuple(param.get_value().shape) != tuple(value.shape):
            raise ValueError(f"{key}: expected shape {tuple(param.get_value().shape)} after conversion, "
                             f"got {tuple(value.shape)}")
        param.set_value(jnp.asarray(value, jnp.float32))

    assign(layer.q_proj, take("q_proj.weight").T, "q_proj.weight")
    assign(layer.gate, take("gate.weight").T, "gate.weight")
    assign(layer.A_log, take("A_log"), "A_log")
    assign(layer.dt_bias, take("dt_bias"), "dt_bias")
    for part in _PARTS:
        if not single_kv_proj:
            stacked = np.stack([take(f"{part}_proj.{m}.weight").T for m in range(e)])
            assign(getattr(layer, f"{part}_proj"), stacked, f"{part}_proj.*")
        if shared_memory or single_kv_proj:
            assign(getattr(layer, f"shared_{part}"), take(f"shared_{part}.weight").T,
                   f"shared_{part}.weight")
    if use_short_conv:
        for part in ("q", "k", "v"):
            w = take(f"{part}_conv1d.weight")
            assign(getattr(layer, f"{part}_conv"), w[:, 0, :].T, f"{part}_conv1d.weight")
    if layer.head.use_output_gate:
        assign(layer.head.g_proj, take("g_proj.weight").T, "g_proj.weight")
    assign(layer.head.o_norm, take("o_norm.weight"), "o_norm.weight")
    assign(layer.head.o_proj, take("o_proj.weight").T, "o_proj.weight")
    unused = sorted(set(sd) - used)
    if unused:
        extra = [k for k in unused if not re.fullmatch(r"[kvba]_proj\.\d+\.weight", k)]
        raise ValueError(f"state dict has entries MoMLayer does not use: {unused}"
                         + ("" if extra else f" (more memories than gate.weight's {e}?)"))
    return layer


def mom_layer_to_torch_state_dict(layer: MoMLayer) -> dict[str, np.ndarray]:
    """The inverse mapping: MoMLayer (gated delta rule) -> fla MomAttention names, torch layouts."""
    if layer.update_rule != "gated_delta":
        raise ValueError("fla's MomAttention only has the gated delta rule")
    sd = {"q_proj.weight": np.asarray(layer.q_proj[...]).T,
          "gate.weight": np.asarray(layer.gate[...]).T,
          "A_log": np.asarray(layer.A_log[...]), "dt_bias": np.asarray(layer.dt_bias[...])}
    for part in _PARTS:
        if not layer.single_kv_proj:
            stacked = np.asarray(getattr(layer, f"{part}_proj")[...])
            for m in range(layer.num_memories):
                sd[f"{part}_proj.{m}.weight"] = stacked[m].T
        if layer.shared_memory or layer.single_kv_proj:
            sd[f"shared_{part}.weight"] = np.asarray(getattr(layer, f"shared_{part}")[...]).T
    if layer.use_short_conv:
        for part in ("q", "k", "v"):
            sd[f"{part}_conv1d.weight"] = np.asarray(getattr(layer, f"{part}_conv")[...]).T[:, None]
    if layer.head.use_output_gate:
        sd["g_proj.weight"] = np.asarray(layer.head.g_proj[...]).T
    sd["o_norm.weight"] = np.asarray(layer.head.o_norm[...])
    sd["o_proj.weight"] = np.asarray(layer.head.o_proj[...]).T
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}
