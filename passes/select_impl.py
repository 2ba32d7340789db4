"""``select-impl``: choose how the expert op is computed (exact)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from moejax import dialect
from moejax.pipeline import Pass, PassContext, PassError, register_pass
from moejax.program import Program

# What "auto" picks per platform, best first; the first registered one wins.
AUTO_CHOICES = {
    "cpu": ("blocked", "ragged"),
    "gpu": ("pallas", "ragged"),
    "cuda": ("pallas", "ragged"),
    "rocm": ("ragged",),
    "tpu": ("pallas", "ragged"),
}


@register_pass
@dataclasses.dataclass(frozen=True)
class SelectImpl(Pass):
    """Set the ``impl`` of every ``moe_expert_ffn`` (all implementations compute the same function).

    ``impl=auto`` picks the fastest registered implementation for the platform
    (``blocked`` on CPU, Pallas kernels on GPU/TPU, ``ragged_dot`` otherwise).
    """

    name: ClassVar[str] = "select-impl"
    exact: ClassVar[bool] = True
    impl: str = "auto"

    def resolve(self, platform: str) -> str:
        available = dialect.ffn_impls()
        if self.impl != "auto":
            if self.impl not in available:
                raise PassError(f"select-impl: unknown impl {self.impl!r}; available: {', '.join(available)}, auto")
            return self.impl
        for choice in AUTO_CHOICES.get(platform, ("ragged",)):
            if choice in available:
                return choice
        return "ragged"

    def run(self, program: Program, ctx: PassContext) -> Program:
        impl = self.resolve(ctx.platform)

        def rule(rc):
            return rc.bind(impl=impl)

        return program.rewrite({dialect.expert_ffn_p.name: rule})
