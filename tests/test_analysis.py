"""Typed analysis results, the weight-dataflow walker, and programs that free their memory."""
from __future__ import annotations

import gc
import json
import weakref

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jcore

import moejax
from moejax import analysis, dataflow, dialect, rewrite, stats
from moejax.models import MoEDecoder, tiny_mixtral
from moejax.pipeline import PassContext

RNG = np.random.default_rng(0)
TOKENS = jnp.asarray(RNG.integers(0, 64, (2, 8)), jnp.int32)


# ---- JSON round trips ------------------------------------------------------------
def _layer(s: int, e: int, d: int, n: int) -> analysis.LayerRouting:
    counts = RNG.integers(0, 9, (s, e)).astype(np.float64)
    return analysis.LayerRouting(
        counts=counts, frequency=counts / counts.sum(1, keepdims=True), mass=RNG.random((s, e)),
        coactivation=RNG.random((s, e, e)), output_mean=RNG.normal(size=(s, e, d)).astype(np.float32),
        inputs=RNG.normal(size=(s, n, d)).astype(np.float32), tokens=17, mean_active=1.75)


def _assert_layers_equal(a: analysis.LayerRouting, b: analysis.LayerRouting) -> None:
    for k in ("counts", "frequency", "mass", "coactivation", "output_mean", "inputs"):
        x, y = getattr(a, k), getattr(b, k)
        assert x.dtype == y.dtype and x.shape == y.shape, k
        np.testing.assert_array_equal(x, y)  # bit for bit: JSON floats round-trip exactly
    assert (a.tokens, a.mean_active) == (b.tokens, b.mean_active)


def test_routing_profile_json_round_trip():
    profile = analysis.RoutingProfile({"layers/*/mlp": _layer(2, 4, 8, 5), "moe": _layer(1, 3, 8, 0)},
                                      source="calibration")
    text = profile.to_json()
    assert isinstance(json.loads(text)["layers"]["moe"]["counts"], list)  # arrays as lists
    back = analysis.RoutingProfile.from_json(text)
    assert back.source == "calibration" and list(back.layers) == list(profile.layers)
    for name in profile.layers:
        _assert_layers_equal(profile.layers[name], back.layers[name])
    assert back.layers["moe"].inputs.shape == (1, 0, 8)  # an empty sample keeps its feature axis
    # the metadata form keeps the pre-typed read access, and reads back typed
    meta = analysis.write({}, profile)
    assert meta["routing_profile"]["moe"]["counts"] is profile.layers["moe"].counts
    assert profile["moe"]["mean_active"] == 1.75 and "inputs" in profile["moe"]
    _assert_layers_equal(analysis.read(meta, analysis.RoutingProfile).layers["moe"], profile.layers["moe"])


def test_plans_and_bit_allocation_json_round_trip():
    prune = analysis.PrunePlan("reconstruction", 2, {"a": analysis.LayerPrune(((0, 3), (1, 2)), (0.25, None))})
    assert analysis.PrunePlan.from_json(prune.to_json()) == prune
    merge = analysis.MergePlan("output", 2, {"a": analysis.MergePlan.clusters_of([[[0, 1], [2, 3]]])})
    assert analysis.MergePlan.from_json(merge.to_json()) == merge
    bits = analysis.BitAllocation(3.5, {"a": np.array([[8, 4, 2, 2]]), "b": np.array([[4, 4, 3, 3]])})
    back = analysis.BitAllocation.from_json(bits.to_json())
    assert back.budget == 3.5 and set(back.layers) == {"a", "b"}
    for name in bits.layers:
        np.testing.assert_array_equal(back.layers[name], bits.layers[name])
    for result in (prune, merge, bits):  # stored under its declared key, read back typed
        meta = analysis.write({"other": 1}, result)
        assert type(result).key in meta and meta["other"] == 1
        assert isinstance(analysis.read(meta, type(result)), type(result))


def test_store_is_typed_and_keyed_by_step():
    store = analysis.AnalysisStore()
    plan = analysis.PrunePlan("frequency", 1, {})
    store.put("prune(num_experts=1)#0", plan)
    assert store.get(analysis.PrunePlan, "prune(num_experts=1)#0") is plan
    assert store.get(analysis.PrunePlan, "prune(num_experts=1)#1") is None
    assert store.latest(analysis.PrunePlan) is plan and store.latest(analysis.MergePlan) is None
    with pytest.raises(KeyError, match="not a declared analysis result"):
        store.put("x#0", object())  # type: ignore[arg-type]
    ctx = PassContext()
    assert [ctx.step("profile"), ctx.step("prune"), ctx.step("profile")] == ["profile#0", "prune#0", "profile#1"]


# ---- the weight-dataflow walker ----------------------------------------------------
def _old_expert_weight_sites(program) -> dict[str, tuple[str, int]]:
    """The walker stats used before moejax.dataflow (kept here as the reference)."""
    def walk(jaxpr, sources, found):
        for eqn in jaxpr.eqns:
            if eqn.primitive is dialect.expert_ffn_p:
                for pos, v in enumerate(eqn.invars):
                    if not isinstance(v, jcore.Literal) and v in sources:
                        found.setdefault(id(eqn), set()).add((pos, sources[v]))
            for _, sub in rewrite.sub_jaxprs(eqn):
                offset = len(eqn.invars) - len(sub.invars)
                if offset < 0 or eqn.primitive.name == "while":
                    continue
                walk(sub, {sv: sources[ov] for sv, ov in zip(sub.invars, eqn.invars[offset:])
                           if not isinstance(ov, jcore.Literal) and ov in sources}, found)

    top = program.jaxpr.jaxpr
    found: dict = {}
    walk(top, {v: i for i, v in enumerate(top.invars[:program.num_weight_leaves])}, found)
    names = {id(s.eqn): s.name for s in rewrite.dialect_sites(program.jaxpr, "moe_expert_ffn")}
    paths = [o.path for o in dataflow.leaf_owners(program)]
    out = {}
    for eqn_id, hits in found.items():
        for pos, src in sorted(hits):
            if pos >= 2:
                out[paths[src]] = (names[eqn_id], pos - 2)
    return dict(sorted(out.items()))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_walker_finds_the_same_sites_as_before(scan):
    from moejax.passes.prune import find_moe_layers
    from moejax.sharding.expert_parallel import moe_layers

    program = moejax.trace(MoEDecoder(tiny_mixtral(scan_layers=scan), rngs=nnx.Rngs(0)), TOKENS)
    sites = stats.expert_weight_sites(program)
    assert sites == _old_expert_weight_sites(program)
    layer_names = ["layers/*/mlp"] if scan else ["layers/0/mlp", "layers/1/mlp"]
    assert sorted({name for name, _ in sites.values()}) == layer_names
    assert len(sites) == 3 * len(layer_names)  # gate, up, down per layer
    paths = [o.path for o in dataflow.leaf_owners(program)]
    assert {paths[i] for i in stats.expert_weight_leaf_indices(program)} == set(sites)
    # prune's view: one scan over stacked layers; ep's view: the expert axis after the stack axis
    layers = find_moe_layers(program, "test")
    assert sorted(layers) == layer_names and all(l.stacked == scan for l in layers.values())
    for info in moe_layers(program).values():
        assert sorted(info.weights) == sorted(p for p, (n, _) in sites.items() if n == info.name)
        assert all(axes == {0: int(scan)} for axes in info.weights.values())
    # the router is read (unchanged) by moe_route, sliced once under the scan
    reads = dataflow.weight_reads(program, lambda e: e.primitive is dialect.route_p)
    assert [src.sliced_axes for r in reads for _, src in r.sources()] == [int(scan)] * len(layer_names)


# ---- programs free their memory ------------------------------------------------------
def test_deleted_program_and_its_weights_are_freed():
    model = MoEDecoder(tiny_mixtral(), rngs=nnx.Rngs(0))
    program = moejax.trace(model, TOKENS)
    del model
    program(TOKENS)
    program.run_with_taps({"moe_route": lambda c: None}, TOKENS)
    rewrite._contains_dialect(program.jaxpr.jaxpr)
    metadata_only = program.replace(metadata={"note": 1})  # shares the compiled function
    np.testing.assert_array_equal(np.asarray(metadata_only(TOKENS)), np.asarray(program(TOKENS)))
    refs = [weakref.ref(program), weakref.ref(metadata_only), weakref.ref(program.jaxpr),
            weakref.ref(program.jaxpr.jaxpr), weakref.ref(program.weights["layers/0/mlp/experts/w_up"])]
    del program, metadata_only
    gc.collect()
    assert [r() is None for r in refs] == [True] * len(refs)


# ---- one profile for the programs of one optimize call ---------------------------------
def test_prefill_and_decode_programs_share_one_profile():
    model = MoEDecoder(tiny_mixtral(), rngs=nnx.Rngs(0))
    cache = model.init_cache(2, 9)
    cal = [RNG.integers(0, 64, (3, 8))]
    opt = moejax.optimize(model, (TOKENS,), "profile,prune(num_experts=3)", calibration=cal,
                          decode_example=((TOKENS[:, :1],), {"cache": cache, "cache_index": jnp.int32(7)}))
    prefill, decode = opt.stages, opt.decode_stages
    # the decode step cannot be profiled on token batches: it reuses the prefill program's profile
    assert decode[1].program.metadata["routing_profile"] is prefill[1].program.metadata["routing_profile"]
    profile = analysis.read(prefill[1].program.metadata, analysis.RoutingProfile)
    assert isinstance(profile, analysis.RoutingProfile) and sorted(profile.layers) == ["layers/0/mlp", "layers/1/mlp"]
    assert decode[1].program.metadata["routing_profile_source"] == "calibration"
    # and prunes the same experts, from the plan the prefill run made
    plans = [analysis.read(s[2].program.metadata, analysis.PrunePlan) for s in (prefill, decode)]
    assert plans[0] == plans[1] and all(len(k) == 3 for p in plans for l in p.values() for k in l.kept)
    np.testing.assert_array_equal(np.asarray(decode[2].program.weights["layers/0/mlp/experts/w_up"]),
                                  np.asarray(prefill[2].program.weights["layers/0/mlp/experts/w_up"]))
