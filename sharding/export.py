"""Lower expert-parallel programs for platforms this host lacks (``jax.export``).

A ``shard_map`` over a :class:`jax.sharding.AbstractMesh` needs no devices:
``export_program(program, ["tpu", "cuda"])`` lowers an ``ep`` program built on
``abstract_expert_mesh(8)`` for an 8-device TPU slice or GPU node from a
CPU-only machine. Compiling and running the result needs the real devices.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.program import Program

__all__ = ["export_program", "count_collectives"]

COLLECTIVES = ("all_to_all", "all_reduce", "all_gather", "reduce_scatter", "collective_permute",
               "ragged_all_to_all")


def export_program(program: Program, platforms: Sequence[str] = ("tpu", "cuda")) -> jax.export.Exported:
    """``jax.export`` of ``program`` (weights as arguments) for ``platforms``.

    Works for programs whose weights are abstract (made by
    ``expert_parallel_program(program, abstract_expert_mesh(n))``) or concrete;
    the inputs are exported replicated over the weights' mesh.
    """
    leaves = program.weight_leaves
    mesh = None
    for leaf in leaves:
        sh = getattr(leaf, "sharding", None)
        if isinstance(sh, NamedSharding):
            mesh = sh.mesh
            break

    def spec(x, replicated=False):
        sh = getattr(x, "sharding", None)
        if mesh is not None and (replicated or not isinstance(sh, NamedSharding)):
            sh = NamedSharding(mesh, P())
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh if mesh is not None else None)

    weights = [spec(x) for x in leaves]
    inputs = [spec(a, replicated=True) for a in program.in_avals]
    fn = program.as_function()
    # ragged_all_to_all lowers to a custom call without a serialization-compatibility guarantee.
    checks = [jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
    return jax.export.export(jax.jit(fn), platforms=list(platforms), disabled_checks=checks)(weights, *inputs)


def count_collectives(exported_or_text) -> dict[str, int]:
    """Number of each StableHLO collective op in an export (or its MLIR text)."""
    text = exported_or_text if isinstance(exported_or_text, str) else exported_or_text.mlir_module()
    counts = {c: text.count(f'"stablehlo.{c}"') + text.count(f"stablehlo.{c} ") for c in COLLECTIVES}
    counts["ragged_all_to_all"] += text.count("@ragged_all_to_all(")  # lowered as a custom call
    return counts
