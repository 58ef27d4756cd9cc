"""MoMLayer and the single-memory baselines against the independent token-by-token reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mom_jax.layers import GatedDeltaNetLayer, GLALayer, MoMLayer
from tests import reference_layer as ref

D, H, DK, EXPAND_V, T, B, CHUNK = 16, 2, 4, 2, 11, 2, 4


def make_layer(rule="gated_delta", shared=True, seed=0, **kw):
    kw.setdefault("num_memories", 3)
    kw.setdefault("topk", 2)
    kw.setdefault("impl", "xla")
    return MoMLayer(D, num_heads=H, head_dim=DK, expand_v=EXPAND_V, update_rule=rule,
                    shared_memory=shared, chunk_size=CHUNK, rngs=nnx.Rngs(seed), **kw)


def cfg_of(layer, mom=True):
    c = dict(heads=layer.num_heads, dk=layer.head_dim, dv=layer.head_v_dim, rule=layer.update_rule,
             conv=layer.use_short_conv, output_gate=layer.head.use_output_gate, eps=layer.norm_eps)
    if mom:
        c.update(num_memories=layer.num_memories, topk=layer.topk, shared=layer.shared_memory,
                 single_kv=layer.single_kv_proj)
    return c


def randomize(layer, seed):
    """Random (non-init) parameter values so that every path carries signal, e.g. larger decays."""
    graphdef, state = nnx.split(layer)
    pure = nnx.to_pure_dict(state)
    leaves, tree = jax.tree.flatten(pure)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    pure = jax.tree.unflatten(tree, leaves)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def layer_fn(layer):
    graphdef, state = nnx.split(layer)
    pure = nnx.to_pure_dict(state)

    def apply(p, x):
        st = nnx.clone(state) if hasattr(nnx, "clone") else state
        nnx.replace_by_pure_dict(st, p)
        out = nnx.merge(graphdef, st)(x)
        return out[0] if isinstance(out, tuple) else out
    return apply, pure


def rel_err(a, b):
    return float(jnp.linalg.norm(jnp.ravel(a - b)) / jnp.linalg.norm(jnp.ravel(b)))


def check_against_reference(layer, seed):
    x = jax.random.normal(jax.random.PRNGKey(seed), (B, T, D))
    apply, p = layer_fn(layer)
    choices = ref.routing_choices(p, x, layer.topk)
    cfg = cfg_of(layer)
    y_ref = ref.reference_mom(p, x, cfg, choices)
    y = apply(p, x)
    assert rel_err(y, y_ref) < 2e-5

    r = jax.random.normal(jax.random.PRNGKey(seed + 1), y.shape)
    g_fast = jax.grad(lambda p, x: jnp.sum(apply(p, x) * r), argnums=(0, 1))(p, x)
    g_ref = jax.grad(lambda p, x: jnp.sum(ref.reference_mom(p, x, cfg, choices) * r),
                     argnums=(0, 1))(p, x)
    flat_fast = jax.tree_util.tree_leaves_with_path(g_fast)
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(g_ref))
    assert len(flat_fast) == len(flat_ref)
    for path, gf in flat_fast:
        gr = flat_ref[path]
        assert float(jnp.linalg.norm(gr)) > 0, jax.tree_util.keystr(path)
        assert rel_err(gf, gr) < 1e-4, (jax.tree_util.keystr(path), rel_err(gf, gr))


@pytest.mark.parametrize("rule", ["gated_delta", "delta", "gla", "linear"])
@pytest.mark.parametrize("shared", [True, False])
def test_mom_matches_token_reference_forward_and_grad(rule, shared):
    check_against_reference(randomize(make_layer(rule, shared), seed=1), seed=2)


def test_ragged_projection_matches_reference_forward_and_grad():
    check_against_reference(randomize(make_layer(routed_projection="ragged"), seed=3), seed=4)


def test_grouped_projection_matches_reference_forward_and_grad():
    """The stream's k|v projection by the grouped Pallas matmul (interpret mode), float32."""
    check_against_reference(randomize(make_layer(routed_projection="grouped"), seed=3), seed=4)


@pytest.mark.parametrize("rule", ["linear", "gla"])
def test_grouped_projection_other_rules_match_reference(rule):
    """Without beta / decay columns (linear) and with GLA's key-wide decay (forward)."""
    layer = randomize(make_layer(rule, routed_projection="grouped"), seed=5)
    x = jax.random.normal(jax.random.PRNGKey(6), (B, T, D))
    apply, p = layer_fn(layer)
    y_ref = ref.reference_mom(p, x, cfg_of(layer), ref.routing_choices(p, x, layer.topk))
    assert rel_err(apply(p, x), y_ref) < 2e-5


def test_auto_projection_resolution():
    """"auto" projects with the grouped kernel where ``resolve_grouped_matmul_impl`` says so (on
    CPU: impl="pallas" only), else densely; one k|v weight (single_kv_proj) is always dense."""
    def resolved(**kw):
        return make_layer(**kw)._resolved_projection()
    assert resolved() == "dense"                               # impl="xla"
    assert resolved(impl="pallas") == "grouped"
    assert resolved(impl="pallas", single_kv_proj=True) == "dense"
    assert resolved(impl="pallas", routed_projection="dense") == "dense"
    assert resolved(routed_projection="grouped") == "grouped"


@pytest.mark.parametrize("kw", [
    dict(single_kv_proj=True),
    dict(use_short_conv=False),
    dict(use_output_gate=False),
    dict(num_memories=1, topk=1),
    dict(num_memories=4, topk=4),
    dict(num_memories=4, topk=1, conv_size=2),
    dict(routed_projection="ragged"),
])
def test_mom_variants_match_reference(kw):
    layer = randomize(make_layer("gated_delta", True, **kw), seed=4)
    x = jax.random.normal(jax.random.PRNGKey(5), (B, T, D))
    apply, p = layer_fn(layer)
    y_ref = ref.reference_mom(p, x, cfg_of(layer), ref.routing_choices(p, x, layer.topk))
    assert rel_err(apply(p, x), y_ref) < 2e-5


@pytest.mark.parametrize("cls", [GatedDeltaNetLayer, GLALayer])
def test_single_memory_baselines_match_reference(cls):
    layer = cls(D, num_heads=H, head_dim=DK, expand_v=EXPAND_V, chunk_size=CHUNK, impl="xla",
                rngs=nnx.Rngs(0))
    layer = randomize(layer, seed=6)
    x = jax.random.normal(jax.random.PRNGKey(7), (B, T, D))
    apply, p = layer_fn(layer)
    assert rel_err(apply(p, x), ref.reference_single(p, x, cfg_of(layer, mom=False))) < 2e-5


# impl="pallas" (interpret mode on CPU; chunk 16, the kernels' smallest): the layers hand the raw
# q, k to the op, whose kernel L2-normalises them in its pre-pass and custom VJP.
PALLAS_CHUNK = 16


@pytest.mark.parametrize("rule", ["gated_delta", "delta"])
def test_mom_pallas_matches_token_reference_forward_and_grad(rule):
    layer = MoMLayer(D, num_heads=H, head_dim=DK, expand_v=EXPAND_V, update_rule=rule,
                     num_memories=3, topk=2, chunk_size=PALLAS_CHUNK, impl="pallas",
                     rngs=nnx.Rngs(0))
    check_against_reference(randomize(layer, seed=1), seed=2)


def test_gated_deltanet_pallas_matches_reference_forward_and_grad():
    layer = GatedDeltaNetLayer(D, num_heads=H, head_dim=DK, expand_v=EXPAND_V,
                               chunk_size=PALLAS_CHUNK, impl="pallas", rngs=nnx.Rngs(0))
    layer = randomize(layer, seed=6)
    x = jax.random.normal(jax.random.PRNGKey(7), (B, 2 * PALLAS_CHUNK + 3, D))
    apply, p = layer_fn(layer)
    cfg = cfg_of(layer, mom=False)
    assert rel_err(apply(p, x), ref.reference_single(p, x, cfg)) < 2e-5
    r = jax.random.normal(jax.random.PRNGKey(8), x.shape)
    g_fast = jax.grad(lambda p: jnp.sum(apply(p, x) * r))(p)
    g_ref = jax.grad(lambda p: jnp.sum(ref.reference_single(p, x, cfg) * r))(p)
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(g_ref))
    for path, gf in jax.tree_util.tree_leaves_with_path(g_fast):
        assert float(jnp.linalg.norm(flat_ref[path])) > 0, jax.tree_util.keystr(path)
        assert rel_err(gf, flat_ref[path]) < 1e-4, jax.tree_util.keystr(path)


def test_mom_pallas_prefill_then_steps_equals_forward():
    """Prefill through the kernel (normalising in the op) then decode steps (the fused step
    kernel, normalising in XLA in ``_step_features``) == the forward."""
    layer = MoMLayer(D, num_heads=H, head_dim=DK, expand_v=EXPAND_V, num_memories=3, topk=2,
                     chunk_size=PALLAS_CHUNK, impl="pallas", rngs=nnx.Rngs(0))
    layer = randomize(layer, seed=11)
    t1, t2 = 20, 5
    x = jax.random.normal(jax.random.PRNGKey(12), (B, t1 + t2, D))
    y_full, _ = layer(x)
    y1, _, cache = layer.prefill(x[:, :t1])
    step = jax.jit(lambda c, xt: layer.step(xt, c))
    outs = [y1]
    for t in range(t1, t1 + t2):
        yt, _, cache = step(cache, x[:, t])
        outs.append(yt[:, None])
    np.testing.assert_allclose(jnp.concatenate(outs, 1), y_full, rtol=1e-4, atol=1e-5)


def test_bf16_compute_close_to_fp32():
    layer = randomize(make_layer(), seed=8)
    x = jax.random.normal(jax.random.PRNGKey(9), (B, 40, D))
    y32 = layer(x)[0]
    layer.dtype = jnp.bfloat16
    y16, logits = layer(x)
    assert y16.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    assert rel_err(y16.astype(jnp.float32), y32) < 3e-2


def test_router_logits_returned():
    layer = make_layer()
    x = jax.random.normal(jax.random.PRNGKey(10), (B, T, D))
    _, logits = layer(x)
    np.testing.assert_allclose(logits, x @ layer.gate[...], rtol=1e-5, atol=1e-6)


def test_router_logits_ask_for_full_float32_precision():
    """The router's dot (forward and decode step) asks for HIGHEST precision: the default f32
    matmul is TF32 on a GPU and bf16 on a TPU, which flips near-tie routing choices.  Checked on
    the lowered program (a CPU computes f32 either way)."""
    layer = make_layer()
    e = layer.num_memories
    for fn, x in ((lambda x: layer(x), jnp.ones((B, T, D), jnp.bfloat16)),
                  (lambda x: layer.step(x, layer.init_cache(B)), jnp.ones((B, D), jnp.bfloat16))):
        text = jax.jit(fn).lower(x).as_text()
        router = [ln for ln in text.splitlines()
                  if "dot_general" in ln and f"x{D}xf32>, tensor<{D}x{e}xf32>" in ln]
        assert router and all("precision = [HIGHEST, HIGHEST]" in ln for ln in router), router


# ------------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["gated_delta", "delta", "gla", "linear"])
@pytest.mark.parametrize("shared", [True, False])
def test_prefill_then_steps_equals_forward(rule, shared):
    layer = randomize(make_layer(rule, shared), seed=11)
    t1, t2 = 9, 7
    x = jax.random.normal(jax.random.PRNGKey(12), (B, t1 + t2, D))
    y_full, logits_full = layer(x)
    y1, logits1, cache = layer.prefill(x[:, :t1])
    step = jax.jit(lambda c, xt: layer.step(xt, c))
    outs, logit_steps = [y1], [logits1]
    for t in range(t1, t1 + t2):
        yt, lt, cache = step(cache, x[:, t])
        outs.append(yt[:, None])
        logit_steps.append(lt[:, None])
    np.testing.assert_allclose(jnp.concatenate(outs, 1), y_full, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jnp.concatenate(logit_steps, 1), logits_full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [GatedDeltaNetLayer, GLALayer])
def test_baseline_prefill_then_steps(cls):
    layer = randomize(cls(D, num_heads=H, head_dim=DK, chunk_size=CHUNK, impl="xla",
                          rngs=nnx.Rngs(1)), seed=2)
    x = jax.random.normal(jax.random.PRNGKey(13), (B, 14, D))
    y_full = layer(x)
    y1, cache = layer.prefill(x[:, :6])
    outs = [y1]
    for t in range(6, 14):
        yt, cache = layer.step(x[:, t], cache)
        outs.append(yt[:, None])
    np.testing.assert_allclose(jnp.concatenate(outs, 1), y_full, rtol=1e-4, atol=1e-5)


def test_step_leaves_unselected_memories_bit_identical():
    layer = randomize(make_layer(num_memories=5, topk=2), seed=14)
    x = jax.random.normal(jax.random.PRNGKey(15), (3, 12, D))
    _, _, cache = layer.prefill(x)
    xt = jax.random.normal(jax.random.PRNGKey(16), (3, D))
    _, logits, new = layer.step(xt, cache)
    chosen = np.asarray(jax.lax.top_k(logits, 2)[1])
    for b in range(3):
        for m in range(5):
            same_state = np.array_equal(new.routed_state[b, m], cache.routed_state[b, m])
            same_conv = np.array_equal(new.routed_conv[b, m], cache.routed_conv[b, m])
            if m in chosen[b]:
                assert not same_state and not same_conv
            else:
                assert same_state and same_conv
    assert not np.array_equal(new.shared_state, cache.shared_state)


def test_init_cache_then_steps_equals_forward():
    layer = randomize(make_layer(), seed=17)
    x = jax.random.normal(jax.random.PRNGKey(18), (B, 6, D))
    cache = layer.init_cache(B)
    outs = []
    for t in range(6):
        yt, _, cache = layer.step(x[:, t], cache)
        outs.append(yt[:, None])
    np.testing.assert_allclose(jnp.concatenate(outs, 1), layer(x)[0], rtol=1e-4, atol=1e-5)


def test_cache_size_is_constant():
    layer = make_layer()
    x = jax.random.normal(jax.random.PRNGKey(19), (B, 30, D))
    sizes = set()
    for t in (5, 30):
        cache = layer.prefill(x[:, :t])[2]
        sizes.add(tuple(a.shape for a in jax.tree.leaves(cache)))
    assert len(sizes) == 1


# ------------------------------------------------------------------------------------------------
# compilation
# ------------------------------------------------------------------------------------------------
def test_compiles_once_for_any_routing():
    layer = make_layer()
    graphdef, state = nnx.split(layer)
    traces = []

    @jax.jit
    def f(state, x):
        traces.append(1)
        return nnx.merge(graphdef, state)(x)

    outs = []
    for seed in range(4):
        x = 3.0 * jax.random.normal(jax.random.PRNGKey(100 + seed), (B, T, D))
        outs.append(f(state, x)[1])
    routes = {tuple(np.asarray(jax.lax.top_k(o, 2)[1]).ravel()) for o in outs}
    assert len(routes) > 1      # the routing really changed between calls
    assert len(traces) == 1


# ------------------------------------------------------------------------------------------------
# configuration and input errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(topk=4, num_memories=3), "topk .*cannot exceed num_memories"),
    (dict(topk=0), "topk must be an integer >= 1"),
    (dict(num_memories=0), "num_memories must be a positive integer"),
    (dict(update_rule="mamba"), "update_rule must be one of"),
    (dict(impl="cuda"), "impl must be one of"),
    (dict(routed_projection="sparse"), "routed_projection must be one of"),
    (dict(routed_projection="grouped", chunk_size=6), "power-of-two chunk_size"),
    (dict(expand_v=0.3), "head_dim \\* expand_v must be a positive integer"),
    (dict(norm_eps=0.0), "norm_eps must be > 0"),
    (dict(chunk_size=0), "chunk_size must be a positive integer"),
])
def test_bad_config_is_rejected(kw, match):
    base = dict(num_heads=H, head_dim=DK, rngs=nnx.Rngs(0))
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        MoMLayer(D, **base)


def test_heads_must_divide_hidden():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        MoMLayer(18, num_heads=4, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("x,err,match", [
    (np.ones((2, 5), np.float32), ValueError, "shape \\[batch, time, hidden\\]"),
    (np.ones((2, 5, 16), np.int32), TypeError, "floating point"),
    (np.ones((2, 5, 8), np.float32), ValueError, "hidden size 8 != layer hidden_size 16"),
])
def test_bad_input_is_rejected(x, err, match):
    layer = make_layer()
    with pytest.raises(err, match=match):
        layer(jnp.asarray(x))


def test_bad_step_input_is_rejected():
    layer = make_layer()
    with pytest.raises(ValueError, match="shape \\[batch, hidden\\]"):
        layer.step(jnp.ones((2, 1, D)), layer.init_cache(2))
