"""``pallas``: lower the expert and routing ops of a Program to the Pallas kernels (exact).

Sets ``impl="pallas"`` on every ``moe_expert_ffn`` (grouped matmuls, fused
SwiGLU/GeGLU gate+up, int8/int4 weights dequantized in the kernel) and, for
``gating="topk"`` routing, on every ``moe_route`` (the fused router kernel).
The kernel variant is chosen when the program is lowered: Mosaic on TPU,
Triton on CUDA/ROCm, the Pallas interpreter elsewhere (CPU: correct, slow).
Tile sizes come from :func:`moejax.pallas_kernels.choose_tiling` and its
override hook.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

from moejax import dialect
from moejax.pipeline import Pass, PassContext, Tolerance, register_pass
from moejax.program import Program

__all__ = ["LowerToPallas"]


@register_pass
@dataclasses.dataclass(frozen=True)
class LowerToPallas(Pass):
    """Route ``moe_expert_ffn`` (and top-k ``moe_route`` when ``route``) to the Pallas kernels.

    Options:
      ffn: run every ``moe_expert_ffn`` with the Pallas grouped-matmul kernels.
      route: run ``moe_route`` with the fused router kernel where its gating is
        top-k (other gating modes keep their implementation).
    """

    name: ClassVar[str] = "pallas"
    needs_stacked_experts: ClassVar[bool] = True
    needs_weight_values: ClassVar[bool] = False  # only re-binds the ops' impl
    exact: ClassVar[bool] = True
    # Measured on CPU (interpret mode): float weights bit-exact; int4 weights up to 8.1e-7 of max|logit| (default model 7.0e-7).
    tolerance: ClassVar[Tolerance | None] = Tolerance(1e-5, 1e-7, "the kernel dequantizes and accumulates tile by tile, a different f32 summation order than dequantize-then-dot")
    option_ranges: ClassVar[Mapping[str, str]] = {"ffn": "true or false", "route": "true or false"}
    ffn: bool = True
    route: bool = True

    def run(self, program: Program, ctx: PassContext) -> Program:
        rules = {}
        if self.ffn:
            rules[dialect.expert_ffn_p.name] = lambda rc: rc.bind(impl="pallas")
        if self.route:
            # Other gating modes have no fused kernel (route_pallas would fall back anyway).
            rules[dialect.route_p.name] = lambda rc: rc.bind(
                impl="pallas" if rc.params["routing"].gating == "topk" else rc.params.get("impl", "reference"))
        return program.rewrite(rules)
