"""The moe_* ops under vmap, jvp and grad stay moe_* ops; abstract eval rejects bad operands.

Every batching rule folds the batch into the token (row) axis and binds the same
op; every JVP binds the op for the primal. These tests compare against a Python
loop over examples (bit for bit for ids, sizes, orders and data movement; to
float32 rounding for arithmetic, because XLA may round a [B*T, ...] matmul or
softmax differently from a [T, ...] one: 1-ulp differences were seen on an AMD
EPYC CPU and none on an Intel Xeon) and against the dialect-free
``einsum_moe_reference``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import dialect as D
from moejax import expert_layout, rewrite

B, T, DM, F, E = 3, 9, 8, 16, 4
OPS = ["moe_combine", "moe_dispatch", "moe_expert_ffn", "moe_route"]
# Dynamic gating: many slots are dropped (id -1), which dispatch must sort last per example.
DROPPING = D.Routing(k=2, gating="threshold", threshold=0.3, max_k=3)


def _data(seed=0, b=B, t=T):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(ks[0], (b, t, DM))
    wr = jax.random.normal(ks[1], (DM, E))
    ws = tuple(jax.random.normal(k, s) * 0.3 for k, s in zip(ks[2:], [(E, DM, F), (E, DM, F), (E, F, DM)]))
    return x, wr, ws


def _ops_in(jaxpr) -> list[str]:
    """Names of the dialect ops at any depth (inside jit, scan, ...)."""
    return sorted({s.eqn.primitive.name for s in rewrite.dialect_sites(jaxpr)})


def _stack_loop(fn, *batched):
    """``fn`` applied to each example in a Python loop, outputs stacked (the meaning of vmap)."""
    fn = jax.jit(fn)  # compiled once for all examples
    n = jax.tree.leaves(batched)[0].shape[0]
    outs = [fn(*jax.tree.map(lambda a: a[i], batched)) for i in range(n)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def _assert_equal_trees(got, want, bitwise_floats=False):
    """Integer leaves bit for bit, float leaves to float32 rounding (see the module doc) unless ``bitwise_floats``."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        if np.issubdtype(g.dtype, np.floating) and not bitwise_floats:
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(g, w)


def _routed(seed=0):
    """A batch routed with dropped slots, and its per-example dispatch."""
    x, wr, ws = _data(seed)
    w, ids = jax.vmap(lambda x: D.moe_route(x, wr, routing=DROPPING, name="l"))(x)
    assert int((ids < 0).sum()) > 0, "the test data must drop some slots"
    grouped, sizes, order = _stack_loop(lambda x, i: D.moe_dispatch(x, i, num_experts=E, name="l"), x, ids)
    return x, wr, ws, w, ids, grouped, sizes, order


# --------------------------------------------------------------------------
# vmap of each op == a loop over examples, and the op is still there.
# --------------------------------------------------------------------------
def test_vmap_route_matches_loop_and_keeps_op():
    x, wr, _ = _data()
    f = lambda x: D.moe_route(x, wr, routing=DROPPING, name="l")
    _assert_equal_trees(jax.vmap(f)(x), _stack_loop(f, x))
    eqns = [e for e in jax.make_jaxpr(jax.vmap(f))(x).eqns if e.primitive is D.route_p]
    assert len(eqns) == 1 and eqns[0].invars[0].aval.shape == (B * T, DM)  # folded into the token axis


def test_vmap_route_preserves_impl(monkeypatch):
    calls = []

    def traced_reference(x, w, *bias, routing):
        calls.append(x.shape)
        return D.route_reference(x, w, *bias, routing=routing)

    monkeypatch.setitem(D._ROUTE_IMPLS, "test-impl", traced_reference)
    x, wr, _ = _data()
    f = lambda x: D.route_p.bind(x, wr, routing=DROPPING, name="l", impl="test-impl")
    jaxpr = jax.make_jaxpr(jax.vmap(f))(x)
    assert [e.params["impl"] for e in jaxpr.eqns if e.primitive is D.route_p] == ["test-impl"]
    _assert_equal_trees(jax.jit(jax.vmap(f))(x), _stack_loop(lambda x: D.moe_route(x, wr, routing=DROPPING), x))
    assert (B * T, DM) in calls  # the registered impl ran once on the folded batch


def test_vmap_dispatch_matches_loop_bit_for_bit_with_dropped_slots():
    x, _, _, _, ids, grouped, sizes, order = _routed()
    got = jax.vmap(lambda x, i: D.moe_dispatch(x, i, num_experts=E, name="l"))(x, ids)
    _assert_equal_trees(got, (grouped, sizes, order), bitwise_floats=True)
    # Dropped slots are not counted and sit after the real rows of their example.
    valid = np.asarray(ids >= 0).reshape(B, -1)
    assert list(np.asarray(sizes).sum(1)) == list(valid.sum(1))
    for b in range(B):
        n_real = int(valid[b].sum())
        assert valid[b][np.asarray(order[b])].tolist() == [True] * n_real + [False] * (T * DROPPING.slots - n_real)


def test_vmap_dispatch_unbatched_operand_and_other_axis():
    x, _, _, _, ids, _, _, _ = _routed()
    disp = lambda x, i: D.moe_dispatch(x, i, num_experts=E, name="l")
    # Only the ids batched, on axis 1: x is shared by every example.
    got = jax.vmap(disp, in_axes=(None, 1))(x[0], jnp.moveaxis(ids, 0, 1))
    _assert_equal_trees(got, _stack_loop(lambda i: disp(x[0], i), ids), bitwise_floats=True)
    jaxpr = jax.make_jaxpr(jax.vmap(disp, in_axes=(None, 1)))(x[0], jnp.moveaxis(ids, 0, 1))
    assert [e.params["num_experts"] for e in jaxpr.eqns if e.primitive is D.dispatch_p] == [B * (E + 1)]


@pytest.mark.parametrize("impl", ["reference", "ragged", "blocked"])
def test_vmap_expert_ffn_matches_loop_and_keeps_impl(impl):
    _, _, ws, _, _, grouped, sizes, _ = _routed()
    ffn = lambda g, s: D.moe_expert_ffn(g, s, ws, impl=impl, name="l")
    got = jax.vmap(ffn)(grouped, sizes)
    want = _stack_loop(ffn, grouped, sizes)
    _assert_equal_trees(got, want)
    # Rows past each example's groups (its dropped slots) come out zero.
    for b in range(B):
        n_real = int(sizes[b].sum())
        assert n_real < grouped.shape[1] and not np.any(np.asarray(got[b, n_real:]))
    eqns = [e for e in jax.make_jaxpr(jax.vmap(ffn))(grouped, sizes).eqns if e.primitive is D.expert_ffn_p]
    assert [e.params["impl"] for e in eqns] == [impl]
    assert eqns[0].invars[0].aval.shape == (B * grouped.shape[1], DM)


def test_vmap_combine_matches_loop_bit_for_bit():
    _, _, ws, w, _, grouped, sizes, order = _routed()
    out = _stack_loop(lambda g, s: D.moe_expert_ffn(g, s, ws, name="l"), grouped, sizes)
    comb = lambda y, o, w: D.moe_combine(y, o, w, name="l")
    np.testing.assert_array_equal(jax.vmap(comb)(out, order, w), _stack_loop(comb, out, order, w))
    # Combine weights shared by all examples (unbatched) are broadcast.
    np.testing.assert_array_equal(jax.vmap(comb, in_axes=(0, 0, None))(out, order, w[0]),
                                  _stack_loop(lambda y, o: comb(y, o, w[0]), out, order))


def test_vmap_of_per_example_weights_falls_back_but_keeps_ops():
    x, wr, ws = _data()
    wrs = jnp.stack([wr, -wr, 2 * wr])
    wss = tuple(jnp.stack([m, m * 0.5, -m]) for m in ws)
    f = lambda x, wr, ws: D.sparse_moe(x, wr, ws, routing=DROPPING, name="l")
    got = jax.jit(jax.vmap(f))(x, wrs, wss)
    want = _stack_loop(f, x, wrs, wss)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert _ops_in(jax.make_jaxpr(jax.vmap(f))(x, wrs, wss)) == OPS


def test_vmap_sparse_moe_keeps_all_ops_and_matches_loop():
    x, wr, ws = _data()
    f = lambda x: D.sparse_moe(x, wr, ws, routing=DROPPING, name="l")
    assert _ops_in(jax.make_jaxpr(jax.vmap(f))(x)) == OPS
    want = _stack_loop(f, x)
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(x), want, rtol=1e-6, atol=1e-6)
    # vmap of vmap folds twice.
    x2 = jnp.stack([x, x[::-1]])
    assert _ops_in(jax.make_jaxpr(jax.vmap(jax.vmap(f)))(x2)) == OPS
    np.testing.assert_allclose(jax.jit(jax.vmap(jax.vmap(f)))(x2), jnp.stack([want, want[::-1]]), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# jvp and grad keep the ops and give the einsum reference's derivatives.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("routing", [D.Routing(k=2), DROPPING], ids=["top2", "dropping"])
def test_grad_keeps_ops_and_matches_einsum_reference(routing):
    x, wr, ws = _data()
    x = x[0]
    loss = lambda moe: (lambda x, wr, ws: jnp.sum(jnp.sin(moe(x, wr, ws, routing=routing))))
    ours = loss(D.sparse_moe)
    assert _ops_in(jax.make_jaxpr(jax.grad(ours, argnums=(0, 1, 2)))(x, wr, ws)) == OPS
    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(x, wr, ws)
    want = jax.jit(jax.grad(loss(D.einsum_moe_reference), argnums=(0, 1, 2)))(x, wr, ws)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert float(jnp.abs(w).max()) > 0
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sizes", [[5, 0, 9, 3], [17, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]],
                         ids=["uneven-with-empty", "one-expert-takes-all", "all-padding", "decode"])
@pytest.mark.parametrize("biases", [False, True])
def test_ffn_blocks_the_tangent_computes_the_reference_and_its_gradient(sizes, biases):
    """Known answer: every routing, padding rows included, gives ffn_reference's value and gradient."""
    n_rows = 20
    x, _, ws = _data(3, b=1, t=n_rows)
    x = x[0]
    if biases:  # swiglu with biases trails them: (w_gate, w_up, w_down, b_gate, b_up, b_down)
        ks = jax.random.split(jax.random.PRNGKey(4), 3)
        ws = ws + tuple(jax.random.normal(k, (E, n)) for k, n in zip(ks, (F, F, DM)))
    gs = jnp.asarray(sizes, jnp.int32)

    def loss(fn, w, x):
        return jnp.sum(jnp.sin(fn(x, gs, w, activation="swiglu")))

    np.testing.assert_allclose(D.ffn_blocks(x, gs, ws, activation="swiglu", block=8),
                               D.ffn_reference(x, gs, ws, activation="swiglu"), atol=1e-5, rtol=1e-5)
    ours = jax.grad(lambda w, x: loss(D.ffn_blocks, w, x), argnums=(0, 1))(ws, x)
    ref = jax.grad(lambda w, x: loss(D.ffn_reference, w, x), argnums=(0, 1))(ws, x)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,ragged", [("cpu", False), ("gpu", True), ("tpu", True)])
def test_expert_tangent_uses_ragged_dot_only_where_it_is_a_grouped_matmul(monkeypatch, backend, ragged):
    x, _, ws = _data(5, b=1, t=12)
    gs = jnp.asarray([3, 0, 7, 2], jnp.int32)
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    grad = jax.make_jaxpr(jax.grad(lambda w: jnp.sum(D.moe_expert_ffn(x[0], gs, w, activation="swiglu"))))(ws)
    assert ("ragged_dot" in str(grad)) == ragged


def test_jvp_keeps_ops_and_integer_outputs_have_zero_tangents():
    x, wr, ws = _data()
    x, tx = x[0], x[1]
    f = lambda x: D.sparse_moe(x, wr, ws, routing=DROPPING, name="l")
    assert _ops_in(jax.make_jaxpr(lambda x, t: jax.jvp(f, (x,), (t,)))(x, tx)) == OPS
    _, got = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))(x, tx)
    _, want = jax.jvp(lambda x: D.einsum_moe_reference(x, wr, ws, routing=DROPPING), (x,), (tx,))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    (_, ids), (_, ids_t) = jax.jvp(lambda x: D.moe_route(x, wr, routing=DROPPING), (x,), (tx,))
    assert ids.dtype == jnp.int32 and ids_t.dtype == jax.dtypes.float0


def test_grad_of_vmapped_moe_keeps_ops():
    x, wr, ws = _data()
    f = lambda ws: jnp.sum(jax.vmap(lambda x: D.sparse_moe(x, wr, ws, routing=DROPPING))(x) ** 2)
    assert _ops_in(jax.make_jaxpr(jax.grad(f))(ws)) == OPS
    ref = lambda ws: jnp.sum(D.einsum_moe_reference(x, wr, ws, routing=DROPPING) ** 2)
    for g, w in zip(jax.jit(jax.grad(f))(ws), jax.jit(jax.grad(ref))(ws), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# A traced Program under vmap and grad.
# --------------------------------------------------------------------------
def test_vmap_program_keeps_ops_and_matches_loop(tiny_model, tokens):
    program = moejax.trace(tiny_model, tokens)
    batch = jnp.stack([tokens, (tokens * 3 + 1) % 64, (tokens + 11) % 64])
    assert _ops_in(jax.make_jaxpr(jax.vmap(program))(batch)) == OPS
    got = jax.jit(jax.vmap(program))(batch)
    want = [program(t) for t in batch]
    want = jax.tree.map(lambda *xs: jnp.stack(xs), *want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_grad_of_program_keeps_ops_and_matches_inlined_program(tiny_model, tokens):
    program = moejax.trace(tiny_model, tokens)
    fn, plain = program.as_function(), moejax.inline_dialect(program).as_function()
    assert _ops_in(moejax.inline_dialect(program).jaxpr) == []  # the comparison is dialect-free
    loss = lambda f: (lambda w: jnp.sum(jnp.tanh(jax.tree.leaves(f(w, tokens))[0])))
    assert _ops_in(jax.make_jaxpr(jax.grad(loss(fn)))(program.weight_leaves)) == OPS
    got = jax.jit(jax.grad(loss(fn)))(program.weight_leaves)
    want = jax.jit(jax.grad(loss(plain)))(program.weight_leaves)
    assert len(got) == len(want)
    for path, g, w in zip(program.weight_leaf_paths(), got, want, strict=True):
        # summation-order noise scales with the tensor's largest entries (embedding gradients reach ~1e2)
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 + 1e-6 * float(np.abs(w).max()), err_msg=path)
    assert any("experts" in p and float(jnp.abs(g).max()) > 0 for p, g in zip(program.weight_leaf_paths(), got))


# --------------------------------------------------------------------------
# Abstract eval: every operand checked, errors name the op and the layer.
# --------------------------------------------------------------------------
def test_expert_weights_of_the_wrong_shape_are_rejected_naming_the_layer():
    _, _, ws, _, _, grouped, sizes, _ = _routed()
    g, s = grouped[0], sizes[0]
    bad_up = (ws[0], jnp.zeros((E, 2 * DM, F)), ws[2])
    with pytest.raises(D.DialectTypeError, match=r"moe_expert_ffn\[layers/0/mlp\]: w_up has shape \[4,16,16\] "
                                                 r"but the rows are \[N=27,d=8\].*expected w_up \[E=4,d=8,f=16\]"):
        jax.jit(lambda g, s: D.moe_expert_ffn(g, s, bad_up, name="layers/0/mlp"))(g, s)
    bad_down = (ws[0], ws[1], jnp.zeros((E, F + 1, DM)))
    with pytest.raises(TypeError, match=r"moe_expert_ffn\[l\]: w_down has shape \[4,17,8\].*\[E=4,f=16,d=8\]"):
        D.moe_expert_ffn(g, s, bad_down, name="l")
    with pytest.raises(TypeError, match=r"w_gate has shape \[4,8,16\].*E=3 group sizes"):
        D.moe_expert_ffn(g, s[:3], ws, name="l")
    with pytest.raises(TypeError, match=r"moe_expert_ffn\[l\]: group sizes float32\[4\] must have an integer"):
        D.moe_expert_ffn(g, s.astype(jnp.float32), ws, name="l")


def test_structured_weights_are_checked_by_their_logical_shape():
    _, _, ws, _, _, grouped, sizes, _ = _routed()
    split = tuple(expert_layout.split_experts(w) for w in ws)  # E buffers; .shape is the stacked [E,k,n]
    np.testing.assert_array_equal(D.moe_expert_ffn(grouped[0], sizes[0], split, name="l"),
                                  D.moe_expert_ffn(grouped[0], sizes[0], ws, name="l"))
    three = tuple(expert_layout.split_experts(w[:3]) for w in ws)
    with pytest.raises(D.DialectTypeError, match=r"moe_expert_ffn\[l\]: w_gate has shape \[3,8,16\]"):
        D.moe_expert_ffn(grouped[0], sizes[0], three, name="l")


def test_dispatch_rejects_float_ids_and_route_and_combine_check_operands():
    x, wr, _, w, ids, grouped, _, order = _routed()
    with pytest.raises(D.DialectTypeError, match=r"moe_dispatch\[layers/1/mlp\]: expert ids float32\[9,3\] must "
                                                 r"have an integer dtype"):
        D.moe_dispatch(x[0], ids[0].astype(jnp.float32), num_experts=E, name="layers/1/mlp")
    with pytest.raises(TypeError, match=r"moe_route\[l\]: x int32\[9,8\] .* must be floating point"):
        D.moe_route(x[0].astype(jnp.int32), wr, routing=DROPPING, name="l")
    with pytest.raises(TypeError, match=r"moe_route\[l\]: selection bias float32\[3\] must be float \[E=4\]"):
        D.moe_route(x[0], wr, jnp.zeros(3), routing=DROPPING, name="l")
    with pytest.raises(TypeError, match=r"moe_combine\[l\]: out float32\[26,8\] and order int32\[26\] must have "
                                        r"N = T\*K = 27 rows"):
        D.moe_combine(grouped[0, :-1], order[0, :-1], w[0], name="l")
    with pytest.raises(TypeError, match=r"moe_combine\[l\]: order float32\[27\] must have an integer dtype"):
        D.moe_combine(grouped[0], order[0].astype(jnp.float32), w[0], name="l")


def test_errors_under_vmap_show_per_example_shapes():
    x, _, _, _, ids, _, _, _ = _routed()
    with pytest.raises(D.DialectTypeError, match=r"moe_dispatch\[l\]: expert ids float32\[9,3\]"):
        jax.vmap(lambda x, i: D.moe_dispatch(x, i, num_experts=E, name="l"))(x, ids.astype(jnp.float32))
    with pytest.raises(D.DialectTypeError, match=r"moe_dispatch\[l\]: x float32\[9,8\] and ids int32\[8,3\]"):
        jax.vmap(lambda x, i: D.moe_dispatch(x, i, num_experts=E, name="l"))(x, ids[:, 1:])
