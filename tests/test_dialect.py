"""The moe_* dialect against a plain einsum MoE: jit, vmap, grad, edge cases."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import dialect as D


def _weights(key, e, d, f, dtype=jnp.float32, gated=True):
    ks = jax.random.split(key, 4)
    mats = [jax.random.normal(ks[0], (e, d, f)) * 0.3, jax.random.normal(ks[1], (e, d, f)) * 0.3,
            jax.random.normal(ks[2], (e, f, d)) * 0.3]
    if not gated:
        mats = mats[1:]
    return tuple(m.astype(dtype) for m in mats)


def _case(t=9, d=8, f=16, e=4, seed=0, dtype=jnp.float32, gated=True):
    key = jax.random.PRNGKey(seed)
    kx, kr, kw = jax.random.split(key, 3)
    x = jax.random.normal(kx, (t, d)).astype(dtype)
    wr = jax.random.normal(kr, (d, e))
    return x, wr, _weights(kw, e, d, f, dtype, gated)


def _moe(routing, activation="swiglu", impl="reference"):
    def f(x, wr, ws):
        w, ids = D.moe_route(x, wr, routing=routing, name="l")
        g, sizes, order = D.moe_dispatch(x, ids, num_experts=routing.num_selected_experts(wr.shape[1]), name="l")
        out = D.moe_expert_ffn(g, sizes, ws, activation=activation, impl=impl, name="l")
        return D.moe_combine(out, order, w, name="l")
    return f


def _ref(routing, activation="swiglu"):
    return lambda x, wr, ws: D.einsum_moe_reference(x, wr, ws, routing=routing, activation=activation)


@pytest.mark.parametrize("impl", ["reference", "ragged"])
@pytest.mark.parametrize("routing", [
    D.Routing(k=2),
    D.Routing(k=4),  # k = number of experts
    D.Routing(k=1, norm_topk=False),
    D.Routing(k=2, score="sigmoid", n_group=2, topk_group=1, group_score="top2_sum", scale=2.5),
    D.Routing(k=3, gating="top_p", top_p=0.6, max_k=3),
    D.Routing(k=2, gating="threshold", threshold=0.3, max_k=3),
    D.Routing(k=2, gating="skip", skip_ratio=0.5),
], ids=["top2", "k=E", "top1", "grouped-sigmoid", "top_p", "threshold", "skip"])
def test_matches_einsum_moe_under_jit(routing, impl):
    x, wr, ws = _case()
    got = jax.jit(_moe(routing, impl=impl))(x, wr, ws)
    np.testing.assert_allclose(got, _ref(routing)(x, wr, ws), atol=2e-5, rtol=2e-5)


def test_vmap_keeps_route_op_and_matches():
    x, wr, ws = _case()
    xb = jnp.stack([x, 2 * x, -x])
    r = D.Routing(k=2)
    got = jax.vmap(_moe(r), in_axes=(0, None, None))(xb, wr, ws)
    want = jax.vmap(_ref(r), in_axes=(0, None, None))(xb, wr, ws)
    np.testing.assert_allclose(got, want, atol=2e-5)
    jaxpr = jax.make_jaxpr(jax.vmap(_moe(r), in_axes=(0, None, None)))(xb, wr, ws)
    assert "moe_route" in str(jaxpr)


def test_grad_matches_einsum_moe():
    x, wr, ws = _case()
    r = D.Routing(k=2)
    loss = lambda f: (lambda *a: jnp.sum(f(*a) ** 2))
    g1 = jax.grad(loss(_moe(r)), argnums=(0, 1, 2))(x, wr, ws)
    g2 = jax.grad(loss(_ref(r)), argnums=(0, 1, 2))(x, wr, ws)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_single_token_and_bf16():
    x, wr, ws = _case(t=1, dtype=jnp.bfloat16)
    r = D.Routing(k=2)
    got = jax.jit(_moe(r))(x, wr, ws)
    assert got.dtype == jnp.bfloat16 and got.shape == (1, 8)
    np.testing.assert_allclose(np.float32(got), np.float32(_ref(r)(x, wr, ws)), atol=3e-2, rtol=3e-2)


def test_all_tokens_on_one_expert_and_empty_experts():
    x, wr, ws = _case()
    wr = jnp.zeros_like(wr).at[:, 2].set(0.0)
    x = jnp.abs(x)
    wr = wr.at[:, 2].set(10.0)  # expert 2 wins for every token
    r = D.Routing(k=1)
    w, ids = D.moe_route(x, wr, routing=r)
    assert set(np.asarray(ids).ravel()) == {2}
    _, sizes, _ = jax.jit(lambda x, i: D.moe_dispatch(x, i, num_experts=4))(x, ids)
    assert list(np.asarray(sizes)) == [0, 0, x.shape[0], 0]
    for impl in ("reference", "ragged"):
        np.testing.assert_allclose(_moe(r, impl=impl)(x, wr, ws), _ref(r)(x, wr, ws), atol=2e-5)


def test_gelu_experts():
    x, wr, ws = _case(gated=False)
    r = D.Routing(k=2)
    np.testing.assert_allclose(_moe(r, activation="gelu")(x, wr, ws), _ref(r, "gelu")(x, wr, ws), atol=2e-5)


def test_dropped_slots_are_left_out_of_group_sizes():
    x, wr, _ = _case(t=16)
    r = D.Routing(k=2, gating="threshold", threshold=0.45, max_k=2)
    w, ids = D.moe_route(x, wr, routing=r)
    _, sizes, _ = D.moe_dispatch(x, ids, num_experts=4)
    valid = int((np.asarray(ids) >= 0).sum())
    assert int(sizes.sum()) == valid < 16 * 2
    assert np.all(np.asarray(w)[np.asarray(ids) < 0] == 0)


def test_expert_map_sums_colliding_slots():
    x = jnp.ones((1, 2))
    wr = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # probs ordered e0 > e1 > e2
    r = D.Routing(k=2, norm_topk=False, expert_map=(0, 0, 1))  # e0 and e1 merge
    w, ids = D.route_reference(x, wr, routing=r)
    probs = jax.nn.softmax(jnp.array([2.0, 1.0, 0.0]))
    assert list(np.asarray(ids[0])) == [0, -1]
    np.testing.assert_allclose(w[0, 0], probs[0] + probs[1], rtol=1e-6)


def test_distinct_merged_routing_picks_the_next_merged_expert_instead_of_summing():
    x = jnp.ones((1, 2))
    wr = jnp.array([[3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # probs ordered e0 > e1 > e2 > e3
    probs = np.asarray(jax.nn.softmax(jnp.array([3.0, 2.0, 1.0, 0.0])))
    r = D.Routing(k=2, norm_topk=False, expert_map=(0, 0, 1, 2), distinct_merged=True)  # e0 and e1 merge
    w, ids = D.route_reference(x, wr, routing=r)
    assert list(np.asarray(ids[0])) == [0, 1]  # merged expert 0 (by e0), then e2's merged expert 1
    np.testing.assert_allclose(np.asarray(w[0]), probs[[0, 2]], rtol=1e-6)
    # a tie inside a cluster yields one pick, by its first column
    tied = jnp.array([[1.0, 1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    w, ids = D.route_reference(x, tied, routing=dataclasses.replace(r, norm_topk=True))
    assert list(np.asarray(ids[0])) == [0, 1]
    np.testing.assert_allclose(float(w[0].sum()), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="distinct merged experts: it needs an expert_map"):
        D.Routing(k=2, distinct_merged=True)
    with pytest.raises(ValueError, match="naming at least that many"):
        D.Routing(k=3, expert_map=(0, 0, 1, 1), distinct_merged=True)


def test_bad_arguments_raise_clear_errors():
    x, wr, ws = _case()
    with pytest.raises(ValueError, match="needs 3 weight"):
        D.moe_expert_ffn(x, jnp.zeros(4, jnp.int32), ws[:2], activation="swiglu")
    with pytest.raises(TypeError, match="must be \\[T,d\\] and \\[d,E\\]"):
        D.moe_route(x, wr.T, routing=D.Routing(k=2))
    with pytest.raises(ValueError, match="gating must be one of"):
        D.Routing(k=2, gating="sometimes")
    with pytest.raises(ValueError, match="unknown impl"):
        jax.jit(_moe(D.Routing(k=2), impl="nope"))(x, wr, ws)
