"""Tests of the sequence-mixing ops (mom_jax.ops): chunked XLA forms against the token-by-token scan,
the scan against an independent NumPy float64 loop, varlen packing, gradients, bf16, errors and jit.

All inputs are random (jax.random) and small, so the file runs in well under two minutes on a CPU.
"""
from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mom_jax import ops
from mom_jax.ops import api as ops_api
from mom_jax.ops import PackedLayout

RULES = ("gated_delta", "delta", "gla", "linear")
DELTA_RULES = ("gated_delta", "delta")

# fp32 tolerances: relative error ||a - b|| / ||b|| and an elementwise allclose.
F32_REL = 1e-5
GRAD_REL = 1e-4
BF16_REL = 1e-2


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def _f64(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)  # bfloat16 converts through ml_dtypes


def rel_err(a, b) -> float:
    a, b = _f64(a), _f64(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    nb = np.linalg.norm(b)
    assert nb > 0, "reference is all zeros: the comparison would be vacuous"
    return float(np.linalg.norm(a - b) / nb)


def assert_close(a, b, rel=F32_REL, rtol=1e-4, what=""):
    """Relative-norm check plus an elementwise allclose with atol scaled to the reference's size."""
    err = rel_err(a, b)
    assert err < rel, f"{what}: relative error {err:.3e} >= {rel:.1e}"
    a, b = _f64(a), _f64(b)
    atol = rel * max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=what)


@functools.partial(jax.jit, static_argnums=1)
def _normal_pool(seed, size):
    return jax.random.normal(jax.random.PRNGKey(seed), (size,))


def randn(seed, shape) -> np.ndarray:
    """Standard normals drawn with jax.random, as a float32 NumPy array.  Sizes are rounded up to a
    power of two, so only a handful of sizes ever compile (threefry compiles slowly on CPU)."""
    n = int(np.prod(shape))
    size = max(1024, 1 << (n - 1).bit_length())
    return np.asarray(_normal_pool(seed % 2**31, size))[:n].reshape(shape)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def make_inputs(seed, b, t, h, dk, dv, *, n_states=None, strong_decay=False):
    """Random q, k, v, log-decays (scalar g and per-channel gk, both <= 0), beta in (0, 1), h0.

    NumPy float32 arrays: slicing and masking them in the tests costs no per-shape XLA compile.
    """
    n_states = b if n_states is None else n_states
    shapes = dict(q=(b, t, h, dk), k=(b, t, h, dk), v=(b, t, h, dv), g=(b, t, h),
                  gk=(b, t, h, dk), beta=(b, t, h), h0=(n_states, h, dk, dv))
    sizes = [int(np.prod(shape)) for shape in shapes.values()]
    flat = randn(seed, (sum(sizes),))
    z = {key: part.reshape(shape) for (key, shape), part
         in zip(shapes.items(), np.split(flat, np.cumsum(sizes)[:-1]))}
    x = dict(q=z["q"], k=z["k"], v=z["v"], beta=_sigmoid(z["beta"]), h0=0.5 * z["h0"])
    for key in ("g", "gk"):
        if strong_decay:  # log-decays spread over (-8, 0)
            x[key] = -8.0 * _sigmoid(2.0 * z[key])
        else:  # mostly mild decay (log_sigmoid(2.5) ~ -0.08) with an occasional strong one
            x[key] = -np.logaddexp(0.0, -(1.5 * z[key] + 2.5))
    x = {key: val.astype(np.float32) for key, val in x.items()}
    assert all(np.all(x[key] <= 0) for key in ("g", "gk"))
    return x


def _arrays(x, init, cu_seqlens):
    arrays = {key: x.get(key) for key in ("q", "k", "v", "g", "gk", "beta")}
    arrays["h0"] = x["h0"] if init else None
    arrays["cu"] = cu_seqlens
    return arrays


def call(rule, x, impl, *, init=True, jit=True, cu_seqlens=None, **kw):
    """Runs the public op for ``rule`` on the inputs dict ``x``; returns NumPy arrays (or None).

    Runs under jax.jit unless jit=False: compiling once is much faster on CPU than op-by-op
    dispatch.  Errors are checked eagerly (the value checks of cu_seqlens need concrete values).
    """
    arrays = _arrays(x, init, cu_seqlens)
    if jit:
        return jax.device_get(_call_jit(rule, impl, tuple(sorted(kw.items())), arrays))
    return _call(rule, impl, kw, arrays)


def _call(rule, impl, kw, a):
    kw = dict(kw, impl=impl, initial_state=a["h0"], cu_seqlens=a["cu"])
    q, k, v = a["q"], a["k"], a["v"]
    if rule == "gated_delta":
        return ops.gated_delta_rule(q, k, v, a["g"], a["beta"], **kw)
    if rule == "delta":
        return ops.delta_rule(q, k, v, a["beta"], **kw)
    if rule == "gla":
        return ops.gated_linear_attention(q, k, v, a["gk"], **kw)
    return ops.linear_attention(q, k, v, **kw)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _call_jit(rule, impl, kw_items, arrays):
    return _call(rule, impl, dict(kw_items), arrays)


def _np_l2norm(x):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-6)


def np_reference(rule, q, k, v, g=None, beta=None, h0=None, *, scale=None, normalize):
    """Independent float64 NumPy loop, one token at a time (vectorised over batch and heads).

    S = exp(g) S  (or diag(exp(gk)) S);  S += beta k (v - S^T k)^T  (delta)  or  S += k v^T;
    o = S^T q, with q, k L2-normalised (eps 1e-6) when ``normalize`` and q scaled by dk ** -0.5.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    if normalize:
        q, k = _np_l2norm(q), _np_l2norm(k)
    q = q * (dk ** -0.5 if scale is None else scale)
    s = np.zeros((b, h, dk, dv)) if h0 is None else np.array(h0, np.float64)
    o = np.zeros((b, t, h, dv))
    for i in range(t):
        if rule == "gated_delta":
            s = s * np.exp(np.asarray(g, np.float64)[:, i])[:, :, None, None]
        elif rule == "gla":
            s = s * np.exp(np.asarray(g, np.float64)[:, i])[:, :, :, None]
        ki, vi, qi = k[:, i], v[:, i], q[:, i]
        if rule in DELTA_RULES:
            pred = np.einsum("bhkv,bhk->bhv", s, ki)
            u = np.asarray(beta, np.float64)[:, i][..., None] * (vi - pred)
        else:
            u = vi
        s = s + ki[..., :, None] * u[..., None, :]
        o[:, i] = np.einsum("bhkv,bhk->bhv", s, qi)
    return o, s


def run_rows_separately(rule, x, spans, h0, *, width=None, **kw):
    """Runs token spans (row, lo, hi) of ``x`` each on its own batch row with impl="scan", no
    cu_seqlens: one compile for all of them.  Rows are zero-padded at the end to ``width`` tokens
    (k = v = g = beta = 0 after the last token leaves the state exactly as it is; earlier outputs
    can't see it).  Returns (list of o [hi - lo, H, dv], list of final [H, dk, dv])."""
    width = width or max(1, max(hi - lo for _, lo, hi in spans))
    rows = {}
    for key in ("q", "k", "v", "g", "gk", "beta"):
        if x.get(key) is None:
            continue
        val = x[key]
        out = np.zeros((len(spans), width) + val.shape[2:], val.dtype)
        for i, (r, lo, hi) in enumerate(spans):
            out[i, :hi - lo] = val[r, lo:hi]
        rows[key] = out
    o, f = call(rule, dict(rows, h0=h0), "scan", output_final_state=True, **kw)
    return [o[i, :hi - lo] for i, (_, lo, hi) in enumerate(spans)], list(f)


# ------------------------------------------------------------------------------------------------
# chunked XLA form vs token-by-token scan
# ------------------------------------------------------------------------------------------------

# (B, T, H, dk, dv, chunk_size)
SHAPES = [
    pytest.param((2, 100, 2, 16, 24, 16), id="T100_not_multiple_dk<dv_7chunks"),
    pytest.param((1, 37, 3, 8, 8, 64), id="T37_shorter_than_chunk"),
    pytest.param((2, 96, 1, 16, 8, 32), id="T96_exact_chunks_dk>dv"),
    pytest.param((1, 1, 2, 4, 6, 16), id="T1_single_token"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rule", RULES)
def test_xla_matches_scan(rule, shape):
    b, t, h, dk, dv, c = shape
    x = make_inputs(zlib.crc32(repr((rule, shape)).encode()), b, t, h, dk, dv)
    outs = {}
    for init in (False, True):
        o_x, f_x = call(rule, x, "xla", init=init, chunk_size=c, output_final_state=True)
        o_s, f_s = call(rule, x, "scan", init=init, chunk_size=c, output_final_state=True)
        assert o_x.shape == (b, t, h, dv) and f_x.shape == (b, h, dk, dv)
        assert o_x.dtype == jnp.float32 and f_x.dtype == jnp.float32
        assert_close(o_x, o_s, what=f"{rule} o init={init}")
        assert_close(f_x, f_s, what=f"{rule} final init={init}")
        outs[init] = o_x
    # guards against a silently ignored initial state (both impls would then still agree)
    assert rel_err(outs[False], outs[True]) > 1e-3
    # without output_final_state no state comes back and the outputs do not change
    o_x2, f_none = call(rule, x, "xla", chunk_size=c)
    assert f_none is None
    np.testing.assert_array_equal(o_x2, outs[True])
    if jax.default_backend() == "cpu":  # impl="auto" is the chunked XLA form on CPU
        assert ops.resolve_impl("auto", rule) == "xla"


@pytest.mark.parametrize("rule", ["gated_delta", "gla"])
def test_xla_matches_scan_strong_decay(rule):
    """Log-decays down to -8 per token: cumulative decays underflow inside a chunk of 64."""
    x = make_inputs(11, 1, 150, 2, 16, 16, strong_decay=True)
    o_x, f_x = call(rule, x, "xla", chunk_size=64, output_final_state=True)
    o_s, f_s = call(rule, x, "scan", chunk_size=64, output_final_state=True)
    assert np.all(np.isfinite(np.asarray(o_x)))
    assert_close(o_x, o_s, what="o")
    assert_close(f_x, f_s, what="final")


@pytest.mark.parametrize("rule", RULES)
def test_scale_and_l2norm_options(rule):
    """Non-default scale and the opposite use_qk_l2norm setting, xla vs scan vs NumPy."""
    x = make_inputs(5, 1, 40, 2, 8, 12)
    default_norm = rule in DELTA_RULES
    # without normalisation the delta rule needs |k|^2 beta <= 2 to stay stable: shrink k
    if default_norm:
        x = dict(x, k=x["k"] * 0.3)
    kw = dict(scale=0.37, use_qk_l2norm=not default_norm, chunk_size=16, output_final_state=True)
    o_x, f_x = call(rule, x, "xla", **kw)
    o_s, f_s = call(rule, x, "scan", **kw)
    assert_close(o_x, o_s, what="o")
    assert_close(f_x, f_s, what="final")
    g = {"gated_delta": x["g"], "gla": x["gk"]}.get(rule)
    o_np, f_np = np_reference(rule, x["q"], x["k"], x["v"], g, x["beta"], x["h0"], scale=0.37,
                              normalize=not default_norm)
    assert_close(o_s, o_np, what="scan vs numpy o")
    assert_close(f_s, f_np, what="scan vs numpy final")


@pytest.mark.parametrize("rule", ["gated_delta"])
def test_numpy_inputs_eager(rule):
    """Plain NumPy arrays (initial_state and cu_seqlens included), outside jit, for both impls."""
    x = make_inputs(13, 1, 30, 2, 8, 8, n_states=2)
    assert all(isinstance(a, np.ndarray) for a in x.values())
    cu = np.array([0, 12, 30], np.int32)
    ref = call(rule, x, "scan", cu_seqlens=cu, chunk_size=16, output_final_state=True)
    for impl in ("xla", "scan"):
        o, f = call(rule, x, impl, jit=False, cu_seqlens=cu, chunk_size=16, output_final_state=True)
        assert_close(o, ref[0], what=f"{impl} o")
        assert_close(f, ref[1], what=f"{impl} final")


# ------------------------------------------------------------------------------------------------
# the ground truth itself: scan vs an independent NumPy float64 loop
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("rule", RULES)
def test_scan_matches_numpy_reference(rule, init):
    x = make_inputs(21, 2, 20, 2, 4, 5)
    o_s, f_s = call(rule, x, "scan", init=init, output_final_state=True)
    g = {"gated_delta": x["g"], "gla": x["gk"]}.get(rule)
    o_np, f_np = np_reference(rule, x["q"], x["k"], x["v"], g, x["beta"],
                              x["h0"] if init else None, normalize=rule in DELTA_RULES)
    assert_close(o_s, o_np, what="o")
    assert_close(f_s, f_np, what="final")
    # and the chunked form against the float64 loop directly
    o_x, f_x = call(rule, x, "xla", init=init, output_final_state=True, chunk_size=8)
    assert_close(o_x, o_np, what="xla o")
    assert_close(f_x, f_np, what="xla final")


def test_l2norm():
    x = jnp.asarray(randn(0, (3, 5, 7)))
    ref = _np_l2norm(x)
    assert_close(ops.l2norm(x), ref)
    assert ops.l2norm(x.astype(jnp.bfloat16)).dtype == jnp.float32


# ------------------------------------------------------------------------------------------------
# special cases: delta rule == gated delta rule with g = 0, linear attention == GLA with g = 0
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["xla", "scan"])
@pytest.mark.parametrize("rule,gated_rule,gate,seed", [("delta", "gated_delta", "g", 31),
                                                       ("linear", "gla", "gk", 32)])
def test_ungated_rule_is_gated_rule_with_zero_gate(impl, rule, gated_rule, gate, seed):
    """delta == gated delta with g = 0; linear attention == GLA with gk = 0."""
    x = make_inputs(seed, 2, 50, 2, 8, 12)
    kw = dict(output_final_state=True, chunk_size=16)
    o_u, f_u = call(rule, x, impl, **kw)
    o_g, f_g = call(gated_rule, dict(x, **{gate: np.zeros_like(x[gate])}), impl, **kw)
    assert_close(o_u, o_g, rel=1e-6)
    assert_close(f_u, f_g, rel=1e-6)
    # and the gate does matter when it is not zero
    o_g2, _ = call(gated_rule, x, impl, **kw)
    assert rel_err(o_g2, o_u) > 1e-3


# ------------------------------------------------------------------------------------------------
# varlen (cu_seqlens)
# ------------------------------------------------------------------------------------------------

CHUNK = 16
# lengths 0 (empty, first), 5 (< chunk), 70 (many chunks), 16 (exactly one chunk), 0 (empty, middle),
# 9, 0 (empty, last)
CU = np.array([0, 0, 5, 75, 91, 91, 100, 100], np.int32)


@pytest.mark.parametrize("rule", RULES)
def test_varlen(rule):
    n = len(CU) - 1
    total = int(CU[-1])
    x = make_inputs(41 + RULES.index(rule), 1, total, 2, 8, 12, n_states=n)
    cu = jnp.asarray(CU)
    for init in (True, False):
        o_x, f_x = call(rule, x, "xla", init=init, cu_seqlens=cu, chunk_size=CHUNK,
                        output_final_state=True)
        o_s, f_s = call(rule, x, "scan", init=init, cu_seqlens=cu, chunk_size=CHUNK,
                        output_final_state=True)
        assert o_x.shape == (1, total, 2, 12) and f_x.shape == (n, 2, 8, 12)
        assert_close(o_x, o_s, what=f"o init={init}")
        assert_close(f_x, f_s, what=f"final init={init}")
        h0 = x["h0"] if init else np.zeros_like(x["h0"])
        # independent path: every sequence on its own batch row, no cu_seqlens, token-by-token scan
        o_rows, f_rows = run_rows_separately(rule, x, [(0, int(CU[i]), int(CU[i + 1]))
                                                       for i in range(n)], h0)
        for i in range(n):
            lo, hi = int(CU[i]), int(CU[i + 1])
            if lo == hi:  # an empty sequence's final state is its initial state
                np.testing.assert_array_equal(f_x[i], h0[i])
                np.testing.assert_array_equal(f_s[i], h0[i])
                continue
            assert_close(o_x[0, lo:hi], o_rows[i], what=f"seq {i} o (xla) init={init}")
            assert_close(o_s[0, lo:hi], o_rows[i], what=f"seq {i} o (scan) init={init}")
            assert_close(f_x[i], f_rows[i], what=f"seq {i} final (xla) init={init}")
            assert_close(f_s[i], f_rows[i], what=f"seq {i} final (scan) init={init}")


@pytest.mark.parametrize("rule", ["gated_delta", "gla"])
def test_varlen_single_sequence_equals_plain_call(rule):
    x = make_inputs(51, 1, 45, 2, 8, 8)
    cu = jnp.array([0, 45], jnp.int32)
    o_v, f_v = call(rule, x, "xla", cu_seqlens=cu, chunk_size=16, output_final_state=True)
    o_p, f_p = call(rule, x, "xla", chunk_size=16, output_final_state=True)
    assert_close(o_v, o_p, rel=1e-6)
    assert_close(f_v, f_p, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------

def _grad_args(rule, x):
    args = dict(q=x["q"], k=x["k"], v=x["v"], h0=x["h0"])
    if rule == "gated_delta":
        args["g"] = x["g"]
    if rule == "gla":
        args["gk"] = x["gk"]
    if rule in DELTA_RULES:
        args["beta"] = x["beta"]
    return args


def _grads(rule, x, impl, cu_seqlens=None, **kw):
    """Gradient of a random projection of the outputs and of the final state."""
    args = _grad_args(rule, x)
    r_o = randn(991, x["v"].shape)
    r_f = randn(992, x["h0"].shape)
    kw_items = tuple(sorted(dict(kw, output_final_state=True).items()))

    def loss(a):
        o, f = _call_jit(rule, impl, kw_items, _arrays(dict(x, **a), True, cu_seqlens))
        return jnp.sum(o.astype(jnp.float32) * r_o) + jnp.sum(f * r_f)

    return jax.device_get(jax.jit(jax.grad(loss))(args))


GRAD_CASES = [
    pytest.param(dict(shape=(2, 50, 2, 8, 12), chunk_size=16), id="plain_T50_C16_dk<dv"),
    pytest.param(dict(shape=(1, 60, 2, 8, 8), chunk_size=16,
                      cu=np.array([0, 0, 7, 50, 50, 60], np.int32)), id="varlen"),
]


@pytest.mark.parametrize("case", GRAD_CASES)
@pytest.mark.parametrize("rule", RULES)
def test_gradients_xla_match_scan(rule, case):
    b, t, h, dk, dv = case["shape"]
    cu = case.get("cu")
    n = b if cu is None else len(cu) - 1
    x = make_inputs(61 + RULES.index(rule), b, t, h, dk, dv, n_states=n)
    kw = dict(chunk_size=case["chunk_size"])
    if cu is not None:
        kw["cu_seqlens"] = jnp.asarray(cu)
    g_x = _grads(rule, x, "xla", **kw)
    g_s = _grads(rule, x, "scan", **kw)
    assert set(g_x) == set(_grad_args(rule, x))
    for name in g_x:
        assert g_x[name].shape == x[name].shape
        assert_close(g_x[name], g_s[name], rel=GRAD_REL, rtol=1e-3, what=f"d/d{name}")


# ------------------------------------------------------------------------------------------------
# bfloat16
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule, varlen", [(rule, False) for rule in RULES]
                         + [("gated_delta", True), ("gla", True)])
def test_bf16_inputs(rule, varlen):
    t = 70
    cu = np.array([0, 10, 10, 70], np.int32) if varlen else None
    b, n = 1 if varlen else 2, 3 if varlen else 2
    x = make_inputs(71 + RULES.index(rule), b, t, 2, 16, 8, n_states=n)
    kw = dict(chunk_size=16, output_final_state=True)
    if varlen:
        kw["cu_seqlens"] = jnp.asarray(cu)
    xb = dict(x, q=x["q"].astype(jnp.bfloat16), k=x["k"].astype(jnp.bfloat16),
              v=x["v"].astype(jnp.bfloat16))
    o_ref, f_ref = call(rule, x, "scan", **kw)  # float32 ground truth on the float32 inputs
    for impl in ("xla", "scan"):
        o_b, f_b = call(rule, xb, impl, **kw)
        assert o_b.dtype == jnp.bfloat16, impl
        assert f_b.dtype == jnp.float32, impl
        assert_close(o_b, o_ref, rel=BF16_REL, rtol=5e-2, what=f"{impl} o")
        assert_close(f_b, f_ref, rel=BF16_REL, rtol=5e-2, what=f"{impl} final")
    if varlen:
        return
    # output dtype follows v (not q)
    xv = dict(x, v=x["v"].astype(jnp.bfloat16))
    assert call(rule, xv, "xla", **kw)[0].dtype == jnp.bfloat16
    xq = dict(x, q=x["q"].astype(jnp.bfloat16), k=x["k"].astype(jnp.bfloat16))
    assert call(rule, xq, "xla", **kw)[0].dtype == jnp.float32


# ------------------------------------------------------------------------------------------------
# q/k L2-norm inside the op (use_qk_l2norm) vs the op on inputs the test normalised itself
# ------------------------------------------------------------------------------------------------

def _test_l2norm(x):
    """The test's own L2 normalisation (float32, eps 1e-6), differentiated by JAX."""
    x = jnp.asarray(x).astype(jnp.float32)
    return x / jnp.sqrt(jnp.sum(jnp.square(x), -1, keepdims=True) + 1e-6)


# varlen: an empty first sequence, 9 tokens, 31 (two chunks), an empty one, 21 (two chunks)
QK_CU = np.array([0, 0, 9, 40, 40, 61], np.int32)
QK_IMPLS = [(rule, impl) for impl in ("scan", "xla") for rule in RULES] + [
    (rule, "pallas") for rule in DELTA_RULES]


def _qk_norm_in_op_and_reference(rule, impl, x, scale, **kw):
    """Runs the op with use_qk_l2norm=True and ``scale`` on the raw q, k, and with
    use_qk_l2norm=False, scale=1 on q, k normalised and scaled by the test (``_test_l2norm``);
    returns {True: (o, final, grads), False: ...}, the gradients (of a random projection of o and
    of the final state) w.r.t. the raw q, k, v, g/gk, beta, h0 (through the test's normalisation
    in the reference)."""
    args = _grad_args(rule, x)
    r_o = randn(993, x["v"].shape)
    r_f = randn(994, x["h0"].shape)
    cu = jnp.asarray(QK_CU)
    out = {}
    for on in (True, False):
        def run(a, on=on):
            if not on:
                a = dict(a, q=_test_l2norm(a["q"]) * scale, k=_test_l2norm(a["k"]))
            kwargs = dict(kw, use_qk_l2norm=on, scale=scale if on else 1.0,
                          output_final_state=True)
            return _call(rule, impl, kwargs, _arrays(dict(x, **a), True, cu))

        def loss(a, run=run):
            o, f = run(a)
            return jnp.sum(o.astype(jnp.float32) * r_o) + jnp.sum(f * r_f)

        out[on] = jax.device_get(jax.jit(lambda a, run=run, loss=loss: (*run(a), jax.grad(loss)(a)))(
            args))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rule,impl", QK_IMPLS)
def test_qk_l2norm_in_op_matches_prenormalised(rule, impl, dtype):
    """use_qk_l2norm=True equals the op on pre-normalised q, k (forward, final state and every
    gradient, the reference's through jax.grad of the test's normalisation): varlen with an
    initial state, a non-default scale, dk=12 (padded to 16 inside the Pallas kernel)."""
    x = make_inputs(111 + RULES.index(rule), 1, int(QK_CU[-1]), 2, 12, 8, n_states=len(QK_CU) - 1)
    assert np.abs(np.linalg.norm(x["q"], axis=-1) - 1).min() > 0.1  # raw q really is not unit
    bf16 = dtype == "bfloat16"
    if bf16:
        x = dict(x, **{n: x[n].astype(jnp.bfloat16) for n in ("q", "k", "v")})
    res = _qk_norm_in_op_and_reference(rule, impl, x, scale=0.37, chunk_size=16)
    (o, f, grads), (o_ref, f_ref, grads_ref) = res[True], res[False]
    assert o.dtype == x["v"].dtype and f.dtype == jnp.float32
    rel, grad_rel = (BF16_REL, BF16_REL) if bf16 else (F32_REL, GRAD_REL)
    rtol = 5e-2 if bf16 else 1e-3
    assert_close(o, o_ref, rel=rel, rtol=rtol, what="o")
    assert_close(f, f_ref, rel=rel, rtol=rtol, what="final")
    assert set(grads) == set(_grad_args(rule, x))
    for name in grads:
        assert grads[name].dtype == x[name].dtype, name
        assert_close(grads[name], grads_ref[name], rel=grad_rel, rtol=rtol, what=f"d/d{name}")


@pytest.mark.parametrize("rule", RULES)
def test_packed_recurrence_qk_l2norm(rule):
    """packed_recurrence(use_qk_l2norm=True, scale) == packed_recurrence on q, k normalised and
    scaled by the test, scan and xla, forward and the gradients w.r.t. the raw q, k; zero rows
    (padding slots) stay zero."""
    b, l, h, dk, dv, c = 2, 48, 2, 8, 6, 16
    x = make_inputs(121 + RULES.index(rule), b, l, h, dk, dv)
    x["k"][:, 40:] = 0.0  # padding slots at the end of every row
    layout = PackedLayout(jnp.zeros((b, l // c), jnp.int32), 1, c)
    g = {"gated_delta": x["g"], "gla": x["gk"]}.get(rule)
    beta = x["beta"] if rule in DELTA_RULES else None
    r = randn(7, (b, l, h, dv))

    def f(q, k, impl, on):
        if not on:
            q, k = _test_l2norm(q) * 0.5, _test_l2norm(k)
        o, _ = ops.packed_recurrence(rule, q, k, x["v"], g=g, beta=beta, layout=layout,
                                     use_qk_l2norm=on, scale=0.5 if on else 1.0, impl=impl)
        return o

    for impl in ("scan", "xla"):
        run = jax.jit(lambda q, k, impl=impl: {
            on: (f(q, k, impl, on), jax.grad(lambda q, k, on=on: jnp.sum(f(q, k, impl, on) * r),
                                             argnums=(0, 1))(q, k)) for on in (True, False)})
        res = jax.device_get(run(x["q"], x["k"]))
        assert_close(res[True][0], res[False][0], what=f"{impl} o")
        for i, name in enumerate("qk"):
            assert_close(res[True][1][i], res[False][1][i], rel=GRAD_REL, rtol=1e-3,
                         what=f"{impl} d/d{name}")
    q0, k0 = (jnp.zeros((1, c, 1, dk)),) * 2
    qn, kn = jax.jit(lambda q, k: ops.common.qk_features(q, k, True, 0.5))(q0, k0)
    assert not np.any(np.asarray(qn)) and not np.any(np.asarray(kn))


def test_qk_l2norm_errors():
    x = _small()
    layout = PackedLayout(jnp.zeros((1, 1), jnp.int32), 1, 8)
    with pytest.raises(ValueError, match="use_qk_l2norm must be a Python bool"):
        ecall("gated_delta", x, "xla", use_qk_l2norm=jnp.array(True))
    with pytest.raises(ValueError, match="use_qk_l2norm must be a Python bool"):
        ops.packed_recurrence("delta", x["q"], x["k"], x["v"], beta=x["beta"], layout=layout,
                              use_qk_l2norm="yes", impl="xla")
    with pytest.raises(ValueError, match="scale must be a number"):
        ecall("linear", x, "scan", scale="big")
    with pytest.raises(NotImplementedError, match="has no kernel"):  # no Pallas GLA kernel
        ecall("gla", x, "pallas", use_qk_l2norm=True)


def test_qk_l2norm_pallas_traced_scale():
    """The Pallas kernel applies the scale at trace time: with a traced scale packed_recurrence
    applies the features in XLA before the kernel instead; the kernel entry itself refuses it."""
    layout16 = PackedLayout(jnp.zeros((1, 1), jnp.int32), 1, 16)
    x16 = _small(t=16)

    def traced(s, on, impl="pallas"):
        return ops.packed_recurrence("gated_delta", x16["q"], x16["k"], x16["v"], g=x16["g"],
                                     beta=x16["beta"], layout=layout16, use_qk_l2norm=on, scale=s,
                                     impl=impl)[0]

    for on in (True, False):
        o = jax.jit(traced, static_argnums=1)(0.5, on)
        assert_close(o, traced(0.5, on, "scan"), what=f"use_qk_l2norm={on}")
    from pallas_kernels.gated_delta import api as gd_api  # noqa: PLC0415
    with pytest.raises(ValueError, match="scale must be a static Python number"):
        jax.jit(lambda s: gd_api.gated_delta_packed(
            x16["q"], x16["k"], x16["v"], x16["g"], x16["beta"], layout16, scale=s)[0])(0.5)


def test_pallas_kernels_normalise_in_the_op():
    """The registered gated delta kernels take use_qk_l2norm themselves (raw q, k reach them)."""
    ops_api._load_pallas_kernels()
    for rule in DELTA_RULES:
        assert ops_api._PALLAS_KERNELS[rule].qk_l2norm


# ------------------------------------------------------------------------------------------------
# packed_recurrence with a hand-made layout
# ------------------------------------------------------------------------------------------------

PC = 8  # chunk size of the hand-made layout
# row 0: segment 0 = 3 chunks (20 tokens, padding at the end of its last chunk), segment 1 = 1 chunk
#        (5 tokens + 3 padding slots), then an unused chunk; segment 2 has no chunk in this row.
# row 1: segment 1 = 1 chunk (8 tokens), an unused chunk, segment 0 = 2 chunks (11 tokens),
#        segment 2 = 1 chunk (3 tokens).
CHUNK_SEGMENT = np.array([[0, 0, 0, 1, -1],
                          [1, -1, 0, 0, 2]], np.int32)
# (row, segment) -> (first chunk, number of real tokens)
SEGMENTS = {(0, 0): (0, 20), (0, 1): (3, 5), (1, 1): (0, 8), (1, 0): (2, 11), (1, 2): (4, 3)}


@pytest.mark.parametrize("rule", RULES)
def test_packed_recurrence_hand_made_layout(rule):
    b, nc = CHUNK_SEGMENT.shape
    s, h, dk, dv = 3, 2, 8, 6
    length = nc * PC
    x = make_inputs(81 + RULES.index(rule), b, length, h, dk, dv)
    q = _np_l2norm(x["q"]).astype(np.float32) * dk ** -0.5
    k = _np_l2norm(x["k"]).astype(np.float32)
    v, beta = x["v"], x["beta"]
    g = {"gated_delta": x["g"], "gla": x["gk"]}.get(rule)
    # zero every slot that carries no token (padding inside a chunk); unused chunks keep random data
    real = np.zeros((b, length), bool)
    for (row, _), (c0, n_tok) in SEGMENTS.items():
        real[row, c0 * PC: c0 * PC + n_tok] = True
    real[0, 4 * PC:] = True   # the unused chunks hold garbage, which must not leak anywhere
    real[1, 1 * PC: 2 * PC] = True
    m = real[..., None]  # [B, L, 1]: broadcasts against [B, L, H]

    def mask(a):
        return None if a is None else np.where(m[..., None] if a.ndim == 4 else m, a, 0.0)

    q, k, v, beta, g = mask(q), mask(k), mask(v), mask(beta), mask(g)
    h0 = 0.5 * randn(5, (b, s, h, dk, dv))
    layout = PackedLayout(jnp.asarray(CHUNK_SEGMENT), s, PC)
    kw = dict(g=g, beta=beta if rule in DELTA_RULES else None, layout=layout,
              output_final_state=True)
    run = jax.jit(ops.packed_recurrence, static_argnames=("rule", "output_final_state", "impl"))
    for init in (None, h0):
        o_x, f_x = jax.device_get(run(rule, q, k, v, initial_state=init, impl="xla", **kw))
        o_s, f_s = jax.device_get(run(rule, q, k, v, initial_state=init, impl="scan", **kw))
        assert o_x.shape == (b, length, h, dv) and f_x.shape == (b, s, h, dk, dv)
        used = np.repeat(CHUNK_SEGMENT >= 0, PC, axis=1)
        assert_close(np.asarray(o_x)[used], np.asarray(o_s)[used], what="o")
        assert_close(f_x, f_s, what="final")
        init_arr = np.zeros_like(h0) if init is None else init
        # row 0 has no segment 2: its final state is its initial state
        np.testing.assert_array_equal(np.asarray(f_x[0, 2]), np.asarray(init_arr[0, 2]))
        np.testing.assert_array_equal(np.asarray(f_s[0, 2]), np.asarray(init_arr[0, 2]))
        # each segment's real tokens on their own row through the public scan, no layout
        # (q, k are already normalised and scaled)
        spans = [(row, c0 * PC, c0 * PC + n_tok) for (row, _), (c0, n_tok) in SEGMENTS.items()]
        h0_rows = np.stack([init_arr[row, seg] for row, seg in SEGMENTS])
        xs = dict(q=q, k=k, v=v, beta=beta, g=g, gk=g)
        o_rows, f_rows = run_rows_separately(rule, xs, spans, h0_rows, scale=1.0,
                                             use_qk_l2norm=False)
        for i, ((row, seg), (c0, n_tok)) in enumerate(SEGMENTS.items()):
            sl = slice(c0 * PC, c0 * PC + n_tok)
            assert_close(o_x[row, sl], o_rows[i], what=f"row {row} seg {seg} o")
            assert_close(f_x[row, seg], f_rows[i], what=f"row {row} seg {seg} final")


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------

def ecall(*args, **kw):
    """Eager call: the value checks of a concrete cu_seqlens only run outside jit."""
    return call(*args, jit=False, **kw)


def _small(seed=0, b=1, t=8, h=2, dk=4, dv=4):
    return make_inputs(seed, b, t, h, dk, dv)


@pytest.mark.parametrize("rule", RULES)
def test_error_wrong_rank(rule):
    x = _small()
    with pytest.raises(ValueError, match=r"q must have shape \[batch, time, heads, dim\]"):
        ecall(rule, dict(x, q=x["q"][0]), "xla")
    with pytest.raises(ValueError, match=r"v must have shape \[batch, time, heads, dim\]"):
        ecall(rule, dict(x, v=x["v"][..., None]), "xla")


def test_error_mismatched_shapes():
    x = _small()
    with pytest.raises(ValueError, match="q and k must have the same shape"):
        ecall("gated_delta", dict(x, k=x["k"][..., :3]), "xla")
    with pytest.raises(ValueError, match="q and k must have the same shape"):
        ecall("linear", dict(x, k=x["k"][:, :5]), "scan")
    with pytest.raises(ValueError, match=r"v must share \[batch, time, heads\]"):
        ecall("gla", dict(x, v=x["v"][:, :5]), "xla")


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_error_integer_dtype(name):
    x = _small()
    bad = dict(x, **{name: x[name].astype(jnp.int32)})
    with pytest.raises(TypeError, match=f"{name} must be a floating-point array"):
        ecall("gated_delta", bad, "xla")


def test_error_gate_shapes_and_dtypes():
    x = _small()
    with pytest.raises(ValueError, match=r"gated_delta_rule: g must have shape \[1, 8, 2\]"):
        ecall("gated_delta", dict(x, g=x["gk"]), "xla")
    with pytest.raises(ValueError, match=r"gated_linear_attention: g must have shape \[1, 8, 2, 4\]"):
        ecall("gla", dict(x, gk=x["g"]), "xla")
    with pytest.raises(ValueError, match=r"beta must have shape \[1, 8, 2\]"):
        ecall("gated_delta", dict(x, beta=x["beta"][:, :7]), "xla")
    with pytest.raises(ValueError, match=r"delta_rule: beta must have shape"):
        ecall("delta", dict(x, beta=x["beta"][..., None]), "scan")
    with pytest.raises(TypeError, match="g must be a floating-point array"):
        ecall("gated_delta", dict(x, g=x["g"].astype(jnp.int32)), "xla")
    with pytest.raises(TypeError, match="beta must be a floating-point array"):
        ecall("delta", dict(x, beta=jnp.ones((1, 8, 2), jnp.int32)), "xla")


@pytest.mark.parametrize("impl", ["xla", "scan"])
def test_error_missing_beta(impl):
    x = _small()
    with pytest.raises(ValueError, match="beta is required"):
        ops.delta_rule(x["q"], x["k"], x["v"], None, impl=impl)
    with pytest.raises(ValueError, match="beta is required"):
        ops.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], None, impl=impl)


def test_error_initial_state_shape():
    x = _small(b=2)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[batch, heads, dk, dv\]"):
        ecall("gated_delta", dict(x, h0=x["h0"][:, :, :, :3]), "xla")
    with pytest.raises(ValueError, match=r"initial_state must have shape \[batch"):
        ecall("linear", dict(x, h0=x["h0"][:1]), "scan")
    # with cu_seqlens the leading axis is the number of sequences
    x1 = _small(b=1)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[number of sequences"):
        ecall("gla", x1, "xla", cu_seqlens=jnp.array([0, 3, 8], jnp.int32))


def test_error_cu_seqlens():
    x2 = _small(b=2)
    with pytest.raises(ValueError, match="with cu_seqlens the batch size must be 1"):
        ecall("gated_delta", x2, "xla", init=False, cu_seqlens=jnp.array([0, 8], jnp.int32))
    x = _small(b=1, t=8)
    bad_values = [[1, 4, 8], [0, 4, 7], [0, 4, 9], [0, 6, 3, 8]]
    for cu in bad_values:
        with pytest.raises(ValueError, match="cu_seqlens must start at 0, be nondecreasing and end"):
            ecall("gated_delta", x, "xla", init=False, cu_seqlens=jnp.array(cu, jnp.int32))
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D array of N\\+1 offsets"):
        ecall("delta", x, "xla", init=False, cu_seqlens=jnp.array([[0, 8]], jnp.int32))
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D array of N\\+1 offsets"):
        ecall("delta", x, "xla", init=False, cu_seqlens=jnp.array([0], jnp.int32))
    with pytest.raises(TypeError, match="cu_seqlens must be integer"):
        ecall("linear", x, "xla", init=False, cu_seqlens=jnp.array([0.0, 8.0]))


def test_error_impl_and_chunk_size():
    x = _small()
    with pytest.raises(ValueError, match="impl must be one of"):
        ecall("gated_delta", x, "triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.resolve_impl("cuda", "delta")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        ecall("gla", x, "xla", chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        ecall("gla", x, "xla", chunk_size=16.0)
    with pytest.raises(ValueError, match="unknown update rule"):
        ops.register_pallas_kernel("mamba", lambda *a: None)


@pytest.mark.parametrize("rule", RULES)
def test_error_pallas_without_kernel(rule, monkeypatch):
    # make sure no kernel is registered, whatever pallas_kernels may provide one day
    monkeypatch.setattr(ops_api, "_PALLAS_KERNELS", {})
    monkeypatch.setattr(ops_api, "_load_pallas_kernels", lambda: None)
    x = _small()
    with pytest.raises(NotImplementedError, match=f"impl='pallas' has no kernel for update rule '{rule}'"):
        ecall(rule, x, "pallas")
    layout = PackedLayout(jnp.zeros((1, 1), jnp.int32), 1, 8)
    with pytest.raises(NotImplementedError, match="has no kernel"):
        ops.packed_recurrence(rule, x["q"], x["k"], x["v"], layout=layout, impl="pallas")
    # with no kernel, "auto" falls back to the chunked XLA form on every backend
    assert ops.resolve_impl("auto", rule) == "xla"


def test_registered_pallas_kernel_is_dispatched(monkeypatch):
    monkeypatch.setattr(ops_api, "_PALLAS_KERNELS", {})
    monkeypatch.setattr(ops_api, "_load_pallas_kernels", lambda: None)
    seen = {}

    def fake(q, k, v, g, beta, layout, initial_state, output_final_state, *, out_dtype):
        seen["called"], seen["out_dtype"] = True, out_dtype
        return ops.packed_recurrence("gated_delta", q, k, v, g=g, beta=beta, layout=layout,
                                     initial_state=initial_state,
                                     output_final_state=output_final_state, impl="scan",
                                     out_dtype=out_dtype)

    ops.register_pallas_kernel("gated_delta", fake)
    x = make_inputs(91, 1, 20, 2, 8, 8)
    o_p, f_p = ecall("gated_delta", x, "pallas", chunk_size=8, output_final_state=True)
    o_s, f_s = ecall("gated_delta", x, "scan", output_final_state=True)
    assert seen.get("called") and seen["out_dtype"] == x["v"].dtype   # the op asks for v's dtype
    assert_close(o_p, o_s)
    assert_close(f_p, f_s)


# ------------------------------------------------------------------------------------------------
# jit: traced cu_seqlens, no retrace when the lengths change
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["xla", "scan"])
def test_jit_traced_cu_seqlens_no_retrace(impl):
    total, n = 64, 3
    x = make_inputs(101, 1, total, 2, 8, 8, n_states=n)
    traces = []

    @jax.jit
    def f(q, k, v, g, beta, cu, h0):
        traces.append(1)  # Python side effect: runs once per trace only
        return ops.gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu, initial_state=h0,
                                    output_final_state=True, chunk_size=16, impl=impl)

    for cu in ([0, 10, 40, 64], [0, 0, 50, 64], [0, 64, 64, 64], [0, 3, 4, 64]):
        cu_arr = jnp.array(cu, jnp.int32)
        o, fin = f(x["q"], x["k"], x["v"], x["g"], x["beta"], cu_arr, x["h0"])
        # reference: each sequence on its own row, no cu_seqlens (one compile: fixed width)
        o_rows, f_rows = run_rows_separately("gated_delta", x, [(0, cu[i], cu[i + 1])
                                                                for i in range(n)],
                                             x["h0"], width=total)
        for i in range(n):
            if cu[i] < cu[i + 1]:
                assert_close(o[0, cu[i]:cu[i + 1]], o_rows[i], what=f"o seq {i} cu={cu}")
            assert_close(fin[i], f_rows[i], what=f"final seq {i} cu={cu}")
    assert len(traces) == 1
