"""The short-conv kernel (``pallas_kernels.short_conv``, interpret mode on CPU) against a
token-by-token numpy loop (values) and XLA autodiff of ``short_conv_packed``'s shifted adds
(gradients), on random packed streams with segments of length 1 upwards.  Also: the Triton kernels
lower for CUDA, and the layers route their conv to the kernel as ``ops.resolve_conv_impl`` says."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels  # noqa: F401  (registers the kernels)
from mom_jax import ops
from mom_jax.layers import common as lc
from pallas_kernels import short_conv as sc
from tests.lowering import abstract_mesh

SMALL = sc.ConvConfig(block_l=16, block_c=32)


def _stream(seed, b, l, c, w, dtype=jnp.float32, p_start=0.15):
    """Random x [B, L, C], weight [W, C], rank [B, L] (segments start at random slots), dy."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(k1, (b, l, c), jnp.float32).astype(dtype)
    weight = jax.random.normal(k2, (w, c), jnp.float32)
    starts = jax.random.bernoulli(k3, p_start, (b, l)).at[:, 0].set(True)
    pos = jnp.arange(l)[None]
    rank = (pos - jax.lax.cummax(jnp.where(starts, pos, 0), axis=1)).astype(jnp.int32)
    dy = jax.random.normal(k4, (b, l, c), jnp.float32).astype(dtype)
    return x, weight, rank, dy


def _numpy_conv(x, weight, rank, activation):
    x, weight, rank = (np.asarray(a, np.float64) for a in (x, weight, rank))
    w = weight.shape[0]
    acc = np.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for s in range(min(w, int(rank[b, t]) + 1)):
                acc[b, t] += weight[w - 1 - s] * x[b, t - s]
    return acc / (1.0 + np.exp(-acc)) if activation else acc


@pytest.mark.parametrize("b,l,c,w,activation", [
    (2, 100, 40, 4, True),     # L, C not whole blocks
    (1, 64, 64, 2, True),
    (2, 48, 32, 4, False),
])
def test_forward_matches_token_loop(b, l, c, w, activation):
    x, weight, rank, _ = _stream(0, b, l, c, w)
    out = sc.short_conv(x, weight, rank, activation=activation, config=SMALL)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_allclose(out, _numpy_conv(x, weight, rank, activation), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(rank)) >= w and int(jnp.sum(rank == 0)) > b     # restarts were tested


@pytest.mark.parametrize("b,l,c,w,activation,config", [
    (2, 100, 40, 4, True, SMALL),
    (2, 96, 64, 3, False, SMALL),
    (1, 128, 64, 4, True, sc.ConvConfig(block_l=32, block_c=64)),
    # dx pass walking several row tiles (ConvConfig.dx_tiles): 12 tiles of 16 rows in walks of
    # 4, 3, 2 (SMALL's 7 tiles above: walks of one)
    (2, 192, 64, 4, True, sc.ConvConfig(block_l=16, block_c=32, dx_tiles=4)),
    (2, 192, 64, 4, True, sc.ConvConfig(block_l=16, block_c=32, dx_tiles=3)),
    (2, 192, 64, 4, True, sc.ConvConfig(block_l=16, block_c=32, dx_tiles=2)),
])
def test_gradients_match_xla_autodiff(b, l, c, w, activation, config):
    x, weight, rank, dy = _stream(1, b, l, c, w, p_start=0.3)

    def xla(x, weight):
        return lc.short_conv_packed(x, weight, rank, activation=activation, impl="xla")

    def kernel(x, weight):
        return sc.short_conv(x, weight, rank, activation=activation, config=config)

    out_ref, vjp_ref = jax.vjp(xla, x, weight)
    out, vjp = jax.vjp(kernel, x, weight)
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(vjp(dy), vjp_ref(dy)):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("c,splits,config", [
    (96, (32, 64), SMALL),                               # whole blocks: one array per part
    (96, (24, 56), SMALL),                               # not whole blocks: the packed output split
    (100, (32, 64), SMALL),                              # last part not whole blocks: split too
    (128, (64,), sc.ConvConfig(block_l=32, block_c=64)),
])
def test_split_outputs_match_the_split_of_xla_autodiff(c, splits, config):
    """``splits``: the parts and, from per-part cotangents, dx and dweight equal XLA autodiff of
    the packed conv followed by ``jnp.split``; negative ranks give exactly zero outputs."""
    b, l, w = 2, 100, 4
    x, weight, rank, dy = _stream(5, b, l, c, w, p_start=0.3)
    rank = rank.at[:, -7:].set(-1)                       # padding after the stream's end

    def xla(x, weight):
        return lc.short_conv_packed(x, weight, rank, impl="xla", splits=splits)

    def kernel(x, weight):
        return sc.short_conv(x, weight, rank, config=config, splits=splits)

    dys = jnp.split(dy, splits, axis=-1)
    out_ref, vjp_ref = jax.vjp(xla, x, weight)
    out, vjp = jax.vjp(kernel, x, weight)
    assert [o.shape for o in out] == [o.shape for o in out_ref] and len(out) == len(splits) + 1
    for got, want in zip(out, out_ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert float(jnp.max(jnp.abs(got[:, -7:]))) == 0.0 and float(jnp.max(jnp.abs(got))) > 0
    for got, want in zip(vjp(dys), vjp_ref(dys)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="splits"):
        sc.short_conv(x, weight, rank, splits=(64, 32))


def test_bfloat16_stream_within_rounding_of_float32():
    """bf16 in and out (the backward's dacc stored in bf16 too): out and dx as close to the
    float32 answer as XLA's own bf16 conv; dweight within a few bf16 ulps (XLA keeps it exact)."""
    x, weight, rank, dy = _stream(2, 2, 80, 64, 4, dtype=jnp.bfloat16)

    def run(impl, x, dy):
        def f(x, weight):
            if impl == "kernel":
                return sc.short_conv(x, weight, rank, config=SMALL)
            return lc.short_conv_packed(x, weight, rank, impl="xla")
        out, vjp = jax.vjp(f, x, weight)
        return (out,) + vjp(dy)

    want = run("xla", x.astype(jnp.float32), dy.astype(jnp.float32))
    got, xla_bf16 = run("kernel", x, dy), run("xla", x, dy)
    assert got[0].dtype == got[1].dtype == jnp.bfloat16 and got[2].dtype == jnp.float32

    def err(a, b):
        return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))

    for i in (0, 1):
        assert 0 < err(got[i], want[i]) <= 1.2 * err(xla_bf16[i], want[i]) + 1e-4
    assert err(got[2], want[2]) < 5e-3


def test_config_and_shape_errors():
    x, weight, rank, _ = _stream(3, 1, 16, 8, 4)
    with pytest.raises(ValueError, match="power of two"):
        sc.ConvConfig(block_l=24)
    with pytest.raises(ValueError, match="weight"):
        sc.short_conv(x, weight[:, :4], rank)
    with pytest.raises(ValueError, match="rank"):
        sc.short_conv(x, weight, rank[:, :8])


def test_resolve_conv_impl_and_layer_routing(monkeypatch):
    assert ops.resolve_conv_impl("pallas") == "pallas"      # interpret mode on CPU
    assert ops.resolve_conv_impl("auto") == "xla"           # CPU: XLA unless asked
    assert ops.resolve_conv_impl("xla") == ops.resolve_conv_impl("scan") == "xla"
    calls = []
    original = ops.short_conv_kernel()
    monkeypatch.setitem(ops.api._PALLAS_CONV, "fn",
                        lambda *a, **kw: calls.append(1) or original(*a, **kw))
    x, weight, rank, _ = _stream(4, 1, 32, 16, 4)
    np.testing.assert_allclose(lc.short_conv_packed(x, weight, rank, impl="pallas"),
                               lc.short_conv_packed(x, weight, rank, impl="xla"),
                               rtol=1e-6, atol=1e-6)
    assert calls == [1]


@pytest.mark.parametrize("splits,head_norm", [((), None), ((1024, 2048), None),
                                             ((1024, 2048), (256, (0.0625, 1.0, None)))])
def test_kernels_lower_for_cuda(monkeypatch, splits, head_norm):
    """Forward and backward (two passes) lower to three Triton calls for an H100 without a GPU,
    with the output packed, in parts, or in parts with q, k heads normalised (the layers')."""
    monkeypatch.setattr(sc, "_interpret", lambda: False)
    sds = jax.ShapeDtypeStruct
    args = (sds((2, 6400, 3072), jnp.bfloat16), sds((4, 3072), jnp.float32))
    rank = sds((2, 6400), jnp.int32)

    def loss(x, weight, rank):
        out = sc.short_conv(x, weight, rank, splits=splits, head_norm=head_norm)
        return sum(jnp.sum(o.astype(jnp.float32)) for o in (out if splits else [out]))

    with jax.sharding.use_abstract_mesh(abstract_mesh()):
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(*args, rank).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3
    for name in ("short_conv_fwd", "short_conv_bwd_dacc", "short_conv_bwd"):
        assert name in text


@pytest.mark.parametrize("head_dim,splits,scales,config", [
    (32, (64, 128), (0.25, 1.0, None), SMALL),             # q, k normalised, v plain
    (64, (128, 256), (0.125, 1.0, None), sc.ConvConfig()),  # head tiles of 64 rows x 64
    (16, (), (0.5,), SMALL),                               # one part, tiles of 64 x 16
    (24, (48, 96), (0.2, 1.0, None), SMALL),               # head_dim not a power of two: XLA norm
])
def test_head_norm_matches_xla_autodiff(head_dim, splits, scales, config):
    """``head_norm``: the parts with a scale are scale * l2norm(SiLU(conv)) per head, equal to
    XLA's (float32 norm of the float32 output) in value and in dx, dweight (the kernel applies
    the norm's Jacobian in its dacc pass); negative ranks still give exact zeros."""
    b, l, w = 2, 100, 4
    c = (splits[-1] + splits[-1] // 2) if splits else 3 * head_dim
    x, weight, rank, dy = _stream(11, b, l, c, w, p_start=0.3)
    rank = rank.at[:, -5:].set(-1)
    norm = (head_dim, scales)

    def xla(x, weight):
        return lc.short_conv_packed(x, weight, rank, impl="xla", splits=splits, head_norm=norm)

    def kernel(x, weight):
        return sc.short_conv(x, weight, rank, config=config, splits=splits, head_norm=norm)

    dys = jnp.split(dy, splits, axis=-1) if splits else dy
    out_ref, vjp_ref = jax.vjp(xla, x, weight)
    out, vjp = jax.vjp(kernel, x, weight)
    outs, outs_ref = (out, out_ref) if splits else ([out], [out_ref])
    for got, want, scale in zip(outs, outs_ref, scales):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert float(jnp.max(jnp.abs(got[:, -5:]))) == 0.0
        if scale is not None:       # unit-norm heads (times the scale) where the output is not 0
            norms = jnp.linalg.norm(got.reshape(b, l, -1, head_dim), axis=-1)[:, :-5]
            np.testing.assert_allclose(norms[norms > 0], scale, rtol=1e-3)
    for got, want in zip(vjp(dys), vjp_ref(dys)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_head_norm_errors():
    x, weight, rank, _ = _stream(3, 1, 16, 64, 4)
    with pytest.raises(ValueError, match="one scale per part"):
        sc.short_conv(x, weight, rank, splits=(32,), head_norm=(16, (1.0,)))
    with pytest.raises(ValueError, match="activation"):
        sc.short_conv(x, weight, rank, activation=False, head_norm=(16, (1.0,)))
    with pytest.raises(ValueError, match="multiple of head_dim"):
        sc.short_conv(x, weight, rank, splits=(40,), head_norm=(16, (1.0, None)))


@pytest.mark.parametrize("in_splits,splits,norm,config", [
    ((64,), (64, 128), (32, (0.25, 1.0, None)), SMALL),   # the layers' call: q | k|v inputs
    ((64, 96), (), None, SMALL),                          # three inputs, one packed output
    ((64,), (), None, SMALL),                             # one tile-sized input, one output
    ((40,), (64, 128), None, SMALL),                      # 40 not whole tiles: concatenated
])
def test_input_parts_equal_the_concatenated_input(in_splits, splits, norm, config):
    """x given as parts along the channels: the same output and dweight as the concatenated x,
    and each part's dx is that slice of the concatenated x's dx (the kernels read and write the
    parts as they are where they are whole tiles)."""
    b, l, c, w = 2, 100, 192, 4
    x, weight, rank, dy = _stream(21, b, l, c, w, p_start=0.3)

    def packed(x, weight):
        return sc.short_conv(x, weight, rank, config=config, splits=splits, head_norm=norm)

    def parted(xs, weight):
        return sc.short_conv(list(xs), weight, rank, config=config, splits=splits, head_norm=norm)

    dys = jnp.split(dy, splits, axis=-1) if splits else dy
    out_ref, vjp_ref = jax.vjp(packed, x, weight)
    out, vjp = jax.vjp(parted, tuple(jnp.split(x, in_splits, axis=-1)), weight)
    for got, want in zip(out if splits else [out], out_ref if splits else [out_ref]):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    (dxs, dw), (dx_ref, dw_ref) = vjp(dys), vjp_ref(dys)
    np.testing.assert_allclose(jnp.concatenate(dxs, axis=-1), dx_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)


def test_input_parts_lower_for_cuda(monkeypatch):
    """The layers' call with q and k|v as two inputs lowers to three Triton calls."""
    monkeypatch.setattr(sc, "_interpret", lambda: False)
    sds = jax.ShapeDtypeStruct
    args = ((sds((2, 6400, 1024), jnp.bfloat16), sds((2, 6400, 2048), jnp.bfloat16)),
            sds((4, 3072), jnp.float32))

    def loss(xs, weight, rank):
        out = sc.short_conv(list(xs), weight, rank, splits=(1024, 2048),
                            head_norm=(256, (0.0625, 1.0, None)))
        return sum(jnp.sum(o.astype(jnp.float32)) for o in out)

    with jax.sharding.use_abstract_mesh(abstract_mesh()):
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(
            *args, sds((2, 6400), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3
    assert "concatenate" not in text


def test_dx_group_is_the_largest_divisor_within_dx_tiles():
    """``ConvConfig.dx_group``: the row tiles one dx-pass program walks divide the tile count."""
    cfg = sc.ConvConfig(block_l=16, block_c=32, dx_tiles=4)
    assert [cfg.dx_group(n) for n in (1, 2, 3, 4, 6, 7, 9, 12, 100)] == [1, 2, 3, 4, 3, 1, 3, 4, 4]
    with pytest.raises(ValueError, match="dx_tiles"):
        sc.ConvConfig(dx_tiles=0)


def test_default_config_setter(monkeypatch):
    """``set_default_config``: calls without a config (the layers') run on the set tiling."""
    seen = []
    original = sc._fwd_call
    monkeypatch.setattr(sc, "_fwd_call", lambda *a, **kw: seen.append(a[4]) or original(*a, **kw))
    x, weight, rank, _ = _stream(6, 1, 64, 32, 4)
    tiles = sc.ConvConfig(block_l=16, block_c=32, dx_tiles=2)
    assert sc.get_default_config() == sc.ConvConfig()
    sc.set_default_config(tiles)
    try:
        out = sc.short_conv(x, weight, rank)
    finally:
        sc.set_default_config(sc.ConvConfig())
    sc.short_conv(x, weight, rank)
    assert seen == [tiles, sc.ConvConfig()]
    np.testing.assert_allclose(out, _numpy_conv(x, weight, rank, True), rtol=1e-5, atol=1e-5)
