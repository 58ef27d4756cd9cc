"""The fused decode step (``mom_jax.ops.decode_step``; Triton kernel in interpret mode on CPU)
against the token-by-token ``scan.recurrent_step`` on gathered states, and in the layers' ``step``.
Inputs are random (never zeros)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mom_jax import ops
from mom_jax.layers import GatedDeltaNetLayer, GLALayer, MoMLayer
from mom_jax.ops.scan import recurrent_step
from pallas_kernels import decode_step as kernel
from tests.lowering import abstract_mesh

RULES = {  # rule -> (uses g, uses gk, uses beta)
    "gated_delta": (True, False, True), "delta": (False, False, True),
    "gla": (False, True, False), "linear": (False, False, False)}


def _inputs(b=3, m=4, j=2, h=2, dk=32, dv=64, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    state = jax.random.normal(ks[0], (b, m, h, dk, dv))
    slots = jnp.stack([jax.random.permutation(jax.random.fold_in(ks[7], r), m)[:j]
                       for r in range(b)]).astype(jnp.int32)
    q = jax.random.normal(ks[1], (b, j, h, dk)) * dk ** -0.5
    k = ops.l2norm(jax.random.normal(ks[2], (b, j, h, dk)))
    v = jax.random.normal(ks[3], (b, j, h, dv)).astype(jnp.bfloat16)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, j, h)))
    g = -jax.nn.softplus(jax.random.normal(ks[5], (b, j, h)))
    gk = -jax.nn.softplus(jax.random.normal(ks[6], (b, j, h, dk)))
    return state, slots, q, k, v, beta, g, gk


@pytest.mark.parametrize("rule", list(RULES))
def test_kernel_matches_gathered_recurrent_step(rule):
    use_g, use_gk, use_beta = RULES[rule]
    state, slots, q, k, v, beta, g, gk = _inputs()
    kw = dict(g=g if use_g else None, gk=gk if use_gk else None, beta=beta if use_beta else None)
    new, _, o = ops.decode_step(state, q, k, v, slots=slots, impl="pallas", **kw)
    rows = jnp.arange(state.shape[0])[:, None]
    ref_s, ref_o = recurrent_step(state[rows, slots], q, k, v, **kw)
    np.testing.assert_allclose(new[rows, slots], ref_s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o, ref_o, rtol=1e-5, atol=1e-5)
    untouched = ~jnp.zeros(state.shape[:2], bool).at[rows, slots].set(True)
    assert bool(jnp.all(jnp.where(untouched[..., None, None, None], new == state, True)))
    assert int(untouched.sum()) == state.shape[0] * (state.shape[1] - slots.shape[1])
    # the XLA path (gather / update / scatter) agrees
    new_x, _, o_x = ops.decode_step(state, q, k, v, slots=slots, impl="xla", **kw)
    np.testing.assert_allclose(new, new_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o, o_x, rtol=1e-5, atol=1e-5)


def test_kernel_all_memories_without_slots():
    state, _, q, k, v, beta, g, _ = _inputs(m=2, j=2, dk=16, dv=32, seed=3)
    new, _, o = ops.decode_step(state, q, k, v, g=g, beta=beta, impl="pallas")
    ref_s, ref_o = recurrent_step(state, q, k, v, g=g, beta=beta)
    np.testing.assert_allclose(new, ref_s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o, ref_o, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", ["gated_delta", "gla"])
def test_kernel_with_shared_memory(rule):
    """Routed slots plus the shared memory in one launch: the last input of each row."""
    use_g, use_gk, use_beta = RULES[rule]
    state, slots, q, k, v, beta, g, gk = _inputs(j=3, seed=5)
    shared = jax.random.normal(jax.random.PRNGKey(11), (3, 2, 32, 64))
    slots = slots[:, :2]
    kw = dict(g=g if use_g else None, gk=gk if use_gk else None, beta=beta if use_beta else None)
    new, new_shared, o = ops.decode_step(state, q, k, v, slots=slots, shared_state=shared,
                                         impl="pallas", **kw)
    rows = jnp.arange(3)[:, None]
    sub = lambda x, sl: None if x is None else x[:, sl]  # noqa: E731
    r = slice(0, 2)
    ref_s, ref_o = recurrent_step(state[rows, slots], q[:, r], k[:, r], v[:, r],
                                  **{n: sub(x, r) for n, x in kw.items()})
    ref_sh, ref_osh = recurrent_step(shared, q[:, 2], k[:, 2], v[:, 2],
                                     **{n: sub(x, 2) for n, x in kw.items()})
    np.testing.assert_allclose(new, state.at[rows, slots].set(ref_s), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_shared, ref_sh, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o[:, :2], ref_o, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o[:, 2], ref_osh, rtol=1e-5, atol=1e-5)
    out_x = ops.decode_step(state, q, k, v, slots=slots, shared_state=shared, impl="xla", **kw)
    for a, b in zip((new, new_shared, o), out_x):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_resolve_step_impl():
    assert ops.resolve_step_impl("auto", 32, 64) == "xla"        # CPU: XLA unless asked
    assert ops.resolve_step_impl("pallas", 32, 64) == "pallas"   # interpret mode on CPU
    assert ops.resolve_step_impl("pallas", 24, 64) == "xla"      # Triton needs powers of two
    assert ops.resolve_step_impl("scan", 32, 64) == "xla"
    assert not kernel.supported(48, 64) and kernel.supported(256, 256)


def test_decode_step_shape_errors():
    state, slots, q, k, v, beta, g, gk = _inputs()
    with pytest.raises(ValueError, match="needs q, k"):
        ops.decode_step(state, q[:, :1], k, v, slots=slots, beta=beta)
    with pytest.raises(ValueError, match="at most one"):
        ops.decode_step(state, q, k, v, slots=slots, g=g, gk=gk, beta=beta)


def _decode(layer, x, steps):
    cache = layer.init_cache(x.shape[0], jnp.float32)
    outs = []
    for t in range(steps):
        out = layer.step(x[:, t], cache)
        outs.append(out[0])
        cache = out[-1]
    return jnp.stack(outs, 1), cache


STEP_VARIANTS = {  # name -> MoMLayer options; the fused feature pass must handle each
    "gated_delta+shared": dict(),
    "gated_delta": dict(shared_memory=False),
    "delta+shared": dict(update_rule="delta"),
    "gla+shared,no conv": dict(update_rule="gla", use_short_conv=False),
    "linear,conv 3": dict(update_rule="linear", shared_memory=False, conv_size=3),
    "single_kv_proj+shared": dict(single_kv_proj=True),
    "gated_delta+shared,bf16": dict(dtype=jnp.bfloat16),
}


@pytest.mark.parametrize("variant", list(STEP_VARIANTS))
def test_mom_layer_step_pallas_equals_xla(variant):
    """Several decode steps of a MoM layer: the fused kernels (feature pass + state update, in
    interpret mode) equal the XLA path (gathers, feature fusions, recurrent_step, scatters)."""
    opts = STEP_VARIANTS[variant]
    kw = dict(num_heads=2, head_dim=16, num_memories=3, topk=2, **opts)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 32))
    layer_p = MoMLayer(32, impl="pallas", rngs=nnx.Rngs(0), **kw)
    layer_x = MoMLayer(32, impl="xla", rngs=nnx.Rngs(0), **kw)
    conv_dtype = opts.get("dtype", jnp.float32)
    tol = 2e-2 if conv_dtype == jnp.bfloat16 else 2e-5
    cache_p = cache_x = layer_p.init_cache(2, conv_dtype)
    for t in range(5):
        y_p, _, new_p = layer_p.step(x[:, t], cache_p)
        y_x, _, new_x = layer_x.step(x[:, t], cache_x)
        np.testing.assert_allclose(np.asarray(y_p, np.float32), np.asarray(y_x, np.float32),
                                   rtol=tol, atol=tol)
        for a, b in zip(jax.tree.leaves(new_p), jax.tree.leaves(new_x)):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       rtol=tol, atol=tol)
        # the memories not routed to keep their state and conv history bit for bit
        logits = x[:, t] @ layer_p.gate[...]
        chosen = jnp.zeros((2, 3), bool).at[jnp.arange(2)[:, None],
                                            jax.lax.top_k(logits, 2)[1]].set(True)
        same = jnp.all((new_p.routed_state == cache_p.routed_state).reshape(2, 3, -1), -1)
        same_conv = jnp.all((new_p.routed_conv == cache_p.routed_conv).reshape(2, 3, -1), -1)
        assert bool(jnp.all(same | chosen)) and bool(jnp.all(same_conv | chosen))
        assert not bool(jnp.any(same & chosen))
        cache_p, cache_x = new_p, new_x


@pytest.mark.parametrize("layer_cls", [GatedDeltaNetLayer, GLALayer])
def test_single_memory_layer_step_pallas_equals_xla(layer_cls):
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 32))
    y_p, c_p = _decode(layer_cls(32, num_heads=2, impl="pallas", rngs=nnx.Rngs(0)), x, 4)
    y_x, c_x = _decode(layer_cls(32, num_heads=2, impl="xla", rngs=nnx.Rngs(0)), x, 4)
    np.testing.assert_allclose(y_p, y_x, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(c_p.state, c_x.state, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(c_p.conv, c_x.conv, rtol=2e-5, atol=2e-5)


def _assert_lowers_for_h100_with_aliases(fn, args, donate_argnums):
    """``fn`` lowers for an H100 without a GPU: one Triton call, its outputs aliased to inputs."""
    with jax.sharding.use_abstract_mesh(abstract_mesh()):
        lowered = jax.jit(fn, donate_argnums=donate_argnums).trace(*args).lower(
            lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "output_operand_aliases" in text


def test_step_kernel_lowers_for_cuda():
    """The step kernel lowers to Triton IR for an H100, with the state aliased."""
    sds = jax.ShapeDtypeStruct
    b, m, j, h, dk, dv = 2, 4, 2, 4, 256, 256
    args = (sds((b, m, h, dk, dv), jnp.float32), sds((b, j), jnp.int32),
            sds((b, j + 1, h, dk), jnp.bfloat16), sds((b, j + 1, h, dk), jnp.bfloat16),
            sds((b, j + 1, h, dv), jnp.bfloat16), sds((b, j + 1, h), jnp.float32),
            sds((b, j + 1, h), jnp.float32), sds((b, h, dk, dv), jnp.float32))
    _assert_lowers_for_h100_with_aliases(kernel.step_in_place, args, (0, 7))


def test_feature_kernel_lowers_for_cuda():
    """The fused feature pass lowers to Triton IR for an H100, the conv histories aliased (at
    the 340M model's head sizes)."""
    import functools  # noqa: PLC0415

    from pallas_kernels import decode_features  # noqa: PLC0415
    sds = jax.ShapeDtypeStruct
    b, e, k, h, d, w = 2, 4, 2, 4, 256, 4
    n = 2 * h * d + 2 * h
    c = 3 * h * d
    args = (sds((b, h * d + (e + 1) * n), jnp.bfloat16), sds((b, k + 1), jnp.int32),
            sds((b, k), jnp.int32), sds((b, e, w - 1, c), jnp.bfloat16),
            sds((b, w - 1, c), jnp.bfloat16), sds((w, c), jnp.float32), sds((2, h), jnp.float32))
    fn = functools.partial(decode_features.step_features_in_place, update_rule="gated_delta",
                           num_heads=h, head_dim=d, head_v_dim=d, conv_size=w, q_scale=d ** -0.5,
                           eps=1e-6)
    _assert_lowers_for_h100_with_aliases(fn, args, (3, 4))
