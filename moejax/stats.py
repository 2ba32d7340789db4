"""Per-stage statistics: weight bytes, expert bytes, active expert FLOPs, op counts."""
from __future__ import annotations

import collections
import math
from typing import Any

import jax
import numpy as np

from moejax import analysis, dataflow, dialect, rewrite

__all__ = ["program_stats", "expert_weight_leaf_indices", "ffn_matrix_shapes", "expected_slots"]


def _expert_weight_reads(program) -> list[tuple[str, set[tuple[int, int]]]]:
    """Per ``moe_expert_ffn`` equation reading stored weights: (layer name, {(weight operand position, leaf index)})."""
    reads = dataflow.weight_reads(program, lambda e: e.primitive is dialect.expert_ffn_p)
    # operands 0, 1 are the grouped rows and the group sizes; the rest are weights, then expert biases
    # (gpt-oss), which are not expert matrices: passes that quantize or re-lay matrices leave them alone.
    out = [(r.name, {(pos - 2, src.input) for pos, src in r.sources(start=2) if pos < 2 + _num_matrix_leaves(r.eqn)})
           for r in reads]
    return [(name, hits) for name, hits in out if hits]


def _num_matrix_leaves(eqn) -> int:
    """Operand count of an expert op's matrices (its weight leaves before any expert biases)."""
    children = jax.tree_util.treedef_children(eqn.params["weights_tree"])
    mats, _ = dialect.split_biases(children, eqn.params["activation"])
    return sum(c.num_leaves for c in mats)


def expert_weight_leaf_indices(program) -> set[int]:
    """Indices of weight leaves that feed a ``moe_expert_ffn`` weight operand."""
    return {src for _, hits in _expert_weight_reads(program) for _, src in hits}


def expert_weight_sites(program) -> dict[str, tuple[str, int]]:
    """Weight path -> (MoE layer name, operand position) for every expert-FFN weight.

    The position is that of the weight's last leaf among the op's weight
    operands: it orders a layer's matrices (gate, up, down), it is not their index.
    """
    owners = dataflow.leaf_owners(program)
    out: dict[str, tuple[str, int]] = {}
    for name, hits in _expert_weight_reads(program):
        for pos, src in sorted(hits):
            out[owners[src].path] = (name, pos)
    return dict(sorted(out.items()))


def ffn_matrix_shapes(eqn) -> list[tuple[int, ...]]:
    """Logical [E, in, out] shapes of an expert op's weight matrices."""
    avals = [v.aval for v in eqn.invars[2:]]
    mats = jax.tree_util.tree_unflatten(eqn.params["weights_tree"], avals)
    mats, _ = dialect.split_biases(mats, eqn.params["activation"])  # expert biases are not matrices
    return [tuple(m.shape) for m in mats]


def expected_slots(route_eqn, profile: analysis.RoutingProfile | None) -> float:
    """Expected experts per token of a route op (measured when profiled)."""
    r: dialect.Routing = route_eqn.params["routing"]
    name = route_eqn.params.get("name", "")
    layer = profile.layers.get(name) if profile is not None else None
    if layer is not None and layer.mean_active is not None:
        return float(layer.mean_active)
    return float(r.slots)


def program_stats(program) -> dict[str, Any]:
    """Statistics of a program (bytes by kind, active expert FLOPs per token, op counts; see docs/architecture.md)."""
    leaves = program.weight_leaves
    sizes = [int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves]
    expert_idx = expert_weight_leaf_indices(program)
    counts: collections.Counter = collections.Counter()
    impls: collections.Counter = collections.Counter()
    devices = 1
    profile = analysis.read(program.metadata, analysis.RoutingProfile)
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
