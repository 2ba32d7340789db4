"""System-level passes (survey section 4): expert parallelism, placement, meshes, multi-host, memory plans.

Importing this package registers the ``ep`` pass.
"""
from moejax.sharding.cost_model import overlap_time, suggest_overlap_chunks
from moejax.sharding.expert_parallel import ExpertParallel, count_dropped, expert_parallel_program, moe_layers
from moejax.sharding.export import count_collectives, export_program
from moejax.sharding.mesh import abstract_expert_mesh, auto_axes, expert_mesh
from moejax.sharding.plan import DEVICES, MemoryPlan, PlanError, format_plan, parse_mesh, plan_memory
from moejax.sharding.placement import (Placement, PlacementError, balanced_placement, contiguous_placement,
                                       device_loads, load_summary)

__all__ = [
    "ExpertParallel", "expert_parallel_program", "count_dropped", "moe_layers", "expert_mesh",
    "abstract_expert_mesh", "auto_axes", "Placement", "PlacementError", "contiguous_placement",
    "balanced_placement", "device_loads", "load_summary", "suggest_overlap_chunks", "overlap_time",
    "export_program", "count_collectives", "plan_memory", "MemoryPlan", "PlanError", "parse_mesh", "format_plan",
    "DEVICES",
]
