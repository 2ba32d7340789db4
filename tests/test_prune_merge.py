"""Expert pruning and merging passes: exact-answer cases, graph changes, scanned layers, errors."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import weight_formats as wf
from moejax import dialect, rewrite
from moejax.models import MoEDecoder, tiny_mixtral
from moejax.passes.merge import (MergeExperts, absorb_clusters, absorption_costs, align_hidden_units,
                                 average_linkage, cosine_distances, merge_expert_weights, merge_weights)
from moejax.passes.profile import ProfileRouting
from moejax.passes.prune import PruneExperts, find_moe_layers
from moejax.pipeline import PassContext, PassError, PassManager
from profile_util import hand_profile

D, F, E, T = 8, 12, 4, 48
ROUTING = dialect.Routing(k=2)


def _moe_program(params, routing=ROUTING, positive=True):
    """A one-layer MoE program (float input x [T, D]) over hand-made weights, with a routing profile."""
    def fn(p, x):
        return dialect.sparse_moe(x, p["router"], (p["w_gate"], p["w_up"], p["w_down"]), routing=routing,
                                  name="moe")

    x = np.random.RandomState(7).randn(T, D)
    x = jnp.asarray(np.abs(x) if positive else x, jnp.float32)
    program = moejax.trace(fn, x, params={k: jnp.asarray(v, jnp.float32) for k, v in params.items()})
    return program.replace(metadata={"routing_profile": {"moe": hand_profile(x, params["router"], routing)}}), x


def _weights(seed=0, dup_pairs=False, dead_expert=None):
    rs = np.random.RandomState(seed)
    p = {"router": rs.randn(D, E), "w_gate": rs.randn(E, D, F) / 3, "w_up": rs.randn(E, D, F) / 3,
         "w_down": rs.randn(E, F, D) / 3}
    if dup_pairs:  # experts 0 == 1 and 2 == 3
        for k in ("w_gate", "w_up", "w_down"):
            p[k][1], p[k][3] = p[k][0], p[k][2]
    if dead_expert is not None:  # x >= 0, so a negative router column is never selected
        p["router"][:, dead_expert] = -5.0
    return p


def _ctx(x):
    return PassContext(example_args=(x,))


def _routing_of(program):
    return rewrite.dialect_sites(program.jaxpr, "moe_route")[0].eqn.params["routing"]


# ---- clustering and averaging ------------------------------------------------
def test_average_linkage_known_clusters_and_size_cap():
    pts = np.array([[0.0], [0.1], [5.0], [5.2], [5.3], [10.0]])
    dist = np.abs(pts - pts.T)
    assert average_linkage(dist, 3) == [[0, 1], [2, 3, 4], [5]]
    assert average_linkage(dist, 1) == [[0, 1, 2, 3, 4, 5]]
    # greedy with a cap: {3,4} and {0,1} join first, so 2 and 5 are left to pair up
    assert average_linkage(dist, 3, max_size=2) == [[0, 1], [2, 5], [3, 4]]
    with pytest.raises(ValueError, match="n_clusters must be in"):
        average_linkage(dist, 7)
    np.testing.assert_allclose(cosine_distances(np.array([[1.0, 0], [2.0, 0], [0, 1.0]])),
                               [[0, 0, 1], [0, 0, 1], [1, 1, 0]], atol=1e-12)


def test_absorption_costs_match_their_definition():
    rs = np.random.RandomState(2)
    n, e, d = 10, 3, 4
    picked = rs.rand(n, e) < 0.5
    picked[:, 2] = False  # expert 2 is never routed to: absorbing it costs nothing
    gates = np.where(picked, rs.rand(n, e), 0.0)
    outputs = rs.randn(e, n, d)
    cost = absorption_costs(gates, picked, outputs)
    for i in range(e):
        rows = np.flatnonzero(picked[:, i])
        for j in range(e):
            terms = [gates[t, i] * np.linalg.norm(outputs[i, t] - outputs[j, t]) for t in rows]
            np.testing.assert_allclose(cost[i, j], np.mean(terms) if rows.size else 0.0, rtol=1e-12)
    assert np.all(np.diag(cost) == 0) and np.all(cost[2] == 0)


def test_absorb_clusters_merges_the_cheapest_experts_and_keeps_absorbers_whole():
    inf = 9.0
    cost = np.array([[0, 1, inf, inf],  # 0 is cheap to serve by 1
                     [5, 0, 4, inf],
                     [inf, 0.5, 0, 3],  # 2 is cheapest of all, by 1
                     [inf, inf, 2, 0]])
    assert absorb_clusters(cost, 3) == [[0], [1, 2], [3]]
    # then 0 joins 1's cluster (cost 1; moving {1, 2} under 0 or 3 costs more)
    assert absorb_clusters(cost, 2) == [[0, 1, 2], [3]]
    assert absorb_clusters(cost, 1) == [[0, 1, 2, 3]]  # whole clusters move too: {3} joins under centre 1
    # with clusters of at most 2, 0 cannot join 1 and goes to its next cheapest target, 3
    assert absorb_clusters(cost, 2, max_size=2) == [[0, 3], [1, 2]]
    with pytest.raises(ValueError, match="cannot reach 1 clusters"):
        absorb_clusters(cost, 1, max_size=2)


def test_reap_merging_absorbs_duplicates_exactly_and_distinct_routing_keeps_k_experts():
    program, x = _moe_program(_weights(dup_pairs=True))
    merged = MergeExperts(num_experts=2, method="reap").run(program, _ctx(x))
    assert _routing_of(merged).expert_map == (0, 0, 1, 1)
    np.testing.assert_allclose(np.asarray(merged(x)), np.asarray(program(x)), rtol=1e-5, atol=1e-5)
    # distinct=true: a token that picked both members of a pair now also gets the other pair
    distinct = MergeExperts(num_experts=2, method="reap", distinct=True).run(program, _ctx(x))
    assert _routing_of(distinct).distinct_merged
    _, ids = dialect.route_reference(x, distinct.weights["router"], routing=_routing_of(distinct))
    assert np.all(np.sort(np.asarray(ids), axis=1) == [0, 1])
    with pytest.raises(PassError, match="would keep only 1; merge to at least 2"):
        MergeExperts(num_experts=1, distinct=True).check(program, _ctx(x))
    with pytest.raises(ValueError, match="similarity= applies to method=linkage only"):
        MergeExperts(num_experts=2, method="reap", similarity="weight")
    with pytest.raises(ValueError, match="method must be one of"):
        MergeExperts(num_experts=2, method="hc")


def test_merge_weights_is_frequency_weighted():
    w = np.arange(4, dtype=np.float32)[:, None] * np.ones((4, 2), np.float32)  # expert e holds value e
    out = merge_weights(w, [[0, 3], [1, 2]], np.array([0.3, 0.0, 0.0, 0.1]))
    np.testing.assert_allclose(out[:, 0], [(0 * 0.3 + 3 * 0.1) / 0.4, 1.5], rtol=1e-6)  # unrouted cluster: uniform


# ---- merging: exact answers on hand-made experts ---------------------------------
@pytest.mark.parametrize("similarity", ["weight", "output"])
def test_merging_duplicate_experts_is_exact_and_maps_routing(similarity):
    program, x = _moe_program(_weights(dup_pairs=True))
    merged = MergeExperts(num_experts=2, similarity=similarity).run(program, _ctx(x))
    assert _routing_of(merged).expert_map == (0, 0, 1, 1)
    text = str(merged)
    assert "expert_map=(0, 0, 1, 1)" in text and "num_experts=2" in text
    assert merged.weights["w_up"].shape == (2, D, F) and merged.weights["router"].shape == (D, E)
    np.testing.assert_allclose(np.asarray(merged(x)), np.asarray(program(x)), rtol=1e-5, atol=1e-5)
    # tokens that picked both members of a pair now hold one slot with the summed weight
    w0, ids0 = dialect.route_reference(x, program.weights["router"], routing=ROUTING)
    w1, ids1 = dialect.route_reference(x, merged.weights["router"], routing=_routing_of(merged))
    both = np.asarray(ids0 // 2)[:, 0] == np.asarray(ids0 // 2)[:, 1]
    assert both.any() and (~both).any()
    np.testing.assert_array_equal(np.asarray(ids1)[both, 1], -1)
    np.testing.assert_allclose(np.asarray(w1)[both, 0], np.asarray(w0)[both].sum(1), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(ids1)[~both], np.asarray(ids0)[~both] // 2)


def test_merge_weights_in_program_follow_profile_frequency():
    params = _weights(seed=3)
    program, x = _moe_program(params)
    merged = MergeExperts(num_experts=3, similarity="weight").run(program, _ctx(x))
    emap = _routing_of(merged).expert_map
    clusters = [[e for e in range(E) if emap[e] == j] for j in range(3)]
    freq = program.metadata["routing_profile"]["moe"]["frequency"][0]
    mats = [params[k] for k in ("w_gate", "w_up", "w_down")]
    want = merge_expert_weights(mats, clusters, freq, align=True)
    for k, w in zip(("w_gate", "w_up", "w_down"), want):
        np.testing.assert_allclose(np.asarray(merged.weights[k]), w, rtol=1e-5, atol=1e-6)
    # a singleton cluster keeps its expert untouched
    single = [c for c in clusters if len(c) == 1][0][0]
    np.testing.assert_allclose(np.asarray(merged.weights["w_up"])[emap[single]], params["w_up"][single], rtol=1e-6)


def test_alignment_recovers_permuted_hidden_units_so_merging_a_permuted_copy_is_exact():
    rs = np.random.RandomState(2)
    anchor = [rs.randn(D, F), rs.randn(D, F), rs.randn(F, D)]
    perm = rs.permutation(F)
    shuffled = [anchor[0][:, perm], anchor[1][:, perm], anchor[2][perm]]
    for a, b in zip(align_hidden_units(anchor, shuffled), anchor):
        np.testing.assert_allclose(a, b)
    mats = [np.stack([a, s]) for a, s in zip(anchor, shuffled)]
    merged = merge_expert_weights(mats, [[0, 1]], np.array([0.7, 0.3]), align=True)
    for m, a in zip(merged, anchor):
        np.testing.assert_allclose(m[0], a, rtol=1e-6)
    unaligned = merge_expert_weights(mats, [[0, 1]], np.array([0.7, 0.3]), align=False)
    assert not np.allclose(unaligned[0][0], anchor[0])


def test_dominant_merge_starts_from_each_clusters_most_used_member():
    rs = np.random.RandomState(5)
    mats = [rs.randn(3, D, F), rs.randn(3, D, F), rs.randn(3, F, D)]
    merged = merge_expert_weights(mats, [[0, 1], [2]], np.array([0.2, 0.5, 0.3]), start="dominant")
    for m, w in zip(merged, mats):
        np.testing.assert_array_equal(m, w[[1, 2]])


# ---- pruning: exact answers --------------------------------------------------------
def test_pruning_a_never_routed_expert_is_exact():
    program, x = _moe_program(_weights(dead_expert=2))
    assert program.metadata["routing_profile"]["moe"]["counts"][0, 2] == 0
    pruned = PruneExperts(num_experts=3, method="frequency").run(program, _ctx(x))
    assert pruned.weights["router"].shape == (D, 3) and pruned.weights["w_gate"].shape == (3, D, F)
    np.testing.assert_array_equal(np.asarray(pruned.weights["router"]),
                                  np.asarray(program.weights["router"])[:, [0, 1, 3]])
    assert "num_experts=3" in str(pruned) and "num_experts=4" in str(program)
    np.testing.assert_allclose(np.asarray(pruned(x)), np.asarray(program(x)), rtol=1e-5, atol=1e-5)


def test_reconstruction_pruning_matches_brute_force_on_a_dialect_free_reference():
    params = _weights(seed=5)
    program, x = _moe_program(params, positive=False)
    assert (program.metadata["routing_profile"]["moe"]["counts"] > 0).all()  # every expert matters
    mats = [jnp.asarray(params[k], jnp.float32) for k in ("w_gate", "w_up", "w_down")]
    full = np.asarray(dialect.einsum_moe_reference(x, jnp.asarray(params["router"], jnp.float32), mats,
                                                   routing=ROUTING))
    errors = {}
    for keep in itertools.combinations(range(E), 3):
        k = list(keep)
        y = np.asarray(dialect.einsum_moe_reference(x, jnp.asarray(params["router"][:, k], jnp.float32),
                                                    [m[np.asarray(k)] for m in mats], routing=ROUTING))
        errors[keep] = float(np.sum((y - full) ** 2) / np.sum(full ** 2))
    best = min(errors, key=errors.get)
    assert errors[best] > 1e-3
    layer = find_moe_layers(program, "prune")["moe"]
    exhaustive = PruneExperts(num_experts=3, method="reconstruction")
    plan = exhaustive.plans(program, {"moe": layer})["moe"]
    (keep,), (err,) = plan.kept, plan.relative_error
    assert tuple(keep) == best and err == pytest.approx(errors[best], rel=1e-3)
    greedy = PruneExperts(num_experts=3, method="naee", exhaustive_limit=1).plans(program, {"moe": layer})["moe"]
    (gkeep,), (gerr,) = greedy.kept, greedy.relative_error
    assert gerr >= err - 1e-9 and gerr == pytest.approx(errors[tuple(gkeep)], rel=1e-3)
    pruned = exhaustive.run(program, _ctx(x))
    y = np.asarray(pruned(x))
    np.testing.assert_allclose(float(np.sum((y - full) ** 2) / np.sum(full ** 2)), errors[best], rtol=1e-3)


def test_prune_after_merge_remaps_router_columns():
    program, x = _moe_program(_weights(dup_pairs=True))
    merged = MergeExperts(num_experts=2, similarity="weight").run(program, _ctx(x))
    merged = merged.replace(metadata={"routing_profile": {"moe": hand_profile(x, merged.weights["router"],
                                                                          _routing_of(merged))}})
    assert merged.metadata["routing_profile"]["moe"]["counts"].shape == (1, 2)
    pruned = PruneExperts(num_experts=1, method="mass").run(merged, _ctx(x))
    keep = int(np.argmax(merged.metadata["routing_profile"]["moe"]["mass"][0]))
    cols = [2 * keep, 2 * keep + 1]
    assert _routing_of(pruned).expert_map == (0, 0)
    np.testing.assert_array_equal(np.asarray(pruned.weights["router"]), np.asarray(merged.weights["router"])[:, cols])
    assert pruned.weights["w_up"].shape == (1, D, F)


# ---- errors ----------------------------------------------------------------------
def test_errors_target_above_count_missing_profile_stale_profile_and_options():
    program, x = _moe_program(_weights())
    with pytest.raises(PassError, match="num_experts=5 is above the 4 experts layer 'moe'"):
        MergeExperts(num_experts=5).check(program, _ctx(x))
    with pytest.raises(PassError, match="num_experts=6 is above the 4 experts"):
        PruneExperts(num_experts=6).check(program, _ctx(x))
    with pytest.raises(PassError, match="keep at least that many"):
        PruneExperts(num_experts=1).check(program, _ctx(x))
    bare = program.replace(metadata={})
    with pytest.raises(PassError, match="needs .routing_profile., which no earlier pass provided; add profile before it"):
        PassManager([MergeExperts(num_experts=2)]).run(bare, _ctx(x))
    pruned = PruneExperts(num_experts=3).run(program, _ctx(x))
    stale = pruned.replace(metadata=program.metadata)  # the 4-expert profile on a 3-expert program
    with pytest.raises(PassError, match="stale profile.*run 'profile' again"):
        MergeExperts(num_experts=2).check(stale, _ctx(x))
    with pytest.raises(ValueError, match="merge needs exactly one of num_experts"):
        MergeExperts()
    with pytest.raises(ValueError, match="similarity must be one of"):
        MergeExperts(num_experts=2, similarity="cka")
    with pytest.raises(ValueError, match="method must be one of"):
        PruneExperts(num_experts=2, method="random")


def test_merge_after_quantization_is_rejected_prune_slices_quantized_experts():
    """Quantization is per expert, so pruning commutes with it: prune(quantize(W)) == quantize(prune(W))."""
    from moejax.passes.quantize import QuantizeExperts

    program, x = _moe_program(_weights())
    quantized = QuantizeExperts(bits=4, group_size=4).run(program, _ctx(x))
    with pytest.raises(PassError, match=rf"quantized expert weights .*must run before quantize"):
        MergeExperts(num_experts=2).check(quantized, _ctx(x))
    prune = PruneExperts(num_experts=2)
    prune.check(quantized, _ctx(x))
    pruned_after = prune.run(quantized, _ctx(x))
    pruned_first = QuantizeExperts(bits=4, group_size=4).run(prune.run(program, _ctx(x)), _ctx(x))
    assert all(wf.is_structured(w) and w.shape[0] == 2 for p, w in pruned_after.weights.items() if "w_" in p)
    np.testing.assert_array_equal(np.asarray(pruned_after(x)), np.asarray(pruned_first(x)))


# ---- scanned (stacked) layers ------------------------------------------------------
def test_scanned_layers_prune_and_merge_per_layer():
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 8)), jnp.int32)
    model = MoEDecoder(tiny_mixtral(scan_layers=True), rngs=nnx.Rngs(0))
    ctx = PassContext(example_args=(tokens,), calibration=[np.random.RandomState(1).randint(0, 64, (4, 16))])
    program = ProfileRouting().run(moejax.trace(model, tokens), ctx)
    router = "layers/mlp/gate/kernel"
    old_router = np.asarray(program.weights[router])
    counts = program.metadata["routing_profile"]["layers/*/mlp"]["counts"]

    pruned = PruneExperts(num_experts=3).run(program, ctx)
    assert pruned.weights["layers/mlp/experts/w_up"].shape == (2, 3, 32, 48)
    for s in range(2):  # each stacked layer keeps its own most frequent experts
        keep = sorted(np.argsort(-counts[s], kind="stable")[:3])
        np.testing.assert_array_equal(np.asarray(pruned.weights[router])[s], old_router[s][:, keep])
    assert np.shape(pruned.metadata["routing_profile"]["layers/*/mlp"]["counts"]) == (2, 3)  # re-measured

    merged = MergeExperts(num_experts=2, balanced=True).run(program, ctx)
    assert _routing_of(merged).expert_map == (0, 0, 1, 1)  # one canonical map for every stacked layer
    assert merged.weights["layers/mlp/experts/w_down"].shape == (2, 2, 48, 32)
    new_router = np.asarray(merged.weights[router])
    for s in range(2):  # router columns are permuted per layer, none lost
        assert sorted(map(tuple, new_router[s].T.round(6))) == sorted(map(tuple, old_router[s].T.round(6)))
    out = np.asarray(merged(tokens))
    assert out.shape == (2, 8, 64) and np.isfinite(out).all()
    assert merged.metadata["routing_profile"]["layers/*/mlp"]["mean_active"] <= 2.0


def test_global_merge_budget_merges_where_it_costs_least():
    """``budget=global``: the same total, taken first from the layer whose experts merge for free."""
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 8)), jnp.int32)
    program = moejax.trace(MoEDecoder(tiny_mixtral(), rngs=nnx.Rngs(0)), tokens)
    layers = find_moe_layers(program, "t")
    first = next(iter(layers.values()))
    dup = {}
    for p in first.experts:  # layer 0: experts 1 == 0 and 3 == 2, so merging it to 2 changes nothing
        w = np.asarray(program.weights[p]).copy()
        w[1], w[3] = w[0], w[2]
        dup[p] = jnp.asarray(w)
    ctx = PassContext(example_args=(tokens,), calibration=[np.random.RandomState(1).randint(0, 64, (4, 16))])
    program = ProfileRouting().run(program.rewrite(weights=dup), ctx)
    for method in ("linkage", "reap"):
        merge = MergeExperts(num_experts=3, method=method, budget="global")
        assert list(merge.global_counts(program, layers).values()) == [2, 4]
        merged = merge.run(program, ctx)
        np.testing.assert_allclose(np.asarray(merged(tokens)), np.asarray(program(tokens)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="budget must be one of"):
        MergeExperts(num_experts=3, budget="layerwise")
    scanned = moejax.trace(MoEDecoder(tiny_mixtral(scan_layers=True), rngs=nnx.Rngs(0)), tokens)
    with pytest.raises(PassError, match="budget=global gives layers different expert counts"):
        MergeExperts(num_experts=3, budget="global").check(ProfileRouting().run(scanned, ctx), ctx)
