"""``gating``: post-training dynamic gating (survey section 3.3.1), plus routing re-measurement.

:class:`DynamicGating` rewrites the ``routing`` param of every ``moe_route`` to one
of the dialect's adaptive modes:

* ``top_p``: the smallest set of experts whose probability mass reaches ``p``,
  capped at ``max_k`` ("Harder Tasks Need More Experts");
* ``threshold``: experts whose probability reaches ``t`` (XMoE), capped at ``max_k``;
* ``skip_ratio``: top-k, then secondary experts whose weight is below
  ``skip_ratio`` times the top weight are skipped (NAEE dynamic skipping).
* ``min_weight``: top-k, then experts whose share of the token's top-k weight is
  below ``min_weight`` are skipped.

``renormalize=false`` leaves each kept expert the weight the full top-k gave it,
so a skipped expert costs only what it would have added.

Dropped slots carry expert id -1, which dispatch leaves out of the group sizes,
so they cost no expert FLOPs. After rewriting, the pass re-measures routing on
the calibration tokens and stores the measured ``mean_active`` experts per token
in ``metadata["routing_profile"]`` (which :mod:`moejax.stats` turns into active
expert FLOPs per token).

This module also holds :func:`refresh_profile`, the re-measurement that the
prune and merge passes share.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar


from moejax import analysis, dialect
from moejax.pipeline import Pass, PassContext, PassError, register_pass, with_note
from moejax.program import Program

__all__ = ["DynamicGating", "refresh_profile", "with_remeasured_profile", "mean_active_experts"]

PROFILE_KEY = analysis.RoutingProfile.key


# --------------------------------------------------------------------------
# Re-measuring routing after a pass changed it (shared with prune / merge).
# --------------------------------------------------------------------------
def refresh_profile(program: Program, ctx: PassContext, step: str) -> analysis.RoutingProfile | None:
    """Re-measure the routing profile of ``program`` after a routing-changing pass (pipeline ``step``).

    Runs the profile pass's :func:`moejax.passes.profile.measure_routing` on the
    same calibration tokens the profile pass uses (``ctx.calibration``, else its
    default text / example inputs). The result is stored in ``ctx.analysis``
    under ``step`` so that the decode program of the same ``optimize`` call,
    which cannot run token batches, reuses it. Returns None when there is
    nothing to measure on.
    """
    from moejax.passes.profile import ProfileRouting, measure_routing, token_input_shape

    try:
        token_input_shape(program)
    except PassError:  # a decode-step program: reuse what the prefill run measured
        return ctx.analysis.get(analysis.RoutingProfile, step)
    try:
        batches, _ = ProfileRouting()._calibration(program, ctx)
    except PassError:
        return None
    return ctx.analysis.put(step, measure_routing(program, batches))


def with_remeasured_profile(program: Program, ctx: PassContext, step: str) -> dict[str, Any]:
    """``program.metadata`` after a pass changed routing (pipeline ``step``): the routing profile re-measured.

    A profile that cannot be re-measured is dropped: it would describe the old
    routing (experts that are gone, routers that were retrained). Metadata without
    a profile is returned as it is.
    """
    meta = dict(program.metadata)
    if PROFILE_KEY not in meta:
        return meta
    profile = refresh_profile(program, ctx, step)
    if profile is None:
        meta.pop(PROFILE_KEY)
        return meta
    return analysis.write(meta, profile)


def mean_active_experts(profile: analysis.RoutingProfile | Mapping[str, Any]) -> float:
    """Token-weighted mean active experts per token over every profiled layer."""
    return analysis.RoutingProfile.from_metadata(profile).mean_active()


# --------------------------------------------------------------------------
# The pass.
# --------------------------------------------------------------------------
@register_pass
@dataclasses.dataclass(frozen=True)
class DynamicGating(Pass):
    """Adaptive post-training routing: top-p, threshold, or skipping low-weight experts.

    Options (exactly one of the first four):
      top_p: keep the smallest set of experts whose probability mass reaches ``top_p``.
      threshold: keep the experts whose routing probability reaches ``threshold``.
      skip_ratio: keep top-k, but skip experts whose weight is below ``skip_ratio``
        times the top expert's weight.
      min_weight: keep top-k, but skip experts whose share of the token's top-k
        weight is below ``min_weight`` (what a skipped expert would have added
        scales with its weight, not with its ratio to the top one).
      max_k: the cap on experts per token for ``top_p``/``threshold`` (default: the
        model's k). Every token keeps at least its best expert.
      renormalize: ``true``: the kept weights are renormalised to sum to 1, so the
        dropped experts' share goes to the kept ones; ``false``: each kept expert
        keeps the weight the model's full top-k gives it and the dropped share is
        left out (``Routing.renormalize_kept``; on the fine-grained model this moves
        each layer's output 4-6x less at the same active experts). Default: the
        model's own ``norm_topk``, renormalising what is kept.

    Pipeline spelling: ``gating(top_p=0.6,max_k=2)``, ``gating(min_weight=0.14,renormalize=false)``.
    """

    name: ClassVar[str] = "gating"
    exact: ClassVar[bool] = False
    # What __post_init__ (and new_routing, for max_k) accepts; shown by `moejax passes`.
    option_ranges: ClassVar[Mapping[str, str]] = {
        "top_p": "number in (0, 1], or none; exactly one of top_p, threshold, skip_ratio, min_weight",
        "threshold": "number in [0, 1), or none; exactly one of top_p, threshold, skip_ratio, min_weight",
        "skip_ratio": "number in (0, 1], or none; exactly one of top_p, threshold, skip_ratio, min_weight",
        "min_weight": "number in (0, 1), or none; exactly one of top_p, threshold, skip_ratio, min_weight",
        "max_k": "integer >= 1, at most the layer's experts, or none; not with skip_ratio or min_weight",
        "renormalize": "true, false or none (none: the model's norm_topk, renormalised over the kept experts)",
    }

    top_p: float | None = None
    threshold: float | None = None
    skip_ratio: float | None = None
    min_weight: float | None = None
    max_k: int | None = None
    renormalize: bool | None = None

    def __post_init__(self):
        modes = [m for m in ("top_p", "threshold", "skip_ratio", "min_weight") if getattr(self, m) is not None]
        if len(modes) != 1:
            got = ", ".join(f"{m}={getattr(self, m)}" for m in modes) or "none"
            raise ValueError(f"gating needs exactly one of top_p, threshold, skip_ratio, min_weight (got {got}); "
                             "e.g. gating(top_p=0.6)")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"gating: top_p must be in (0, 1], got {self.top_p}")
        if self.threshold is not None and not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"gating: threshold must be in [0, 1), got {self.threshold}")
        if self.skip_ratio is not None and not 0.0 < self.skip_ratio <= 1.0:
            raise ValueError(f"gating: skip_ratio must be in (0, 1], got {self.skip_ratio}")
        if self.min_weight is not None and not 0.0 < self.min_weight < 1.0:
            raise ValueError(f"gating: min_weight must be in (0, 1), got {self.min_weight}")
        if self.max_k is not None:
            if isinstance(self.max_k, bool) or not isinstance(self.max_k, int) or self.max_k < 1:
                raise ValueError(f"gating: max_k must be an integer >= 1, got {self.max_k!r}")
            if self.mode in ("skip", "min_weight"):
                raise ValueError(f"gating: max_k caps top_p/threshold gating; {modes[0]} keeps at most the "
                                 "model's k experts, so drop max_k")
        if self.renormalize is not None and not isinstance(self.renormalize, bool):
            raise ValueError(f"gating: renormalize must be true or false, got {self.renormalize!r}")

    @property
    def mode(self) -> str:
        """The ``Routing.gating`` mode this pass sets."""
        if self.top_p is not None:
            return "top_p"
        if self.threshold is not None:
            return "threshold"
        return "skip" if self.skip_ratio is not None else "min_weight"

    def new_routing(self, routing: dialect.Routing, num_router_experts: int, layer: str) -> dialect.Routing:
        """The routing param after this pass, for one layer."""
        max_k = self.max_k if self.max_k is not None else routing.k
        if self.max_k is not None and max_k > num_router_experts:
            raise PassError(f"pass {self}: max_k={max_k} exceeds the {num_router_experts} experts of layer "
                            f"{layer}; use max_k <= {num_router_experts}")
        changes: dict[str, Any] = {"gating": self.mode}
        if self.mode == "top_p":
            changes.update(top_p=float(self.top_p), max_k=max_k)
        elif self.mode == "threshold":
            changes.update(threshold=float(self.threshold), max_k=max_k)
        elif self.mode == "skip":
            changes.update(skip_ratio=float(self.skip_ratio))
        else:
            changes.update(min_weight=float(self.min_weight))
        if self.renormalize:
            changes.update(norm_topk=True, renormalize_kept=True)
        elif self.renormalize is not None:  # false: the model's own normalisation over its full top-k
            changes["renormalize_kept"] = False
        return dataclasses.replace(routing, **changes)

    def check(self, program: Program, ctx: PassContext) -> None:
        from moejax.rewrite import dialect_sites

        sites = dialect_sites(program.jaxpr, dialect.route_p.name)
        if not sites:
            raise PassError(f"pass {self}: the program has no moe_route op to gate (is it a MoE model?)")
        for site in sites:
            self.new_routing(site.eqn.params["routing"], site.eqn.invars[1].aval.shape[-1], site.name)

    def run(self, program: Program, ctx: PassContext) -> Program:
        def rule(rc):
            routing = self.new_routing(rc.params["routing"], rc.invals[1].shape[-1], rc.name)
            return rc.bind(routing=routing)

        new = program.rewrite({dialect.route_p.name: rule})
        profile = refresh_profile(new, ctx, ctx.step(self))
        if profile is None:
            return new
        return new.replace(metadata=with_note(analysis.write(new.metadata, profile), str(self),
                                              f"measured mean active experts per token: {profile.mean_active():.3f}"))
