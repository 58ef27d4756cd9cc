"""Pieces shared by the Triton (GPU) and Mosaic (TPU) gated-delta kernels.

Notation inside one chunk of C tokens (see ``mom_jax.ops.chunked`` for the derivation):
  G_i = sum_{t <= i} g_t (chunk-local cumulative log-decay), A_ij = b_i exp(G_i - G_j) k_i.k_j (j < i),
  T = (I + A)^-1, W = T diag(b e^G) K, U = T diag(b) V - W S0,
  O = diag(e^G) Q S0 + (tril(e^{G_i - G_j}) * Q K^T) U,
  S_C = e^{G_C} S0 + (diag(e^{G_C - G}) K)^T U.

The unit-lower-triangular inverse T is computed by ``ut_inverse``: forward substitution inside
16 x 16 diagonal blocks (all blocks at once, one rank-1 update per step on the whole C x C tile), then
block doubling  X <- X - X L X  (L = the strictly-block-lower part of A at the next level).  This is
block forward substitution, as stable as the scalar one.  The product form (I+N)(I+N^2)(I+N^4)... is
*not* used: with correlated keys (k_i.k_j ~ 0.9, common after the SiLU short conv) the powers N^(2^m)
grow to ~1e9 while T stays O(1), and float32 results are garbage (see NOTES_kernels.md).

The blocked form (``diag_block_inverses`` + ``block_row_of_inverse``, composed in
``block_ut_inverse``; used by the Triton UT kernel ``ut_kernel="split"``) never forms the C x C
tile: it takes A as 16 x 16 blocks A_ij (j <= i), inverts each diagonal block on its own 16 x 16
tile (row forward substitution) and builds the off-diagonal blocks by block forward substitution,
T_ij = -T_ii sum_{m=j}^{i-1} A_im T_mj, one row block of T after the other.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mom_jax.ops.common import PackedLayout

F32 = jnp.float32
SUB_BLOCK = 16


def iota2(n: int, m: int, dim: int) -> jax.Array:
    return jax.lax.broadcasted_iota(jnp.int32, (n, m), dim)


def mm(a, b, precision=None, *, ta=False, tb=False):
    """a @ b with optional transposes, float32 accumulation.

    precision: a ``jax.lax.Precision``/``DotAlgorithmPreset`` or the string "bf16" (operands cast to
    bfloat16, float32 accumulation).
    """
    if precision == "bf16":
        a = a.astype(jnp.bfloat16)
        b = b.astype(jnp.bfloat16)
        precision = None
    elif a.dtype != b.dtype:  # e.g. a bfloat16 input against a float32 state: dot in float32
        a = a.astype(F32)
        b = b.astype(F32)
    dims = (((0,) if ta else (1,), (1,) if tb else (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def ut_inverse(a: jax.Array, precision=jax.lax.Precision.HIGHEST, sub: int = SUB_BLOCK, *,
               keep_2d: bool = False) -> jax.Array:
    """(I + a)^-1 for a strictly lower-triangular float32 [C, C] tile (C a power of two >= 16).

    Works inside Pallas kernel bodies (only iota, where, sums, dots and a fori_loop).  ``keep_2d``
    keeps every intermediate 2-D ([1, C] / [C, 1] reductions), as Mosaic (TPU) needs.
    """
    c = a.shape[0]
    sub = min(sub, c)
    assert c % sub == 0 and (c // sub) & (c // sub - 1) == 0, (c, sub)
    row, col = iota2(c, c, 0), iota2(c, c, 1)
    row_blk, col_blk = row // sub, col // sub
    same = row_blk == col_blk
    a_bd = jnp.where(same, a, 0.0)
    x = jnp.where(row == col, 1.0, 0.0).astype(F32)

    def step(r, x):
        # Row j = sub*blk + r of every diagonal block is final: eliminate it from the rows below it.
        xr = jnp.sum(jnp.where(row == col_blk * sub + r, x, 0.0), axis=0, keepdims=keep_2d)
        ar = jnp.sum(jnp.where(col == row_blk * sub + r, a_bd, 0.0), axis=1, keepdims=keep_2d)
        outer = ar * xr if keep_2d else ar[:, None] * xr[None, :]     # a[i, j(i)] * x[j(l), l]
        return x - jnp.where(same, outer, 0.0)

    x = jax.lax.fori_loop(0, sub - 1, step, x)
    size = sub
    while size < c:
        size *= 2
        half = size // 2
        low = (row // size == col // size) & (row // half > col // half)
        lo = jnp.where(low, a, 0.0)
        x = x - mm(x, mm(lo, x, precision), precision)
    return x


def diag_block_inverses(a_ts: list) -> list:
    """(I + A_b)^-1 for several small strictly lower-triangular float32 blocks, each given as its
    transpose: ``a_ts[b]`` = A_b^T [s, s] (zero on and below the diagonal).  Returns the list of
    float32 [s, s] inverses (unit lower triangular).

    Row forward substitution, all blocks in the same step: row r of T_b is
    e_r - sum_{j<r} A_b[r, j] T_b[j, :], and rows j < r are final at step r.  Taking A^T lets the
    row A_b[r, :] come out of one reduction already laid out along axis 0 (it does not depend on
    the loop carry, so only the second reduction is on the sequential chain).  Elementwise float32
    only (no dots): exact forward substitution.  Works inside Pallas Triton kernel bodies."""
    s = a_ts[0].shape[0]
    row, col = iota2(s, s, 0), iota2(s, s, 1)
    eye = jnp.where(row == col, 1.0, 0.0).astype(F32)

    def step(r, xs):
        out = []
        for a_t, x in zip(a_ts, xs):
            a_r = jnp.sum(jnp.where(col == r, a_t, 0.0), axis=1)        # [s]: A[r, j] along j
            contrib = jnp.sum(a_r[:, None] * x, axis=0)                 # sum_j A[r, j] T[j, :]
            out.append(x - jnp.where(row == r, contrib[None, :], 0.0))
        return tuple(out)

    return list(jax.lax.fori_loop(1, s, step, tuple(eye for _ in a_ts)))


def block_row_of_inverse(a_row: list, t: dict, i: int,
                         precision=jax.lax.Precision.HIGHEST) -> list:
    """Off-diagonal blocks of row block i of T = (I + A)^-1, by block forward substitution:
    T_ij = -T_ii sum_{m=j}^{i-1} A_im T_mj for j = i-1, ..., 0.

    a_row: [A_i0, ..., A_i(i-1)] float32 [s, s]; t: {(m, j): T_mj} for every j <= m < i and
    (i, i): T_ii.  Returns [T_i0, ..., T_i(i-1)] float32 [s, s] (i - j + 1 dots per block, in
    ``precision``).  Row blocks in order need only the rows above them: a kernel can form T, and
    use it, one row block at a time."""
    out = [None] * i
    for j in range(i - 1, -1, -1):
        acc = None
        for m in range(j, i):
            part = mm(a_row[m], t[(m, j)], precision)
            acc = part if acc is None else acc + part
        out[j] = -mm(t[(i, i)], acc, precision)
    return out


def block_ut_inverse(a_blocks: dict, n: int, precision=jax.lax.Precision.HIGHEST) -> dict:
    """Blocks {(i, j): T_ij, j <= i < n} of T = (I + A)^-1 from the blocks {(i, j): A_ij, j <= i}
    (float32 [s, s]; the diagonal blocks strictly lower) of a strictly lower-triangular A: the
    composition of ``diag_block_inverses`` and ``block_row_of_inverse`` that the split Triton UT
    kernel runs, as one function (tests compare it with a float64 inverse)."""
    t = {}
    for i in range(n):
        t[(i, i)] = diag_block_inverses([a_blocks[(i, i)].T])[0]
        row = block_row_of_inverse([a_blocks[(i, m)] for m in range(i)], t, i, precision)
        t.update({(i, j): x for j, x in enumerate(row)})
    return t


def strict_a(k: jax.Array, beta: jax.Array, gcum: jax.Array, precision=jax.lax.Precision.HIGHEST):
    """A_ij = b_i exp(G_i - G_j) k_i.k_j for j < i, else 0 ([C, C], float32)."""
    return strict_a_from_kk(mm(k, k, precision, tb=True), beta, gcum)


def strict_decay(gcum: jax.Array) -> jax.Array:
    """E_ij = exp(G_i - G_j) for j < i, else 0 ([C, C])."""
    c = gcum.shape[0]
    strict = iota2(c, c, 0) > iota2(c, c, 1)
    return jnp.where(strict, jnp.exp(jnp.where(strict, gcum[:, None] - gcum[None, :], 0.0)), 0.0)


def strict_a_from_kk(kk: jax.Array, beta: jax.Array, gcum: jax.Array) -> jax.Array:
    """A_ij = b_i exp(G_i - G_j) kk_ij for j < i, else 0, from the Gram matrix kk = K K^T."""
    return beta[:, None] * kk * strict_decay(gcum)


def causal_decay(gcum: jax.Array) -> jax.Array:
    """D_ij = exp(G_i - G_j) for j <= i, else 0 ([C, C])."""
    c = gcum.shape[0]
    row, col = iota2(c, c, 0), iota2(c, c, 1)
    incl = row >= col
    return jnp.where(incl, jnp.exp(jnp.where(incl, gcum[:, None] - gcum[None, :], 0.0)), 0.0)


# ------------------------------------------------------------------------------------------------
# Layout helpers (plain XLA, run outside the kernels)
# ------------------------------------------------------------------------------------------------

def chunk_cumsum(g: jax.Array, chunk: int) -> jax.Array:
    """Chunk-local inclusive cumsum of g [B, L, H] along L, float32."""
    b, l, h = g.shape
    gc = jnp.cumsum(g.astype(F32).reshape(b, l // chunk, chunk, h), axis=2)
    return gc.reshape(b, l, h)


def chunk_cumsum_vjp(dgcum_t: jax.Array, chunk: int) -> jax.Array:
    """Cotangent of g through ``chunk_cumsum``, head-major: dgcum_t [B, H, L] (w.r.t. the
    chunk-local cumsum G) -> dg [B, H, L] float32, a reverse cumsum inside each chunk."""
    b, h, l = dgcum_t.shape
    dgc = dgcum_t.astype(F32).reshape(b, h, l // chunk, chunk)
    return jnp.flip(jnp.cumsum(jnp.flip(dgc, -1), axis=-1), -1).reshape(b, h, l)


def segment_ranges(layout: PackedLayout):
    """Per (row, segment): the chunk range [lo, hi) that holds it (lo = hi = 0 when empty).

    Returns (lo [B*S], hi [B*S], seg [B, Nc], first [B, Nc]) as int32.  A program walking [lo, hi)
    processes only the chunks whose index equals its segment and resets to the initial state at
    every chunk that starts a run (so even a segment split into several runs matches the reference).
    """
    seg = layout.chunk_segment.astype(jnp.int32)
    b, nc = seg.shape
    s = layout.num_segments
    c_idx = jnp.broadcast_to(jnp.arange(nc, dtype=jnp.int32), (b, nc))
    r_idx = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, nc))
    tgt = jnp.where(seg >= 0, seg, s)  # out of range -> dropped
    lo = jnp.full((b, s), nc, jnp.int32).at[r_idx, tgt].min(c_idx, mode="drop")
    hi = jnp.zeros((b, s), jnp.int32).at[r_idx, tgt].max(c_idx + 1, mode="drop")
    lo = jnp.minimum(lo, hi)
    first = layout.chunk_first().astype(jnp.int32)
    return lo.reshape(-1), hi.reshape(-1), seg, first


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def pad_last(x: jax.Array, size: int) -> jax.Array:
    if x.shape[-1] == size:
        return x
    pad = [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])]
    return jnp.pad(x, pad)


def float64_inverse_check(a: np.ndarray) -> np.ndarray:
    """Reference (I + a)^-1 in float64 (for tests and notes)."""
    a = np.asarray(a, np.float64)
    return np.linalg.inv(np.eye(a.shape[-1]) + a)
