"""Pallas gated delta rule kernels (pallas_kernels.gated_delta) against the token-by-token scan.

CPU only: the Triton kernels run with ``interpret=True``, the Mosaic (TPU) kernels in TPU interpret
mode.  Inputs are random (never zeros) and small.  Also checks that the Triton kernels lower for CUDA
and the Mosaic kernels lower for TPU without the hardware.
"""
from __future__ import annotations

import functools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels  # noqa: F401  (registers the kernels)
from mom_jax import ops
from mom_jax.ops import PackedLayout, l2norm
from mom_jax.ops import api as ops_api
from pallas_kernels.gated_delta import api as gd_api
from pallas_kernels.gated_delta import common as cm
from tests.lowering import H100, abstract_mesh

F32_REL = 1e-5
GRAD_REL = 1e-4
BF16_REL = 1e-2


def rel_err(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    nb = np.linalg.norm(b)
    assert nb > 0, "reference is all zeros: the comparison would be vacuous"
    return float(np.linalg.norm(a - b) / nb)


# Layouts: (chunk_segment rows, num_segments, token length of every (row, segment)).
# Covers: a segment spanning many chunks, segments shorter than a chunk (tail slots padded with
# zeros), empty segments, unused chunks (-1) between and after segments, a segment split into two
# runs (restarts from its initial state, final state after the last run).
LAYOUTS = {
    "long": ([[0, 0, 0, 0, 0, 0]], 1, [[6 * 16]]),
    "packed": ([[0, 0, 1, -1, 3, 3, 3, -1],
                [1, 2, 2, 2, 0, -1, -1, -1]], 4, [[20, 5, 0, 40], [9, 16, 48, 0]]),
    "split_runs": ([[0, 0, 1, 0, -1, 2]], 3, [[32, 7, 16], [0, 0, 0]]),
}


def make_case(name, *, chunk=16, h=2, dk=32, dv=32, seed=0, init=True, gated=True):
    rows, s, lens = LAYOUTS[name]
    seg = np.asarray(rows, np.int32)
    b, nc = seg.shape
    l = nc * chunk
    # slot -> used?  tokens of a segment fill its chunks from the start, up to its length; with a
    # segment split into runs, the length counts over all its chunks in order.
    used = np.zeros((b, l), bool)
    for r in range(b):
        for sid in range(s):
            n = lens[r][sid] if r < len(lens) else 0
            for c in np.nonzero(seg[r] == sid)[0]:
                take = min(n, chunk)
                used[r, c * chunk: c * chunk + take] = True
                n -= take
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    m = jnp.asarray(used)
    q = l2norm(jax.random.normal(ks[0], (b, l, h, dk))) * dk ** -0.5
    k = l2norm(jax.random.normal(ks[1], (b, l, h, dk))) * m[..., None, None]
    v = jax.random.normal(ks[2], (b, l, h, dv)) * m[..., None, None]
    g = jax.nn.log_sigmoid(1.5 * jax.random.normal(ks[3], (b, l, h)) + 2.5) * m[..., None]
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, l, h))) * m[..., None]
    h0 = 0.5 * jax.random.normal(ks[5], (b, s, h, dk, dv)) if init else None
    layout = PackedLayout(jnp.asarray(seg), s, chunk)
    return dict(q=q, k=k, v=v, g=g if gated else None, beta=beta, h0=h0, layout=layout,
                rule="gated_delta" if gated else "delta")


STATIC_KEYS = ("rule", "qk")  # case entries that are not arrays


def run(case, impl, config=None):
    """Forward of a case; ``case["qk"]`` (optional): use_qk_l2norm / scale of the op."""
    kw = dict(layout=case["layout"], initial_state=case["h0"], output_final_state=True,
              **case.get("qk", {}))
    if impl == "pallas" and config is not None:
        return gd_api.gated_delta_packed(case["q"], case["k"], case["v"], case["g"], case["beta"],
                                         config=config, **kw)
    return ops.packed_recurrence(case["rule"], case["q"], case["k"], case["v"], g=case["g"],
                                 beta=case["beta"], impl=impl, **kw)


def jrun(case, impl, config=None):
    """run() under jax.jit (the rule string and q/k options stay outside the traced arguments)."""
    arrays = {n: x for n, x in case.items() if n not in STATIC_KEYS}
    static = {n: x for n, x in case.items() if n in STATIC_KEYS}
    return jax.jit(lambda a: run(dict(a, **static), impl, config))(arrays)


def cotangents(case):
    """The cotangents of (o, final state) that ``grads`` uses."""
    ct = jax.random.normal(jax.random.PRNGKey(11), case["v"].shape)
    b, s = case["layout"].chunk_segment.shape[0], case["layout"].num_segments
    ctf = jax.random.normal(jax.random.PRNGKey(12), (b, s) + case["q"].shape[2:] + case["v"].shape[-1:])
    return ct, ctf


def grads(case, impl, config=None, o_weight=1.0):
    """Gradients of sum(o * ct) * o_weight + sum(final * ctf) w.r.t. every array input of the case
    (o_weight=0: the final-state cotangent alone)."""
    ct, ctf = cotangents(case)
    names = [n for n in ("q", "k", "v", "g", "beta", "h0") if case[n] is not None]

    def loss(*arrays):
        c = dict(case, **dict(zip(names, arrays)))
        o, final = run(c, impl, config)
        return o_weight * jnp.sum(o * ct) + jnp.sum(final * ctf)

    return dict(zip(names, jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))(
        *[case[n] for n in names])))


def assert_pallas_matches_scan(case, config=None):
    """Pallas forward (o, final state) and every gradient against the scan reference."""
    o, final = jrun(case, "pallas", config)
    o_ref, final_ref = jrun(case, "scan")
    assert rel_err(o, o_ref) < F32_REL and rel_err(final, final_ref) < F32_REL
    gp, gs = grads(case, "pallas", config), grads(case, "scan")
    for n in gs:
        assert rel_err(gp[n], gs[n]) < GRAD_REL, n


# ------------------------------------------------------------------------------------------------
# triangular inverse
# ------------------------------------------------------------------------------------------------

def _blocked_inverse(a):
    """cm.block_ut_inverse on the 16 x 16 blocks of a strictly lower [C, C] A, assembled."""
    s = min(cm.SUB_BLOCK, a.shape[0])
    n = a.shape[0] // s
    blk = lambda i, j: a[i * s:(i + 1) * s, j * s:(j + 1) * s]  # noqa: E731
    t = cm.block_ut_inverse({(i, j): blk(i, j) for i in range(n) for j in range(i + 1)}, n)
    z = jnp.zeros((s, s), jnp.float32)
    return jnp.block([[t[(i, j)] if j <= i else z for j in range(n)] for i in range(n)])


@pytest.mark.parametrize("inverse", ["masked", "blocked"])
@pytest.mark.parametrize("chunk", [16, 64, 128])
@pytest.mark.parametrize("corr", [0.0, 3.0])
def test_ut_inverse_matches_float64(inverse, chunk, corr):
    """Correlated keys (k_i.k_j ~ 0.9) make the product form blow up; ours must stay accurate.
    "masked": ``cm.ut_inverse`` (whole tile); "blocked": ``cm.block_ut_inverse`` (16 x 16
    blocks)."""
    rng = np.random.default_rng(int(chunk + 10 * corr))
    k = rng.standard_normal((chunk, 64)) + corr * rng.standard_normal((1, 64))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    beta = 1 / (1 + np.exp(-rng.standard_normal(chunk)))
    gcum = np.cumsum(-0.05 * rng.random(chunk))
    a = jax.jit(cm.strict_a)(jnp.asarray(k, jnp.float32), jnp.asarray(beta, jnp.float32),
                             jnp.asarray(gcum, jnp.float32))
    t = jax.jit(cm.ut_inverse if inverse == "masked" else _blocked_inverse)(a)
    a64 = np.tril(beta[:, None] * np.exp(gcum[:, None] - gcum[None, :]) * (k @ k.T), -1)
    ref = cm.float64_inverse_check(a64)
    assert rel_err(t, ref) < 2e-6
    assert np.abs(ref - np.eye(chunk)).max() > 0.1  # T is not close to I: the inverse was exercised
    if corr:
        assert np.abs(a64).max() > 0.5  # the correlated case really is correlated


# ------------------------------------------------------------------------------------------------
# Triton kernels (interpret mode on CPU)
# ------------------------------------------------------------------------------------------------

def _ut_case(chunk, dk, dv, seed):
    """Three chunks of one head (k [3, C, dk], v [3, C, dv], beta, G [3, C]; float32 values held
    as float64, so that the reference sees exactly the kernel's inputs):
    0: independent keys, sigmoid beta, mild decay; 1: zero beta on every third row and on the
    second 16-row block (if any), and log-decay -100 at every eighth position (from 3 on: the
    groups straddle the 16-row blocks), so e^{G_i - G_j} underflows in float32 across two such
    steps; 2: correlated keys (k_i.k_j ~ 0.9) with beta = 1."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((3, chunk, dk))
    k[2] += 3.0 * rng.standard_normal(dk)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((3, chunk, dv))
    beta = 1 / (1 + np.exp(-rng.standard_normal((3, chunk))))
    beta[1, ::3] = 0.0
    beta[1, 16:32] = 0.0
    beta[2] = 1.0
    g = -0.05 * rng.random((3, chunk))
    g[1, 3::8] = -100.0
    f32 = lambda x: x.astype(np.float32).astype(np.float64)  # noqa: E731
    return f32(k), f32(v), f32(beta), f32(np.cumsum(g, axis=1))


def _ut_reference(k, v, beta, gcum):
    """float64 T = (I + A)^-1, W = T diag(b e^G) K, U = T diag(b) V of one chunk."""
    strict = np.tri(len(beta), k=-1, dtype=bool)
    decay = np.where(strict, np.exp(np.where(strict, gcum[:, None] - gcum[None, :], 0.0)), 0.0)
    t = cm.float64_inverse_check(beta[:, None] * decay * (k @ k.T))
    return t, t @ ((beta * np.exp(gcum))[:, None] * k), t @ (beta[:, None] * v)


@pytest.mark.parametrize("kernel", ["split", "masked"])
@pytest.mark.parametrize("chunk,dk", [(64, 64), (64, 128), (64, 256), (32, 128), (16, 64),
                                      (128, 64)])
def test_ut_kernel_matches_float64(kernel, chunk, dk):
    """T, W and U of the UT kernel (interpret mode, float32) against float64 NumPy, chunk by
    chunk: zero-beta rows, decays that underflow, correlated keys; with_t=False gives the same
    W and U."""
    from pallas_kernels.gated_delta import triton_fwd  # noqa: PLC0415
    dv = 32
    k, v, beta, gcum = _ut_case(chunk, dk, dv, seed=chunk + dk)
    f32 = lambda x, d: jnp.asarray(x.reshape(1, 3 * chunk, 1, d), jnp.float32)  # noqa: E731
    args = (f32(k, dk), f32(v, dv), jnp.asarray(beta.reshape(1, 1, -1), jnp.float32),
            jnp.asarray(gcum.reshape(1, 1, -1), jnp.float32))
    run_ut = lambda with_t, l2norm=False, args=args: jax.jit(functools.partial(  # noqa: E731
        triton_fwd.ut_transform, chunk=chunk, interpret=True, kernel=kernel, with_t=with_t,
        block_k=32, block_v=16, l2norm=l2norm))(*args)
    t, w, u, rk = run_ut(True)
    assert rk is None
    for x in range(3):
        rows = slice(x * chunk, (x + 1) * chunk)
        t_ref, w_ref, u_ref = _ut_reference(k[x], v[x], beta[x], gcum[x])
        assert rel_err(t[0, 0, rows], t_ref) < 3e-6, x
        assert rel_err(w[0, rows, 0], w_ref) < 3e-6, x
        assert rel_err(u[0, rows, 0], u_ref) < 3e-6, x
    t_none, w2, u2, _ = run_ut(False)
    assert t_none is None
    np.testing.assert_array_equal(np.asarray(w2), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(u2), np.asarray(u))
    # The key L2-norm inside the kernels, on keys of row norms 0.1..10 and a zero row: rk from
    # the Gram diagonal (1/sqrt(eps) for the zero row, as the XLA l2norm), and T, W, U of the
    # normalised keys.
    norms = 10.0 ** np.random.default_rng(1).uniform(-1, 1, (3, chunk, 1))
    norms[0, 5] = 0.0
    k_raw = (k * norms).astype(np.float32).astype(np.float64)
    t, w, u, rk = run_ut(True, l2norm=True, args=(f32(k_raw, dk), *args[1:]))
    for x in range(3):
        rows = slice(x * chunk, (x + 1) * chunk)
        rk_ref = 1.0 / np.sqrt(np.sum(k_raw[x] ** 2, axis=1) + 1e-6)
        assert rel_err(rk[0, rows, 0], rk_ref) < 1e-6, x
        t_ref, w_ref, u_ref = _ut_reference(k_raw[x] * rk_ref[:, None], v[x], beta[x], gcum[x])
        assert rel_err(t[0, 0, rows], t_ref) < 3e-6, x
        assert rel_err(w[0, rows, 0], w_ref) < 3e-6, x
        assert rel_err(u[0, rows, 0], u_ref) < 3e-6, x


def test_ut_kernel_config():
    """Config.ut_kernel names exactly the kernels triton_fwd has; anything else is an error; the
    warps default to 1 for the split kernel's inverse; the rules of the other derived knobs."""
    from pallas_kernels.gated_delta import triton_fwd  # noqa: PLC0415
    assert set(gd_api.UT_KERNELS) == set(triton_fwd.UT_KERNELS)
    assert gd_api.Config().ut_kernel == "split" and gd_api.Config().ut_warps() == 1
    assert gd_api.Config(ut_kernel="masked").ut_warps() == gd_api.Config().par_num_warps
    assert gd_api.Config(ut_num_warps=2).ut_warps() == 2
    with pytest.raises(ValueError, match="ut_kernel"):
        gd_api.Config(ut_kernel="fla")
    with pytest.raises(ValueError, match="ut_num_warps"):
        gd_api.Config(ut_num_warps=3)
    assert gd_api.Config(par_num_warps=2).bwd_par_warps() == 2
    assert gd_api.Config(bwd_par_num_warps=8).bwd_par_warps() == 8
    with pytest.raises(ValueError, match="bwd_par_num_warps"):
        gd_api.Config(bwd_par_num_warps=6)
    # walk value block: 64 only for dk <= 128 with enough walk programs, else 32, never above dv
    auto = gd_api.Config()
    assert auto.walk_block_v(128, 128, walks=128) == 64          # 256 programs of 64 columns
    assert auto.walk_block_v(128, 128, walks=32) == 32           # too few programs
    assert auto.walk_block_v(256, 256, walks=160) == 64          # MoM layer: 640 programs
    assert auto.walk_block_v(256, 256, walks=32) == 32           # 128 programs: too few
    assert auto.walk_warps(256, 64) == 8 and auto.walk_warps(256, 32) == 4
    assert auto.walk_warps(128, 64) == 4 and gd_api.Config(num_warps=2).walk_warps(256, 64) == 2
    # forward walk stages: 3 for dk <= 128 walks of < 256 programs, else 2; the dS walk 2
    # unless num_stages is set
    assert auto.walk_stages(128, programs=128) == 3 and auto.walk_stages(128, programs=256) == 2
    assert auto.walk_stages(256, programs=128) == 2
    assert gd_api.Config(num_stages=1).walk_stages(128, programs=128) == 1
    from pallas_kernels.gated_delta import triton_bwd  # noqa: PLC0415
    from pallas_kernels.gated_delta import triton_common as tc  # noqa: PLC0415
    assert triton_bwd._bwd_walk_stages(auto, 64, 128, 64, 2) == 2
    assert triton_bwd._bwd_walk_stages(auto, 64, 256, 32, 2) == 1         # 96 KB per stage
    # ... by the device's shared-memory budget: an H100's fits two bf16 stages at dk 256, not fp32
    h100 = tc.TILE_SMEM_BUDGET[9]
    assert triton_bwd._bwd_walk_stages(auto, 64, 256, 64, 2, smem_budget=h100) == 2
    assert triton_bwd._bwd_walk_stages(auto, 64, 256, 64, 4, smem_budget=h100) == 1
    assert triton_bwd._bwd_walk_stages(auto, 128, 256, 64, 2, smem_budget=h100) == 1   # 196 KB
    assert triton_bwd._bwd_walk_stages(gd_api.Config(num_stages=4), 64, 256, 64, 2,
                                       smem_budget=h100) == 2    # 4 asked, 2 fit (96 KB each)
    # the forward walk too: one stage of K, W [128, 256] and U [128, 64] bf16 tiles (144 KB) at
    # chunk 128, dk 256 (two asked the H100 for 295 KB and failed to launch)
    assert auto.walk_stages(256, 640, chunk=64, block_v=64, smem_budget=h100) == 2
    assert auto.walk_stages(256, 640, chunk=128, block_v=64, smem_budget=h100) == 1
    assert auto.walk_stages(128, 128, chunk=128, block_v=64, smem_budget=h100) == 2
    assert tc.stages_within_budget(4, 100, 250) == 2 and tc.stages_within_budget(2, 300, 250) == 1
    assert triton_bwd._bwd_walk_stages(auto, 64, 256, 64, 2, smem_budget=160 * 1024) == 1
    assert tc.tile_smem_budget() == tc.DEFAULT_TILE_SMEM_BUDGET            # CPU: no GPU generation
    assert triton_bwd._bwd_walk_stages(gd_api.Config(num_stages=3), 64, 128, 64, 2) == 3
    with pytest.raises(ValueError, match="num_warps"):
        gd_api.Config(num_warps=3)
    assert auto.walk_block_v(16, 16, walks=1024) == 16
    assert gd_api.Config(block_v=16).walk_block_v(128, 128, 1024, backward=True) == 16
    assert gd_api.Config(bwd_block_v=64).walk_block_v(256, 256, 1, backward=True) == 64
    with pytest.raises(ValueError, match="unknown UT kernel"):
        triton_fwd.ut_transform(*[jnp.zeros((1, 16, 1, 16))] * 2, *[jnp.zeros((1, 1, 16))] * 2, 16,
                                interpret=True, kernel="fla")


@pytest.mark.parametrize("ut_kernel", ["split", "masked"])
@pytest.mark.parametrize("chunk", [32, 64])
def test_ut_kernels_end_to_end(ut_kernel, chunk):
    """Both UT kernels inside the whole forward and backward at chunk 32 / 64 (several 16-row
    blocks per chunk): packed layout with empty and short segments, unused chunks, initial state."""
    case = make_case("packed", chunk=chunk, seed=31)
    assert_pallas_matches_scan(case, gd_api.Config(ut_kernel=ut_kernel))


@pytest.mark.parametrize("name,gated,init", [("long", True, True), ("packed", True, True),
                                             ("packed", False, False), ("split_runs", True, True)])
def test_forward_matches_scan(name, gated, init):
    case = make_case(name, gated=gated, init=init)
    o, final = jrun(case, "pallas")
    o_ref, final_ref = jrun(case, "scan")
    assert not np.isnan(np.asarray(o)).any()
    assert rel_err(o, o_ref) < F32_REL
    assert rel_err(final, final_ref) < F32_REL


@pytest.mark.parametrize("name,gated,init", [("packed", True, True), ("packed", False, False),
                                             ("split_runs", True, True)])
def test_gradients_match_scan(name, gated, init):
    case = make_case(name, gated=gated, init=init, seed=3)
    gp = grads(case, "pallas")
    gs = grads(case, "scan")
    assert set(gp) == set(gs)
    for n in gs:
        assert rel_err(gp[n], gs[n]) < GRAD_REL, n


def test_chunk64_many_chunks_and_odd_head_dims():
    """Chunk 64 with a segment over many chunks; dk=24, dv=40 are padded to powers of two."""
    rows = [[0, 0, 0, 0, 1]]
    LAYOUTS["c64"] = (rows, 3, [[4 * 64, 30, 0]])
    case = make_case("c64", chunk=64, dk=24, dv=40, h=1, seed=5)
    assert_pallas_matches_scan(case)


@pytest.mark.parametrize("launch", [True, False])
def test_several_key_and_value_tiles(launch):
    """dk=32 as two 16-wide key tiles, dv=48 (padded to 64) as 16-wide value blocks: several walk
    programs per head, loops over value and key blocks inside the chunk-parallel kernels, dG shares
    of the key blocks; launch orders: the defaults (dq/dk/dW key blocks first in the grid, the
    walks longest first) or the given orders."""
    config = gd_api.Config(block_k=16, block_v=16, par_block_v=16, blocks_first=launch,
                           longest_first=launch)
    case = make_case("packed", dk=32, dv=48, seed=17)
    assert_pallas_matches_scan(case, config)


def test_walk_order_longest_first():
    """Walk ids by length, longest first; ties keep their order; empty walks last."""
    lo = jnp.array([0, 3, 5, 5, 9, 0], jnp.int32)
    hi = jnp.array([3, 5, 9, 5, 12, 4], jnp.int32)
    from pallas_kernels.gated_delta import triton_common  # noqa: PLC0415
    assert triton_common.walk_order(lo, hi).tolist() == [2, 5, 0, 4, 1, 3]
    assert triton_common.walk_order(lo, hi, longest_first=False).tolist() == list(range(6))


def test_default_blocks_at_dk128():
    """The default block sizes at dk = dv = 128: two 64-wide key tiles, four 32-wide walk
    programs per head, two 64-wide value blocks in the chunk-parallel kernels; a split segment."""
    case = make_case("split_runs", dk=128, dv=128, h=1, seed=29)
    assert_pallas_matches_scan(case)


@pytest.mark.parametrize("name,config", [("packed", gd_api.Config(bwd="xla")),
                                         ("split_runs", gd_api.Config(bwd_qdo=True))])
def test_other_backward_configs_match(name, config):
    """The XLA backward, and the dS walk that reads Q^T e^G dO precomputed per chunk by the P^T dO
    kernel (bwd_qdo=True; the default computes it in the walk)."""
    case = make_case(name, seed=7)
    gp = grads(case, "pallas", config)
    gs = grads(case, "scan")
    for n in gs:
        assert rel_err(gp[n], gs[n]) < GRAD_REL, n


def test_bf16_stored_intermediates(monkeypatch):
    """The GPU default stores q, k, v, dO, W, h, v_new, dh, du, dW in bfloat16 (they are only
    bf16 dot operands there).  Force that storage in interpret mode (dots stay float32) and check
    forward and gradients against the scan at bf16 tolerance, incl. split runs and initial state."""
    from pallas_kernels.gated_delta import triton_common  # noqa: PLC0415
    monkeypatch.setattr(triton_common, "operand_dtype", lambda precision, interpret: jnp.bfloat16)
    case = make_case("split_runs", seed=23)
    o, final = jrun(case, "pallas")
    o_ref, final_ref = jrun(case, "scan")
    assert 1e-6 < rel_err(o, o_ref) < BF16_REL  # (lower bound: the bf16 storage was really used)
    assert rel_err(final, final_ref) < BF16_REL
    gp, gs = grads(case, "pallas"), grads(case, "scan")
    for n in gs:
        assert rel_err(gp[n], gs[n]) < 2 * BF16_REL, n


@pytest.mark.parametrize("impl", ["pallas", "xla", "scan"])
def test_out_dtype_rounds_o_once(impl):
    """packed_recurrence(out_dtype=bfloat16) gives the float32 o rounded to bfloat16 (the Pallas
    output kernel writes it so; the others cast), and its gradients (bf16 cotangent of o) match
    the float32 run's to bf16 accuracy."""
    case = make_case("packed", seed=5)
    kw = dict(g=case["g"], beta=case["beta"], layout=case["layout"], initial_state=case["h0"],
              impl=impl)

    def f(q, k, v, out_dtype):
        return ops.packed_recurrence(case["rule"], q, k, v, out_dtype=out_dtype, **kw)[0]

    args = (case["q"], case["k"], case["v"])
    o32 = jax.jit(functools.partial(f, out_dtype=jnp.float32))(*args)
    o16 = jax.jit(functools.partial(f, out_dtype=jnp.bfloat16))(*args)
    assert o32.dtype == jnp.float32 and o16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(o16), np.asarray(o32.astype(jnp.bfloat16)))
    ct = cotangents(case)[0]

    def loss(out_dtype):
        return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a, out_dtype).astype(jnp.float32) * ct),
                                argnums=(0, 1, 2)))(*args)

    for a, b in zip(loss(jnp.bfloat16), loss(jnp.float32)):
        assert a.dtype == b.dtype == jnp.float32
        assert rel_err(a, b) < 1e-2


def test_bf16_features_without_norm_give_bf16_gradients():
    """The layers' call: q', k' already normalised (and q scaled) in bf16, no norm or scale in
    the op.  The backward kernels then write dq, dk in bf16 themselves (no XLA cast after them);
    forward and gradients match the float32 scan at bf16 tolerance."""
    case = make_case("split_runs", seed=31)
    q, k, v = (case[n].astype(jnp.bfloat16) for n in ("q", "k", "v"))
    kw = dict(g=case["g"], beta=case["beta"], layout=case["layout"], initial_state=case["h0"],
              output_final_state=True)
    ct = cotangents(case)

    def loss(impl, q, k, v):
        o, fs = ops.packed_recurrence(case["rule"], q, k, v, impl=impl, out_dtype=v.dtype, **kw)
        return jnp.sum(o.astype(jnp.float32) * ct[0]) + jnp.sum(fs * ct[1])

    gp = jax.jit(jax.grad(functools.partial(loss, "pallas"), argnums=(0, 1, 2)))(q, k, v)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    gs = jax.jit(jax.grad(functools.partial(loss, "scan"), argnums=(0, 1, 2)))(*up)
    for a, r in zip(gp, gs):
        assert a.dtype == jnp.bfloat16
        assert rel_err(a, r) < 2 * BF16_REL


@pytest.mark.parametrize("varlen", [False, True])
def test_public_api_bf16(varlen):
    """bf16 q/k/v through gated_delta_rule (l2norm in the API) vs the fp32 scan, incl. varlen."""
    b, t, h, dk, dv = (1, 77, 2, 32, 32) if varlen else (2, 40, 2, 32, 32)
    ks = jax.random.split(jax.random.PRNGKey(21), 6)
    q, k = (jax.random.normal(ks[i], (b, t, h, dk), jnp.bfloat16) for i in (0, 1))
    v = jax.random.normal(ks[2], (b, t, h, dv), jnp.bfloat16)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h)) + 2.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h)))
    cu = jnp.array([0, 5, 5, 40, 77], jnp.int32) if varlen else None
    n = 4 if varlen else b
    h0 = jax.random.normal(ks[5], (n, h, dk, dv))

    def f(impl, *args):
        o, fs = ops.gated_delta_rule(*args, impl=impl, initial_state=h0, output_final_state=True,
                                     cu_seqlens=cu, chunk_size=16)
        return o, fs

    o, fs = jax.jit(functools.partial(f, "pallas"))(q, k, v, g, beta)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    o_ref, fs_ref = jax.jit(functools.partial(f, "scan"))(*up, g, beta)
    assert o.dtype == jnp.bfloat16
    assert rel_err(o, o_ref) < BF16_REL and rel_err(fs, fs_ref) < BF16_REL

    def loss(impl, *args):
        o, fs = f(impl, *args)
        return jnp.sum(o.astype(jnp.float32) * jnp.cos(jnp.arange(dv))) + jnp.sum(fs)

    gp = jax.jit(jax.grad(functools.partial(loss, "pallas"), argnums=(0, 1, 2, 3, 4)))(q, k, v, g, beta)
    gs = jax.jit(jax.grad(functools.partial(loss, "scan"), argnums=(0, 1, 2, 3, 4)))(*up, g, beta)
    for a, r in zip(gp, gs):
        assert rel_err(a, r) < 2 * BF16_REL


# ------------------------------------------------------------------------------------------------
# q/k L2-norm inside the op (use_qk_l2norm): pre-pass + custom-VJP Jacobian
# ------------------------------------------------------------------------------------------------

def _test_l2norm(x):
    """The test's own L2 normalisation (float32, eps 1e-6), differentiated by JAX."""
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.sum(jnp.square(x), -1, keepdims=True) + 1e-6)


def qk_norm_results(case, config=None, dtype=jnp.float32):
    """Forward and gradients (w.r.t. the raw q, k, v, g, beta, h0) of the kernel with
    use_qk_l2norm=True on raw q, k, and of the kernel with use_qk_l2norm=False on q, k normalised
    and scaled by the test (its gradients through that normalisation).  config None: through
    ``ops.packed_recurrence`` (the registered kernel), else ``gated_delta_packed``."""
    b, l, h, dk = case["q"].shape
    scale = dk ** -0.5
    ks = jax.random.split(jax.random.PRNGKey(41), 2)
    used = (case["v"] != 0).any(-1, keepdims=True)  # slots with a token (v is zero elsewhere)
    raw = dict(case, q=(1.7 * jax.random.normal(ks[0], (b, l, h, dk))).astype(dtype),
               k=(1.3 * jax.random.normal(ks[1], (b, l, h, dk)) * used).astype(dtype))
    ct = jax.random.normal(jax.random.PRNGKey(11), case["v"].shape)
    names = [n for n in ("q", "k", "v", "g", "beta", "h0") if case[n] is not None]

    def run(c, on):
        q, k = c["q"], c["k"]
        if not on:
            q, k = _test_l2norm(q) * scale, _test_l2norm(k)
        qk = dict(use_qk_l2norm=on, scale=scale if on else 1.0)
        if config is None:
            return ops.packed_recurrence(c["rule"], q, k, c["v"], g=c["g"], beta=c["beta"],
                                         layout=c["layout"], initial_state=c["h0"],
                                         output_final_state=True, impl="pallas", **qk)
        return gd_api.gated_delta_packed(q, k, c["v"], c["g"], c["beta"], c["layout"], c["h0"],
                                         True, config=config, **qk)

    out = {}
    for on in (True, False):
        def loss(*arrays, on=on):
            o, final = run(dict(raw, **dict(zip(names, arrays))), on)
            return jnp.sum(o * ct) + jnp.sum(final * jnp.cos(final))

        def fwd_and_grads(*arrays, on=on, loss=loss):
            o, final = run(dict(raw, **dict(zip(names, arrays))), on)
            grads = jax.grad(loss, argnums=tuple(range(len(names))))(*arrays)
            return o, final, dict(zip(names, grads))

        out[on] = jax.jit(fwd_and_grads)(*[raw[n] for n in names])
    return out


QK_CASES = [
    pytest.param("packed", dict(), None, id="registered_kernel"),
    pytest.param("packed", dict(gated=False, init=False), None, id="delta_rule_no_init"),
    pytest.param("split_runs", dict(dk=24, dv=40), gd_api.Config(), id="dk24_dv40_padded"),
    pytest.param("split_runs", dict(), gd_api.Config(bwd="xla"), id="xla_backward"),
    pytest.param("packed", dict(), gd_api.Config(backend="mosaic"), id="mosaic"),
]


@pytest.mark.parametrize("name,kw,config", QK_CASES)
def test_qk_l2norm_in_op_matches_prenormalised(name, kw, config):
    """use_qk_l2norm=True (normalised in the pre-pass, L2-norm Jacobian in the custom VJP) equals
    the kernel on q, k the test normalised, forward and every gradient, on varlen layouts."""
    res = qk_norm_results(make_case(name, seed=31, **kw), config)
    (o, final, g_on), (o_ref, final_ref, g_ref) = res[True], res[False]
    assert rel_err(o, o_ref) < F32_REL and rel_err(final, final_ref) < F32_REL
    assert set(g_on) == set(g_ref)
    for n in g_ref:
        assert rel_err(g_on[n], g_ref[n]) < GRAD_REL, n


def test_qk_l2norm_in_op_bf16_inputs_and_storage(monkeypatch):
    """bf16 raw q, k (normalised in float32; gradients come back in bf16) with the GPU's bf16
    storage of the kernels' operands forced in interpret mode, against the same op with float32
    operands.  The Triton forward dots the raw bf16 q, k and scales the float32 results by the
    norms: at least as accurate as dotting bf16-rounded normalised copies (the pre-normalised
    path, which rounds q, k a second time)."""
    from pallas_kernels.gated_delta import triton_common  # noqa: PLC0415
    case = make_case("split_runs", seed=37)
    exact = qk_norm_results(case, dtype=jnp.bfloat16)[True]
    with monkeypatch.context() as m:
        m.setattr(triton_common, "operand_dtype", lambda precision, interpret: jnp.bfloat16)
        res = qk_norm_results(case, dtype=jnp.bfloat16)
    (o, final, g_on), (o_pre, final_pre, g_pre) = res[True], res[False]
    o_ref, final_ref, g_ref = exact
    assert rel_err(o, o_ref) < 3e-3 and rel_err(final, final_ref) < 3e-3
    assert rel_err(o, o_ref) <= 1.2 * rel_err(o_pre, o_ref)
    assert rel_err(final, final_ref) <= 1.2 * rel_err(final_pre, final_ref)
    for n in g_ref:
        assert g_on[n].dtype == g_pre[n].dtype == g_ref[n].dtype, n
        assert rel_err(g_on[n], g_ref[n]) < BF16_REL, n


def test_registration_and_auto():
    assert ops_api.resolve_impl("pallas", "gated_delta") == "pallas"
    assert ops_api.resolve_impl("pallas", "delta") == "pallas"
    if jax.default_backend() == "cpu":  # CPU users stay on XLA
        assert ops_api.resolve_impl("auto", "gated_delta") == "xla"


def test_bad_chunk_falls_back_to_xla_with_one_warning():
    """Chunk 24 (not a power of two): same result as the chunked XLA form, one warning only."""
    rows = [[0, 0, 1, -1]]
    LAYOUTS["c24"] = (rows, 2, [[40, 11]])
    case = make_case("c24", chunk=24, seed=19)
    gd_api._warn_chunk_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match="power-of-two"):
        o, final = run(case, "pallas", gd_api.Config())
    o_ref, final_ref = run(case, "scan")
    assert rel_err(o, o_ref) < F32_REL and rel_err(final, final_ref) < F32_REL
    import warnings  # noqa: PLC0415
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(case, "pallas", gd_api.Config())  # no second warning
    with pytest.raises(ValueError):  # a stream length that does not match the layout still errors
        gd_api.gated_delta_packed(case["q"][:, :40], case["k"][:, :40], case["v"][:, :40],
                                  case["g"][:, :40], case["beta"][:, :40], case["layout"])


# ------------------------------------------------------------------------------------------------
# Lowering without the hardware
# ------------------------------------------------------------------------------------------------

def _grad_fn(config):
    def loss(q, k, v, g, beta, h0, seg):
        layout = PackedLayout(seg, 2, 64)
        o, final = gd_api.gated_delta_packed(q, k, v, g, beta, layout, h0, True, config=config)
        return jnp.sum(o) + jnp.sum(final)
    return jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))


def _abstract_args(b=1, nc=4, h=2, dk=128, dv=128, s=2):
    sds = jax.ShapeDtypeStruct
    l = nc * 64
    return (sds((b, l, h, dk), jnp.float32), sds((b, l, h, dk), jnp.float32),
            sds((b, l, h, dv), jnp.bfloat16), sds((b, l, h), jnp.float32),
            sds((b, l, h), jnp.float32), sds((b, s, h, dk, dv), jnp.float32),
            sds((b, nc), jnp.int32))


@pytest.mark.parametrize("ut_kernel", ["split", "masked"])
def test_triton_kernels_lower_for_cuda(monkeypatch, ut_kernel):
    """Forward and backward Triton kernels lower to Triton IR for an H100 without a GPU, with
    either UT kernel (chunk 64: four 16-row blocks in the split one)."""
    monkeypatch.setattr(gd_api, "_interpret", lambda: False)
    with jax.sharding.use_abstract_mesh(abstract_mesh(H100, "gpu")):
        lowered = jax.jit(_grad_fn(gd_api.Config(backend="triton", ut_kernel=ut_kernel))).trace(
            *_abstract_args()).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    # UT transform, forward state walk, outputs; backward: P^T dO, state walk, dq/dk/dW, WY
    split = ut_kernel == "split"   # three UT launches: gdn_ut_gram, gdn_ut_inverse, gdn_ut_apply
    assert text.count("__gpu$xla.gpu.triton") == (9 if split else 7)
    assert all(name in text for name in ("gdn_ut_gram", "gdn_ut_inverse", "gdn_ut_apply")) == split
    assert ("gdn_ut_transform" in text) != split


def _lowered_stages(monkeypatch, config) -> dict:
    """{kernel name: num_stages} of the Triton kernels of a forward + backward lowered for an
    H100 (dk = dv = 128)."""
    monkeypatch.setattr(gd_api, "_interpret", lambda: False)
    with jax.sharding.use_abstract_mesh(abstract_mesh(H100, "gpu")):
        text = jax.jit(_grad_fn(config)).trace(*_abstract_args()).lower(
            lowering_platforms=("cuda",)).as_text()
    found = re.findall(r'name = "(gdn_[a-z_]+)"[^\n]{0,400}?num_stages = (\d+)', text)
    return {name: int(stages) for name, stages in found}


def test_chunk_parallel_kernels_pipelining_stages(monkeypatch):
    """The chunk-parallel kernels lower with ``PAR_STAGES``' per-kernel stages by default and all
    with ``par_num_stages`` when set; the walks keep their own."""
    par = {"gdn_ut_gram": "ut", "gdn_ut_apply": "ut", "gdn_chunk_output": "output",
           "gdn_bwd_dv_local": "dv_local", "gdn_bwd_dqkw": "dqkw", "gdn_bwd_wy": "wy"}
    default = _lowered_stages(monkeypatch, gd_api.Config(backend="triton"))
    assert {n: default[n] for n in par} == {n: gd_api.PAR_STAGES[k] for n, k in par.items()}
    assert default["gdn_bwd_dqkw"] == 2 and default["gdn_bwd_wy"] == 1
    three = _lowered_stages(monkeypatch, gd_api.Config(backend="triton", par_num_stages=3))
    assert all(three[n] == 3 for n in par)
    walks = ("gdn_state_walk", "gdn_bwd_state_walk", "gdn_ut_inverse")
    assert {n: three[n] for n in walks} == {n: default[n] for n in walks}
    assert gd_api.Config(par_num_stages=4).par_stages("wy") == 4
    with pytest.raises(ValueError, match="unknown chunk-parallel kernel"):
        gd_api.Config().par_stages("walk")
    with pytest.raises(ValueError, match="par_num_stages"):
        gd_api.Config(par_num_stages=0)
    # a stage buffers one loop iteration's tiles: 128 KB at chunk 128, dk 256 in bf16 -> 1 stage
    # within the 160 KB default budget, three 16 KB stages fit
    from pallas_kernels.gated_delta import triton_common as tc  # noqa: PLC0415
    assert tc.par_stages(3, (128, 256, jnp.bfloat16), (128, 256, jnp.bfloat16)) == 1
    assert tc.par_stages(3, (64, 64, jnp.bfloat16), (64, 64, jnp.bfloat16)) == 3


# ------------------------------------------------------------------------------------------------
# Mosaic (TPU) kernel: TPU interpret mode on CPU, lowering (and, with libtpu, compiling) for TPU
# ------------------------------------------------------------------------------------------------

MOSAIC = gd_api.Config(backend="mosaic")


@pytest.mark.parametrize("name,gated,init", [("long", True, True), ("packed", True, True),
                                             ("packed", False, False)])
def test_mosaic_forward_matches_scan(name, gated, init):
    case = make_case(name, gated=gated, init=init, seed=9)
    o, final = jrun(case, "pallas", MOSAIC)
    o_ref, final_ref = jrun(case, "scan")
    assert rel_err(o, o_ref) < F32_REL
    assert rel_err(final, final_ref) < F32_REL


def _chunk_reference(q, k, v, beta, g, h):
    """One chunk of the gated delta rule in plain jnp (its own code: a triangular solve for T,
    g the per-token log-decay): returns (o [C, dv], state after the chunk [dk, dv])."""
    c = q.shape[0]
    hp = jax.lax.Precision.HIGHEST
    mm = functools.partial(jnp.dot, precision=hp)
    gc = jnp.cumsum(g)
    diff = gc[:, None] - gc[None, :]
    strict, incl = jnp.tri(c, k=-1, dtype=bool), jnp.tri(c, dtype=bool)
    decay = lambda m: jnp.where(m, jnp.exp(jnp.where(m, diff, 0.0)), 0.0)  # noqa: E731
    a = beta[:, None] * mm(k, k.T) * decay(strict)
    t = jax.scipy.linalg.solve_triangular(jnp.eye(c) + a, jnp.eye(c), lower=True,
                                          unit_diagonal=True)
    u = mm(t, v * beta[:, None]) - mm(mm(t, k * (beta * jnp.exp(gc))[:, None]), h)
    o = mm(q * jnp.exp(gc)[:, None], h) + mm(mm(q, k.T) * decay(incl), u)
    return o, jnp.exp(gc[-1]) * h + mm((k * jnp.exp(gc[-1] - gc)[:, None]).T, u)


@pytest.mark.parametrize("chunk,padded", [(16, False), (64, True)])
def test_mosaic_chunk_grads_match_vjp(chunk, padded):
    """The backward kernel's chunk algebra (``mosaic_bwd.chunk_grads``, plain arrays, no kernel)
    against jax.vjp of a plain-jnp chunk; ``padded``: correlated keys and the last 20 rows empty
    (zero k, v, beta, g: a segment shorter than the chunk)."""
    from pallas_kernels.gated_delta import mosaic_bwd  # noqa: PLC0415
    dk, dv = 32, 48
    ks = jax.random.split(jax.random.PRNGKey(chunk), 8)
    k = jax.random.normal(ks[1], (chunk, dk)) + (2.0 * jax.random.normal(ks[7], (dk,)) if padded
                                                 else 0.0)
    keep = (jnp.arange(chunk) < chunk - 20)[:, None] if padded else jnp.ones((chunk, 1), bool)
    q, k = l2norm(jax.random.normal(ks[0], (chunk, dk))) * dk ** -0.5, l2norm(k) * keep
    v = jax.random.normal(ks[2], (chunk, dv)) * keep
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (chunk,))) * keep[:, 0]
    g = jax.nn.log_sigmoid(1.5 * jax.random.normal(ks[4], (chunk,)) + 2.5) * keep[:, 0]
    h = 0.5 * jax.random.normal(ks[5], (dk, dv))
    do, ds = jax.random.normal(ks[6], (chunk, dv)), jax.random.normal(ks[7], (dk, dv))
    _, vjp = jax.vjp(_chunk_reference, q, k, v, beta, g, h)
    ref = vjp((do, ds))
    gc = jnp.cumsum(g)
    dq, dk_, dv_, dbeta, dgc, dh = jax.jit(mosaic_bwd.chunk_grads)(
        q, k, v, beta[:, None], gc[:, None], gc[None, :], h, do, ds)
    dg = jnp.cumsum(dgc[::-1, 0])[::-1]  # dG (w.r.t. the cumsum) -> dg, as the wrapper does
    for n, x, r in zip(("q", "k", "v", "beta", "g", "h"), (dq, dk_, dv_, dbeta[:, 0], dg, dh),
                       ref):
        assert rel_err(x, r) < 1e-5, n


@pytest.fixture
def mosaic_bwd_calls(monkeypatch):
    """Counts the calls of the Mosaic backward kernel's wrapper (so a test sees it was used)."""
    from pallas_kernels.gated_delta import mosaic_bwd  # noqa: PLC0415
    calls = []
    original = mosaic_bwd.gated_delta_bwd

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(mosaic_bwd, "gated_delta_bwd", counting)
    return calls


@pytest.mark.parametrize("name,kw,config", [
    pytest.param("packed", dict(), MOSAIC, id="packed_init"),
    pytest.param("packed", dict(gated=False, init=False), MOSAIC, id="packed_delta_rule"),
    pytest.param("long", dict(), MOSAIC, id="long_segment"),
    pytest.param("c64", dict(chunk=64, h=1, dk=32, dv=64), MOSAIC, id="chunk64"),
    pytest.param("packed", dict(dk=16, dv=256, h=1), gd_api.Config(backend="mosaic", block_v=128),
                 id="fwd_value_blocks"),
    pytest.param("packed", dict(), gd_api.Config(backend="mosaic", bwd="xla"), id="xla_backward"),
])
def test_mosaic_gradients_match_scan(mosaic_bwd_calls, name, kw, config):
    """Every gradient (q, k, v, g, beta, initial state) of the Mosaic kernels against the scan,
    with cotangents on o and on the final state: packed layout (a segment of 20 tokens over two
    chunks, one of 5, an empty one, unused chunks between and after, initial states), the delta
    rule (g None) without initial state, one segment over six chunks, chunk 64 (three chunks and a
    short segment), a forward in two 128-wide value blocks (chunk-start states stored per block,
    the backward takes all 256 columns at once); and that Config(bwd="xla") still takes the XLA
    VJP instead of the kernel."""
    if name == "c64":
        LAYOUTS["c64m"] = ([[0, 0, 0, 1, -1]], 3, [[3 * 64, 30, 0]])
        name = "c64m"
    case = make_case(name, seed=13, **kw)
    gp, gs = grads(case, "pallas", config), grads(case, "scan")
    assert set(gp) == set(gs)
    for n in gs:
        assert rel_err(gp[n], gs[n]) < GRAD_REL, n
    assert len(mosaic_bwd_calls) == (config.bwd == "pallas")


def test_mosaic_final_state_cotangent_only(mosaic_bwd_calls):
    """Only the final state has a cotangent (dO = 0): the dS walk from d(final) alone, through
    empty, short and multi-chunk segments, to d(initial state) and every input."""
    case = make_case("packed", seed=15)
    gp, gs = grads(case, "pallas", MOSAIC, o_weight=0.0), grads(case, "scan", o_weight=0.0)
    np.testing.assert_array_equal(np.asarray(gp.pop("q")), 0.0)  # the final state ignores q
    for n in gp:
        assert rel_err(gp[n], gs[n]) < GRAD_REL, n
    assert len(mosaic_bwd_calls) == 1


def test_mosaic_qk_l2norm_matches_scan(mosaic_bwd_calls):
    """use_qk_l2norm=True with a q scale on raw q, k: the kernels see q', k' and the custom VJP
    applies the L2-norm Jacobian to their dq, dk; forward and every gradient against the scan
    with the same options."""
    case = make_case("packed", seed=19)
    ks = jax.random.split(jax.random.PRNGKey(43), 2)
    used = (case["v"] != 0).any(-1, keepdims=True)
    case = dict(case, q=1.7 * jax.random.normal(ks[0], case["q"].shape),
                k=1.3 * jax.random.normal(ks[1], case["k"].shape) * used,
                qk=dict(use_qk_l2norm=True, scale=case["q"].shape[-1] ** -0.5))
    o, final = jrun(case, "pallas", MOSAIC)
    o_ref, final_ref = jrun(case, "scan")
    assert rel_err(o, o_ref) < F32_REL and rel_err(final, final_ref) < F32_REL
    gp, gs = grads(case, "pallas", MOSAIC), grads(case, "scan")
    for n in gs:
        assert rel_err(gp[n], gs[n]) < GRAD_REL, n
    assert len(mosaic_bwd_calls) == 1


def _chunk_start_states(case):
    """Reference state at the start of every chunk, [B, H, Nc, dk, dv], from the token scan: each
    chunk is made its own "segment" (so the scan records the state after it) while the resets
    stay those of the layout, with the segment's initial state at a run start."""
    from mom_jax.ops.scan import recurrent_scan  # noqa: PLC0415
    layout = case["layout"]
    seg = layout.chunk_segment
    b, nc = seg.shape
    chunk = layout.chunk_size
    h, dk, dv = case["q"].shape[2], case["q"].shape[3], case["v"].shape[3]
    h0 = case["h0"] if case["h0"] is not None else jnp.zeros((b, layout.num_segments, h, dk, dv))
    init = jnp.where((seg >= 0)[..., None, None, None],
                     h0[jnp.arange(b)[:, None], jnp.maximum(seg, 0)], 0.0)   # [B, Nc, H, dk, dv]
    start, _ = layout.token_view()
    token_chunk = jnp.broadcast_to(jnp.repeat(jnp.arange(nc), chunk), start.shape)
    _, after = recurrent_scan(case["q"], case["k"], case["v"], g=case["g"], beta=case["beta"],
                              delta=True, token_start=start, token_segment=token_chunk,
                              num_segments=nc, initial_state=init)
    before = jnp.concatenate([jnp.zeros_like(after[:, :1]), after[:, :-1]], axis=1)
    states = jnp.where(layout.chunk_first()[..., None, None, None], init, before)
    return jnp.transpose(states, (0, 2, 1, 3, 4))


def test_mosaic_backward_split_runs():
    """A segment split into two runs (restart from its initial state; dS = 0 at the end of the
    earlier run, d(final) at the end of the last; d(initial state) = the sum over its runs).  The
    Mosaic forward cannot run this layout in the TPU interpreter (it revisits the final-state
    block), so the backward kernel is called on reference chunk-start states from the scan."""
    from pallas_kernels.gated_delta import mosaic_bwd  # noqa: PLC0415
    case = make_case("split_runs", seed=17)
    flags, _ = mosaic_bwd.walk_flags(case["layout"])
    np.testing.assert_array_equal(np.asarray(flags[2]), [[0, 2, 1, 1, 0, 1]])   # end flags
    ct, ctf = cotangents(case)
    names = ("q", "k", "v", "g", "beta", "h0")
    got = jax.jit(functools.partial(mosaic_bwd.gated_delta_bwd, has_init=True, interpret=True))(
        case["q"], case["k"], case["v"], case["g"], case["beta"], case["layout"],
        _chunk_start_states(case), ct, ctf)
    gs = grads(case, "scan")
    for n, x in zip(names, (got[0], got[1], got[2], got[3], got[4], got[5])):
        assert rel_err(x, gs[n]) < GRAD_REL, n


def _mosaic_fn():
    def f(q, k, v, g, beta, h0, seg):
        o, final = gd_api.gated_delta_packed(q, k, v, g, beta, PackedLayout(seg, 2, 64), h0, True,
                                             config=MOSAIC)
        return jnp.sum(o) + jnp.sum(final)
    return jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4, 5))


@pytest.mark.parametrize("bwd", ["pallas", "xla"])
def test_mosaic_kernel_lowers_for_tpu(monkeypatch, bwd):
    """Value and gradient lower for TPU without one: the forward kernel and, with bwd="pallas",
    the backward kernel (two Mosaic custom calls; bwd="xla": the forward only)."""
    monkeypatch.setattr(gd_api, "_interpret", lambda: False)
    monkeypatch.setattr(sys.modules[__name__], "MOSAIC", gd_api.Config(backend="mosaic", bwd=bwd))
    with jax.sharding.use_abstract_mesh(abstract_mesh("TPU v5 lite", "tpu")):
        lowered = jax.jit(_mosaic_fn()).trace(
            *_abstract_args(dk=256, dv=256)).lower(lowering_platforms=("tpu",))
    text = lowered.as_text()
    assert text.count("tpu_custom_call") == (2 if bwd == "pallas" else 1)
    assert 'kernel_name = "gdn_mosaic_fwd"' in text
    assert ('kernel_name = "gdn_mosaic_bwd"' in text) == (bwd == "pallas")


def test_mosaic_kernel_compiles_for_tpu_topology(monkeypatch):
    """Compile the Mosaic forward and backward for a v5e 2x2 topology on the CPU with libtpu's
    compiler (scripts/test.sh provides libtpu from requirements-test.txt; skipped without it)."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies  # noqa: PLC0415
    try:
        devices = topologies.get_topology_desc("v5e:2x2", "tpu").devices
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"libtpu cannot describe a TPU topology here: {e}")
    monkeypatch.setattr(gd_api, "_interpret", lambda: False)
    mesh = jax.sharding.Mesh(devices[:1], ("x",))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shard)
            for a in _abstract_args(dk=256, dv=256)]
    with jax.set_mesh(mesh):
        compiled = jax.jit(_mosaic_fn()).trace(*args).lower().compile()
    # The Mosaic forward and backward kernels, each compiled by libtpu's Mosaic compiler.
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 2
