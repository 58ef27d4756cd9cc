"""Shared pieces of the sequence-mixing ops: validation, normalisation and the packed chunk layout.

Every op works on a *chunk-aligned packed stream*: rows of length ``L = num_chunks * chunk_size``
in which each chunk belongs to exactly one segment (or to none).  A segment is a run of whole chunks
whose recurrent state starts from its own initial state (zero by default) and whose final state is
reported separately.  Slots inside a chunk that carry no token hold zeros for ``k``, ``v``, ``beta``
and the log-decay ``g``, which leaves the state untouched under every update rule, so padding is exact.

The layout is described by one integer array ``chunk_segment[B, num_chunks]``: the index (within the
row) of the segment each chunk belongs to, or ``-1`` for an unused chunk.  Consecutive chunks with the
same index form one segment; a chunk whose index differs from its predecessor's starts a new segment.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

L2NORM_EPS = 1e-6
IMPLS = ("auto", "pallas", "xla", "scan")
Impl = Literal["auto", "pallas", "xla", "scan"]


def l2norm(x: jax.Array, eps: float = L2NORM_EPS) -> jax.Array:
    """x / sqrt(sum(x**2, -1) + eps), computed in float32, returned in float32."""
    return l2norm_rstd(x, eps)[0]


def head_l2norm(x: jax.Array, head_dim: int, scale: float = 1.0) -> jax.Array:
    """``l2norm`` of each head of ``head_dim`` channels of x [..., n * head_dim], times scale:
    the gated delta rule's q (scale dk**-0.5) and k (scale 1) features.  Float32 result."""
    heads = x.reshape(x.shape[:-1] + (-1, head_dim))
    return (l2norm(heads) * scale).reshape(x.shape)


def head_norm_parts(parts, head_norm, dtype) -> list:
    """The q/k features of split conv outputs: ``head_norm`` = (head_dim, one scale or None per
    part); a part with a scale becomes ``head_l2norm(part, head_dim, scale)``, the others stay.
    All come back in ``dtype``."""
    head_dim, scales = head_norm
    return [(p if s is None else head_l2norm(p, head_dim, s)).astype(dtype)
            for p, s in zip(parts, scales)]


def l2norm_rstd(x: jax.Array, eps: float = L2NORM_EPS) -> tuple[jax.Array, jax.Array]:
    """(l2norm(x), rstd): y = x * rstd with rstd = 1 / sqrt(sum(x**2, -1) + eps).

    x: [..., d] any float dtype.  Returns y [..., d] float32 and rstd [...] float32 (the per-row
    inverse norm, what a custom VJP keeps to apply ``l2norm_vjp`` later).
    """
    x = x.astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.sum(x * x, axis=-1) + eps)
    return x * rstd[..., None], rstd


def l2norm_vjp(x: jax.Array, rstd: jax.Array, dy: jax.Array,
               dy_dot_y: jax.Array | None = None) -> jax.Array:
    """Cotangent of x through y = l2norm(x), from x, its rstd and the cotangent dy of y.

    With y = x * rstd and rstd = (|x|^2 + eps)^(-1/2), dy/dx = rstd (I - y y^T) exactly (eps
    included), so dx = rstd * (dy - y <dy, y>).  x: [..., d] any float dtype; rstd: [...] float32;
    dy: [..., d]; dy_dot_y: the row sums <dy, y> [...] float32 where the caller already has them
    (then this is one elementwise pass, no reduction), else computed here.
    Returns dx [..., d] float32 (cast it to x's dtype where wanted).
    """
    r = rstd[..., None]
    y = x.astype(jnp.float32) * r
    dy = dy.astype(jnp.float32)
    dot = (jnp.sum(dy * y, axis=-1, keepdims=True) if dy_dot_y is None
           else dy_dot_y.astype(jnp.float32)[..., None])
    return r * (dy - y * dot)


def check_qk_options(use_qk_l2norm, scale, op: str) -> float | None:
    """Checks the q/k feature options of an op; returns ``scale`` as a float, or None when it is
    a traced value (fine for the XLA forms, not for a kernel that needs it at trace time).

    use_qk_l2norm must be a Python bool: it selects code when the op is traced.
    """
    if not isinstance(use_qk_l2norm, (bool, np.bool_)):
        raise ValueError(f"{op}: use_qk_l2norm must be a Python bool (it selects code at trace "
                         f"time), got {use_qk_l2norm!r}")
    if isinstance(scale, (int, float, np.number)) and not isinstance(scale, bool):
        return float(scale)
    if getattr(scale, "ndim", None) == 0 and jnp.issubdtype(scale.dtype, jnp.number):
        try:
            return float(scale)
        except jax.errors.ConcretizationTypeError:  # traced
            return None
    raise ValueError(f"{op}: scale must be a number, got {scale!r}")


def qk_features(q: jax.Array, k: jax.Array, use_qk_l2norm: bool, scale=1.0):
    """q <- l2norm(q) * scale, k <- l2norm(k) (or q <- q * scale without the normalisation),
    as plain jnp at an op's entry (differentiated by JAX).

    q, k: [..., dk] any float dtype.  Returns (q, k); both float32 when use_qk_l2norm or a scale
    other than the literal 1.0 is given, else exactly the inputs.
    """
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if not (isinstance(scale, (int, float)) and scale == 1.0):
        q = q.astype(jnp.float32) * scale
    return q, k


def round_up(n, multiple: int):
    """Smallest multiple of ``multiple`` that is >= n (works on Python ints and integer arrays)."""
    return (n + multiple - 1) // multiple * multiple


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _check_float(name: str, x) -> None:
    if not jnp.issubdtype(jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")


@dataclasses.dataclass(frozen=True)
class OpShapes:
    batch: int
    length: int
    heads: int
    key_dim: int
    value_dim: int


def validate_qkv(q, k, v, *, op: str) -> OpShapes:
    """Checks q, k: [B, T, H, dk], v: [B, T, H, dv], float dtypes; returns the sizes."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{op}: {name} must have shape [batch, time, heads, dim], "
                             f"got shape {getattr(x, 'shape', None)}")
        _check_float(f"{op}: {name}", x)
    if q.shape != k.shape:
        raise ValueError(f"{op}: q and k must have the same shape, got {q.shape} and {k.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: v must share [batch, time, heads] with q, got {v.shape} vs {q.shape}")
    b, t, h, dk = q.shape
    return OpShapes(b, t, h, dk, v.shape[-1])


def validate_gate(name: str, x, expected: tuple[int, ...], op: str) -> None:
    if x is None:
        return
    if tuple(x.shape) != expected:
        raise ValueError(f"{op}: {name} must have shape {list(expected)}, got {list(x.shape)}")
    _check_float(f"{op}: {name}", x)


# ----------------------------------------------------------------------------------------------
# Packed layouts
# ----------------------------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Where the segments of a chunk-aligned packed stream are.

    Attributes:
      chunk_segment: int32 [B, num_chunks]; segment index of each chunk within its row, -1 if unused.
      num_segments: static number of segments per row (the size of initial / final state arrays).
      chunk_size: static chunk length C; the stream length is num_chunks * C.
    """
    chunk_segment: jax.Array
    num_segments: int = dataclasses.field(metadata=dict(static=True))
    chunk_size: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_chunks(self) -> int:
        return self.chunk_segment.shape[1]

    def chunk_first(self) -> jax.Array:
        """bool [B, num_chunks]: the chunk starts a segment (or is unused: its state starts at zero)."""
        seg = self.chunk_segment
        prev = jnp.pad(seg[:, :-1], ((0, 0), (1, 0)), constant_values=-2)
        return (seg != prev) | (seg < 0)

    def chunk_last(self) -> jax.Array:
        """bool [B, num_chunks]: the chunk ends a (used) segment."""
        seg = self.chunk_segment
        nxt = jnp.pad(seg[:, 1:], ((0, 0), (0, 1)), constant_values=-2)
        return (seg != nxt) & (seg >= 0)

    def token_view(self) -> tuple[jax.Array, jax.Array]:
        """Per-token (start [B, L] bool, segment [B, L] int32) for token-by-token references."""
        c = self.chunk_size
        first = self.chunk_first()
        start = jnp.zeros(first.shape + (c,), bool).at[..., 0].set(first).reshape(first.shape[0], -1)
        segment = jnp.repeat(self.chunk_segment, c, axis=1)
        return start, segment


def rows_layout(batch: int, length: int, chunk_size: int) -> PackedLayout:
    """Layout for B independent rows of T tokens: one segment per row, padded to whole chunks."""
    num_chunks = max(1, -(-length // chunk_size))
    return PackedLayout(jnp.zeros((batch, num_chunks), jnp.int32), 1, chunk_size)


def pad_time(x: jax.Array | None, length: int) -> jax.Array | None:
    """Zero-pads axis 1 of x to ``length``."""
    if x is None or x.shape[1] == length:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VarlenPacking:
    """How the tokens of a ``cu_seqlens`` batch (one row, N sequences) map onto a chunk-aligned stream.

    Attributes:
      positions: int32 [T]; slot of each input token in the aligned stream.
      layout: the aligned stream's PackedLayout (one row, N segments).
    """
    positions: jax.Array
    layout: PackedLayout


def varlen_packing(cu_seqlens: jax.Array, total: int, chunk_size: int) -> VarlenPacking:
    """Aligns each sequence of a cu_seqlens batch to whole chunks (static size T + N*(C-1), rounded).

    Args:
      cu_seqlens: int [N+1], nondecreasing, cu_seqlens[0] == 0 and cu_seqlens[-1] == total.
        Values may be traced: a change of lengths never recompiles.
      total: static number of tokens T.
    """
    cu = cu_seqlens.astype(jnp.int32)
    n = cu.shape[0] - 1
    c = chunk_size
    lengths = cu[1:] - cu[:-1]
    padded = round_up(lengths, c)
    aligned_off = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(padded)[:-1]])
    t = jnp.arange(total, dtype=jnp.int32)
    seq_of_token = jnp.searchsorted(cu, t, side="right") - 1
    seq_of_token = jnp.clip(seq_of_token, 0, n - 1)
    positions = aligned_off[seq_of_token] + (t - cu[seq_of_token])
    num_chunks = max(1, round_up(total + n * (c - 1), c) // c)
    chunk_start = jnp.arange(num_chunks, dtype=jnp.int32) * c
    seg = jnp.searchsorted(aligned_off, chunk_start, side="right") - 1
    seg = jnp.clip(seg, 0, n - 1)
    in_use = chunk_start < aligned_off[seg] + padded[seg]
    chunk_segment = jnp.where(in_use, seg, -1)[None]
    return VarlenPacking(positions, PackedLayout(chunk_segment, n, c))


def validate_cu_seqlens(cu_seqlens, batch: int, total: int, op: str) -> None:
    """Static checks (shape, dtype, batch == 1) and, when concrete, value checks."""
    if batch != 1:
        raise ValueError(f"{op}: with cu_seqlens the batch size must be 1 (sequences are packed "
                         f"along time), got batch {batch}")
    if getattr(cu_seqlens, "ndim", None) != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"{op}: cu_seqlens must be a 1-D array of N+1 offsets, got shape "
                         f"{getattr(cu_seqlens, 'shape', None)}")
    if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
        raise TypeError(f"{op}: cu_seqlens must be integer, got {cu_seqlens.dtype}")
    if isinstance(cu_seqlens, jax.core.Tracer):
        return
    cu = np.asarray(cu_seqlens)
    if cu[0] != 0 or cu[-1] != total or np.any(np.diff(cu) < 0):
        raise ValueError(f"{op}: cu_seqlens must start at 0, be nondecreasing and end at the number of "
                         f"tokens ({total}); got {cu.tolist()}")
