"""Routing: top-k weights, packed dispatch plan, combine, aux loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
