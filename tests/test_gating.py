"""Dynamic gating pass: options, routing params in the graph, dropped slots, measured active experts."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import dialect, stats
from moejax.models import MoEDecoder, tiny_mixtral
from moejax.analysis import RoutingProfile
from moejax.passes.gating import DynamicGating, mean_active_experts
from moejax.passes.profile import ProfileRouting
from moejax.pipeline import PassContext, PassError, PassManager, parse_pipeline

TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 8)), jnp.int32)
CALIBRATION = [np.random.RandomState(1).randint(0, 64, (4, 16))]


@pytest.fixture(scope="module")
def unrolled():
    model = MoEDecoder(tiny_mixtral(), rngs=nnx.Rngs(0))
    return moejax.trace(model, TOKENS)


def _ffn_group_sizes(program):
    """Group sizes reaching each expert op, and the number of valid routed ids, by layer."""
    def route(ctx):
        w, ids = ctx.bind()
        ctx.tap(f"{ctx.name}|valid", (ids >= 0).sum())
        ctx.tap(f"{ctx.name}|slots", jnp.asarray(ids.size))
        return [w, ids]

    def ffn(ctx):
        ctx.tap(f"{ctx.name}|sizes", ctx.invals[1])
        return None

    _, taps = program.run_with_taps({"moe_route": route, "moe_expert_ffn": ffn}, TOKENS)
    return {k: np.asarray(v) for k, v in taps.items()}


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of top_p, threshold, skip_ratio"),
    ({"top_p": 0.5, "threshold": 0.2}, "exactly one of"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"threshold": -0.1}, "threshold must be in [0, 1)"),
    ({"skip_ratio": 0.3, "max_k": 2}, "drop max_k"),
    ({"top_p": 0.5, "max_k": 0}, "max_k must be an integer >= 1"),
])
def test_option_conflicts_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        DynamicGating(**kwargs)


def test_pipeline_spelling_and_parse_errors():
    (p,) = parse_pipeline("gating(top_p=0.6,max_k=2)")
    assert isinstance(p, DynamicGating) and p.top_p == 0.6 and p.max_k == 2 and str(p) == "gating(top_p=0.6,max_k=2)"
    with pytest.raises(PassError, match="pass gating: needs exactly one"):
        parse_pipeline("gating(top_p=0.6,skip_ratio=0.2)")


def test_new_routing_fields_and_top_p_known_answer():
    base = dialect.Routing(k=2, norm_topk=False)
    r = DynamicGating(top_p=0.5, max_k=3, renormalize=True).new_routing(base, 4, "l")
    assert (r.gating, r.top_p, r.max_k, r.slots, r.norm_topk, r.k) == ("top_p", 0.5, 3, 3, True, 2)
    r2 = DynamicGating(skip_ratio=0.4).new_routing(base, 4, "l")
    assert (r2.gating, r2.skip_ratio, r2.slots, r2.norm_topk) == ("skip", 0.4, 2, False)  # keeps the model's norm
    with pytest.raises(PassError, match="max_k=5 exceeds the 4 experts"):
        DynamicGating(top_p=0.5, max_k=5).new_routing(base, 4, "layers/0/mlp")
    # probabilities [0.6, 0.3, 0.07, 0.03]: top_p=0.5 keeps 1 expert, 0.8 keeps 2, 0.95 keeps 3
    x = jnp.log(jnp.asarray([[0.6, 0.3, 0.07, 0.03]], jnp.float32))
    eye = jnp.eye(4, dtype=jnp.float32)
    for p, want in ((0.5, 1), (0.8, 2), (0.95, 3)):
        w, ids = dialect.route_reference(x, eye, routing=DynamicGating(top_p=p, max_k=3).new_routing(
            dialect.Routing(k=2), 4, "l"))
        assert int((np.asarray(ids) >= 0).sum()) == want
        np.testing.assert_allclose(np.asarray(w).sum(), 1.0, rtol=1e-6)


def test_gating_rewrites_route_and_drops_slots_before_the_expert_op(unrolled):
    ctx = PassContext(example_args=(TOKENS,), calibration=CALIBRATION)
    gated = DynamicGating(top_p=0.5).run(unrolled, ctx)
    text = str(gated)
    assert "gating='top_p', top_p=0.5" in text and "max_k=2" in text
    assert "gating='top_p'" not in str(unrolled)
    taps = _ffn_group_sizes(gated)
    for layer in ("layers/0/mlp", "layers/1/mlp"):
        sizes, valid, slots = taps[f"{layer}|sizes"], int(taps[f"{layer}|valid"]), int(taps[f"{layer}|slots"])
        assert sizes.sum() == valid  # dropped slots never reach the expert op
        assert valid < slots == TOKENS.size * 2
    # the measured mean active experts drive the stats' active FLOPs
    profile = gated.metadata["routing_profile"]
    active = {n: e["mean_active"] for n, e in profile.items()}
    assert all(1.0 <= a < 2.0 for a in active.values()), active
    before = stats.program_stats(unrolled)["active_expert_flops_per_token"]
    after = stats.program_stats(gated)["active_expert_flops_per_token"]
    np.testing.assert_allclose(after, before / 2 * np.mean(list(active.values())), rtol=1e-6)
    assert "measured mean active experts per token" in gated.metadata["notes"]["gating(top_p=0.5)"]
    assert abs(mean_active_experts(profile) - np.mean(list(active.values()))) < 1e-9
    # stored for the decode program of the same optimize call
    assert ctx.analysis.get(RoutingProfile, "gating(top_p=0.5)#0") is not None


def test_gating_on_scanned_layers_through_the_pass_manager():
    model = MoEDecoder(tiny_mixtral(scan_layers=True), rngs=nnx.Rngs(0))
    program = moejax.trace(model, TOKENS)
    ctx = PassContext(example_args=(TOKENS,), calibration=CALIBRATION)
    stages = PassManager([ProfileRouting(), DynamicGating(threshold=0.45)]).run(program, ctx)
    gated = stages[-1].program
    assert "gating='threshold'" in str(gated) and "threshold=0.45" in str(gated)
    entry = gated.metadata["routing_profile"]["layers/*/mlp"]
    assert np.shape(entry["counts"]) == (2, 4)
    assert 1.0 <= entry["mean_active"] < 2.0
    assert stages[-1].stats["active_expert_flops_per_token"] < stages[1].stats["active_expert_flops_per_token"]
    out = np.asarray(gated(TOKENS))
    assert out.shape == (2, 8, 64) and np.isfinite(out).all()


def test_skip_mode_keeps_top_expert_and_renormalizes():
    routing = DynamicGating(skip_ratio=0.6, renormalize=True).new_routing(dialect.Routing(k=2), 4, "l")
    x = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1], [0.4, 0.35, 0.15, 0.1]], jnp.float32))
    w, ids = dialect.route_reference(x, jnp.eye(4, dtype=jnp.float32), routing=routing)
    # token 0: 0.25 < 0.6 * 0.5 -> skipped; token 1: 0.35 >= 0.24 -> kept
    np.testing.assert_array_equal(np.asarray(ids), [[0, -1], [0, 1]])
    np.testing.assert_allclose(np.asarray(w), [[1.0, 0.0], [0.4 / 0.75, 0.35 / 0.75]], rtol=1e-5)
    assert dataclasses.replace(routing, skip_ratio=0.0).gating == "skip"


def test_skip_without_renormalizing_keeps_each_kept_experts_full_top_k_weight():
    routing = DynamicGating(skip_ratio=0.6, renormalize=False).new_routing(dialect.Routing(k=2), 4, "l")
    assert routing.norm_topk and not routing.renormalize_kept
    x = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1], [0.4, 0.35, 0.15, 0.1]], jnp.float32))
    w, ids = dialect.route_reference(x, jnp.eye(4, dtype=jnp.float32), routing=routing)
    np.testing.assert_array_equal(np.asarray(ids), [[0, -1], [0, 1]])
    # normalised over the top-2 picked before skipping: token 0 keeps 0.5 / 0.75, not 1
    np.testing.assert_allclose(np.asarray(w), [[0.5 / 0.75, 0.0], [0.4 / 0.75, 0.35 / 0.75]], rtol=1e-5)
    # a model without norm_topk has nothing to renormalise: false keeps its raw weights
    raw = DynamicGating(skip_ratio=0.6, renormalize=False).new_routing(dialect.Routing(k=2, norm_topk=False), 4, "l")
    w, _ = dialect.route_reference(x, jnp.eye(4, dtype=jnp.float32), routing=raw)
    np.testing.assert_allclose(np.asarray(w), [[0.5, 0.0], [0.4, 0.35]], rtol=1e-5)
    # static top-k is untouched by the field
    top2 = dataclasses.replace(dialect.Routing(k=2), renormalize_kept=False)
    w, _ = dialect.route_reference(x, jnp.eye(4, dtype=jnp.float32), routing=top2)
    np.testing.assert_allclose(np.asarray(w).sum(-1), [1.0, 1.0], rtol=1e-6)


def test_min_weight_mode_drops_small_shares_of_the_top_k_weight():
    """Known answer: probabilities [0.5, 0.25, 0.15, 0.1], top-3 shares 0.5/0.9, 0.25/0.9, 0.15/0.9."""
    x = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1]], jnp.float32))
    base = dialect.Routing(k=3)
    kept = DynamicGating(min_weight=0.2, renormalize=False).new_routing(base, 4, "l")
    assert (kept.gating, kept.min_weight, kept.slots) == ("min_weight", 0.2, 3)
    w, ids = dialect.route_reference(x, jnp.eye(4, dtype=jnp.float32), routing=kept)
    np.testing.assert_array_equal(np.asarray(ids), [[0, 1, -1]])  # 0.167 < 0.2: dropped; 0.278 kept
    np.testing.assert_allclose(np.asarray(w), [[0.5 / 0.9, 0.25 / 0.9, 0.0]], rtol=1e-5)
    renorm = DynamicGating(min_weight=0.3).new_routing(base, 4, "l")  # the model's norm_topk: renormalised
    w, ids = dialect.route_reference(x, jnp.eye(4, dtype=jnp.float32), routing=renorm)
    np.testing.assert_array_equal(np.asarray(ids), [[0, -1, -1]])  # the best expert always stays
    np.testing.assert_allclose(np.asarray(w), [[1.0, 0.0, 0.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="min_weight must be in"):
        DynamicGating(min_weight=1.0)
    with pytest.raises(ValueError, match="max_k caps top_p/threshold gating; min_weight"):
        DynamicGating(min_weight=0.2, max_k=2)

