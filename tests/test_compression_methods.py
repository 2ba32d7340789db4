"""REAP pruning, global expert budgets, merging with a least-squares refit and router recalibration:
known-answer cases on hand-made one- and two-layer MoE programs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import dialect
from moejax.passes.merge import MergeExperts, refit_output_matrix
from moejax.passes.prune import PruneExperts, allocate_global, find_moe_layers, reap_saliency
from moejax.passes.recalibrate import RecalibrateRouter
from moejax.pipeline import PassContext, PassError, PassManager
from profile_util import hand_profile

D, F, E, T = 8, 12, 4, 64


def _weights(rs, dead=(), dup_pairs=False):
    p = {"router": rs.randn(D, E), "w_gate": rs.randn(E, D, F) / 3, "w_up": rs.randn(E, D, F) / 3,
         "w_down": rs.randn(E, F, D) / 3}
    for e in dead:  # inputs are >= 0, so a strongly negative router column is never selected
        p["router"][:, e] = -5.0
    if dup_pairs:
        for k in ("w_gate", "w_up", "w_down"):
            p[k][1], p[k][3] = p[k][0], p[k][2]
    return p


def _profiled(layers: dict[str, dict], routing: dialect.Routing):
    """MoE layers side by side on float tokens x [T, D] >= 0 (each sees x), with a routing profile."""
    def fn(params, x):
        return sum(dialect.sparse_moe(x, p["router"], (p["w_gate"], p["w_up"], p["w_down"]), routing=routing,
                                      name=name) for name, p in params.items())

    x = jnp.asarray(np.abs(np.random.RandomState(7).randn(T, D)), jnp.float32)
    params = {n: {k: jnp.asarray(v, jnp.float32) for k, v in p.items()} for n, p in layers.items()}
    program = moejax.trace(fn, x, params=params)
    profile = {n: hand_profile(x, p["router"], routing) for n, p in layers.items()}
    return program.replace(metadata={"routing_profile": profile}), x


def _run(pipeline, program, x):
    """Stages of ``pipeline`` on ``program`` (which carries its routing profile)."""
    return PassManager(pipeline, check_exact=False).run(program, PassContext(example_args=(x,)))


def _layer_out(program, x):
    return np.asarray(program(x))


# ---- REAP -------------------------------------------------------------------
def test_reap_saliency_is_gate_weight_times_output_norm_over_routed_tokens():
    rs = np.random.RandomState(0)
    program, x = _profiled({"moe": _weights(rs, dead=(2,))}, dialect.Routing(k=2))
    profiled = program
    layer = find_moe_layers(profiled, "t")["moe"]
    sal = reap_saliency(profiled, layer, 0, np.asarray(x))
    w, ids = (np.asarray(a) for a in dialect.route_reference(x, profiled.weights[layer.router],
                                                             routing=layer.routing))
    mats = [np.asarray(profiled.weights[q]) for q in layer.experts]
    expected = np.zeros(E)
    for e in range(E):
        rows = [(t, j) for t in range(T) for j in range(2) if ids[t, j] == e]
        if rows:
            out = [np.asarray(dialect.expert_ffn_math(jnp.asarray(x[t:t + 1]), [m[e] for m in mats], "swiglu"))[0]
                   for t, _ in rows]
            expected[e] = np.mean([w[t, j] * np.linalg.norm(o) for (t, j), o in zip(rows, out)])
    np.testing.assert_allclose(sal, expected, rtol=1e-4)
    assert sal[2] == 0.0  # the dead expert scores nothing ...
    pruned = _run(["prune(num_experts=3,method=reap)"], program, x)[-1].program
    assert "[0, 1, 3]" in pruned.metadata["notes"]["prune(num_experts=3,method=reap)"]
    np.testing.assert_allclose(_layer_out(pruned, x), _layer_out(program, x), atol=1e-6)  # ... and goes for free


def test_keep_fraction_equals_the_count_it_rounds_to():
    rs = np.random.RandomState(1)
    program, x = _profiled({"moe": _weights(rs)}, dialect.Routing(k=2))
    by_fraction = _run(["prune(keep=0.75,method=reap)"], program, x)[-1].program
    by_count = _run(["prune(num_experts=3,method=reap)"], program, x)[-1].program
    np.testing.assert_array_equal(_layer_out(by_fraction, x), _layer_out(by_count, x))
    with pytest.raises(PassError, match="routes every token to 2 experts"):
        _run(["prune(num_experts=1)"], program, x)


# ---- global budget -------------------------------------------------------------
def test_global_budget_takes_dead_experts_first_and_keeps_the_total():
    rs = np.random.RandomState(2)
    routing = dialect.Routing(k=1)
    program, x = _profiled({"a": _weights(rs, dead=(1, 2)), "b": _weights(rs)}, routing)
    stages = _run(["prune(keep=0.75,method=reap,budget=global)"], program, x)
    note = stages[-1].program.metadata["notes"]["prune(keep=0.75,method=reap,budget=global)"]
    # 6 of 8 experts stay: layer a loses its two dead experts (no output change), layer b keeps all 4
    assert "'a': [0, 3]" in note and "'b': [0, 1, 2, 3]" in note
    np.testing.assert_allclose(_layer_out(stages[-1].program, x), _layer_out(program, x), atol=1e-6)
    uniform = _run(["prune(keep=0.75,method=reap)"], program, x)[-1].program
    assert np.abs(_layer_out(uniform, x) - _layer_out(program, x)).max() > 1e-3  # layer b lost a live expert


def test_allocate_global_follows_the_cheapest_removals_and_refuses_impossible_budgets():
    curves = {"a": np.array([np.nan, 9.0, 1.0, 0.5, 0.0]), "b": np.array([np.nan, 5.0, 4.0, 0.1, 0.0])}
    assert allocate_global(curves, 6, {"a": 1, "b": 1}) == {"a": 3, "b": 3}  # 0.5 and 0.1 go first
    assert allocate_global(curves, 4, {"a": 1, "b": 1}) == {"a": 2, "b": 2}  # then a's 0.5 (vs b's 3.9)
    with pytest.raises(PassError, match="global budget of 1 experts is below"):
        allocate_global(curves, 1, {"a": 1, "b": 1})


def test_global_budget_refuses_scanned_layers():
    from moejax.models import MoEDecoder, tiny_mixtral
    from flax import nnx

    model = MoEDecoder(tiny_mixtral(scan_layers=True), rngs=nnx.Rngs(0))
    tokens = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(PassError, match="budget=global gives layers different expert counts"):
        moejax.optimize(model, (tokens,), "profile,prune(keep=0.5,budget=global)", calibration=[tokens],
                        check_exact=False)


# ---- merge with refit -------------------------------------------------------
def test_refit_recovers_a_planted_output_matrix_exactly():
    rs = np.random.RandomState(3)
    x = rs.randn(200, D)
    merged = [rs.randn(D, F), rs.randn(D, F), np.zeros((F, D))]  # averaged output matrix: wrong on purpose
    planted = rs.randn(F, D)
    h = np.asarray(dialect.activation_fn("swiglu")(jnp.asarray(x @ merged[0]), jnp.asarray(x @ merged[1])))
    gates = np.abs(rs.randn(200, 2)) * (rs.rand(200, 2) > 0.3)
    # both members' outputs are the merged hidden state times the planted matrix
    outputs = np.stack([h @ planted, h @ planted])
    fitted = refit_output_matrix(x, gates, outputs, merged, "swiglu", ridge=1e-9)
    np.testing.assert_allclose(fitted, planted, atol=1e-4)


def test_duplicated_experts_merge_exactly_with_and_without_refit():
    rs = np.random.RandomState(4)
    program, x = _profiled({"moe": _weights(rs, dup_pairs=True)}, dialect.Routing(k=2))
    ref = _layer_out(program, x)
    for spec in ("merge(num_experts=2)", "merge(num_experts=2,refit=true)", "merge(keep=0.5,refit=true)",
                 "merge(num_experts=2,weights=dominant)", "merge(num_experts=2,refit=true,weights=dominant)"):
        merged = _run([spec], program, x)[-1].program
        np.testing.assert_allclose(_layer_out(merged, x), ref, atol=2e-5, err_msg=spec)


@pytest.mark.parametrize("start", ["average", "dominant"])
def test_refit_beats_the_unrefitted_merge_on_the_calibration_tokens(start):
    rs = np.random.RandomState(5)
    program, x = _profiled({"moe": _weights(rs)}, dialect.Routing(k=2))
    ref = _layer_out(program, x)
    err = {}
    for refit in (False, True):
        merged = _run([f"merge(num_experts=2,refit={str(refit).lower()},weights={start})"], program, x)[-1].program
        err[refit] = float(np.sum((_layer_out(merged, x) - ref) ** 2))
    assert err[True] < 0.8 * err[False], err


# ---- router recalibration --------------------------------------------------------
def test_recalibration_repairs_a_damaged_router_and_leaves_a_perfect_one():
    rs = np.random.RandomState(6)
    weights = _weights(rs)
    program, x = _profiled({"moe": weights}, dialect.Routing(k=2))
    source = program
    layer = find_moe_layers(source, "t")["moe"]
    damaged = source.rewrite(weights={layer.router: source.weights[layer.router]
                                      + 0.8 * jnp.asarray(rs.randn(D, E), jnp.float32)})
    ctx = PassContext(example_args=(x,))
    ctx.analysis.keep_source(source)
    fixed = RecalibrateRouter(steps=300, lr=0.02).run(damaged, ctx)
    before = float(np.sum((_layer_out(damaged, x) - _layer_out(source, x)) ** 2))
    after = float(np.sum((_layer_out(fixed, x) - _layer_out(source, x)) ** 2))
    assert after < 0.5 * before, (before, after)
    # Nothing to repair: the router stays as it is (the held-out error cannot improve on 0).
    ctx2 = PassContext(example_args=(x,))
    ctx2.analysis.keep_source(source)
    same = RecalibrateRouter(steps=20).run(source, ctx2)
    np.testing.assert_array_equal(np.asarray(same.weights[layer.router]), np.asarray(source.weights[layer.router]))


def test_recalibration_needs_a_source_and_refuses_input_weighted_routing():
    rs = np.random.RandomState(7)
    program, x = _profiled({"moe": _weights(rs)}, dialect.Routing(k=2))
    profiled = program
    with pytest.raises(PassError, match="no source program"):
        RecalibrateRouter().check(profiled, PassContext(example_args=(x,)))
    llama = _profiled({"moe": _weights(rs)}, dialect.Routing(k=1, score="sigmoid", weight_on="input"))[0]
    with pytest.raises(PassError, match="input-weighted"):
        _run(["recalibrate-router"], llama, x)
    with pytest.raises(PassError, match="applies routing weights to the expert input"):
        _run(["merge(num_experts=2,refit=true)"], llama, x)


def _tiny_decoder_program():
    """A tiny Mixtral decoder's traced forward on [2, 16] tokens (the source a repair pass matches)."""
    from flax import nnx

    from moejax.models import MoEDecoder, tiny_mixtral

    return moejax.trace(MoEDecoder(tiny_mixtral(), rngs=nnx.Rngs(0)), jnp.zeros((2, 16), jnp.int32))


def _kl(source, program, tok) -> float:
    """Mean KL divergence of ``program``'s next-token distributions from ``source``'s on ``tok``."""
    p, q = (jax.nn.log_softmax(prog(tok), -1) for prog in (source, program))
    return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))


def _repair(pass_, program, source, calibration):
    """``pass_`` run on ``program`` as a pipeline would, with ``source`` as the program it started from."""
    ctx = PassContext(calibration=calibration)
    ctx.analysis.keep_source(source)
    return pass_.run(program, ctx)


def _assert_repairs_and_keeps_perfect(repair, source, damaged, tok, names, steps):
    """``repair(program, steps)`` halves the KL to ``source`` on unseen ``tok`` and leaves ``source`` itself alone."""
    fixed = repair(damaged, steps)
    assert _kl(source, fixed, tok) < 0.5 * _kl(source, damaged, tok)
    assert "KL divergence" in str(fixed.metadata["notes"])
    same = repair(source, 8)  # nothing to repair: the held-out KL cannot improve on 0
    for name in names:
        np.testing.assert_array_equal(np.asarray(same.weights[name]), np.asarray(source.weights[name]))


def test_logit_recalibration_repairs_damaged_routers_end_to_end_and_leaves_perfect_ones():
    rs = np.random.RandomState(8)
    source = _tiny_decoder_program()
    calibration = [rs.randint(0, 64, (16, 16))]  # 8 batches of windows: 6 to fit, 2 held out
    routers = [layer.router for layer in find_moe_layers(source, "t").values()]
    damaged = source.rewrite(weights={r: source.weights[r] + 0.5 * jnp.asarray(rs.randn(*source.weights[r].shape),
                                                                               jnp.float32) for r in routers})

    tok = jnp.asarray(rs.randint(0, 64, (2, 16)))  # windows the pass never sees

    def recalibrate(program, steps):
        return _repair(RecalibrateRouter(target="logits", steps=steps, lr=0.05), program, source, calibration)

    _assert_repairs_and_keeps_perfect(recalibrate, source, damaged, tok, routers, steps=60)
    with pytest.raises(ValueError, match="target must be layer or logits"):
        RecalibrateRouter(target="output")


def test_distillation_repairs_damaged_experts_end_to_end_and_leaves_perfect_ones():
    from moejax.passes.distill import Distill

    rs = np.random.RandomState(9)
    source = _tiny_decoder_program()
    calibration = [rs.randint(0, 64, (64, 16))]  # 32 batches of windows: 24 to fit, 8 held out
    layers = find_moe_layers(source, "t").values()
    trained = [l.router for l in layers] + [e for l in layers for e in l.experts]
    experts = [e for l in layers for e in l.experts]
    # what removing or merging experts does, in kind: expert outputs the routers cannot choose their way around
    damaged = source.rewrite(weights={e: source.weights[e] * jnp.asarray(1 + 0.5 * rs.randn(
        *source.weights[e].shape), jnp.float32) for e in experts})
    tok = jnp.asarray(rs.randint(0, 64, (2, 16)))  # windows the pass never sees

    def distill(program, steps):
        ctx = PassContext()
        ctx.analysis.keep_source(source)
        Distill(steps=steps).check(program, ctx)  # float experts and a source: nothing to refuse
        return _repair(Distill(steps=steps, lr=0.02), program, source, calibration)

    _assert_repairs_and_keeps_perfect(distill, source, damaged, tok, trained, steps=150)
    with pytest.raises(PassError, match="not float; run distill before quantize"):
        PassManager(["quantize(bits=8)", "distill(steps=1)"], check_exact=False).run(
            source, PassContext(calibration=calibration))
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        Distill(steps=0)
    with pytest.raises(ValueError, match="train must be experts or all"):
        Distill(train="attention")


@pytest.mark.parametrize("pass_", ["distill(steps=20,lr=0.05)", "recalibrate-router(target=logits,steps=20,lr=0.05)"])
def test_passes_that_retrain_routers_measure_routing_again(pass_):
    """The routing profile after a pass that trains the routers is the new routers' (stats read it)."""
    from moejax import analysis
    from moejax.passes.profile import ProfileRouting, measure_routing

    rs = np.random.RandomState(10)
    source = _tiny_decoder_program()
    calibration = [rs.randint(0, 64, (16, 16))]
    routers = [layer.router for layer in find_moe_layers(source, "t").values()]
    damaged = source.rewrite(weights={r: source.weights[r] + 0.5 * jnp.asarray(rs.randn(*source.weights[r].shape),
                                                                               jnp.float32) for r in routers})
    ctx = PassContext(calibration=calibration)
    ctx.analysis.keep_source(source)
    profiled = ProfileRouting().run(damaged, ctx)
    trained = moejax.parse_pipeline(pass_)[0].run(profiled, ctx)
    before, after = (analysis.read(p.metadata, analysis.RoutingProfile) for p in (profiled, trained))
    fresh = measure_routing(trained, calibration)
    assert any((before[n].counts != after[n].counts).any() for n in after)  # the routers moved
    for n in after:
        np.testing.assert_array_equal(after[n].counts, fresh[n].counts)


def test_distillation_of_every_weight_repairs_what_the_experts_cannot():
    """``train=all``: damage outside the experts (attention) is repaired; ``train=experts`` can only work around it."""
    from moejax.passes.distill import Distill

    rs = np.random.RandomState(10)
    source = _tiny_decoder_program()
    calibration = [rs.randint(0, 64, (64, 16))]
    attention = [n for n in source.weights if n.endswith(("o_proj/kernel", "v_proj/kernel"))]
    damaged = source.rewrite(weights={n: source.weights[n] * jnp.asarray(1 + 0.5 * rs.randn(
        *source.weights[n].shape), jnp.float32) for n in attention})
    tok = jnp.asarray(rs.randint(0, 64, (2, 16)))

    def distill(train):
        def repair(program, steps):
            return _repair(Distill(steps=steps, lr=0.01, train=train), program, source, calibration)
        return repair

    _assert_repairs_and_keeps_perfect(distill("all"), source, damaged, tok, list(source.weights), steps=300)
    # measured: 0.319 damaged, 0.142 after train=all, 0.278 after train=experts
    assert _kl(source, distill("experts")(damaged, 300), tok) > 0.75 * _kl(source, damaged, tok)


def test_logit_recalibration_needs_no_routing_profile_but_layer_recalibration_does():
    """``target=logits`` trains on calibration windows end to end; only ``target=layer`` reads the profile."""
    rs = np.random.RandomState(11)
    source = _tiny_decoder_program()
    assert "routing_profile" not in source.metadata
    ctx = PassContext(calibration=[rs.randint(0, 64, (8, 16))])
    stages = PassManager(["recalibrate-router(target=logits,steps=2)"], check_exact=False).run(source, ctx)
    assert "KL divergence" in str(stages[-1].program.metadata["notes"])
    with pytest.raises(PassError, match="needs 'routing_profile', which no earlier pass provided"):
        PassManager(["recalibrate-router"], check_exact=False).run(source, PassContext(calibration=ctx.calibration))


def test_distillation_on_bundled_text_says_so_when_the_user_gave_calibration_batches(caplog):
    """``distill(calibration_bytes=N)`` reads the bundled training text: never silently over the user's batches."""
    from flax import nnx

    from moejax.models import MoEDecoder, tiny_mixtral
    from moejax.passes.distill import Distill

    source = moejax.trace(MoEDecoder(tiny_mixtral(vocab_size=256), rngs=nnx.Rngs(0)), jnp.zeros((2, 16), jnp.int32))
    own = [np.random.RandomState(12).randint(0, 256, (8, 16))]
    with caplog.at_level("WARNING", logger="moejax.passes.distill"):
        bundled = _repair(Distill(steps=1, calibration_bytes=2048), source, source, own)
    assert "not on the calibration batches given to optimize" in caplog.text
    assert "calibration windows of train_bytes[:2048]" in str(bundled.metadata["notes"])
    caplog.clear()
    with caplog.at_level("WARNING", logger="moejax.passes.distill"):
        users = _repair(Distill(steps=1), source, source, own)
    assert not caplog.text and "calibration windows of calibration:" in str(users.metadata["notes"])
