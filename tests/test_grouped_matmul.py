"""The row-grouped matmul (``pallas_kernels.grouped_matmul``, interpret mode on CPU) against a
float64 numpy loop over the row groups (values and both gradients), including rows of no group,
tiles across a group boundary, groups with no rows and ragged M / K / N; plus its Triton lowering
for CUDA."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import grouped_matmul as gm
from tests.lowering import abstract_mesh

SMALL = gm.GroupedMatmulConfig(block_m=8, block_n=16, block_k=16, dw_block_k=16, dw_block_n=16)


def _problem(seed, chunks, rows, k, n, g, dtype=jnp.float32):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(k1, (chunks * rows, k), jnp.float32).astype(dtype)
    w = jax.random.normal(k2, (g, k, n), jnp.float32).astype(dtype)
    # Runs of equal groups (as in a stream) with some -1 chunks; group g-1 never appears.
    groups = jax.random.randint(k3, (chunks,), -1, g - 1)
    groups = jnp.where(jax.random.bernoulli(k4, 0.5, (chunks,)), jnp.roll(groups, 1), groups)
    groups = groups.at[2].set(-1).at[-1].set(-1)
    dy = jax.random.normal(k4, (chunks * rows, n), jnp.float32).astype(dtype)
    return x, w, groups.astype(jnp.int32), dy


def _numpy(x, w, groups, dy, rows):
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    out, dx, dw = np.zeros((x.shape[0], w.shape[2])), np.zeros_like(x), np.zeros_like(w)
    for c, g in enumerate(np.asarray(groups)):
        if g < 0:
            continue
        r = slice(c * rows, (c + 1) * rows)
        out[r] = x[r] @ w[g]
        dx[r] = dy[r] @ w[g].T
        dw[g] += x[r].T @ dy[r]
    return out, dx, dw


@pytest.mark.parametrize("chunks,rows,k,n,g,config", [
    (12, 8, 32, 48, 4, SMALL),                                       # one group per tile
    (11, 4, 40, 20, 3, SMALL),         # tiles of 2 groups (block_m 8 = 2 x 4), ragged M, K, N
    (9, 8, 64, 32, 5, gm.GroupedMatmulConfig(block_m=64, block_n=16, block_k=32,
                                             dw_block_k=32, dw_block_n=16)),   # 2 per tile
])
def test_values_and_gradients_match_numpy(chunks, rows, k, n, g, config):
    x, w, groups, dy = _problem(0, chunks, rows, k, n, g)
    assert int(jnp.sum(groups < 0)) > 0
    out, vjp = jax.vjp(lambda x, w: gm.grouped_matmul(x, w, groups, rows, config=config), x, w)
    dx, dw = vjp(dy)
    ref_out, ref_dx, ref_dw = _numpy(x, w, groups, dy, rows)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-4)
    assert float(jnp.max(jnp.abs(dw[g - 1]))) == 0.0          # the group with no rows
    assert out.dtype == x.dtype and dw.dtype == w.dtype


def test_bfloat16_within_rounding_of_float32():
    x, w, groups, dy = _problem(1, 8, 8, 32, 32, 3, jnp.bfloat16)
    out, vjp = jax.vjp(lambda x, w: gm.grouped_matmul(x, w, groups, 8, config=SMALL), x, w)
    dx, dw = vjp(dy)
    ref = _numpy(x, w, groups, dy, 8)
    for got, want in zip((out, dx, dw), ref):
        assert got.dtype == jnp.bfloat16
        err = np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want))
        assert err < 8e-3, err


def test_chunk_order():
    order, starts = gm.chunk_order(jnp.array([2, -1, 0, 2, 0, -1, 1], jnp.int32), 4)
    np.testing.assert_array_equal(order, [1, 5, 2, 4, 6, 0, 3])
    np.testing.assert_array_equal(starts, [2, 4, 5, 7, 7])


def test_stages_fit_shared_memory():
    """The default tiling's stage counts by shared memory (an H100's 200 KB tile budget): bf16 at
    chunk 64 keeps 4 stages; the dw kernel's [128, 128] x 2 tiles at chunk 128 (64 KB a stage)
    get 2 (4 asked the H100 for 295 KB and failed to launch); float32 gets 2."""
    h100 = 200 * 1024
    c = gm.tile_config(gm.GroupedMatmulConfig(), 64, jnp.bfloat16, h100)
    assert (c.block_m, c.num_stages, c.dw_num_stages) == (128, 4, 4)
    c = gm.tile_config(gm.GroupedMatmulConfig(), 128, jnp.bfloat16, h100)
    assert (c.block_m, c.num_stages, c.dw_num_stages) == (128, 4, 2)
    c = gm.tile_config(gm.GroupedMatmulConfig(), 64, jnp.float32, h100)
    assert (c.num_stages, c.dw_num_stages) == (2, 2)
    c = gm.tile_config(gm.GroupedMatmulConfig(block_m=16), 16, jnp.bfloat16, h100)
    assert c.block_m == 16


def test_shape_errors():
    x, w, groups, _ = _problem(0, 4, 8, 16, 16, 2)
    with pytest.raises(ValueError, match="groups must be"):
        gm.grouped_matmul(x, w, groups[:3], 8)
    with pytest.raises(ValueError, match="group_rows"):
        gm.grouped_matmul(x, w, groups, 6)
    with pytest.raises(ValueError, match="w \\[G, K, N\\]"):
        gm.grouped_matmul(x, w[0], groups, 8)
    with pytest.raises(ValueError, match="dtype"):
        gm.grouped_matmul(x, w.astype(jnp.bfloat16), groups, 8)
    with pytest.raises(ValueError, match="power of two"):
        gm.GroupedMatmulConfig(block_n=48)


def test_kernels_lower_for_cuda(monkeypatch):
    """Forward, dx and dw lower to three Triton calls for an H100 (the MoM stream's shape)."""
    monkeypatch.setattr(gm, "_interpret", lambda: False)
    sds = jax.ShapeDtypeStruct
    args = (sds((51200, 1024), jnp.bfloat16), sds((5, 1024, 2048), jnp.bfloat16))

    def loss(x, w, groups):
        return jnp.sum(gm.grouped_matmul(x, w, groups, 64).astype(jnp.float32))

    with jax.sharding.use_abstract_mesh(abstract_mesh()):
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(
            *args, sds((800,), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3
    assert "grouped_matmul_dw" in text
