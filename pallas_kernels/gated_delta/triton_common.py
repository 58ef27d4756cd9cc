"""Helpers shared by the Triton (GPU) kernels of the gated delta rule: precision names, compiler
parameters, block specs of the two grid kinds, and loading one chunk's tiles inside a kernel.

Two grid kinds are used:
  * segment walks (``WalkSpecs``): grid (dv/BV, H, B*S); program (j, i, r) walks value block j of
    head i of the r-th longest (row, segment) walk, and sees the whole sequence of every row;
  * chunk-parallel kernels (``ChunkSpecs``): grid (B*Nc, H[, n]); program (p, i, .) sees chunk
    p % Nc of row p // Nc, head i.
Tensors are in the packed layout: time-major [B, L, H, d] sequences, head-major [B, H, L] gates,
[B, H, L, C] T matrices, [B, H, Nc, dk, dv] per-chunk states, [B, S, H, dk, dv] segment states.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mom_jax.ops.common import L2NORM_EPS
from pallas_kernels.gated_delta import common as cm

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


def resolve_precision(precision: str, interpret: bool):
    """Maps a precision name to what ``cm.mm`` takes.  Interpret mode (CPU) always uses float32."""
    if interpret:
        return HIGHEST
    return {
        "ieee": HIGHEST,
        "tf32": jax.lax.Precision.DEFAULT,
        "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
        "bf16": "bf16",
    }[precision]


def operand_dtype(precision: str, interpret: bool):
    """Storage dtype of intermediates that are only ever dot operands (W, chunk-start states h,
    their cotangents dh, v_new, du, dW): bfloat16 when the dots round their operands to bfloat16
    anyway (storing them rounded changes nothing), else float32."""
    return jnp.bfloat16 if (precision == "bf16" and not interpret) else F32


# Shared memory (bytes) that a walk program's software-pipelined chunk tiles may take, by GPU
# compute capability major: what the largest block may opt into, less room for Triton's own
# scratch (layout conversions, reductions).  sm_90 (H100/H200, 227 KB per block): the dS walk's
# two stages of q, k, W tiles at dk 256 in bf16 (196 KB) compile and run, and are faster than one
# (benchmarks/NOTES_kernels.md, session 10).  Others keep the earlier, safer 160 KB.
TILE_SMEM_BUDGET = {9: 200 * 1024}
DEFAULT_TILE_SMEM_BUDGET = 160 * 1024


def tile_smem_budget() -> int:
    """``TILE_SMEM_BUDGET`` of the default device's GPU generation (``DEFAULT_TILE_SMEM_BUDGET``
    for unknown generations and non-GPU devices, e.g. interpret mode)."""
    cc = getattr(jax.devices()[0], "compute_capability", None)
    try:
        major = int(str(cc).split(".")[0])
    except ValueError:
        return DEFAULT_TILE_SMEM_BUDGET
    return TILE_SMEM_BUDGET.get(major, DEFAULT_TILE_SMEM_BUDGET)


def stages_within_budget(stages: int, per_stage_bytes: int, budget: int | None = None) -> int:
    """The most pipelining stages, at most ``stages`` and at least 1, whose buffered tiles
    (``per_stage_bytes`` each) fit ``budget`` bytes of shared memory (None: ``tile_smem_budget``
    of the device).  With more, Triton asks for more shared memory than the GPU has and the
    kernel fails to launch (RESOURCE_EXHAUSTED), e.g. at chunk 128 with dk 256."""
    budget = tile_smem_budget() if budget is None else budget
    return max(1, min(stages, budget // max(per_stage_bytes, 1)))


def par_stages(stages: int, *tiles: tuple) -> int:
    """Pipelining stages of a chunk-parallel kernel's column-block loops (``fori_blocks``):
    ``stages``, but no more than fit the device's tile budget (``stages_within_budget``) when a
    stage buffers one iteration's loaded ``tiles``, each given as (rows, cols, dtype).

    In a pipelined loop, a loaded tile that feeds a dot must feed nothing else: with 2-3 stages,
    Triton (jaxlib 0.11.2) gave wrong and run-to-run varying results where a loop also reduced
    such a tile (sum(dh * h), sum(T^T du * V) and the like; upstream issues on pipelined loads
    with uses outside the dot's stage).  The kernels take such sums from dot results after the
    loop (benchmarks/NOTES_kernels.md, sessions 15-16)."""
    per_stage = sum(r * c * jnp.dtype(dt).itemsize for r, c, dt in tiles)
    return stages_within_budget(stages, per_stage)


def triton_params(num_warps: int, num_stages: int):
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def blocks_first(grid: tuple, in_specs, out_specs):
    """Launch form of a grid whose LAST axis enumerates blocks that read the same tiles (the key
    blocks of a chunk in the dq/dk/dW kernel): that axis moves to the front, which the
    Triton lowering launches as CUDA's fastest-varying block index, so a tile's block programs
    start side by side and the later ones read its tiles from L2 instead of HBM.  The specs'
    index maps keep their logical argument order; kernels read logical grid axis ``a`` with
    ``program_index(a, True)``.  Returns (grid, in_specs, out_specs)."""
    def wrap(spec):
        logical = spec.index_map
        return dataclasses.replace(spec, index_map=lambda *ids: logical(*ids[1:], ids[0]))
    return (grid[-1], *grid[:-1]), [wrap(s) for s in in_specs], tuple(wrap(s) for s in out_specs)


def program_index(axis: int, launched_blocks_first: bool):
    """``pl.program_id`` of logical grid axis ``axis`` of a kernel launched as ``blocks_first``
    says (or as given)."""
    return pl.program_id(axis + 1 if launched_blocks_first else axis)


def blocks(dim: int, block: int) -> list:
    """Static slices covering [0, dim) in pieces of ``block`` (dim a multiple of block)."""
    assert dim % block == 0, (dim, block)
    return [pl.ds(i * block, block) for i in range(dim // block)]


def fori_blocks(dim: int, block: int, body, init):
    """``carry = body(cols, carry)`` for the column blocks ``cols`` of [0, dim), as a loop (an
    ``scf.for``, so Triton cannot hoist every block's loads to the top and keep them all live)
    when there is more than one block."""
    assert dim % block == 0, (dim, block)
    n = dim // block
    if n == 1:
        return body(pl.ds(0, block), init)
    return jax.lax.fori_loop(
        0, n, lambda j, carry: body(pl.ds(pl.multiple_of(j * block, block), block), carry), init)


def walk_segment(lo, hi, run_chunk, init, *, reverse: bool = False):
    """Sequential walk of a segment-walk program: ``carry = run_chunk(c, carry)`` for every chunk c
    in [lo, hi), in order or (``reverse``) backwards.

    The body must itself ignore chunks of other segments (only a segment split into several runs
    has any in its range): compute anyway, keep the carry with ``jnp.where`` and guard the stores
    with ``pl.when``.  A branch-free body (no ``lax.cond`` around the loads) lets Triton pipeline
    the next chunk's loads (``num_stages`` > 1) behind the current chunk's dots."""
    if reverse:
        return jax.lax.fori_loop(0, hi - lo, lambda i, carry: run_chunk(hi - 1 - i, carry), init)
    return jax.lax.fori_loop(lo, hi, run_chunk, init)


def chunk_rows(c, chunk: int):
    """The rows of chunk ``c`` (traced int) in a whole-sequence ref."""
    return pl.ds(pl.multiple_of(c * chunk, chunk), chunk)


def tiles(ref, rows, cols: list) -> list:
    """``[ref[rows, col] for col in cols]`` in the ref's dtype (the dots cast as their precision
    says; elementwise use promotes to float32)."""
    return [ref[rows, col] for col in cols]


@dataclasses.dataclass
class Gates:
    """Decay factors of one chunk (all float32): G [C] the chunk-local cumulative log-decay,
    gl = G_C (scalar), eg = e^G, ekd = e^{G_C - G}, egl = e^{G_C}."""
    gcum: jax.Array
    gl: jax.Array
    eg: jax.Array
    ekd: jax.Array
    egl: jax.Array

    @classmethod
    def load(cls, g_ref, rows, last) -> "Gates":
        """g_ref: a [L] (or [C]) float32 ref; rows: the chunk's rows; last: its last row's index."""
        gcum = g_ref[rows]
        gl = g_ref[last]
        return cls(gcum, gl, jnp.exp(gcum), jnp.exp(gl - gcum), jnp.exp(gl))

    def causal(self) -> jax.Array:
        """D_ij = e^{G_i - G_j} for j <= i, else 0 ([C, C])."""
        return cm.causal_decay(self.gcum)


def used_chunk(seg_ref, zero_refs, launched_blocks_first: bool = False):
    """For the chunk-parallel kernels (grid (B*Nc, H, ...), launched as given or
    ``blocks_first``): zero-fills ``zero_refs`` when this program's chunk belongs to no segment,
    and returns the ``pl.when`` decorator for the body that handles a used chunk
    (``@used_chunk(seg_ref, outs) def _(): ...``)."""
    c = program_index(0, launched_blocks_first) % seg_ref.shape[0]

    @pl.when(seg_ref[c] < 0)
    def _():
        for ref in zero_refs:
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    return pl.when(seg_ref[c] >= 0)


def causal_qk(q_ref, k_ref, rows, key_cols: list, gates: "Gates", mm):
    """Q tiles of the chunk (one per key block) and P = (Q K^T) * D, D the causal decay [C, C]."""
    qs = tiles(q_ref, rows, key_cols)
    p = None
    for q_b, k_b in zip(qs, tiles(k_ref, rows, key_cols)):
        part = mm(q_b, k_b, tb=True)
        p = part if p is None else p + part
    return qs, p * gates.causal()


def diagonal(x: jax.Array) -> jax.Array:
    """The diagonal [n] of a square [n, n] array (masked row sums: no gather in Triton)."""
    n = x.shape[0]
    return jnp.sum(jnp.where(cm.iota2(n, n, 0) == cm.iota2(n, n, 1), x, 0.0), axis=1)


def gram_rstd(kk: jax.Array) -> jax.Array:
    """Per-row inverse L2 norms rstd_i = 1 / sqrt(k_i.k_i + eps) [C] float32 from the Gram matrix
    kk = K K^T [C, C] (its diagonal; with bfloat16 K the products are exact in float32)."""
    return jax.lax.rsqrt(diagonal(kk) + L2NORM_EPS)


def tiles_rstd(row_tiles: list) -> jax.Array:
    """Per-row inverse L2 norms [C] float32 of rows split over key tiles ([C, BK] each)."""
    ss = None
    for x in row_tiles:
        part = jnp.sum(jnp.square(x.astype(F32)), axis=1)
        ss = part if ss is None else ss + part
    return jax.lax.rsqrt(ss + L2NORM_EPS)


def last_row_mask(c: int):
    """[C] bool: True at the chunk's last position."""
    return jax.lax.broadcasted_iota(jnp.int32, (c,), 0) == c - 1


class WalkSpecs:
    """Block specs of a segment-walk kernel.

    Launch grid (dv/BV, H, B*S): program (j, i, r) walks value block j of head i of the r-th
    longest (row, segment) walk, ``walk_order``'s ``order[r]`` = row * S + segment.  The value
    blocks of a walk launch side by side (they read the same K, W and q tiles: the later ones hit
    L2) and the longest walks first (the shared memory's segments of a MoM layer are 2x-4x longer
    than the routed ones: launched in row order, some started last and ran alone; longest first
    is the classic list-scheduling fix).  Since the row is only known inside the kernel (from
    ``order``), the specs hold every batch row and the kernel views them with ``RowView``."""

    def __init__(self, b: int, s: int, l: int, chunk: int):
        self.b, self.s, self.l, self.nc = b, s, l, l // chunk
        self.chunk = chunk

    def grid(self, h: int, value_blocks: int) -> tuple:
        return (value_blocks, h, self.b * self.s)

    def ranges(self):
        """lo / hi / order [B*S] int32 (whole array, scalars read by walk id)."""
        return pl.BlockSpec((self.b * self.s,), lambda j, i, r: (0,))

    def flags(self):
        """Per-chunk int32 flags [B, Nc] (every row)."""
        return pl.BlockSpec((self.b, self.nc), lambda j, i, r: (0, 0))

    def seq(self, d: int):
        """A [B, L, H, d] sequence at the program's head, all of its last dim: [B, L, d]."""
        return pl.BlockSpec((self.b, self.l, None, d), lambda j, i, r: (0, 0, i, 0))

    def seq_v(self, bv: int):
        """The program's head and value block of a [B, L, H, dv] sequence: [B, L, BV]."""
        return pl.BlockSpec((self.b, self.l, None, bv), lambda j, i, r: (0, 0, i, j))

    def gate(self):
        """A [B, H, L] gate at the program's head: [B, L]."""
        return pl.BlockSpec((self.b, None, self.l), lambda j, i, r: (0, i, 0))

    def row_vector(self):
        """A [B, L, H] per-token float32 vector (the inverse key norms) at the program's head:
        [B, L]."""
        return pl.BlockSpec((self.b, self.l, None), lambda j, i, r: (0, 0, i))

    def per_chunk_states(self, dk: int, bv: int):
        """[B, H, Nc, dk, dv] per-chunk states, the program's head and value block:
        [B, Nc, dk, BV]."""
        return pl.BlockSpec((self.b, None, self.nc, dk, bv), lambda j, i, r: (0, i, 0, 0, j))

    def segment_state(self, dk: int, bv: int):
        """[B, S, H, dk, dv] segment states, the program's head and value block:
        [B, S, dk, BV]."""
        return pl.BlockSpec((self.b, self.s, None, dk, bv), lambda j, i, r: (0, 0, i, 0, j))


def walk_order(lo, hi, longest_first: bool = True):
    """[B*S] int32 walk ids (row * S + segment) in launch order: by length hi - lo, longest
    first (stable: ties keep row order), or as given."""
    if not longest_first:
        return jnp.arange(lo.shape[0], dtype=jnp.int32)
    return jnp.argsort(lo - hi, stable=True).astype(jnp.int32)


def walk_program(order_ref, num_segments: int):
    """(walk id, row, segment) of this walk program (``WalkSpecs`` launch grid)."""
    w = order_ref[pl.program_id(2)]
    return w, w // num_segments, w % num_segments


class RowView:
    """A ref whose leading dims hold every batch row (and segment), seen at one (traced) index
    prefix: ``view[idx]`` is ``ref[(*prefix, *idx)]``, for loads and stores alike."""

    def __init__(self, ref, *prefix):
        self.ref, self.prefix = ref, prefix

    @property
    def shape(self):
        return self.ref.shape[len(self.prefix):]

    @property
    def dtype(self):
        return self.ref.dtype

    def _index(self, idx):
        return (*self.prefix, *(idx if isinstance(idx, tuple) else (idx,)))

    def __getitem__(self, idx):
        return self.ref[self._index(idx)]

    def __setitem__(self, idx, value):
        self.ref[self._index(idx)] = value


class ChunkSpecs:
    """Block specs of a chunk-parallel kernel, grid (B*Nc, H) or (B*Nc, H, n); the optional third
    grid index ``j`` selects a block of the last dim where a spec says so."""

    def __init__(self, b: int, l: int, chunk: int):
        self.b, self.l, self.chunk, self.nc = b, l, chunk, l // chunk

    def _rc(self, p):
        return p // self.nc, p % self.nc

    def seg(self):
        """chunk_segment [B, Nc] int32 of the program's row: [Nc]."""
        return pl.BlockSpec((None, self.nc), lambda p, i, *j: (p // self.nc, 0))

    def tok(self, d: int, blocked: bool = False):
        """The chunk of a [B, L, H, d] sequence: [C, d] (blocked: block j of the last dim)."""
        return pl.BlockSpec((None, self.chunk, None, d),
                            lambda p, i, *j: (*self._rc(p), i, j[0] if blocked else 0))

    def row_vector(self):
        """The chunk of a [B, L, H] per-token float32 vector (inverse q/k norms): [C]."""
        return pl.BlockSpec((None, self.chunk, None),
                            lambda p, i, *j: (p // self.nc, p % self.nc, i))

    def gate(self):
        """The chunk of a [B, H, L] gate: [C]."""
        return pl.BlockSpec((None, None, self.chunk),
                            lambda p, i, *j: (p // self.nc, i, p % self.nc))

    def gate_part(self):
        """Block j's share of a [n, B, H, L] gate-shaped sum: [C]."""
        return pl.BlockSpec((None, None, None, self.chunk),
                            lambda p, i, j: (j, p // self.nc, i, p % self.nc))

    def tmat(self):
        """The chunk's T of a [B, H, L, C] array: [C, C]."""
        return pl.BlockSpec((None, None, self.chunk, self.chunk),
                            lambda p, i, *j: (p // self.nc, i, p % self.nc, 0))

    def state(self, dk: int, dv: int, key_blocked: bool = False):
        """The chunk's entry of a [B, H, Nc, dk, dv] per-chunk state array: [dk, dv]
        (key_blocked: rows block j, [BK, dv])."""
        return pl.BlockSpec((None, None, None, dk, dv),
                            lambda p, i, *j: (p // self.nc, i, p % self.nc,
                                              j[0] if key_blocked else 0, 0))
