"""Pieces shared by the MoM layer and its single-memory baselines: init, conv, norm, checks."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mom_jax import ops
from mom_jax.ops import common as oc

LINEAR_INIT_GAIN = 2 ** -2.5


def xavier_uniform(key, shape, *, gain: float = LINEAR_INIT_GAIN, dtype=jnp.float32):
    """Xavier-uniform for a [..., fan_in, fan_out] weight (leading axes are independent copies)."""
    fan_in, fan_out = shape[-2], shape[-1]
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def conv_init(key, shape, dtype=jnp.float32):
    """PyTorch's default for a depthwise Conv1d: U(-1/sqrt(W), 1/sqrt(W)); shape [W, channels]."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def decay_params(key, num_heads: int):
    """(A_log, dt_bias) as in Mamba-2 / Gated DeltaNet: A ~ U(0, 16); dt log-uniform in [1e-3, 0.1]."""
    ka, kd = jax.random.split(key)
    a = jax.random.uniform(ka, (num_heads,), jnp.float32, 0.0, 16.0)
    a = jnp.maximum(a, 1e-6)  # log(0) guard; U(0,16) hits 0 with probability ~0
    dt = jnp.exp(jax.random.uniform(kd, (num_heads,), jnp.float32)
                 * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    dt = jnp.maximum(dt, 1e-4)
    dt_bias = dt + jnp.log(-jnp.expm1(-dt))  # inverse softplus
    return jnp.log(a), dt_bias


def gated_delta_log_decay(a_raw, a_log, dt_bias):
    """g = -exp(A_log) * softplus(a + dt_bias), float32, shape of a_raw ([..., H])."""
    return -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(
        a_raw.astype(jnp.float32) + dt_bias.astype(jnp.float32))


GLA_GATE_NORMALIZER = 16.0


def gla_log_decay(gk_raw):
    """Per-channel GLA log-decay logsigmoid(x) / 16 (as in fla's GLA), float32."""
    return jax.nn.log_sigmoid(gk_raw.astype(jnp.float32)) / GLA_GATE_NORMALIZER


def short_conv_packed(x, weight, rank, *, activation: bool = True, impl: str = "xla",
                      splits: tuple[int, ...] = (), head_norm=None):
    """Depthwise causal conv along a packed stream, restarting (zero history) at every segment.

    Args:
      x: [B, L, C] raw projections, or its parts along the channels (one dtype; the kernel reads
        them as they are, XLA concatenates them); weight: [W, C] (weight[W-1] multiplies the
        current token);
      rank: int32 [B, L], index of each slot inside its segment: taps that would reach before the
        segment start read zero (a negative rank: the slot's output is exactly zero).
      impl: "pallas" / "auto" run the Pallas kernel (``pallas_kernels.short_conv``) where
        ``ops.resolve_conv_impl`` picks it; otherwise the shifted adds below (XLA).
      splits: channel indices to split the output at (``jnp.split``); the kernel writes the parts
        as separate arrays.
      head_norm: None or (head_dim, one scale or None per part): parts with a scale s come out
        as s * L2-normalised heads (``oc.head_l2norm`` of the float32 output; the kernel fuses
        it, ``pallas_kernels.short_conv``).  Needs activation.
    Returns:
      SiLU(conv(x)) [B, L, C] in x's dtype (accumulated in float32), or its parts with splits.
    """
    if ops.resolve_conv_impl(impl) == "pallas":
        return ops.short_conv_kernel()(x, weight, rank, activation=activation, splits=splits,
                                       head_norm=head_norm)
    if isinstance(x, (list, tuple)):
        x = jnp.concatenate(x, axis=-1)
    w_size = weight.shape[0]
    acc = jnp.zeros(x.shape, jnp.float32)
    for shift in range(w_size):
        xs = x if shift == 0 else jnp.pad(x[:, :-shift], ((0, 0), (shift, 0), (0, 0)))
        tap = weight[w_size - 1 - shift].astype(jnp.float32)
        acc = acc + jnp.where((rank >= shift)[..., None], xs.astype(jnp.float32) * tap, 0.0)
    out = jax.nn.silu(acc) if activation else acc
    if head_norm is None:
        out = out.astype(x.dtype)
        return jnp.split(out, list(splits), axis=-1) if splits else out
    parts = oc.head_norm_parts(jnp.split(out, list(splits), axis=-1) if splits else [out],
                               head_norm, x.dtype)
    return parts if splits else parts[0]


def short_conv_step(buffer, x, weight, *, activation: bool = True):
    """One decoding step of the causal conv.

    Args:
      buffer: [..., W-1, C], the previous W-1 raw inputs (oldest first, zeros before the start);
      x: [..., C] the new raw input; weight: [W, C].
    Returns:
      (output [..., C] in x's dtype, new buffer [..., W-1, C]).
    """
    window = jnp.concatenate([buffer.astype(x.dtype), x[..., None, :]], axis=-2)
    acc = jnp.sum(window.astype(jnp.float32) * weight.astype(jnp.float32), axis=-2)
    out = jax.nn.silu(acc) if activation else acc
    return out.astype(x.dtype), window[..., 1:, :]


def rms_norm(x, weight, eps: float):
    """RMSNorm over the last axis in float32: x * rsqrt(mean(x^2) + eps) * weight."""
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * weight.astype(jnp.float32)


def check_input(x, hidden_size: int, name: str, *, rank: int = 3) -> None:
    """Raises a clear error for a wrongly shaped / typed layer input (before any tracing work)."""
    what = "[batch, time, hidden]" if rank == 3 else "[batch, hidden]"
    if getattr(x, "ndim", None) != rank:
        raise ValueError(f"{name}: input must have shape {what}, got shape {getattr(x, 'shape', None)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: input must be floating point, got dtype {x.dtype}")
    if x.shape[-1] != hidden_size:
        raise ValueError(f"{name}: input hidden size {x.shape[-1]} != layer hidden_size {hidden_size}")


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class OutputHead(nnx.Module):
    """Per-head (gated) RMSNorm then o_proj:  out = (RMSNorm_dv(o) * gamma * SiLU(x W_g)) W_o."""

    def __init__(self, hidden_size: int, num_heads: int, head_v_dim: int, *, use_output_gate: bool,
                 norm_eps: float, rngs: nnx.Rngs):
        value_dim = num_heads * head_v_dim
        self.num_heads, self.head_v_dim, self.norm_eps = num_heads, head_v_dim, norm_eps
        self.use_output_gate = use_output_gate
        if use_output_gate:
            self.g_proj = nnx.Param(xavier_uniform(rngs.params(), (hidden_size, value_dim)))
        self.o_norm = nnx.Param(jnp.ones((head_v_dim,), jnp.float32))
        self.o_proj = nnx.Param(xavier_uniform(rngs.params(), (value_dim, hidden_size)))

    def __call__(self, o, x):
        """o: [..., H, dv] (any float); x: [..., D] the layer input.  Returns [..., D] in x's dtype."""
        y = rms_norm(o, self.o_norm[...], self.norm_eps)
        if self.use_output_gate:
            gate = (x @ self.g_proj[...].astype(x.dtype)).reshape(x.shape[:-1] + (
                self.num_heads, self.head_v_dim))
            y = y * jax.nn.silu(gate.astype(jnp.float32))
        y = y.reshape(x.shape[:-1] + (self.num_heads * self.head_v_dim,)).astype(x.dtype)
        return y @ self.o_proj[...].astype(x.dtype)
