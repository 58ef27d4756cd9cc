"""Row-grouped matmul over a packed stream (Pallas, Triton): out[m] = x[m] @ w[group of m].

The MoM layer's routed projections: in the packed stream (``mom_jax.routing``) every chunk of
``group_rows`` slots belongs to one memory (segments are padded to whole chunks), so the k|v
projection of the stream is a matmul whose weight is chosen per row tile.  Projecting the stream
this way does only the routed FLOPs (each token is projected by its k memories and the shared
one), where the dense form projects every token with every memory and then gathers.

    out[m, :] = x[m, :] @ w[g, :, :]    with g = groups[m // group_rows], zero rows where g < 0

Kernels (every dot in float32 accumulation, operands in x's dtype):
  forward (and dx = dout @ w[g]^T, the same kernel on the transposed weights):
    grid (N / block_n, M / block_m); a program loops over K in block_k steps with one [block_m,
    block_k] x [block_k, block_n] dot per step.  A tile of block_m = r * group_rows rows whose r
    groups are all equal (nearly every tile: segments are many chunks long) runs one dot per step;
    a tile across a segment boundary runs one masked dot per group (r times the FLOPs, rare).
    The column axis launches fastest, so a row tile's column programs run side by side and read
    its x rows from L2.
  dw[g] = sum over the chunks c of group g of x[c]^T dout[c]:
    grid (K / block_k, N / block_n, G); a program loops over its group's chunks (``chunk_order``:
    the chunks sorted by group, and each group's first entry), one [group_rows, block_k]^T x
    [group_rows, block_n] dot per chunk.

FLOPs (MoM E4 k2 + shared, B8 T2048, D 1024, N 2048): 2 * 51200 * 1024 * 2048 = 215 GFLOP per
pass (the dense form over all E + 1 memories: 2 * 16384 * 1024 * 10240 = 344).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gated_delta import triton_common as tc

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class GroupedMatmulConfig:
    """Tiling (hashable; powers of two but the stage counts).

    block_m: rows of a forward tile, clamped to [group_rows, 2 * group_rows] (a tile across a
      group boundary runs one masked dot per group, each over the whole tile).  block_n,
      block_k: output columns and reduction depth of a forward step.  dw_block_k, dw_block_n:
      the dw kernel's output tile [dw_block_k, dw_block_n] (its reduction runs over whole
      chunks).  num_warps / num_stages: per program, forward and dw kernels.
    """
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 4
    dw_block_k: int = 128
    dw_block_n: int = 128
    dw_num_warps: int = 4
    dw_num_stages: int = 4

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            stages = f.name.endswith("num_stages")
            if not isinstance(v, int) or v < 1 or (not stages and v & (v - 1)):
                need = "a positive integer" if stages else "a power of two"
                raise ValueError(f"GroupedMatmulConfig.{f.name} must be {need}, got {v!r}")


def _interpret() -> bool:
    return jax.default_backend() == "cpu"


def _params(num_warps, num_stages):
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _dot(a, b, *, ta=False):
    dims = (((0,) if ta else (1,), (0,)), ((), ()))
    precision = jax.lax.Precision.HIGHEST if a.dtype == F32 else None
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def _fwd_kernel(groups_ref, x_ref, w_ref, o_ref, *, block_m, block_n, block_k, group_rows,
                depth):
    """One [block_m, block_n] output tile: row tile i (grid axis 1), column block j (axis 0)."""
    j, i = pl.program_id(0), pl.program_id(1)
    per_tile = block_m // group_rows
    gids = [groups_ref[i * per_tile + s] for s in range(per_tile)]
    cols = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)
    steps = depth // block_k

    def depth_cols(kk):
        return pl.ds(pl.multiple_of(kk * block_k, block_k), block_k)

    uniform = gids[0] >= 0
    for g in gids[1:]:
        uniform = uniform & (g == gids[0])

    @pl.when(uniform)
    def _():
        def step(kk, acc):
            ks = depth_cols(kk)
            return acc + _dot(x_ref[:, ks], w_ref[gids[0], ks, cols])
        acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((block_m, block_n), F32))
        o_ref[...] = acc.astype(o_ref.dtype)

    if per_tile == 1:
        @pl.when(gids[0] < 0)
        def _():
            o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
        return

    @pl.when(jnp.logical_not(uniform))
    def _():
        sub = jax.lax.broadcasted_iota(jnp.int32, (block_m, 1), 0) // group_rows

        def step(kk, acc):
            ks = depth_cols(kk)
            a = x_ref[:, ks]
            for s, g in enumerate(gids):
                a_s = jnp.where((sub == s) & (g >= 0), a, jnp.zeros_like(a))
                acc = acc + _dot(a_s, w_ref[jnp.maximum(g, 0), ks, cols])
            return acc
        acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((block_m, block_n), F32))
        o_ref[...] = acc.astype(o_ref.dtype)


def _fwd_call(x, w, groups, group_rows, config: GroupedMatmulConfig):
    m, depth = x.shape
    n = w.shape[2]
    bm = config.block_m
    bn = min(config.block_n, n)
    bk = min(config.block_k, depth)
    kernel = functools.partial(_fwd_kernel, block_m=bm, block_n=bn, block_k=bk,
                               group_rows=group_rows, depth=depth)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(n // bn, m // bm),
        in_specs=[pl.BlockSpec(groups.shape, lambda j, i: (0,)),
                  pl.BlockSpec((bm, depth), lambda j, i: (i, 0)),
                  pl.BlockSpec(w.shape, lambda j, i: (0, 0, 0))],
        out_specs=pl.BlockSpec((bm, bn), lambda j, i: (i, j)),
        compiler_params=_params(config.num_warps, config.num_stages),
        interpret=_interpret(), name="grouped_matmul")(groups, x, w)


def chunk_order(groups: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
    """(order int32 [C], starts int32 [G + 1]): the chunks sorted by group (stable; groups < 0
    first, then group 0's, ...), and where group g's run starts in ``order`` (starts[G] = C)."""
    order = jnp.argsort(groups, stable=True).astype(jnp.int32)
    below = jnp.sum(groups[None, :] < jnp.arange(num_groups + 1, dtype=groups.dtype)[:, None],
                    axis=1)
    return order, below.astype(jnp.int32)


def _dw_kernel(order_ref, starts_ref, x_ref, dy_ref, dw_ref, *, block_k, block_n, group_rows):
    kb, j, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ks = pl.ds(pl.multiple_of(kb * block_k, block_k), block_k)
    cols = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)

    def step(i, acc):
        rows = pl.ds(pl.multiple_of(order_ref[i] * group_rows, group_rows), group_rows)
        return acc + _dot(x_ref[rows, ks], dy_ref[rows, cols], ta=True)
    acc = jax.lax.fori_loop(starts_ref[g], starts_ref[g + 1], step,
                            jnp.zeros((block_k, block_n), F32))
    dw_ref[...] = acc.astype(dw_ref.dtype)


def _dw_call(x, dy, groups, num_groups, group_rows, config: GroupedMatmulConfig, dtype):
    depth, n = x.shape[1], dy.shape[1]
    bk, bn = min(config.dw_block_k, depth), min(config.dw_block_n, n)
    order, starts = chunk_order(groups, num_groups)
    kernel = functools.partial(_dw_kernel, block_k=bk, block_n=bn, group_rows=group_rows)
    whole = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)   # noqa: E731
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((num_groups, depth, n), dtype),
        grid=(depth // bk, n // bn, num_groups),
        in_specs=[whole(order), whole(starts), whole(x), whole(dy)],
        out_specs=pl.BlockSpec((None, bk, bn), lambda kb, j, g: (g, kb, j)),
        compiler_params=_params(config.dw_num_warps, config.dw_num_stages),
        interpret=_interpret(), name="grouped_matmul_dw")(order, starts, x, dy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped_matmul(x, w, groups, group_rows, config):
    return _fwd_call(x, w, groups, group_rows, config)


def _grouped_matmul_fwd(x, w, groups, group_rows, config):
    return _fwd_call(x, w, groups, group_rows, config), (x, w, groups)


def _grouped_matmul_bwd(group_rows, config, res, dy):
    x, w, groups = res
    dy = dy.astype(x.dtype)
    dx = _fwd_call(dy, jnp.swapaxes(w, 1, 2), groups, group_rows, config)
    dw = _dw_call(x, dy, groups, w.shape[0], group_rows, config, w.dtype)
    return dx, dw, None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_matmul(x: jax.Array, w: jax.Array, groups: jax.Array, group_rows: int, *,
                   config: GroupedMatmulConfig | None = None) -> jax.Array:
    """out[m] = x[m] @ w[groups[m // group_rows]] (zero rows where that group is < 0).

    Args:
      x: [M, K] bf16 or float32; M a multiple of group_rows.
      w: [G, K, N] in x's dtype (cast by the caller).
      groups: int [M // group_rows], the group of each run of group_rows rows (< 0: none).
        Groups >= G are not checked (a caller's bug reads out of bounds).
      group_rows: rows per group entry (the stream's chunk size), a power of two.
      config: tiling (default ``GroupedMatmulConfig()``, the best of the H100 sweep in
        benchmarks/NOTES.md); its stage counts are capped by shared memory (``tile_config``).
    Returns:
      [M, N] in x's dtype, accumulated in float32; differentiable in x and w (dw in w's dtype,
      accumulated in float32 over each group's chunks).  GPU (Triton); interpret mode on CPU.
    """
    if x.ndim != 2 or w.ndim != 3 or w.shape[1] != x.shape[1]:
        raise ValueError(f"grouped_matmul: need x [M, K] and w [G, K, N], got x {x.shape}, "
                         f"w {w.shape}")
    if w.dtype != x.dtype:
        raise ValueError(f"grouped_matmul: w dtype {w.dtype} differs from x dtype {x.dtype}")
    if group_rows < 1 or group_rows & (group_rows - 1) or x.shape[0] % group_rows:
        raise ValueError(f"grouped_matmul: group_rows must be a power of two dividing M = "
                         f"{x.shape[0]}, got {group_rows}")
    if groups.shape != (x.shape[0] // group_rows,):
        raise ValueError(f"grouped_matmul: groups must be [M // group_rows] = "
                         f"[{x.shape[0] // group_rows}], got {list(groups.shape)}")
    config = tile_config(config or GroupedMatmulConfig(), group_rows, x.dtype)
    m, depth = x.shape
    n = w.shape[2]
    blocks = (config.block_n, config.block_k, config.dw_block_k, config.dw_block_n)
    pad_m = -m % config.block_m
    pad_k = _padded(depth, blocks) - depth
    pad_n = _padded(n, blocks) - n
    groups = groups.astype(jnp.int32)
    if pad_m:   # whole tiles: rows of no group after the stream
        x = jnp.pad(x, ((0, pad_m), (0, 0)))
        groups = jnp.pad(groups, (0, pad_m // group_rows), constant_values=-1)
    if pad_k or pad_n:
        x = jnp.pad(x, ((0, 0), (0, pad_k)))
        w = jnp.pad(w, ((0, 0), (0, pad_k), (0, pad_n)))
    out = _grouped_matmul(x, w, groups, group_rows, config)
    return out[:m, :n] if (pad_m or pad_n) else out


def tile_config(config: GroupedMatmulConfig, group_rows: int, dtype,
                smem_budget: int | None = None) -> GroupedMatmulConfig:
    """The tiling the kernels run: block_m clamped to [group_rows, 2 * group_rows], and no more
    pipelining stages than fit the GPU's shared memory (``smem_budget`` bytes, None: the
    device's ``tile_smem_budget``) next to the output tile.  A forward / dx stage buffers a
    [block_m, block_k] and a [block_k, block_n] tile, a dw stage a [group_rows, dw_block_k] and a
    [group_rows, dw_block_n] tile, in ``dtype``: float32 runs at most 2 stages on an H100, and
    the dw kernel at group_rows 128 (chunk 128) 2 instead of 4."""
    size = jnp.dtype(dtype).itemsize
    bm = max(group_rows, min(config.block_m, 2 * group_rows))
    budget = tc.tile_smem_budget() if smem_budget is None else smem_budget
    fwd_stage = (bm * config.block_k + config.block_k * config.block_n) * size
    dw_stage = group_rows * (config.dw_block_k + config.dw_block_n) * size
    fwd_out, dw_out = bm * config.block_n * size, config.dw_block_k * config.dw_block_n * size
    return dataclasses.replace(
        config, block_m=bm,
        num_stages=tc.stages_within_budget(config.num_stages, fwd_stage, budget - fwd_out),
        dw_num_stages=tc.stages_within_budget(config.dw_num_stages, dw_stage, budget - dw_out))


def _padded(dim: int, blocks) -> int:
    """``dim`` rounded up so that every kernel's block over it (``min(block, dim)``, the dx pass
    reads K and N swapped) is a power of two dividing it: the next power of two below the largest
    block, else a multiple of it."""
    big = max(blocks)
    return pl.next_power_of_2(dim) if dim < big else -(-dim // big) * big
