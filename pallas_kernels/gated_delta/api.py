"""Entry point of the gated delta rule kernels: backend choice, padding, ``jax.custom_vjp``.

``gated_delta_packed(q, k, v, g, beta, layout, initial_state, output_final_state, *,
use_qk_l2norm, scale, out_dtype)`` follows the ``mom_jax.ops.packed_recurrence`` contract: q, k
[B, L, H, dk] (float32 or bfloat16), v [B, L, H, dv], g [B, L, H] float32 log-decay or None (plain
delta rule), beta [B, L, H], initial_state [B, S, H, dk, dv] or None.  Returns (o [B, L, H, dv] in
out_dtype (default float32), final state or None).

q/k L2-norm in the op (``use_qk_l2norm=True``: q <- l2norm(q) * scale, k <- l2norm(k), eps 1e-6),
as flash-linear-attention's ``use_qk_l2norm_in_kernel``: the normalisation is part of the op's
forward and backward.
  * Triton forward: no XLA pass over q/k at all (bf16 inputs with power-of-two head dims).  The
    norms are row scales, so the kernels dot the raw q, k and scale float32 results: the Gram
    kernel (``triton_fwd.ut_gram``) takes rstd_k = 1/sqrt(|k|^2 + eps) from the diagonal of each
    chunk's K K^T and scales A by rstd_i rstd_j; W's row scale, the walk's K^T diag(.) v_new and
    the output kernel's Q K^T take rstd_k too; the output kernel computes rstd_q from its q tiles
    and folds rstd_q * scale into its two dot results.  Both rstd come back ([B, L, H] float32).
  * Triton backward: its kernels take the normalised, scaled q', k' in the operand dtype, which
    ``_core_bwd`` rebuilds from the raw q, k and the two rstd in one elementwise XLA pass.
  * Mosaic: the normalisation runs in XLA beside the kernel's head-major transposes.
The custom VJP keeps the raw q/k and rstd (not a normalised copy) and applies the L2-norm Jacobian
dx = rstd * (dy - y <dy, y>) (y = x * rstd, dy including the q scale) to dq/dk in the XLA pass
that slices off the head-dim padding, with the row sums <dy, y> the backward kernels emit.

Backends: "triton" (GPU; on CPU in interpret mode), "mosaic" (TPU; on CPU in TPU interpret mode).
The backward pass is either the Pallas backward kernels (``Config.bwd="pallas"``: four Triton
kernels, ``triton_bwd``, or one Mosaic kernel, ``mosaic_bwd``, each from chunk-start states the
forward stores) or the VJP of the chunked XLA form (``Config.bwd="xla"``, recomputes from the
inputs).  A chunk size the kernels cannot take (not a power of two >= 16) falls back to the chunked
XLA form, with a warning once per chunk size.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp

from mom_jax.ops import chunked
from mom_jax.ops.common import (PackedLayout, check_qk_options, l2norm_rstd, l2norm_vjp,
                                qk_features)
from pallas_kernels.gated_delta import common as cm

F32 = jnp.float32
UT_KERNELS = ("split", "masked")  # keys of triton_fwd.UT_KERNELS (not imported here: lazy)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static knobs of the kernels (hashable; part of the jit cache key).

    backend: "auto" (mosaic on TPU, else triton), "triton" or "mosaic".
    precision: dot precision on GPU for everything but the UT transform's A and inverse: "bf16"
      (operands rounded to bfloat16, float32 accumulation and states; like
      flash-linear-attention, and the fastest: see benchmarks/NOTES_kernels.md), "tf32", "tf32x3"
      or "ieee".  With "bf16", intermediates that are only dot operands (T, W, chunk-start
      states, v_new and their cotangents) and U, P^T dO are stored in bfloat16.  On TPU:
      bf16 -> DEFAULT, tf32 -> HIGH, else HIGHEST.
    ut_precision: dots of the UT transform's inverse, and of A = K K^T where K is stored in
      float32 (precision other than "bf16"; with bf16 K the products are exact anyway):
      "tf32x3" or "ieee".  Interpret mode is always float32.
    ut_kernel: the Triton UT transform (T = (I + A)^-1, W, U per chunk): "split" (three launches:
      A from whole-chunk dots with par_num_warps warps; T alone on 16 x 16 blocks, one warp per
      chunk-head, the diagonal blocks' forward substitutions interleaved, off-diagonal blocks by
      block substitution; then W and U from the stored T with par_num_warps warps) or "masked"
      (one launch on whole C x C tiles, 15 masked full-tile substitution steps, then merges).
      Same results up to rounding; timings in benchmarks/NOTES_kernels.md (runs 6, 7).
    ut_num_warps: warps of a UT transform program (None: 1 for the inverse kernel of "split",
      whose tiles are all 16 rows high and would only be replicated across more warps;
      par_num_warps for "masked").
    block_v: value-dimension block of a sequential walk program (None: ``walk_block_v``'s rule,
      64 or 32).  The Mosaic forward uses it only when it is a multiple of 128 (else the whole
      value dim).
    par_block_v: value block that the chunk-parallel kernels loop over inside a program.
    block_k: key-dimension tile (the state is held as dk/block_k tiles; the dq/dk kernel's grid
      splits dk into blocks of this size).
    num_warps: warps of the two sequential walks (forward state walk, backward dS walk); None:
      ``walk_warps``' rule (8 for a [256, 64] state block, else 4).
    num_stages: software-pipelining stages of the forward state walk (None: ``walk_stages``'
      rule, 3 for dk <= 128 walks of few programs, else 2) and, where set, of the backward dS
      walk too.
    par_num_warps: the chunk-parallel forward kernels (outputs, the A and W/U kernels of
      ut_kernel="split"; the UT transform with ut_kernel="masked" unless ut_num_warps is set).
    bwd_par_num_warps: the chunk-parallel backward kernels (P^T dO, dq/dk/dW, WY backward;
      None: par_num_warps).
    par_num_stages: software-pipelining stages of the column-block loops of every chunk-parallel
      kernel (A and W/U of ut_kernel="split", outputs, P^T dO, dq/dk/dW, WY backward); None:
      ``PAR_STAGES``, per kernel.  Fewer where that many of a kernel's loop tiles would exceed
      the GPU's ``triton_common.tile_smem_budget`` (``triton_common.par_stages``).
    bwd: "pallas" (Triton: a chunk-parallel P^T dO kernel, a sequential dS walk, then two
      chunk-parallel gradient kernels; Mosaic: one reverse chunk walk per (row, head) with the whole
      value dim as one block, ``mosaic_bwd``) or "xla" (VJP of the chunked XLA form).
    bwd_block_v: value block of the Triton backward dS walk (None: as block_v).  The Mosaic
      backward always takes the whole value dim as one block.
    bwd_num_stages: software-pipelining stages of the backward dS walk (None: num_stages if set,
      else 2; but 1 where that many stages of its q/k/W chunk tiles would exceed the GPU's
      ``triton_common.tile_smem_budget``: 200 KB on sm_90 (H100), where two stages at dk = 256
      with bf16 operands (196 KB) fit, else 160 KB).
    bwd_qdo: precompute Q^T diag(e^G) dO per chunk ([B, H, Nc, dk, dv]) in the chunk-parallel
      P^T dO kernel, so that the dS walk loads neither q nor dO and runs 4 fewer dots per step.
      Off by default since the 4-warp walks (H100 run 6: fwd+bwd equal at dk = 128, 2-7% faster
      without it at dk = 256 and at T = 16384, and it saves that [B, H, Nc, dk, dv] array).
    blocks_first: launch a chunk's key-block programs of the dq/dk/dW kernel side by side
      (``triton_common.blocks_first``; each reads the chunk's dO, v_new and du, so the later ones
      hit L2).  False: the logical grid order, the key blocks slowest.  The walks always launch a
      segment's value blocks side by side (``triton_common.WalkSpecs``).
    longest_first: the Triton walks launch the longest (row, segment) walks first (a MoM
      layer's shared-memory segments are the longest); False: in row order.
    """
    backend: str = "auto"
    precision: str = "bf16"
    ut_precision: str = "tf32x3"
    ut_kernel: str = "split"
    ut_num_warps: int | None = None
    block_v: int | None = None
    block_k: int = 64
    num_warps: int | None = None
    num_stages: int | None = None
    par_num_warps: int = 4
    par_num_stages: int | None = None
    par_block_v: int = 64
    bwd_par_num_warps: int | None = None
    bwd: str = "pallas"
    bwd_block_v: int | None = None
    bwd_num_stages: int | None = None
    bwd_qdo: bool = False
    blocks_first: bool = True
    longest_first: bool = True

    def __post_init__(self):
        if self.bwd not in ("pallas", "xla"):
            raise ValueError(f"Config.bwd must be 'pallas' or 'xla', got {self.bwd!r}")
        if self.ut_kernel not in UT_KERNELS:
            raise ValueError(f"Config.ut_kernel must be one of {UT_KERNELS}, "
                             f"got {self.ut_kernel!r}")
        if self.par_num_stages is not None and self.par_num_stages < 1:
            raise ValueError(f"Config.par_num_stages must be >= 1, got {self.par_num_stages!r}")
        for name in ("ut_num_warps", "bwd_par_num_warps", "num_warps"):
            warps = getattr(self, name)
            if warps is not None and (warps < 1 or warps & (warps - 1)):
                raise ValueError(f"Config.{name} must be None or a power of two >= 1, got "
                                 f"{warps!r}")

    def walk_block_v(self, dk: int, dv: int, walks: int, *, backward: bool = False) -> int:
        """Value block of a Triton walk program: ``bwd_block_v`` (backward) or ``block_v`` if set,
        else 64 where dk <= 256 and the walk still has at least ``WALK_MIN_PROGRAMS`` programs of
        64 value columns, else 32; at most dv.  walks: the number of sequential walks, B * S * H.
        Run 7: 64 is 14% faster fwd+bwd at B8 T2048 H16 dk 128 (256 programs), slower with 64 or
        128 programs; session 7: with 8 warps (``walk_warps``) also faster at dk 256 in the MoM
        layer (640 programs of 64 columns)."""
        set_v = (self.bwd_block_v or self.block_v) if backward else self.block_v
        if set_v:
            return min(dv, set_v)
        wide = dk <= 256 and walks * max(dv // 64, 1) >= WALK_MIN_PROGRAMS
        return min(dv, 64 if wide else 32)

    def walk_stages(self, dk: int, programs: int, chunk: int = 64, block_v: int = 64,
                    itemsize: int = 2, smem_budget: int | None = None) -> int:
        """Pipelining stages of the forward state walk: ``num_stages`` if set, else 3 where
        dk <= 128 (three buffered [C, dk] K and W tiles: 96 KB) and the walk has fewer than
        ``WALK_MIN_PROGRAMS`` programs (about one per SM: the deeper pipeline hides the load
        latency that other programs cannot), else 2 -- but no more than fit the GPU's shared
        memory (``triton_common.stages_within_budget``; a stage buffers the chunk's K and W
        [chunk, dk] and U [chunk, block_v] tiles of ``itemsize`` bytes: one stage at chunk 128,
        dk 256).  programs: B * S * H * dv / block_v.
        Session 7 (H100, queued forward): 3 stages 1.40 -> 1.27 ms at B2 T16384 H16 dk 128
        (128 programs), 0.63 -> 0.66 ms at B8 T2048 H16 (256 programs); at dk 256 three stages
        would need ~216 KB of shared memory."""
        if self.num_stages is not None:
            return self.num_stages
        from pallas_kernels.gated_delta import triton_common  # noqa: PLC0415
        stages = 3 if dk <= 128 and programs < WALK_MIN_PROGRAMS else 2
        per_stage = (2 * chunk * dk + chunk * block_v) * itemsize
        return triton_common.stages_within_budget(stages, per_stage, smem_budget)

    def walk_warps(self, dk: int, block_v: int) -> int:
        """Warps of a Triton walk program: ``num_warps`` if set, else 8 where the float32 state
        block [dk, block_v] is larger than [128, 64] (a [256, 64] block does not fit the registers
        of 4 warps), else 4."""
        if self.num_warps is not None:
            return self.num_warps
        return 8 if dk * block_v > 128 * 64 else 4

    def par_stages(self, kernel: str) -> int:
        """Pipelining stages asked for the chunk-parallel kernel ``kernel`` (a key of
        ``PAR_STAGES``): ``par_num_stages`` if set, else ``PAR_STAGES[kernel]``."""
        if kernel not in PAR_STAGES:
            raise ValueError(f"unknown chunk-parallel kernel {kernel!r}; one of "
                             f"{sorted(PAR_STAGES)}")
        return PAR_STAGES[kernel] if self.par_num_stages is None else self.par_num_stages

    def bwd_par_warps(self) -> int:
        """Warps of the chunk-parallel backward kernels (resolves ``bwd_par_num_warps=None``)."""
        return self.par_num_warps if self.bwd_par_num_warps is None else self.bwd_par_num_warps

    def ut_warps(self) -> int:
        """Warps of a UT transform program (resolves ``ut_num_warps=None``)."""
        if self.ut_num_warps is not None:
            return self.ut_num_warps
        return self.par_num_warps if self.ut_kernel == "masked" else 1


WALK_MIN_PROGRAMS = 256  # ~2 walk programs per SM on an H100 (132 SMs)
# Default pipelining stages of the chunk-parallel Triton kernels (``Config.par_stages``): "ut" the
# A and W/U kernels of the split UT transform, "output" the outputs, "dv_local" P^T dO, "dqkw"
# dq/dk/dW, "wy" the WY backward.  Session 16, MoM E4 layer (dk = dv = 256) profiled on an H100:
# dq/dk/dW 0.83 -> 0.68 ms with 2 stages (3: 0.82); WY backward 0.48 -> 0.54 (2) / 0.49 (3);
# outputs 0.31 -> 0.34 (2) / 0.31 (3); the others within 0.01 ms (benchmarks/NOTES_kernels.md).
PAR_STAGES = {"ut": 1, "output": 1, "dv_local": 1, "dqkw": 2, "wy": 1}
DEFAULT_CONFIG = Config()
_config = [DEFAULT_CONFIG]


def set_default_config(config: Config) -> None:
    """Replaces the configuration used by the registered kernels (benchmarks use this)."""
    _config[0] = config


def get_default_config() -> Config:
    return _config[0]


def _interpret() -> bool:
    return jax.default_backend() == "cpu"


def _backend(config: Config) -> str:
    if config.backend != "auto":
        return config.backend
    return "mosaic" if jax.default_backend() == "tpu" else "triton"


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------

def _qk_in(q, k, qk_norm: bool, scale: float):
    """The kernels' q, k (float32, [B, L, H, dk]) from the op's, and (rstd_q, rstd_k) ([B, L, H]
    float32) or None without ``qk_norm``: q' = l2norm(q) * scale (or q * scale), k' = l2norm(k)
    (or k)."""
    if not qk_norm:
        q = q.astype(F32)
        return (q if scale == 1.0 else q * scale), k.astype(F32), None
    (q, rq), (k, rk) = l2norm_rstd(q), l2norm_rstd(k)
    return (q if scale == 1.0 else q * scale), k, (rq, rk)


def _qk_in_from_rstd(q, k, rstd, scale: float):
    """``_qk_in`` again from the residuals (raw q, k and their rstd): the same float32 values."""
    if rstd is None:
        return _qk_in(q, k, False, scale)[:2]
    qn = q.astype(F32) * rstd[0][..., None]
    return (qn if scale == 1.0 else qn * scale), k.astype(F32) * rstd[1][..., None]


def _qk_out(dq, dk, q, k, rstd, scale: float, rowdots=None):
    """Cotangents of the kernels' q', k' (float32, head dim possibly padded) -> of the op's q, k:
    slices the padding off, applies the scale and the L2-norm Jacobian, casts to q/k's dtypes.

    rowdots: (<dq', q'>, <dk', k'>) [B, L, H] float32 from the backward kernels, or None.  With
    y = l2norm(q) = q' / scale and dy = scale dq', <dy, y> = <dq', q'>: given the row sums, the
    Jacobian is one elementwise pass per tensor (no separate reduction pass over float32 dq/dk)."""
    dq, dk = dq[..., :q.shape[-1]], dk[..., :k.shape[-1]]
    if rstd is None and scale == 1.0:
        return dq.astype(q.dtype), dk.astype(k.dtype)
    dq, dk = dq.astype(F32), dk.astype(F32)
    if scale != 1.0:
        dq = dq * scale
    if rstd is not None:
        rq, rk = (None, None) if rowdots is None else rowdots
        dq, dk = l2norm_vjp(q, rstd[0], dq, rq), l2norm_vjp(k, rstd[1], dk, rk)
    return dq.astype(q.dtype), dk.astype(k.dtype)


def _padded_dim(d: int, pad_to: int = 16) -> int:
    """The kernels' head dim for a given one: the next power of two, at least pad_to."""
    return max(pad_to, cm.next_pow2(d))


def _operands(x, dtype, size: int):
    """x [..., d] cast to the kernels' operand dtype and zero-padded to ``size`` in the last dim
    (nothing when it is already both)."""
    return cm.pad_last(x if x.dtype == dtype else x.astype(dtype), size)


def _prepare(q, k, v, g, beta, init, chunk: int, op_dtype):
    """The Triton forward's XLA pre-pass: q, k, v cast to op_dtype and their head dims padded to
    powers of two >= 16 (no pass at all for bfloat16 inputs with power-of-two head dims and bf16
    dots); the chunk-local cumsum; gates transposed.  The q/k L2-norm and the q scale are not
    applied here: the kernels apply them (``triton_fwd``).

    Returns (q, k [B, L, H, dkp], v [B, L, H, dvp] in op_dtype, beta_t, gcum_t [B, H, L] float32,
    init [B, S, H, dkp, dvp] float32 or None).
    """
    dk = q.shape[-1]
    dkp, dvp = _padded_dim(dk), _padded_dim(v.shape[-1])
    q, k, v = _operands(q, op_dtype, dkp), _operands(k, op_dtype, dkp), _operands(v, op_dtype, dvp)
    if init is not None:
        init = cm.pad_last(init.astype(F32), dvp)
        if dkp != dk:
            init = jnp.pad(init, [(0, 0)] * 3 + [(0, dkp - dk), (0, 0)])
    gcum = (jnp.zeros(beta.shape, F32) if g is None else cm.chunk_cumsum(g, chunk))
    beta_t = jnp.transpose(beta.astype(F32), (0, 2, 1))
    gcum_t = jnp.transpose(gcum, (0, 2, 1))
    return q, k, v, beta_t, gcum_t, init


def _forward(q, k, v, g, beta, init, chunk_segment, num_segments, chunk, config: Config,
             qk_norm: bool = False, scale: float = 1.0, for_bwd: bool = False, out_dtype=F32):
    """Runs the forward kernels; returns (o in out_dtype, final, residuals for the Pallas
    backward or None, rstd (rstd_q, rstd_k) or None)."""
    from pallas_kernels.gated_delta import mosaic, triton_common, triton_fwd  # noqa: PLC0415

    layout = PackedLayout(chunk_segment, num_segments, chunk)
    dk, dv = q.shape[-1], v.shape[-1]
    interpret = _interpret()
    backend = _backend(config)
    if backend == "mosaic":  # the features next to the kernel's head-major transposes (XLA)
        qn, kn, rstd = _qk_in(q, k, qk_norm, scale)
        store = for_bwd and config.bwd == "pallas"
        o, final, *h = mosaic.gated_delta_fwd(
            qn, kn, v, g, beta, layout, init, interpret=interpret,
            block_v=config.block_v if config.block_v and config.block_v % 128 == 0 else None,
            precision=mosaic.resolve_precision(config.precision, interpret), store_states=store)
        # Residual for the Mosaic backward: the chunk-start states (q', k' are recomputed there
        # from the raw q, k and rstd, as ``_xla_vjp`` does).
        return o.astype(out_dtype), final, (tuple(h) if store else None), rstd
    # The kernels use q, k, v only as dot operands: with bf16 dots they take them in bf16 (a cast
    # only for float32 inputs).  A = K K^T (UT transform) takes the same bf16 K: its products are
    # exact in the float32 accumulator.  The L2-norm (qk_norm) and the q scale are applied inside
    # the kernels as row scales of float32 dot results: the Gram kernel computes the key norms
    # from its diagonal, the output kernel the query norms from its q tiles.
    op_dtype = triton_common.operand_dtype(config.precision, interpret)
    qp, kp, vp, beta_t, gcum_t, initp = _prepare(q, k, v, g, beta, init, chunk, op_dtype)
    dkp, dvp = qp.shape[-1], vp.shape[-1]
    walks = qp.shape[0] * num_segments * qp.shape[2]          # B * S * H sequential walks
    block_v = config.walk_block_v(dkp, dvp, walks)
    par_block_v = min(dvp, config.par_block_v)
    block_k = min(dkp, config.block_k)
    lo, hi, seg, first = cm.segment_ranges(layout)
    store = for_bwd and config.bwd == "pallas"
    t, w, u, rk = triton_fwd.ut_transform(kp, vp, beta_t, gcum_t, chunk, interpret=interpret,
                                          num_warps=config.ut_warps(),
                                          ut_precision=config.ut_precision,
                                          precision=config.precision, with_t=store,
                                          block_k=block_k, block_v=par_block_v,
                                          kernel=config.ut_kernel,
                                          wu_num_warps=config.par_num_warps, l2norm=qk_norm,
                                          num_stages=config.par_stages("ut"))
    h, v_new, final = triton_fwd.state_walk(
        kp, w, u, gcum_t, initp, lo, hi, seg, first, chunk=chunk, num_segments=num_segments,
        block_v=block_v, precision=config.precision, interpret=interpret,
        num_warps=config.walk_warps(dkp, block_v),
        num_stages=config.walk_stages(dkp, walks * (dvp // block_v), chunk, block_v,
                                      jnp.dtype(op_dtype).itemsize),
        block_k=block_k, rk=rk, longest_first=config.longest_first)
    o, rq = triton_fwd.chunk_output(qp, kp, gcum_t, h, v_new, seg, chunk=chunk,
                                    precision=config.precision, interpret=interpret,
                                    num_warps=config.par_num_warps, block_k=block_k,
                                    block_v=par_block_v, out_dtype=out_dtype, rk=rk,
                                    q_scale=scale, num_stages=config.par_stages("output"))
    # Residuals for the Pallas backward; its kernels take the normalised, scaled q', k', which
    # ``_core_bwd`` rebuilds from the raw q, k and these norms (one elementwise XLA pass).
    extra = (vp, beta_t, gcum_t, t, w, h, v_new, lo, hi, seg, first) if store else None
    rstd = (rq, rk) if qk_norm else None
    return o[..., :dv], final[..., :dk, :dv], extra, rstd


# ------------------------------------------------------------------------------------------------
# custom_vjp
# ------------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11, 12, 13))
def _gated_delta_core(q, k, v, g, beta, init, chunk_segment, num_segments, chunk, has_g, config,
                      qk_norm, scale, out_dtype):
    o, final, _, _ = _forward(q, k, v, g if has_g else None, beta, init, chunk_segment,
                              num_segments, chunk, config, qk_norm, scale, out_dtype=out_dtype)
    return o, final


def _core_fwd(q, k, v, g, beta, init, chunk_segment, num_segments, chunk, has_g, config,
              qk_norm, scale, out_dtype):
    o, final, extra, rstd = _forward(q, k, v, g if has_g else None, beta, init, chunk_segment,
                                     num_segments, chunk, config, qk_norm, scale, for_bwd=True,
                                     out_dtype=out_dtype)
    # Residuals: the raw q, k (as given) and, with qk_norm, only their rstd ([B, L, H] float32);
    # the normalised copies the backward kernels read are the operand-dtype ones in ``extra``.
    return (o, final), (q, k, v, g, beta, init, chunk_segment, extra, rstd)


def _xla_vjp(res, cts, num_segments, chunk, has_g, scale):
    """VJP of the chunked XLA form w.r.t. (q', k', v, g, beta, init), q', k' the kernels' q/k."""
    q, k, v, g, beta, init, chunk_segment, _, rstd = res
    layout = PackedLayout(chunk_segment, num_segments, chunk)
    qn, kn = _qk_in_from_rstd(q, k, rstd, scale)

    def f(q, k, v, g, beta, init):
        return chunked.delta_chunked(q, k, v, g if has_g else None, beta, layout,
                                     initial_state=init, output_final_state=True)

    _, vjp = jax.vjp(f, qn, kn, v, g, beta, init)
    return vjp(cts)


def _mosaic_bwd(res, do, dfinal, num_segments, chunk, has_g, config, scale):
    """The Mosaic backward kernel (``mosaic_bwd``) w.r.t. (q', k', v, g, beta, init), q', k' the
    kernels' q/k, from the residuals (the forward stored the chunk-start states)."""
    from pallas_kernels.gated_delta import mosaic, mosaic_bwd  # noqa: PLC0415
    q, k, v, g, beta, init, chunk_segment, (h,), rstd = res
    qn, kn = _qk_in_from_rstd(q, k, rstd, scale)
    interpret = _interpret()
    dq, dk, dv, dg, dbeta, dinit = mosaic_bwd.gated_delta_bwd(
        qn, kn, v, g if has_g else None, beta, PackedLayout(chunk_segment, num_segments, chunk),
        h, do, dfinal, has_init=init is not None, interpret=interpret,
        precision=mosaic.resolve_precision(config.precision, interpret))
    return dq, dk, dv.astype(v.dtype), dg.astype(g.dtype), dbeta.astype(beta.dtype), dinit


def _core_bwd(num_segments, chunk, has_g, config, qk_norm, scale, out_dtype, res, cts):
    do, dfinal = cts
    q, k, rstd = res[0], res[1], res[8]
    use_pallas = config.bwd == "pallas" and res[7] is not None
    backend = _backend(config)
    rowdots = None
    if use_pallas and backend == "triton":
        from pallas_kernels.gated_delta import triton_bwd, triton_common  # noqa: PLC0415
        interpret = _interpret()
        op_dtype = triton_common.operand_dtype(config.precision, interpret)
        dkp = _padded_dim(q.shape[-1])
        plain = rstd is None and scale == 1.0
        # The forward kernels' q', k': the inputs themselves without norm and scale (then the
        # kernels also write dq, dk in the inputs' dtypes: nothing is left for XLA to do).
        qn, kn = (q, k) if plain else _qk_in_from_rstd(q, k, rstd, scale)
        extra = (_operands(qn, op_dtype, dkp), _operands(kn, op_dtype, dkp), *res[7])
        out_dtypes = (q.dtype, k.dtype) if plain and dkp == q.shape[-1] else (F32, F32)
        *grads, rowdots = triton_bwd.backward((*res[:7], extra), do, dfinal,
                                              num_segments=num_segments, chunk=chunk,
                                              has_g=has_g, config=config, interpret=interpret,
                                              dqk_dtypes=out_dtypes)
    elif use_pallas and backend == "mosaic":
        grads = _mosaic_bwd(res, do, dfinal, num_segments, chunk, has_g, config, scale)
    else:
        grads = _xla_vjp(res, (do, dfinal), num_segments, chunk, has_g, scale)
    dq, dk, dv, dg, dbeta, dinit = grads
    dq, dk = _qk_out(dq, dk, q, k, rstd, scale, rowdots)  # slice, scale, L2-norm Jacobian, cast
    if not has_g:
        dg = jnp.zeros_like(res[3])
    return dq, dk, dv, dg, dbeta, dinit, None


_gated_delta_core.defvjp(_core_fwd, _core_bwd)


def chunk_supported(chunk: int) -> bool:
    """The Pallas kernels need a power-of-two chunk size >= 16 (Triton block shapes; the
    triangular inverse works in 16 x 16 diagonal blocks)."""
    return chunk >= 16 and chunk & (chunk - 1) == 0


@functools.lru_cache(maxsize=None)
def _warn_chunk_fallback(chunk: int) -> None:
    """Warns once per chunk size (the cache makes repeated calls no-ops)."""
    warnings.warn(f"pallas gated delta kernels need a power-of-two chunk size >= 16, got {chunk}; "
                  "using the chunked XLA form instead", RuntimeWarning, stacklevel=3)


def gated_delta_packed(q, k, v, g, beta, layout: PackedLayout, initial_state=None,
                       output_final_state: bool = False, config: Config | None = None, *,
                       use_qk_l2norm: bool = False, scale: float = 1.0, out_dtype=F32):
    """Chunked (gated) delta rule on a packed stream with the Pallas kernels.  See module doc.

    use_qk_l2norm, scale: as in ``mom_jax.ops.packed_recurrence`` (q <- l2norm(q) * scale,
    k <- l2norm(k) inside the op; scale must be a Python number).  Gradients are w.r.t. the raw
    q, k and come back in their dtypes.  o comes back in out_dtype (the output kernel writes it).
    """
    out_dtype = jnp.dtype(out_dtype)
    config = config or get_default_config()
    chunk = layout.chunk_size
    static_scale = check_qk_options(use_qk_l2norm, scale, "gated_delta_packed")
    if static_scale is None:
        raise ValueError(f"gated_delta_packed: scale must be a static Python number (the kernel "
                         f"applies it at trace time), got {scale!r}")
    scale = static_scale
    if q.shape[1] != layout.num_chunks * chunk:
        raise ValueError(f"stream length {q.shape[1]} != num_chunks * chunk_size "
                         f"({layout.num_chunks} * {chunk})")
    if not chunk_supported(chunk):
        _warn_chunk_fallback(chunk)
        q, k = qk_features(q, k, bool(use_qk_l2norm), scale)
        o, final = chunked.delta_chunked(q, k, v, g, beta, layout, initial_state=initial_state,
                                         output_final_state=output_final_state)
        return o.astype(out_dtype), final
    has_g = g is not None
    g_arr = g.astype(F32) if has_g else jnp.zeros(beta.shape, F32)
    init = None if initial_state is None else initial_state.astype(F32)
    o, final = _gated_delta_core(q, k, v, g_arr, beta, init, layout.chunk_segment.astype(jnp.int32),
                                 layout.num_segments, chunk, has_g, config, bool(use_qk_l2norm),
                                 scale, out_dtype)
    return o, (final if output_final_state else None)


def gated_delta_kernel(q, k, v, g, beta, layout, initial_state, output_final_state, *,
                       use_qk_l2norm: bool = False, scale: float = 1.0, out_dtype=F32):
    """Registered for rule "gated_delta" (``register_pallas_kernel(..., qk_l2norm=True)``)."""
    return gated_delta_packed(q, k, v, g, beta, layout, initial_state, output_final_state,
                              use_qk_l2norm=use_qk_l2norm, scale=scale, out_dtype=out_dtype)


def delta_kernel(q, k, v, g, beta, layout, initial_state, output_final_state, *,
                 use_qk_l2norm: bool = False, scale: float = 1.0, out_dtype=F32):
    """Registered for rule "delta" (g is None: no decay)."""
    return gated_delta_packed(q, k, v, None, beta, layout, initial_state, output_final_state,
                              use_qk_l2norm=use_qk_l2norm, scale=scale, out_dtype=out_dtype)
