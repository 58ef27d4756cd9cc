"""Causal depthwise short conv + SiLU over a packed stream, forward and backward (Pallas, Triton).

Computes what ``mom_jax.layers.common.short_conv_packed`` computes,

    acc[b, t, c] = sum_{s < W} weight[W-1-s, c] * x[b, t-s, c] * [rank[b, t] >= s]
    out[b, t, c] = SiLU(acc[b, t, c])            (acc itself with activation=False)

(``rank`` = index of slot t inside its segment, so the taps restart at every segment start), in the
stream's own [B, L, C] layout; with ``head_norm`` some parts (the gated delta rule's q and k) come
out as s * out / |out| per head, normalised in float32 before rounding, the norm's Jacobian applied
in the backward's first pass (the layers' q/k features: no XLA pass over q, k in either
direction).  Written in XLA (``short_conv_packed``'s shifted adds) the conv was laid out
channel-major inside the layers, and the layer paid for transposes of the projections into and the
features out of that layout, forward and backward (1.3 ms of a GDN layer's 5.5 ms and 1.7 ms of a
MoM layer's 14 ms fwd+bwd on an H100; benchmarks/NOTES.md).

Kernels (grid over row x time block x channel block; every load a [block_l, block_c] tile):
  forward:  W shifted loads of x, one store of SiLU(acc) in x's dtype (with ``splits``, into the
            output array of the part that holds the tile's channels: q, k, v come out separate);
  backward: two passes.  First dacc = dy * SiLU'(acc) (the forward's loads plus dy, read from
            the part's cotangent; for a normalised part dy goes through the norm's Jacobian
            first, from the recomputed tile), stored in x's dtype; then for each shift s the
            tile of dacc at rows t+s (masked by the segment restarts):
            dx[t] = sum_s w[W-1-s] dacc[t+s]; the weight gradient leaves as per-tile partial
            sums sum_t x[t] dacc[t+s], [B, L / block_l, W, C] float32, summed in XLA.
Every pass is bound by HBM traffic (on an H100 the forward at the MoM stream's size, 315 MB in and
out, takes 1.1-1.2x an XLA elementwise copy of x); benchmarks/NOTES_kernels.md has the sweep and
the one-pass backward that lost.
Shifted tiles index rows with a clamped index vector and mask what fell outside the stream, so
nothing is padded when L and C are whole tiles (interpret mode on CPU, the tests, runs the same
code).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mom_jax.ops.common import head_norm_parts, l2norm_rstd, l2norm_vjp

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ConvConfig:
    """Tiling of the short-conv kernels (hashable; powers of two).

    block_l, block_c: time steps and channels of one tile (one program).  num_warps: per program.
    """
    block_l: int = 64
    block_c: int = 64
    num_warps: int = 4

    def __post_init__(self):
        for name in ("block_l", "block_c", "num_warps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"ConvConfig.{name} must be a power of two, got {v!r}")


def _silu_and_grad(acc):
    sig = jax.nn.sigmoid(acc)
    return acc * sig, sig * (1.0 + acc * (1.0 - sig))


def _tile(ref, b, rows, cols, length):
    """ref[b, rows, cols] as float32 for a row index vector that may leave [0, length): rows
    are clamped into range (the caller masks the rows that were out of it)."""
    return ref[b, jnp.clip(rows, 0, length - 1), cols].astype(F32)


def _pre_activation(x_ref, rank, rows, b, cols, taps, length):
    """acc[rows] = sum_s tap_s * x[rows - s] where rank[rows] >= s (and rows - s >= 0)."""
    acc = jnp.zeros((rows.shape[0], cols.size), F32)
    for s, tap in enumerate(taps):
        keep = ((rank >= s) & (rows >= s))[:, None]
        acc = acc + jnp.where(keep, _tile(x_ref, b, rows - s, cols, length) * tap, 0.0)
    return acc


def _taps(w_ref, cols, width):
    """[1, block_c] weight of shift s (s = 0: the current token), for s < width."""
    return [w_ref[width - 1 - s, cols][None, :] for s in range(width)]


def _fwd_kernel(x_ref, rank_ref, w_ref, *refs, width, block_l, block_c, activation, length,
                parts, backward):
    """Forward tile: SiLU(acc) (or acc) into the output of the part holding this channel block;
    with ``backward`` (refs = one dy per part, then dacc) the backward's first pass instead:
    dacc = dy * SiLU'(acc), stored in x's dtype into the packed dacc.

    parts: ((first channel, channels, scale), ...) of each output (each dy), static; channels
    are whole blocks.  scale None: the part is SiLU(acc); a number s: each row of the tile (one
    head: block_c = head_dim) is L2-normalised and scaled, y = s * u / sqrt(|u|^2 + eps) with
    u = SiLU(acc), and the backward applies that Jacobian to dy before SiLU's.  One part: its
    output is this program's tile; several: whole-array refs, stored under a branch.
    """
    b, j, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = j * block_l + jnp.arange(block_l)
    cols = pl.ds(c * block_c, block_c)
    acc = _pre_activation(x_ref, rank_ref[b, pl.ds(j * block_l, block_l)], rows, b, cols,
                          _taps(w_ref, cols, width), length)
    n = len(parts)
    tile_rows = pl.ds(j * block_l, block_l)
    if backward:
        dy_refs, (o_ref,) = refs[:n], refs[n:]
        u, grad = _silu_and_grad(acc)

        def dacc(dy, scale):
            dy = dy.astype(F32)
            if scale is not None:   # the L2-norm's Jacobian, each row of the tile one head
                dy = l2norm_vjp(u, l2norm_rstd(u)[1], dy * scale)
            return (dy * grad).astype(o_ref.dtype)

        if n == 1:
            o_ref[...] = dacc(dy_refs[0][...], parts[0][2])
            return
        for dy_ref, (start, width_c, scale) in zip(dy_refs, parts):
            first = start // block_c

            @pl.when((c >= first) & (c < first + width_c // block_c))
            def _(dy_ref=dy_ref, first=first, scale=scale):
                o_ref[...] = dacc(dy_ref[b, tile_rows, pl.ds((c - first) * block_c, block_c)],
                                  scale)
        return
    out = _silu_and_grad(acc)[0] if activation else acc

    def feature(scale):
        return out if scale is None else l2norm_rstd(out)[0] * scale

    if n == 1:
        refs[0][...] = feature(parts[0][2]).astype(refs[0].dtype)
        return
    for o_ref, (start, width_c, scale) in zip(refs, parts):
        first = start // block_c

        @pl.when((c >= first) & (c < first + width_c // block_c))
        def _(o_ref=o_ref, first=first, scale=scale):
            o_ref[b, tile_rows, pl.ds((c - first) * block_c, block_c)] = (
                feature(scale).astype(o_ref.dtype))


def _bwd_kernel(x_ref, rank_ref, w_ref, dacc_ref, dx_ref, dw_ref, *, width, block_l, block_c,
                length):
    """Backward tile from dacc (the cotangent of the pre-activation): dx[t] = sum_s tap_s *
    dacc[t+s] where the output at t+s reads x[t] (rank[t+s] >= s), and per-tile partial sums of
    the weight gradient sum_t x[t] dacc[t+s] (masked alike)."""
    b, j, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = j * block_l + jnp.arange(block_l)
    cols = pl.ds(c * block_c, block_c)
    taps = _taps(w_ref, cols, width)
    x0 = _tile(x_ref, b, rows, cols, length)
    dx = jnp.zeros((block_l, block_c), F32)
    for s in range(width):
        out_rows = rows + s
        rank = rank_ref[b, jnp.minimum(out_rows, length - 1)]
        keep = ((out_rows < length) & (rank >= s))[:, None]
        dacc = jnp.where(keep, _tile(dacc_ref, b, out_rows, cols, length), 0.0)
        dx = dx + dacc * taps[s]
        dw_ref[b, j, width - 1 - s, cols] = jnp.sum(dacc * x0, axis=0)
    dx_ref[...] = dx.astype(dx_ref.dtype)


def _whole(x):
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _interpret() -> bool:
    return jax.default_backend() == "cpu"


def _tiles(config: ConvConfig):
    return pl.BlockSpec((None, config.block_l, config.block_c), lambda i, j, c: (i, j, c))


def _params(config: ConvConfig):
    return pltriton.CompilerParams(num_warps=config.num_warps, num_stages=1)


def _fwd_call(x, rank, weight, activation, config: ConvConfig, parts, dys=None):
    """SiLU(conv) (or the conv) in x's dtype, one array per part (normalised where its scale
    says); with dys (one per part), dacc = the cotangent of the pre-activation in x's dtype,
    packed [B, L, C].  parts: as ``_fwd_kernel``'s, whole ``config.block_c`` blocks."""
    (b, l, c), width = x.shape, weight.shape[0]
    kernel = functools.partial(_fwd_kernel, width=width, block_l=config.block_l,
                               block_c=config.block_c, activation=activation, length=l,
                               parts=parts, backward=dys is not None)
    part_shapes = [jax.ShapeDtypeStruct((b, l, n), x.dtype) for _, n, _ in parts]
    part_specs = [_tiles(config)] if len(parts) == 1 else [_whole(p) for p in part_shapes]
    specs = [_whole(x), _whole(rank), _whole(weight)]
    if dys is None:
        args, out_shape, out_specs = (), tuple(part_shapes), tuple(part_specs)
    else:
        args, out_shape, out_specs = tuple(dys), jax.ShapeDtypeStruct(x.shape, x.dtype), _tiles(
            config)
        specs += part_specs
    return pl.pallas_call(
        kernel, out_shape=out_shape,
        grid=(b, l // config.block_l, c // config.block_c), in_specs=specs,
        out_specs=out_specs, compiler_params=_params(config), interpret=_interpret(),
        name="short_conv_fwd" if dys is None else "short_conv_bwd_dacc")(x, rank, weight, *args)


def _bwd_call(x, rank, weight, dys, activation, configs, parts):
    """(dx in x's dtype, dweight float32 [W, C]) from one dy per part.  configs: (tiles of the
    dacc pass, tiles of the dx / dweight pass)."""
    (b, l, c), width = x.shape, weight.shape[0]
    feature_config, config = configs
    n_blocks = l // config.block_l
    if activation:
        dacc = _fwd_call(x, rank, weight, activation, feature_config, parts, dys=dys)
    else:
        dacc = dys[0] if len(dys) == 1 else jnp.concatenate(dys, axis=-1)
    kernel = functools.partial(_bwd_kernel, width=width, block_l=config.block_l,
                               block_c=config.block_c, length=l)
    dw_shape = jax.ShapeDtypeStruct((b, n_blocks, width, c), F32)
    dx, dw_parts = pl.pallas_call(
        kernel, out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype), dw_shape),
        grid=(b, n_blocks, c // config.block_c),
        in_specs=[_whole(x), _whole(rank), _whole(weight), _whole(dacc)],
        out_specs=(_tiles(config), _whole(dw_shape)),
        compiler_params=_params(config), interpret=_interpret(),
        name="short_conv_bwd")(x, rank, weight, dacc)
    return dx, jnp.sum(dw_parts, axis=(0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _short_conv(x, weight, rank, activation: bool, configs, parts):
    """The kernels on whole tiles of both configs (feature passes, dx pass); weight float32.
    parts: ((first channel, channels, scale or None), ...) covering C; one array per part."""
    return _fwd_call(x, rank, weight, activation, configs[0], parts)


def _short_conv_fwd(x, weight, rank, activation, configs, parts):
    return _fwd_call(x, rank, weight, activation, configs[0], parts), (x, weight, rank)


def _short_conv_bwd(activation, configs, parts, res, dys):
    x, weight, rank = res
    dx, dw = _bwd_call(x, rank, weight, dys, activation, configs, parts)
    return dx, dw, None


_short_conv.defvjp(_short_conv_fwd, _short_conv_bwd)


def head_tiles(config: ConvConfig, head_dim: int) -> ConvConfig:
    """Tiles of the passes that L2-normalise heads: one head per tile (block_c = head_dim), as
    many rows as keep ``config``'s tile size (at least 8)."""
    return dataclasses.replace(
        config, block_c=head_dim,
        block_l=max(8, config.block_l * config.block_c // head_dim))


def short_conv(x, weight, rank, *, activation: bool = True, config: ConvConfig | None = None,
               splits: tuple[int, ...] = (), head_norm=None):
    """SiLU(causal depthwise conv) of a packed stream, restarting at every segment start.

    Args:
      x: [B, L, C] float (bf16 or f32) raw projections.
      weight: [W, C] float (weight[W-1] multiplies the current token).
      rank: int [B, L], index of each slot inside its segment (taps reaching before it read zero;
        a negative rank makes the slot's output exactly zero).
      activation: apply SiLU (else the plain conv).
      config: tiling (default ``ConvConfig()``, the best of the H100 sweep in NOTES_kernels.md).
      splits: channel indices to split the output at, as ``jnp.split(out, splits, -1)``.  Where
        every part is a whole number of ``block_c`` channels the kernel writes each part as its
        own array (no copies to split it; the backward takes the parts' cotangents as they come,
        without concatenating them); otherwise the packed output is split.
      head_norm: None, or (head_dim, scales) with one scale (a float, or None) per part: a part
        with a scale s comes out as s * l2norm(SiLU(conv)) per head of head_dim channels
        (eps ``L2NORM_EPS``), the gated delta rule's q and k features.  The kernel normalises
        the float32 tile before rounding it (one head per tile, ``head_tiles``) and its backward
        applies the norm's Jacobian in the same pass as SiLU's; it needs activation, a
        power-of-two head_dim >= 16 and parts of whole tiles, else the normalisation runs in
        XLA on the rounded output.
    Returns:
      [B, L, C] in x's dtype (accumulated in float32), or the list of parts with ``splits``;
      differentiable in x and weight (dx in x's dtype, dweight in weight's dtype).  GPU (Triton);
      interpret mode on CPU.
    """
    if x.ndim != 3 or weight.ndim != 2 or weight.shape[1] != x.shape[2]:
        raise ValueError(f"short_conv: need x [B, L, C] and weight [W, C], got x {x.shape}, "
                         f"weight {weight.shape}")
    if rank.shape != x.shape[:2]:
        raise ValueError(f"short_conv: rank must be [B, L] = {list(x.shape[:2])}, got "
                         f"{list(rank.shape)}")
    config = config or ConvConfig()
    _, l, c = x.shape
    bounds = [0, *splits, c]
    if any(lo > hi for lo, hi in zip(bounds, bounds[1:])):
        raise ValueError(f"short_conv: splits must be increasing channel indices in [0, {c}], "
                         f"got {list(splits)}")
    widths = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
    scales = (None,) * len(widths)
    if head_norm is not None:
        head_dim, scales = head_norm[0], tuple(head_norm[1])
        if len(scales) != len(widths):
            raise ValueError(f"short_conv: head_norm needs one scale per part ({len(widths)}), "
                             f"got {len(scales)}")
        if not activation:
            raise ValueError("short_conv: head_norm needs activation=True")
        bad = [w for w, sc in zip(widths, scales) if sc is not None and w % head_dim]
        if bad:
            raise ValueError(f"short_conv: a normalised part's width must be a multiple of "
                             f"head_dim {head_dim}, got {bad}")
    normalise = any(sc is not None for sc in scales)
    fused = not normalise or (head_dim >= 16 and head_dim & (head_dim - 1) == 0)
    feature_config = head_tiles(config, head_dim) if normalise and fused else config
    block_c = max(config.block_c, feature_config.block_c)
    if not fused or (splits and (any(v % block_c for v in bounds) or 0 in widths)):
        out = short_conv(x, weight, rank, activation=activation, config=config)
        parts = jnp.split(out, list(splits), axis=-1) if splits else [out]
        if head_norm is not None:
            parts = head_norm_parts(parts, head_norm, x.dtype)
        return parts if splits else parts[0]
    # Without splits: one part, C rounded up to whole blocks.
    parts = tuple(zip(bounds[:-1], widths, scales)) if splits else ((0, c + -c % block_c,
                                                                     scales[0]),)
    block_l = max(config.block_l, feature_config.block_l)
    pad_l, pad_c = -l % block_l, -c % block_c
    if pad_l or pad_c:   # ragged edges: zero rows after the stream (never read by earlier rows)
        x = jnp.pad(x, ((0, 0), (0, pad_l), (0, pad_c)))
        rank = jnp.pad(rank, ((0, 0), (0, pad_l)))
        weight = jnp.pad(weight, ((0, 0), (0, pad_c)))
    outs = _short_conv(x, weight.astype(F32), rank.astype(jnp.int32), bool(activation),
                       (feature_config, config), parts)
    if pad_l or pad_c:
        outs = [o[:, :l, :c] for o in outs]
    return list(outs) if splits else outs[0]
