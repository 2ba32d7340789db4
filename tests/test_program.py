"""Program tracing, calling, printing, rewriting and taps (persistence: test_serialization.py)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import moejax
from moejax import dialect, rewrite


def test_trace_shows_moe_ops_for_every_layer(tiny_model, tokens):
    prog = moejax.trace(tiny_model, tokens)
    sites = rewrite.dialect_sites(prog.jaxpr)
    names = {s.eqn.primitive.name for s in sites}
    assert names == {"moe_route", "moe_dispatch", "moe_expert_ffn", "moe_combine"}
    text = str(prog)
    if tiny_model.config.scan_layers:
        # one op per kind inside the scan body, run once per layer
        assert text.count("moe_route[") == 1 and "name=layers/*/mlp" in text
        assert all(s.trip_count == 2 for s in sites)
        assert moejax.program_stats(prog)["op_counts"]["moe_route"] == 2
    else:
        assert "name=layers/0/mlp" in text and "name=layers/1/mlp" in text
        assert text.count("moe_expert_ffn[") == 2


def test_program_call_matches_model_and_is_jittable(tiny_model, tokens):
    prog = moejax.trace(tiny_model, tokens)
    want = nnx.jit(lambda m, t: m(t))(tiny_model, tokens)  # same computation, compiled the same way
    np.testing.assert_array_equal(prog(tokens), want)
    np.testing.assert_allclose(jax.jit(prog)(tokens), want, atol=1e-5)
    np.testing.assert_allclose(tiny_model(tokens), want, atol=1e-5)  # eager differs only by rounding


def test_signature_errors_name_the_problem(tiny_model, tokens):
    prog = moejax.trace(tiny_model, tokens)
    with pytest.raises(moejax.InputSignatureError, match=r"expected int32\[2,7\], got int32\[3,7\]"):
        prog(jnp.zeros((3, 7), jnp.int32))
    with pytest.raises(moejax.InputSignatureError, match=r"expected int32\[2,7\], got float32\[2,7\]"):
        prog(jnp.zeros((2, 7), jnp.float32))
    with pytest.raises(moejax.InputSignatureError, match="structure"):
        prog(tokens, tokens)


def test_trace_pure_function_and_linen_module():
    x = jnp.ones((5, 8))
    params = {"router": jnp.ones((8, 4)) * 0.1, "experts": tuple(jnp.ones(s) * 0.01 for s in
                                                                   [(4, 8, 16), (4, 8, 16), (4, 16, 8)])}

    def fn(p, x):
        return dialect.sparse_moe(x, p["router"], p["experts"], routing=dialect.Routing(k=2), name="fn")

    prog = moejax.trace(fn, x, params=params)
    np.testing.assert_allclose(prog(x), fn(params, x), atol=1e-6)
    assert "router" in list(prog.weights)[-1] or any("router" in p for p in prog.weights)

    class Block(linen.Module):
        @linen.compact
        def __call__(self, x):
            wr = self.param("router", linen.initializers.normal(), (8, 4))
            ws = tuple(self.param(n, linen.initializers.normal(), s) for n, s in
                       [("g", (4, 8, 16)), ("u", (4, 8, 16)), ("d", (4, 16, 8))])
            return dialect.sparse_moe(x, wr, ws, routing=dialect.Routing(k=2), name="linen")

    block = Block()
    variables = block.init(jax.random.PRNGKey(0), x)
    lprog = moejax.trace(block, x, params=variables)
    np.testing.assert_allclose(lprog(x), block.apply(variables, x), atol=1e-6)
    assert "name=linen" in str(lprog)
    with pytest.raises(TypeError, match="needs its variables"):
        moejax.trace(block, x)


def test_rewrite_changes_params_inside_scan_jit_remat_and_cond():
    x = jnp.ones((3, 8))
    wr = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 4))
    ws = tuple(jax.random.normal(jax.random.PRNGKey(i), s) * 0.2 for i, s in
               enumerate([(2, 4, 8, 16), (2, 4, 8, 16), (2, 4, 16, 8)]))

    def layer(h, w):
        return dialect.sparse_moe(h, w[0], w[1:], routing=dialect.Routing(k=2), name="l")

    def fn(p, x):
        h, _ = jax.lax.scan(lambda h, w: (jax.checkpoint(layer)(h, w), None), x, p)
        h = jax.jit(lambda h: jax.lax.cond(h.sum() > 0, lambda z: layer(z, jax.tree.map(lambda a: a[0], p)),
                                           lambda z: z, h))(h)
        return h

    params = (wr, *ws)
    prog = moejax.trace(fn, x, params=params)
    assert len(rewrite.dialect_sites(prog.jaxpr, "moe_route")) == 2

    def to_top1(ctx):
        return ctx.bind(routing=dataclasses.replace(ctx.params["routing"], k=1))

    new = prog.rewrite({"moe_route": to_top1})
    routings = [s.eqn.params["routing"].k for s in rewrite.dialect_sites(new.jaxpr, "moe_route")]
    assert routings == [1, 1]
    assert "remat" in str(new.jaxpr) or "checkpoint" in str(new.jaxpr)
    # the rewritten program computes the top-1 model
    def fn1(p, x):
        def layer1(h, w):
            return dialect.einsum_moe_reference(h, w[0], w[1:], routing=dialect.Routing(k=1))
        h, _ = jax.lax.scan(lambda h, w: (layer1(h, w), None), x, p)
        return jax.lax.cond(h.sum() > 0, lambda z: layer1(z, jax.tree.map(lambda a: a[0], p)), lambda z: z, h)
    np.testing.assert_allclose(new(x), fn1(params, x), atol=1e-5)


def test_taps_come_out_stacked_from_scans(tiny_model, tokens):
    prog = moejax.trace(tiny_model, tokens)

    def tap_ids(ctx):
        w, ids = ctx.bind()
        ctx.tap(f"{ctx.name}/ids", ids)
        return [w, ids]

    out, taps = prog.run_with_taps({"moe_route": tap_ids}, tokens)
    np.testing.assert_allclose(out, prog(tokens), atol=1e-5)
    if tiny_model.config.scan_layers:
        assert taps["layers/*/mlp/ids"].shape == (2, 14, 2)
    else:
        assert taps["layers/0/mlp/ids"].shape == (14, 2) and "layers/1/mlp/ids" in taps


def test_replace_weights_and_run_replacement(tiny_model, tokens):
    prog = moejax.trace(tiny_model, tokens)
    downs = {p: jnp.zeros_like(w) for p, w in prog.weights.items() if p.endswith("w_down")}
    assert len(downs) == (1 if tiny_model.config.scan_layers else 2)
    zeroed = prog.rewrite(weights=downs)
    # with zero down-projections the experts add nothing: compare to a rule that drops the MoE output
    def drop_moe(ctx):
        combine = ctx.consumers(ctx.eqn.outvars[0])  # dispatch -> ffn
        ffn = combine[0]
        comb = ctx.consumers(ffn.outvars[0])[0]
        x = ctx.invals[0]
        return rewrite.Replace(values={comb.outvars[0]: jnp.zeros_like(x)}, skip=[ffn, comb])

    dropped = prog.rewrite({"moe_dispatch": drop_moe})
    np.testing.assert_allclose(zeroed(tokens), dropped(tokens), atol=1e-5)
    assert not rewrite.dialect_sites(dropped.jaxpr, "moe_expert_ffn")


def test_inline_dialect_leaves_plain_jax(tiny_model, tokens):
    prog = moejax.trace(tiny_model, tokens)
    low = moejax.inline_dialect(prog)
    assert "moe_" not in str(low.jaxpr)
    np.testing.assert_allclose(low(tokens), prog(tokens), atol=1e-6)
