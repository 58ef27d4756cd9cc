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
  forward:  W shifted loads of x (of the input part that holds the tile's channels, where x
            comes in parts: the MoM layer's q and k|v), one store of SiLU(acc) in x's dtype
            (with ``splits``, into the output array of the part that holds the tile's channels:
            q, k, v come out separate);
  backward: two passes.  First dacc = dy * SiLU'(acc) (the forward's loads plus dy, read from
            the part's cotangent; for a normalised part dy goes through the norm's Jacobian
            first, from the recomputed tile), stored in x's dtype; then for each shift s the
            tile of dacc at rows t+s (masked by the segment restarts):
            dx[t] = sum_s w[W-1-s] dacc[t+s]; each program walks ``dx_group`` row tiles
            (default up to four) and the weight gradient leaves as one partial sum
            sum_t x[t] dacc[t+s] per program, [B, L / (block_l * group), W, C] float32,
            summed in XLA.
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
    """Tiling of the short-conv kernels (hashable; tiles and warps are powers of two).

    block_l, block_c: time steps and channels of one tile (one program).  num_warps: per program.
    dx_tiles: row tiles one program of the dx / weight-gradient pass walks (the largest divisor
      of the stream's tile count up to it, ``dx_group``); the weight gradient's column sums then
      run once per walk instead of once per tile.  H100, the MoM stream's conv fwd+bwd queued:
      1 / 4 / 10 tiles 1.955 / 1.997 / 1.983 ms (before session 15: 2.11); the layer A/B ran
      with 4 (benchmarks/NOTES.md session 15).
    """
    block_l: int = 64
    block_c: int = 64
    num_warps: int = 4
    dx_tiles: int = 4

    def __post_init__(self):
        for name in ("block_l", "block_c", "num_warps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"ConvConfig.{name} must be a power of two, got {v!r}")
        tiles = self.dx_tiles
        if isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1:
            raise ValueError(f"ConvConfig.dx_tiles must be a positive integer, got {tiles!r}")

    def dx_group(self, n_tiles: int) -> int:
        """Row tiles per program of the dx pass over ``n_tiles`` tiles: the largest divisor of
        n_tiles that is at most dx_tiles (every program walks the same number)."""
        return max(g for g in range(1, min(self.dx_tiles, n_tiles) + 1) if n_tiles % g == 0)


_config = [ConvConfig()]


def set_default_config(config: ConvConfig) -> None:
    """Replaces the tiling ``short_conv`` uses when called without one (the layers' calls;
    benchmarks use this)."""
    _config[0] = config


def get_default_config() -> ConvConfig:
    return _config[0]


def _silu_and_grad(acc):
    sig = jax.nn.sigmoid(acc)
    return acc * sig, sig * (1.0 + acc * (1.0 - sig))


def _tile(ref, b, rows, cols, length):
    """ref[b, rows, cols] as float32 for a row index vector that may leave [0, length): rows
    are clamped into range (the caller masks the rows that were out of it)."""
    return ref[b, jnp.clip(rows, 0, length - 1), cols].astype(F32)


def _pre_activation(x_ref, rank, rows, b, x_cols, taps, length):
    """acc[rows] = sum_s tap_s * x[rows - s] where rank[rows] >= s (and rows - s >= 0); x_cols:
    the tile's channels in x_ref (an input part), taps: their weights."""
    acc = jnp.zeros((rows.shape[0], x_cols.size), F32)
    for s, tap in enumerate(taps):
        keep = ((rank >= s) & (rows >= s))[:, None]
        acc = acc + jnp.where(keep, _tile(x_ref, b, rows - s, x_cols, length) * tap, 0.0)
    return acc


def _taps(w_ref, cols, width):
    """[1, block_c] weight of shift s (s = 0: the current token), for s < width."""
    return [w_ref[width - 1 - s, cols][None, :] for s in range(width)]


def _part_pairs(c, block_c, in_parts, out_parts):
    """(input part, its column block, output part, its column block, branch condition) for every
    pair of an input part (first channel, channels) and an output part (first channel,
    channels, ...) that share channels, static; channels are whole blocks.  A program (channel
    block c) runs the one branch whose condition holds.  The condition is None where that pair
    covers every block (one input, one output)."""
    pairs = []
    for i, (in_start, in_width) in enumerate(in_parts):
        for o, (out_start, out_width, *_) in enumerate(out_parts):
            lo, hi = max(in_start, out_start), min(in_start + in_width, out_start + out_width)
            if lo >= hi:
                continue
            cond = None
            if len(in_parts) > 1 or len(out_parts) > 1:
                cond = (c >= lo // block_c) & (c < hi // block_c)
            pairs.append((i, c - in_start // block_c, o, c - out_start // block_c, cond))
    return pairs


def _branch(cond, body):
    if cond is None:
        body()
    else:
        pl.when(cond)(body)


def _fwd_kernel(*refs, n_in, width, block_l, block_c, activation, length, in_parts, parts,
                backward):
    """Forward tile: SiLU(acc) (or acc) into the output of the part holding this channel block;
    with ``backward`` (refs after the inputs = one dy per part, then dacc) the backward's first
    pass instead: dacc = dy * SiLU'(acc), stored in x's dtype into the packed dacc.

    refs: the n_in input parts (x), rank, weight, then the outputs.  in_parts: ((first channel,
    channels), ...) of the inputs; parts: ((first channel, channels, scale), ...) of each output
    (each dy), static; channels are whole blocks.  scale None: the part is SiLU(acc); a number
    s: each row of the tile (one head: block_c = head_dim) is L2-normalised and scaled,
    y = s * u / sqrt(|u|^2 + eps) with u = SiLU(acc), and the backward applies that Jacobian to
    dy before SiLU's.  One input and one output part: this program's tiles; else whole-array
    refs, stored under a branch per (input, output) pair.
    """
    x_refs, (rank_ref, w_ref), refs = refs[:n_in], refs[n_in:n_in + 2], refs[n_in + 2:]
    b, j, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = j * block_l + jnp.arange(block_l)
    taps = _taps(w_ref, pl.ds(c * block_c, block_c), width)
    rank = rank_ref[b, pl.ds(j * block_l, block_l)]
    tile_rows = pl.ds(j * block_l, block_l)
    single = len(in_parts) == 1 and len(parts) == 1

    def pre_activation(i, in_block):
        return _pre_activation(x_refs[i], rank, rows, b, pl.ds(in_block * block_c, block_c), taps,
                               length)

    if backward:
        dy_refs, (o_ref,) = refs[:len(parts)], refs[len(parts):]

        def dacc(acc, dy, scale):
            u, grad = _silu_and_grad(acc)
            dy = dy.astype(F32)
            if scale is not None:   # the L2-norm's Jacobian, each row of the tile one head
                dy = l2norm_vjp(u, l2norm_rstd(u)[1], dy * scale)
            return (dy * grad).astype(o_ref.dtype)

        for i, in_block, o, out_block, cond in _part_pairs(c, block_c, in_parts, parts):
            def _(i=i, in_block=in_block, o=o, out_block=out_block):
                dy = (dy_refs[0][...] if single else
                      dy_refs[o][b, tile_rows, pl.ds(out_block * block_c, block_c)])
                o_ref[...] = dacc(pre_activation(i, in_block), dy, parts[o][2])
            _branch(cond, _)
        return

    def feature(acc, scale):
        out = _silu_and_grad(acc)[0] if activation else acc
        return out if scale is None else l2norm_rstd(out)[0] * scale

    for i, in_block, o, out_block, cond in _part_pairs(c, block_c, in_parts, parts):
        def _(i=i, in_block=in_block, o=o, out_block=out_block):
            y = feature(pre_activation(i, in_block), parts[o][2]).astype(refs[o].dtype)
            if single:
                refs[0][...] = y
            else:
                refs[o][b, tile_rows, pl.ds(out_block * block_c, block_c)] = y
        _branch(cond, _)


def _bwd_kernel(*refs, n_in, width, block_l, block_c, length, in_parts, group):
    """Backward from dacc (the cotangent of the pre-activation) over ``group`` consecutive row
    tiles (program (b, j, c): tiles j*group ... j*group + group - 1 of channel block c): per tile
    dx[t] = sum_s tap_s * dacc[t+s] where the output at t+s reads x[t] (rank[t+s] >= s); the
    weight gradient's products x[t] * dacc[t+s] (masked alike) summed elementwise over the tiles,
    then over rows once: one partial sum per program.  refs: the n_in input parts, rank, weight,
    dacc, then one dx per input part, dw [B, tiles / group, W, C] float32 (whole arrays).

    Per tile every load comes first (x, then the shifted dacc tiles), then dx's store; the column
    sums after the walk.  The order matters on an H100 (MoM stream, conv fwd+bwd queued, walks
    of 4 tiles): this one 2.00 ms, x loaded after dx's store 2.24, the pre-session-15 kernel
    (one tile, x loaded after dx's arithmetic, the sums before dx's store) 2.11 (NOTES.md
    session 15)."""
    x_refs, (rank_ref, w_ref, dacc_ref) = refs[:n_in], refs[n_in:n_in + 3]
    dx_refs, dw_ref = refs[n_in + 3:2 * n_in + 3], refs[2 * n_in + 3]
    b, j, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    cols = pl.ds(c * block_c, block_c)
    taps = _taps(w_ref, cols, width)
    all_channels = ((0, w_ref.shape[1]),)     # one output: dx goes to the input's own part
    for i, in_block, _o, _ob, cond in _part_pairs(c, block_c, in_parts, all_channels):
        def _(i=i, in_block=in_block):
            in_cols = pl.ds(in_block * block_c, block_c)

            def tile(t, sums):
                first = (j * group + t) * block_l
                rows = first + jnp.arange(block_l)
                tile_rows = pl.ds(first, block_l)
                x0 = x_refs[i][b, tile_rows, in_cols].astype(F32)
                daccs = []
                for s in range(width):
                    out_rows = rows + s
                    rank = rank_ref[b, jnp.minimum(out_rows, length - 1)]
                    keep = ((out_rows < length) & (rank >= s))[:, None]
                    daccs.append(jnp.where(keep, _tile(dacc_ref, b, out_rows, cols, length), 0.0))
                dx = daccs[0] * taps[0]
                for s in range(1, width):
                    dx = dx + daccs[s] * taps[s]
                dx_refs[i][b, tile_rows, in_cols] = dx.astype(dx_refs[i].dtype)
                return tuple(acc + d * x0 for acc, d in zip(sums, daccs))

            zero = jnp.zeros((block_l, block_c), F32)
            sums = jax.lax.fori_loop(0, group, tile, (zero,) * width)
            for s in range(width):
                dw_ref[b, j, width - 1 - s, cols] = jnp.sum(sums[s], axis=0)
        _branch(cond, _)


def _whole(x):
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _interpret() -> bool:
    return jax.default_backend() == "cpu"


def _tiles(config: ConvConfig):
    return pl.BlockSpec((None, config.block_l, config.block_c), lambda i, j, c: (i, j, c))


def _params(config: ConvConfig):
    return pltriton.CompilerParams(num_warps=config.num_warps, num_stages=1)


def _in_parts(xs) -> tuple:
    """((first channel, channels), ...) of the input parts."""
    bounds = [0]
    for x in xs:
        bounds.append(bounds[-1] + x.shape[2])
    return tuple((lo, hi - lo) for lo, hi in zip(bounds, bounds[1:]))


def _fwd_call(xs, rank, weight, activation, config: ConvConfig, parts, dys=None):
    """SiLU(conv) (or the conv) in x's dtype, one array per part (normalised where its scale
    says); with dys (one per part), dacc = the cotangent of the pre-activation in x's dtype,
    packed [B, L, C].  xs: the input parts [B, L, C_i]; parts: as ``_fwd_kernel``'s, whole
    ``config.block_c`` blocks."""
    (b, l, _), width = xs[0].shape, weight.shape[0]
    c, dtype = weight.shape[1], xs[0].dtype
    in_parts = _in_parts(xs)
    kernel = functools.partial(_fwd_kernel, n_in=len(xs), width=width, block_l=config.block_l,
                               block_c=config.block_c, activation=activation, length=l,
                               in_parts=in_parts, parts=parts, backward=dys is not None)
    part_shapes = [jax.ShapeDtypeStruct((b, l, n), dtype) for _, n, _ in parts]
    single = len(parts) == 1 and len(xs) == 1
    part_specs = [_tiles(config)] if single else [_whole(p) for p in part_shapes]
    specs = [_whole(x) for x in xs] + [_whole(rank), _whole(weight)]
    if dys is None:
        args, out_shape, out_specs = (), tuple(part_shapes), tuple(part_specs)
    else:
        args = tuple(dys)
        out_shape, out_specs = jax.ShapeDtypeStruct((b, l, c), dtype), _tiles(config)
        specs += part_specs
    return pl.pallas_call(
        kernel, out_shape=out_shape,
        grid=(b, l // config.block_l, c // config.block_c), in_specs=specs,
        out_specs=out_specs, compiler_params=_params(config), interpret=_interpret(),
        name="short_conv_fwd" if dys is None else "short_conv_bwd_dacc")(*xs, rank, weight,
                                                                          *args)


def _bwd_call(xs, rank, weight, dys, activation, configs, parts):
    """(dx per input part in x's dtype, dweight float32 [W, C]) from one dy per part.  configs:
    (tiles of the dacc pass, tiles of the dx / dweight pass)."""
    (b, l, _), (width, c) = xs[0].shape, weight.shape
    feature_config, config = configs
    n_tiles = l // config.block_l
    group = config.dx_group(n_tiles)
    if activation:
        dacc = _fwd_call(xs, rank, weight, activation, feature_config, parts, dys=dys)
    else:
        dacc = dys[0] if len(dys) == 1 else jnp.concatenate(dys, axis=-1)
    kernel = functools.partial(_bwd_kernel, n_in=len(xs), width=width, block_l=config.block_l,
                               block_c=config.block_c, length=l, in_parts=_in_parts(xs),
                               group=group)
    dw_shape = jax.ShapeDtypeStruct((b, n_tiles // group, width, c), F32)
    dx_shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs]
    *dxs, dw_parts = pl.pallas_call(
        kernel, out_shape=(*dx_shapes, dw_shape),
        grid=(b, n_tiles // group, c // config.block_c),
        in_specs=[_whole(x) for x in xs] + [_whole(rank), _whole(weight), _whole(dacc)],
        out_specs=(*[_whole(d) for d in dx_shapes], _whole(dw_shape)),
        compiler_params=_params(config), interpret=_interpret(),
        name="short_conv_bwd")(*xs, rank, weight, dacc)
    return tuple(dxs), jnp.sum(dw_parts, axis=(0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _short_conv(xs, weight, rank, activation: bool, configs, parts):
    """The kernels on whole tiles of both configs (feature passes, dx pass); weight float32.
    xs: tuple of input parts along channels; parts: ((first channel, channels, scale or None),
    ...) covering C; one output array per part."""
    return _fwd_call(xs, rank, weight, activation, configs[0], parts)


def _short_conv_fwd(xs, weight, rank, activation, configs, parts):
    return _fwd_call(xs, rank, weight, activation, configs[0], parts), (xs, weight, rank)


def _short_conv_bwd(activation, configs, parts, res, dys):
    xs, weight, rank = res
    dxs, dw = _bwd_call(xs, rank, weight, dys, activation, configs, parts)
    return dxs, dw, None


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
      x: [B, L, C] float (bf16 or f32) raw projections, or a sequence of parts [B, L, C_i] (one
        dtype) that make x along the channels: where every part is a whole number of tiles the
        kernels read them as they are (no concatenation; the backward returns one dx per part),
        else they are concatenated first.
      weight: [W, C] float (weight[W-1] multiplies the current token).
      rank: int [B, L], index of each slot inside its segment (taps reaching before it read zero;
        a negative rank makes the slot's output exactly zero).
      activation: apply SiLU (else the plain conv).
      config: tiling (default ``get_default_config()``: ``ConvConfig()``, the best of the H100
        sweeps in NOTES_kernels.md, unless ``set_default_config`` replaced it).
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
      differentiable in x (each part) and weight (dx in x's dtype, dweight in weight's dtype).
      GPU (Triton); interpret mode on CPU.
    """
    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    if not xs or any(p.ndim != 3 or p.shape[:2] != xs[0].shape[:2] or p.dtype != xs[0].dtype
                     for p in xs):
        raise ValueError(f"short_conv: x must be [B, L, C] or parts [B, L, C_i] of one dtype, "
                         f"got {[(p.shape, str(p.dtype)) for p in xs]}")
    c = sum(p.shape[2] for p in xs)
    if weight.ndim != 2 or weight.shape[1] != c:
        raise ValueError(f"short_conv: need x [B, L, C] and weight [W, C], got x "
                         f"{[p.shape for p in xs]}, weight {weight.shape}")
    if rank.shape != xs[0].shape[:2]:
        raise ValueError(f"short_conv: rank must be [B, L] = {list(xs[0].shape[:2])}, got "
                         f"{list(rank.shape)}")
    config = config or get_default_config()
    l, dtype = xs[0].shape[1], xs[0].dtype
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
    if len(xs) > 1 and (not fused or any(p.shape[2] % block_c for p in xs)):
        return short_conv(jnp.concatenate(xs, axis=-1), weight, rank, activation=activation,
                          config=config, splits=splits, head_norm=head_norm)
    if not fused or (splits and (any(v % block_c for v in bounds) or 0 in widths)):
        out = short_conv(xs, weight, rank, activation=activation, config=config)
        parts = jnp.split(out, list(splits), axis=-1) if splits else [out]
        if head_norm is not None:
            parts = head_norm_parts(parts, head_norm, dtype)
        return parts if splits else parts[0]
    # Without splits: one part, C rounded up to whole blocks (one input then: parts of several
    # inputs are whole blocks).
    parts = tuple(zip(bounds[:-1], widths, scales)) if splits else ((0, c + -c % block_c,
                                                                     scales[0]),)
    block_l = max(config.block_l, feature_config.block_l)
    pad_l, pad_c = -l % block_l, -c % block_c
    if pad_l or pad_c:   # ragged edges: zero rows after the stream (never read by earlier rows)
        xs = [jnp.pad(p, ((0, 0), (0, pad_l), (0, pad_c if i == len(xs) - 1 else 0)))
              for i, p in enumerate(xs)]
        rank = jnp.pad(rank, ((0, 0), (0, pad_l)))
        weight = jnp.pad(weight, ((0, 0), (0, pad_c)))
    outs = _short_conv(tuple(xs), weight.astype(F32), rank.astype(jnp.int32), bool(activation),
                       (feature_config, config), parts)
    if pad_l or pad_c:
        outs = [o[:, :l, :c] for o in outs]
    return list(outs) if splits else outs[0]
