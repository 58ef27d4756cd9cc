"""Routing: top-k weights, packed dispatch plan, combine, aux loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mom_jax import routing


def plan_for(logits, k, chunk=8, shared=True):
    w, idx = routing.route(logits, k)
    return w, idx, routing.plan_dispatch(idx, logits.shape[-1], chunk, shared)


def test_route_weights_are_renormalised_topk():
    logits = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 5))
    w, idx = routing.route(logits, 2)
    p = np.asarray(jax.nn.softmax(logits, -1))
    order = np.argsort(-p, -1, kind="stable")[..., :2]
    np.testing.assert_array_equal(idx, order)
    top = np.take_along_axis(p, order, -1)
    np.testing.assert_allclose(w, top / top.sum(-1, keepdims=True), rtol=1e-6)


def test_ties_go_to_the_lower_index_with_equal_weights():
    logits = jnp.zeros((1, 4, 6))
    w, idx = routing.route(logits, 3)
    np.testing.assert_array_equal(idx, np.broadcast_to([0, 1, 2], (1, 4, 3)))
    np.testing.assert_allclose(w, 1 / 3, rtol=1e-6)


@pytest.mark.parametrize("e,k", [(4, 2), (4, 1), (4, 4), (1, 1), (8, 3)])
@pytest.mark.parametrize("shared", [True, False])
def test_dispatch_round_trip_and_time_order(e, k, shared):
    b, t, c = 3, 29, 8
    logits = jax.random.normal(jax.random.PRNGKey(e * 10 + k), (b, t, e))
    w, idx, plan = plan_for(logits, k, c, shared)
    x = jax.random.normal(jax.random.PRNGKey(1), (b, t, 5))
    xs = routing.dispatch(x, plan)
    # every choice's slot holds exactly that token
    for j in range(k):
        got = jnp.take_along_axis(xs, plan.positions[..., j:j + 1], axis=1)
        np.testing.assert_array_equal(got, x)
    # slots are distinct and padding is zero
    pos = np.asarray(plan.positions).reshape(b, -1)
    assert all(len(set(row)) == t * k for row in pos)
    valid = np.asarray(plan.valid)
    assert np.all(np.asarray(xs)[~valid] == 0)
    assert valid[:, :plan.routed_length].sum() == b * t * k
    # within each memory segment: tokens in strictly increasing time order, ranks 0..n-1
    seg_tok = np.asarray(plan.slot_token)
    off, cnt = np.asarray(plan.segment_offsets), np.asarray(plan.counts)
    idx_np = np.asarray(idx)
    for bb in range(b):
        for m in range(e):
            toks = seg_tok[bb, off[bb, m]:off[bb, m] + cnt[bb, m]]
            expected = [tt for tt in range(t) if m in idx_np[bb, tt]]
            assert list(toks) == expected
            np.testing.assert_array_equal(
                np.asarray(plan.slot_rank)[bb, off[bb, m]:off[bb, m] + cnt[bb, m]],
                np.arange(cnt[bb, m]))
            assert off[bb, m] % c == 0
    # combine of the dispatched input = sum_j w_j x (+ x from the shared memory)
    y = routing.combine(xs, w, plan)
    np.testing.assert_allclose(y, x * (2.0 if shared else 1.0), rtol=1e-5, atol=1e-6)


def test_layout_segments_cover_each_memory_once():
    logits = jax.random.normal(jax.random.PRNGKey(3), (2, 50, 4))
    _, _, plan = plan_for(logits, 2, 8, True)
    seg = np.asarray(plan.layout.chunk_segment)
    cnt = np.asarray(plan.counts)
    for bb in range(2):
        for m in range(4):
            n_chunks = int(np.sum(seg[bb] == m))
            assert n_chunks == -(-cnt[bb, m] // 8)
            if n_chunks:   # contiguous
                where = np.flatnonzero(seg[bb] == m)
                assert where[-1] - where[0] + 1 == n_chunks
        assert np.sum(seg[bb] == 4) == -(-50 // 8)


def test_static_length_fits_worst_case():
    # every token to the same two memories: maximal chunk padding in the others (empty) is zero,
    # and the plan must still fit; all to one memory with k=1
    b, t, e = 2, 37, 5
    idx = jnp.broadcast_to(jnp.array([3, 1], jnp.int32), (b, t, 2))
    plan = routing.plan_dispatch(idx, e, 8, False)
    assert int(plan.positions.max()) < plan.routed_length
    np.testing.assert_array_equal(plan.counts[:, 3], t)
    np.testing.assert_array_equal(plan.counts[:, 0], 0)


def test_load_balancing_loss_matches_numpy():
    e, k = 4, 2
    layers = [jax.random.normal(jax.random.PRNGKey(i), (2, 9, e)) for i in range(3)]
    mask = np.ones((2, 9), bool)
    mask[1, 6:] = False
    got = routing.load_balancing_loss(layers, k, jnp.asarray(mask))
    logits = np.concatenate([np.asarray(x)[mask] for x in layers])       # [N, E]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, -1, kind="stable")[:, :k]
    f = np.zeros((k, e))
    for j in range(k):
        for ee in range(e):
            f[j, ee] = np.mean(top[:, j] == ee)
    expected = e * np.sum(f * p.mean(0)[None])
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_load_balancing_loss_is_minimal_when_balanced():
    # uniform router: P = 1/E, f sums to 1 per choice -> L = k exactly
    logits = jnp.zeros((4, 16, 4))
    np.testing.assert_allclose(routing.load_balancing_loss(logits, 2), 2.0, rtol=1e-6)


# --- Gather VJPs against the plain take_along_axis gathers (whose VJPs are scatter-adds) --------
# The reference functions are copies of dispatch, combine and MoMLayer._stream_raw's single_kv_proj
# and dense branches as they were before the custom VJPs and the zero-row tables.

def ref_dispatch(x, plan):
    idx = jnp.maximum(plan.slot_token, 0)
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    out = jnp.take_along_axis(x, idx, axis=1)
    return jnp.where(plan.valid.reshape(plan.valid.shape + (1,) * (x.ndim - 2)), out, 0)


def ref_combine(o, weights, plan):
    b, t, k = plan.positions.shape
    extra = o.shape[2:]
    pos = plan.positions.reshape(b, t * k, *([1] * len(extra)))
    picked = jnp.take_along_axis(o, pos, axis=1).reshape((b, t, k) + extra).astype(jnp.float32)
    w = weights.astype(jnp.float32).reshape((b, t, k) + (1,) * len(extra))
    y = jnp.sum(picked * w, axis=2)
    if plan.shared:
        y = y + o[:, plan.routed_length:plan.routed_length + t].astype(jnp.float32)
    return y


def ref_stream_raw(self, xc, idx, plan):
    """MoMLayer._stream_raw for the dense and single_kv_proj paths with take_along_axis gathers
    and selects (no zero rows)."""
    b, t, _ = xc.shape
    dtype = xc.dtype
    e, lr = self.num_memories, plan.routed_length
    q = ref_dispatch(xc @ self.q_proj[...].astype(dtype), plan)
    w_mem = self._memory_weights(dtype)
    if self.single_kv_proj:
        proj = xc @ w_mem[0]
        out = jnp.take_along_axis(proj, jnp.maximum(plan.slot_token[:, :lr], 0)[..., None], 1)
    else:
        assert self._resolved_projection() == "dense"
        proj = jnp.einsum("btd,edn->bten", xc, w_mem).reshape(b, t * e, -1)
        seg = jnp.repeat(plan.layout.chunk_segment[:, :lr // self.chunk_size], self.chunk_size,
                         axis=1)
        src = jnp.maximum(plan.slot_token[:, :lr], 0) * e + jnp.maximum(seg, 0)
        out = jnp.take_along_axis(proj, src[..., None], axis=1)
    kvba = jnp.where(plan.valid[:, :lr, None], out, 0)
    if self.shared_memory:
        shared = xc @ self._concat_weights("shared_{}", dtype)
        kvba = jnp.concatenate([kvba, jnp.pad(shared, ((0, 0), (0, plan.length - lr - t),
                                                       (0, 0)))], axis=1)
    nkv = self.key_dim + self.value_dim
    return (q, kvba[..., :nkv]), kvba[..., nkv:]


def _vjp_pair(fn, ref_fn, args, seed):
    """Values and cotangents (random) of fn and ref_fn at args."""
    out = jax.eval_shape(fn, *args)
    ct = jax.random.normal(jax.random.PRNGKey(seed), out.shape, jnp.float32).astype(out.dtype)

    @jax.jit
    def run(args, ct):
        (y, vjp), (y_ref, vjp_ref) = jax.vjp(fn, *args), jax.vjp(ref_fn, *args)
        return y, y_ref, vjp(ct), vjp_ref(ct)
    return run(args, ct)


@pytest.mark.parametrize("e,k,shared", [(4, 2, True), (4, 1, False), (4, 4, True), (3, 3, False),
                                        (8, 3, True), (1, 1, True)])
@pytest.mark.parametrize("extra", [(6,), (3, 4)])
def test_dispatch_and_combine_vjps_match_plain_gathers(e, k, shared, extra):
    b, t, c = 3, 29, 8                       # T not a multiple of the chunk
    keys = jax.random.split(jax.random.PRNGKey(100 * e + 10 * k + len(extra)), 3)
    w, _, plan = plan_for(jax.random.normal(keys[0], (b, t, e)), k, c, shared)
    x = jax.random.normal(keys[1], (b, t) + extra)
    y, y_ref, (dx,), (dx_ref,) = _vjp_pair(lambda x: routing.dispatch(x, plan),
                                           lambda x: ref_dispatch(x, plan), (x,), 1)
    np.testing.assert_array_equal(y, y_ref)
    assert dx.dtype == x.dtype
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-6)

    o = jax.random.normal(keys[2], (b, plan.length) + extra)     # non-zero padding too
    y, y_ref, (do, dw), (do_ref, dw_ref) = _vjp_pair(
        lambda o, w: routing.combine(o, w, plan), lambda o, w: ref_combine(o, w, plan), (o, w), 2)
    np.testing.assert_array_equal(y, y_ref)
    assert do.dtype == o.dtype and dw.dtype == w.dtype
    np.testing.assert_array_equal(do, do_ref)                     # one product per slot: exact
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-6, atol=1e-6)


def test_gather_vjps_keep_low_precision_dtypes():
    b, t, e, k = 2, 13, 4, 2
    w, _, plan = plan_for(jax.random.normal(jax.random.PRNGKey(0), (b, t, e)), k, 4, True)
    x = jax.random.normal(jax.random.PRNGKey(1), (b, t, 5)).astype(jnp.bfloat16)
    y, y_ref, (dx,), (dx_ref,) = _vjp_pair(lambda x: routing.dispatch(x, plan),
                                           lambda x: ref_dispatch(x, plan), (x,), 2)
    np.testing.assert_array_equal(y, y_ref)
    assert dx.dtype == jnp.bfloat16                # summed in float32, so not bitwise the reference
    np.testing.assert_allclose(np.float32(dx), np.float32(dx_ref), rtol=2e-2, atol=2e-2)
    o = jax.random.normal(jax.random.PRNGKey(3), (b, plan.length, 5)).astype(jnp.bfloat16)
    w16 = w.astype(jnp.bfloat16)
    y, y_ref, (do, dw), (do_ref, dw_ref) = _vjp_pair(
        lambda o, w: routing.combine(o, w, plan), lambda o, w: ref_combine(o, w, plan), (o, w16), 4)
    np.testing.assert_array_equal(y, y_ref)
    assert do.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_array_equal(do, do_ref)
    np.testing.assert_allclose(np.float32(dw), np.float32(dw_ref), rtol=1e-2, atol=1e-2)


def test_take_rows_matches_take_along_axis():
    """take_rows (one gather from the flattened array): out[b, m] = x[b, idx[b, m]] for trailing
    dims of any rank, and row 0 for idx < 0; the lowered forward has no transpose."""
    x = jax.random.normal(jax.random.PRNGKey(5), (3, 7, 2, 4))
    idx = jnp.asarray(np.random.default_rng(0).integers(-1, 7, (3, 11)), jnp.int32)
    ref = np.take_along_axis(np.asarray(x), np.maximum(np.asarray(idx), 0)[:, :, None, None], 1)
    np.testing.assert_array_equal(routing.take_rows(x, idx), ref)
    flat = x.reshape(3, 7, 8)
    np.testing.assert_array_equal(routing.take_rows(flat, idx), ref.reshape(3, 11, 8))
    assert "transpose" not in jax.jit(routing.take_rows).lower(x, idx).as_text()


def test_memory_slots_inverts_positions():
    b, t, e, k = 2, 19, 5, 3
    _, idx, plan = plan_for(jax.random.normal(jax.random.PRNGKey(4), (b, t, e)), k, 4, False)
    inv = np.asarray(routing.memory_slots(idx, plan.positions, e))
    expected = np.full((b, t, e), -1)
    for bb in range(b):
        for tt in range(t):
            for j in range(k):
                expected[bb, tt, idx[bb, tt, j]] = plan.positions[bb, tt, j]
    np.testing.assert_array_equal(inv, expected)


def _backward_hlo(fn, *args):
    def bwd(args, ct):
        return jax.vjp(fn, *args)[1](ct)
    ct = jax.eval_shape(fn, *args)
    ct = jnp.ones(ct.shape, ct.dtype)
    return jax.jit(bwd).lower(args, ct).as_text()


def test_backwards_have_no_scatter():
    b, t, e, k = 2, 13, 4, 2
    w, idx, plan = plan_for(jax.random.normal(jax.random.PRNGKey(0), (b, t, e)), k, 4, True)
    x = jnp.ones((b, t, 3, 2))
    o = jnp.ones((b, plan.length, 3, 2))
    table = jnp.ones((routing.table_rows(b * t) * (e + 1), 3))
    cases = [
        (lambda x, plan: routing.dispatch(x, plan), (x, plan)),
        (lambda o, w, plan: routing.combine(o, w, plan), (o, w, plan)),
        (lambda p, plan: routing.gather_table(p, *routing.stream_sources(plan, idx)),
         (table, plan)),
    ]
    for fn, args in cases:
        assert "scatter" not in _backward_hlo(fn, *args)
    # the check can fail: the plain gathers' backwards are scatter-adds
    assert "scatter" in _backward_hlo(lambda x, plan: ref_dispatch(x, plan), x, plan)
    assert "scatter" in _backward_hlo(lambda o, w, plan: ref_combine(o, w, plan), o, w, plan)


@pytest.mark.parametrize("kw", [dict(), dict(single_kv_proj=True, shared_memory=False),
                                dict(num_memories=3, topk=3), dict(num_memories=3, topk=1)])
def test_layer_grads_match_plain_gathers(kw, monkeypatch):
    """The MoM layer's output and parameter gradients with the gather VJPs (combine and
    _stream_raw's dense or single_kv_proj path) vs. the same layer with the plain gathers."""
    from mom_jax.layers import MoMLayer
    from tests.test_mom_layer import B, D, T, make_layer, randomize
    kw = dict(kw)
    shared = kw.pop("shared_memory", True)
    layer = randomize(make_layer("gated_delta", shared, **kw), seed=11)
    graphdef, state = nnx.split(layer)
    x = jax.random.normal(jax.random.PRNGKey(12), (B, T, D))
    r = jax.random.normal(jax.random.PRNGKey(13), (B, T, D))

    def value_and_grad():
        def loss(state):
            y, _ = nnx.merge(graphdef, state)(x)
            return jnp.sum(y * r), y
        return jax.jit(jax.grad(loss, has_aux=True))(state)

    g, y = value_and_grad()
    monkeypatch.setattr(routing, "dispatch", ref_dispatch)
    monkeypatch.setattr(routing, "combine", ref_combine)
    monkeypatch.setattr(MoMLayer, "_stream_raw", ref_stream_raw)
    g_ref, y_ref = value_and_grad()
    # Not bit-equal: the layer runs q and k|v|b|a as one matmul, the reference as two.
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(y_ref))))
    flat, flat_ref = jax.tree.leaves_with_path(g), dict(jax.tree.leaves_with_path(g_ref))
    assert len(flat) == len(flat_ref)
    scale = max(float(jnp.max(jnp.abs(gr))) for gr in flat_ref.values())
    for path, gl in flat:
        gr = flat_ref[path]
        if kw.get("topk") == 1 and "gate" in jax.tree_util.keystr(path):
            # top-1 renormalised weights are all 1: the router's gradient is rounding noise.
            assert float(jnp.max(jnp.abs(gl))) < 1e-5 * scale
            continue
        assert float(jnp.linalg.norm(gr)) > 0, jax.tree_util.keystr(path)
        # atol 1e-5 of the leaf's largest entry: a gate gradient sums many signed terms, so a
        # small entry keeps ~1e-6 of the leaf's scale as float32 ordering noise (CI hit 1.3e-6
        # on shared_a); a wrong gather VJP is off by O(1) of that scale.
        np.testing.assert_allclose(gl, gr, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(gr))),
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("e,k,shared", [(4, 2, True), (4, 1, False), (3, 3, True)])
@pytest.mark.parametrize("per_memory", [False, True])
def test_stream_sources_and_their_inverse(e, k, shared, per_memory):
    """src sends every valid slot to its token's (or its (token, memory)'s) table row and padding
    to the zero rows after the B*T tokens; inv lists exactly the slots reading each row."""
    b, t, c = 2, 21, 4
    _, idx, plan = plan_for(jax.random.normal(jax.random.PRNGKey(e + k), (b, t, e)), k, c, shared)
    src, inv = routing.stream_sources(plan, idx if per_memory else None)
    src, inv = np.asarray(src), np.asarray(inv)
    groups = e + int(shared) if per_memory else 1
    assert src.shape == (b, plan.length) and inv.shape[0] == routing.table_rows(b * t) * groups
    tok, seg = np.asarray(plan.slot_token), np.repeat(np.asarray(plan.layout.chunk_segment), c, 1)
    for bb in range(b):
        for slot in range(plan.length):
            if tok[bb, slot] < 0:
                assert src[bb, slot] == b * t * groups
                continue
            row = bb * t + tok[bb, slot]
            assert src[bb, slot] == (row * groups + seg[bb, slot] if per_memory else row)
    readers = {}
    for flat_slot, row in enumerate(src.reshape(-1)):
        if row < b * t * groups:
            readers.setdefault(row, set()).add(flat_slot)
    for row in range(inv.shape[0]):
        listed = {int(v) for v in inv[row] if v >= 0}
        assert listed == readers.get(row, set()), row
        assert len(listed) == int(np.sum(inv[row] >= 0))          # no slot listed twice


def test_gather_table_vjp_sums_the_readers():
    """gather_table's cotangent: d table[r] = sum of the cotangents of the slots listed in inv[r]
    (against jax's own scatter-add VJP of the plain gather)."""
    b, t, e, k = 2, 11, 4, 2
    _, idx, plan = plan_for(jax.random.normal(jax.random.PRNGKey(9), (b, t, e)), k, 4, True)
    for indices in (None, idx):
        src, inv = routing.stream_sources(plan, indices)
        table = jax.random.normal(jax.random.PRNGKey(10), (inv.shape[0], 3, 2))
        table = table.at[b * t * (1 if indices is None else e + 1):].set(0.0)   # the zero rows
        y, y_ref, (dt,), (dt_ref,) = _vjp_pair(
            lambda tb: routing.gather_table(tb, src, inv), lambda tb: tb[src], (table,), 3)
        np.testing.assert_array_equal(y, y_ref)
        zero_from = b * t * (1 if indices is None else e + 1)
        np.testing.assert_allclose(dt[:zero_from], dt_ref[:zero_from], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(dt[zero_from:], 0.0)        # padding's rows: no gradient
