"""``select-impl``: choose how the expert op is computed, and the expert weights' layout (exact)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from moejax import abstract, dialect, expert_layout, native_build, rewrite, stats
from moejax.pipeline import Pass, PassContext, PassError, Tolerance, register_pass
from moejax.program import Program

# What "auto" picks per platform, best first; the first registered one wins.
AUTO_CHOICES = {
    "cpu": ("native", "blocked", "ragged"),
    "gpu": ("pallas", "ragged"),
    "cuda": ("pallas", "ragged"),
    "rocm": ("ragged",),
    "tpu": ("pallas", "ragged"),
}
# Implementations that read per-expert buffers in place (the others stack them: a copy per call).
PER_EXPERT_IMPLS = ("blocked", "native")
# "auto" splits layers with at most this many experts. Measured on XLA:CPU
# (benchmarks/moe_layer.py): a Mixtral-like layer (8 large experts) ran 1.2-1.3x
# faster split in prefill and 3.1x at one-token decode. A DeepSeek-like layer
# (64 small experts) also ran faster split in one run, but compiled ~6-9x slower
# (64 unrolled expert loops per layer), so many-expert layers stay stacked
# unless layout=per-expert asks for it.
AUTO_SPLIT_MAX_EXPERTS = 16
LAYOUTS = ("auto", "per-expert", "stacked")


@register_pass
@dataclasses.dataclass(frozen=True)
class SelectImpl(Pass):
    """Set the ``impl`` of every ``moe_expert_ffn`` and the layout of its weights.

    Options:
      impl: a registered implementation, or ``auto``: the fastest for the
        platform (on CPU ``native``, the C++ kernel for decode-sized inputs
        that runs ``blocked`` otherwise, or ``blocked`` where no C++ compiler
        is found; Pallas kernels on GPU/TPU; ``ragged_dot`` otherwise). All
        compute the same function. A layer whose activation or expert biases
        (gpt-oss) the chosen impl cannot compute gets ``ragged`` under
        ``auto``; an explicit impl that cannot is refused.
      layout: ``per-expert`` stores each expert's weights as its own buffer
        (what ``blocked`` and ``native`` read in place), ``stacked`` keeps ``[E, k, n]``
        arrays, ``auto`` splits for per-expert implementations on layers of
        at most 16 experts. Weights of scanned layers (``[L, E, k, n]``) and of
        expert-parallel programs always stay stacked.
    """

    name: ClassVar[str] = "select-impl"
    exact: ClassVar[bool] = True
    needs_weight_values: ClassVar[bool] = False  # a layout change is a re-arrangement: shapes suffice
    # Measured on CPU, reference -> ragged/blocked: tiny Mixtral f32 (float, int8 weights) up to 1.8e-6 = 5.5e-7 of
    # max|logit|; the default model 1.4e-5 = 7.5e-7 of max|logit|. ragged <-> blocked and bf16 models: bit-exact.
    # reference -> native (benchmarks/moe_layer.py, max abs deviation): up to 1.6e-6 (int8), 1.1e-6 (int4).
    tolerance: ClassVar[Tolerance | None] = Tolerance(1e-5, 1e-7, "ragged/blocked/native multiply only each expert's own rows, the reference all rows per expert: XLA blocks the f32 sums differently for different row counts, and the native kernel sums each quantization group before scaling it")
    # What __post_init__ (layout) and resolve (impl, when the pass runs) accept; shown by `moejax passes`.
    option_ranges: ClassVar[Mapping[str, str]] = {
        "impl": "auto, reference, ragged, blocked, native or pallas (any registered moe_expert_ffn implementation)",
        "layout": "auto, per-expert or stacked",
    }
    impl: str = "auto"
    layout: str = "auto"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"select-impl: layout={self.layout!r} is not one of {', '.join(LAYOUTS)}")

    def resolve(self, platform: str) -> str:
        available = dialect.ffn_impls()
        if self.impl != "auto":
            if self.impl not in available:
                raise PassError(f"select-impl: unknown impl {self.impl!r}; available: {', '.join(available)}, auto")
            return self.impl
        for choice in AUTO_CHOICES.get(platform, ("ragged",)):
            # "native" needs its C++ library, built on first use (no compiler: the next choice)
            if choice in available and (choice != "native" or native_build.available()):
                return choice
        return "ragged"

    def _wants_split(self, impl: str, weight: Any, program: Program) -> bool:
        if len(weight.shape) != 3 or "expert_parallel" in program.metadata:
            return False
        if self.layout == "per-expert":
            return True
        if self.layout == "stacked":
            return False
        return impl in PER_EXPERT_IMPLS and weight.shape[0] <= AUTO_SPLIT_MAX_EXPERTS

    def impl_for(self, impl: str, params: Mapping[str, Any]) -> str:
        """The impl one expert op gets: ``impl`` if it computes the op's activation (and expert biases); under
        ``auto`` else ``ragged``, which computes every activation with biases; an explicit impl that cannot is
        refused."""
        refusal = dialect.ffn_impl_refusal(impl, params["activation"], dialect.ffn_op_has_biases(params))
        if refusal is None:
            return impl
        if self.impl != "auto":
            raise PassError(f"select-impl: layer {params.get('name', '')!r}: {refusal}")
        return "ragged"

    def run(self, program: Program, ctx: PassContext) -> Program:
        impl = self.resolve(ctx.platform)
        per_layer = {s.eqn.params.get("name", ""): self.impl_for(impl, s.eqn.params)
                     for s in rewrite.dialect_sites(program.jaxpr, dialect.expert_ffn_p.name)}
        relaid: dict[str, Any] = {}
        layout: dict[str, str] = {}
        for path, (layer, _) in stats.expert_weight_sites(program).items():
            w = program.weights[path]
            want = self._wants_split(per_layer.get(layer, impl), w, program)
            if want != expert_layout.is_split(w):
                # once per source weight: the programs of one optimize call share the new buffers
                relaid[path] = ctx.derived_weight(
                    "split-experts" if want else "stack-experts", w,
                    lambda w=w, want=want: abstract.eval_or_shape(
                        lambda v: expert_layout.with_layout_of(v, want), w))
            layout[path] = "per-expert" if want else "stacked"
        return program.rewrite({dialect.expert_ffn_p.name: lambda rc: rewrite.rebind_expert_ffn(
                                    rc, impl=self.impl_for(impl, rc.params))},
                               weights=relaid, metadata={"expert_layout": layout})
