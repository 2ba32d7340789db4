"""Per-stage statistics: weight bytes, expert bytes, active expert FLOPs, op counts."""
from __future__ import annotations

import collections
import math
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from moejax import dialect, rewrite

__all__ = ["program_stats", "expert_weight_leaf_indices", "ffn_matrix_shapes", "expected_slots"]


def _input_sources(jaxpr, sources: dict[Any, int], found: dict[int, set[int]], want) -> None:
    """Map variables that carry a top-level input unchanged to that input's index."""
    for eqn in jaxpr.eqns:
        if want(eqn):
            for pos, v in enumerate(eqn.invars):
                if not isinstance(v, jcore.Literal) and v in sources:
                    found.setdefault(id(eqn), set()).add((pos, sources[v]))
        for _, sub in rewrite.sub_jaxprs(eqn):
            offset = len(eqn.invars) - len(sub.invars)
            if offset < 0 or eqn.primitive.name == "while":
                continue
            inner = {}
            for sv, ov in zip(sub.invars, eqn.invars[offset:]):
                if not isinstance(ov, jcore.Literal) and ov in sources:
                    inner[sv] = sources[ov]
            _input_sources(sub, inner, found, want)


def _expert_weight_hits(program) -> dict[int, set[tuple[int, int]]]:
    """id(moe_expert_ffn eqn) -> {(weight operand position, weight leaf index)} for leaves fed in unchanged."""
    jaxpr = program.jaxpr.jaxpr
    sources = {v: i for i, v in enumerate(jaxpr.invars[:program.num_weight_leaves])}
    found: dict[int, set] = {}
    _input_sources(jaxpr, sources, found, lambda e: e.primitive is dialect.expert_ffn_p)
    # operands 0, 1 are the grouped rows and the group sizes; the rest are weights
    return {eqn_id: {(pos - 2, src) for pos, src in hits if pos >= 2} for eqn_id, hits in found.items()}


def expert_weight_leaf_indices(program) -> set[int]:
    """Indices of weight leaves that feed a ``moe_expert_ffn`` weight operand."""
    return {src for hits in _expert_weight_hits(program).values() for _, src in hits}


def expert_weight_sites(program) -> dict[str, tuple[str, int]]:
    """Weight path -> (MoE layer name, operand position) for every expert-FFN weight.

    The position is that of the weight's last leaf among the op's weight
    operands: it orders a layer's matrices (gate, up, down), it is not their index.
    """
    names = {id(s.eqn): s.name for s in rewrite.dialect_sites(program.jaxpr, "moe_expert_ffn")}
    leaf_to_path = []
    for path, w in program.weights.items():
        leaf_to_path.extend([path] * len(jax.tree_util.tree_leaves(w)))
    out: dict[str, tuple[str, int]] = {}
    for eqn_id, hits in _expert_weight_hits(program).items():
        for pos, src in hits:
            out[leaf_to_path[src]] = (names.get(eqn_id, ""), pos)
    return dict(sorted(out.items()))


def ffn_matrix_shapes(eqn) -> list[tuple[int, ...]]:
    """Logical [E, in, out] shapes of an expert op's weight matrices."""
    avals = [v.aval for v in eqn.invars[2:]]
    mats = jax.tree_util.tree_unflatten(eqn.params["weights_tree"], avals)
    return [tuple(m.shape) for m in mats]


def expected_slots(route_eqn, profile: dict[str, Any] | None) -> float:
    """Expected experts per token of a route op (measured when profiled)."""
    r: dialect.Routing = route_eqn.params["routing"]
    name = route_eqn.params.get("name", "")
    if profile and name in profile and "mean_active" in profile[name]:
        return float(profile[name]["mean_active"])
    return float(r.slots)


def program_stats(program) -> dict[str, Any]:
    """Statistics of a program (see DESIGN.md, 'Stats per stage')."""
    leaves = program.weight_leaves
    sizes = [int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves]
    expert_idx = expert_weight_leaf_indices(program)
    counts: collections.Counter = collections.Counter()
    impls: collections.Counter = collections.Counter()
    devices = 1
    profile = program.metadata.get("routing_profile")
    routes = {}
    for site in rewrite.iter_eqns(program.jaxpr):
        name = site.eqn.primitive.name
        if dialect.is_dialect_primitive(site.eqn.primitive):
            counts[name] += site.trip_count
            if name == "moe_route":
                routes[site.name] = site.eqn
        if name == "shard_map":
            devices = max(devices, math.prod(site.eqn.params["mesh"].shape.values()))
    flops = 0.0
    for site in rewrite.dialect_sites(program.jaxpr, "moe_expert_ffn"):
        impls[site.eqn.params["impl"]] += site.trip_count
        per_slot = sum(2 * s[-2] * s[-1] for s in ffn_matrix_shapes(site.eqn))
        route = routes.get(site.name)
        slots = expected_slots(route, profile) if route is not None else 1.0
        flops += per_slot * slots * site.trip_count
    return {
        "total_bytes": int(sum(sizes)),
        "expert_bytes": int(sum(sizes[i] for i in expert_idx)),
        "active_expert_flops_per_token": float(flops),
        "op_counts": dict(sorted(counts.items())),
        "ffn_impls": dict(impls),
        "devices": devices,
    }
