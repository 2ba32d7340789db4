"""The registered "pallas" implementations against the dialect references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import dialect
from moejax.pallas_kernels import ffn_pallas, quantize, route_pallas

RNG = np.random.default_rng(1)
N, D, F, E = 30, 32, 48, 4
X = RNG.standard_normal((N, D)).astype(np.float32)
GS = np.asarray([7, 0, 12, 5], np.int32)   # empty expert, 6 padding rows
WG, WU = (RNG.standard_normal((E, D, F)).astype(np.float32) * 0.2 for _ in range(2))
WD = RNG.standard_normal((E, F, D)).astype(np.float32) * 0.2


def test_pallas_impls_are_registered():
    assert "pallas" in dialect.ffn_impls()
    assert dialect._ROUTE_IMPLS["pallas"] is route_pallas


# float swiglu is covered end to end by test_sparse_moe_with_pallas_route_and_ffn_matches_einsum_reference
@pytest.mark.parametrize("case", ["gelu-float", "swiglu-int4-int8", "geglu-mixed", "swiglu-bf16"])
def test_ffn_pallas_matches_ffn_reference(case):
    x, act = X, case.split("-")[0]
    if case == "gelu-float":
        weights = (WU, WD)
    elif case == "swiglu-int4-int8":
        weights = (quantize(WG, 4, 16), quantize(WU, 4, 16), quantize(WD, 8))
    elif case == "geglu-mixed":  # gate and up in different formats: two kernels, activation outside
        weights = (quantize(WG, 8), WU, quantize(WD, 4, 16, symmetric=False))
    else:
        x, weights = X.astype(jnp.bfloat16), (WG, WU, WD)
    run = jax.jit(lambda x, gs, w: (ffn_pallas(x, gs, w, activation=act),
                                    dialect.ffn_reference(x, gs, w, activation=act)))
    out, ref = run(x, GS, weights)
    assert out.dtype == x.dtype and out.shape == x.shape
    tol = 2e-2 if x.dtype == jnp.bfloat16 else 2e-5
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)
    assert not np.any(np.asarray(out, np.float32)[24:])  # rows past the groups are zero


def test_expert_op_with_pallas_impl_under_scan_of_quantized_layers():
    """Stacked int4 layers sliced by scan keep their static metadata valid."""
    layers = 2
    stack = lambda w: np.stack([w, w[::-1]])  # noqa: E731
    weights = tuple(quantize(stack(w), 4, 16) for w in (WG, WU, WD))

    def model(x, gs, weights, impl):
        def body(h, w):
            return h + dialect.moe_expert_ffn(h, gs, w, activation="swiglu", impl=impl), None
        return jax.lax.scan(body, x, weights)[0]

    run = jax.jit(lambda x, gs, w: (model(x, gs, w, "pallas"), model(x, gs, w, "reference")))
    out, ref = run(X, GS, weights)
    assert weights[0].shape == (layers, E, D, F)
    np.testing.assert_allclose(out, ref, atol=5e-5, rtol=5e-5)


ROUTINGS = {
    "softmax-top2": (dialect.Routing(k=2), False),
    "sigmoid-grouped-top2sum-bias": (dialect.Routing(k=3, score="sigmoid", n_group=4, topk_group=2,
                                                     group_score="top2_sum", scale=2.5), True),
    "grouped-max-no-norm": (dialect.Routing(k=2, n_group=2, topk_group=1, norm_topk=False), True),
    "k-above-E": (dialect.Routing(k=10), False),
    "merged-experts": (dialect.Routing(k=3, expert_map=(0, 0, 1, 1, 2, 2, 3, 3)), False),
    "distinct-merged-falls-back": (dialect.Routing(k=3, expert_map=(0, 0, 1, 1, 2, 2, 3, 3), distinct_merged=True),
                                   False),
    "top_p-falls-back": (dialect.Routing(k=2, gating="top_p", top_p=0.5, max_k=3), False),
}


def test_route_pallas_matches_route_reference():
    t, d, e = 21, 24, 8
    x = RNG.standard_normal((t, d)).astype(np.float32)
    w = RNG.standard_normal((d, e)).astype(np.float32)
    b = (RNG.standard_normal((e,)) * 0.1).astype(np.float32)
    x[3] = x[4]  # identical tokens route identically

    @jax.jit
    def run(x, w, b):
        out = {}
        for name, (r, use_bias) in ROUTINGS.items():
            args = (x, w, b) if use_bias else (x, w)
            out[name] = (route_pallas(*args, routing=r), dialect.route_reference(*args, routing=r))
        r, _ = ROUTINGS["sigmoid-grouped-top2sum-bias"]  # once through the primitive's impl param
        out["primitive"] = (dialect.route_p.bind(x, w, b, routing=r, name="", impl="pallas"),
                            dialect.route_reference(x, w, b, routing=r))
        return out

    for name, ((pw, pi), (rw, ri)) in run(x, w, b).items():
        assert pw.shape == rw.shape and pi.dtype == jnp.int32, name
        np.testing.assert_array_equal(pi, ri, err_msg=name)
        np.testing.assert_allclose(pw, rw, atol=1e-6, rtol=1e-6, err_msg=name)


def test_sparse_moe_with_pallas_route_and_ffn_matches_einsum_reference():
    t, d, f, e = 12, 16, 24, 4
    r = dialect.Routing(k=2)
    x = RNG.standard_normal((t, d)).astype(np.float32)
    w_router = RNG.standard_normal((d, e)).astype(np.float32)
    ws = tuple(RNG.standard_normal(s).astype(np.float32) * 0.3 for s in [(e, d, f), (e, d, f), (e, f, d)])

    @jax.jit
    def moe(x):
        w, ids = dialect.route_p.bind(x, w_router, routing=r, name="", impl="pallas")
        grouped, sizes, order = dialect.moe_dispatch(x, ids, num_experts=e)
        out = dialect.moe_expert_ffn(grouped, sizes, ws, activation="swiglu", impl="pallas")
        return dialect.moe_combine(out, order, w)

    ref = dialect.einsum_moe_reference(x, w_router, ws, routing=r)
    np.testing.assert_allclose(moe(x), ref, atol=2e-5, rtol=2e-5)


def test_ffn_pallas_gradients_match_reference_through_the_primitive():
    """Kernels give the value; the JVP (and so grad) follows ffn_blocks."""
    def loss(x, w, impl):
        return jnp.sum(jnp.sin(dialect.moe_expert_ffn(x, GS, w, activation="swiglu", impl=impl)))

    grads = jax.jit(lambda x, w: (jax.grad(loss, argnums=(0, 1))(x, w, "pallas"),
                                  jax.grad(loss, argnums=(0, 1))(x, w, "reference")))
    ours, ref = grads(X, (WG, WU, WD))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)
    assert float(jnp.abs(ours[1][2]).max()) > 0  # the down-projection weights get a gradient
