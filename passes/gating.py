"""``gating``: post-training dynamic gating (survey section 3.3.1), plus routing re-measurement.

:class:`DynamicGating` rewrites the ``routing`` param of every ``moe_route`` to one
of the dialect's adaptive modes:

* ``top_p``: the smallest set of experts whose probability mass reaches ``p``,
  capped at ``max_k`` ("Harder Tasks Need More Experts");
* ``threshold``: experts whose probability reaches ``t`` (XMoE), capped at ``max_k``;
* ``skip_ratio``: top-k, then secondary experts whose weight is below
  ``skip_ratio`` times the top weight are skipped (NAEE dynamic skipping).

Dropped slots carry expert id -1, which dispatch leaves out of the group sizes,
so they cost no expert FLOPs. After rewriting, the pass re-measures routing on
the calibration tokens and stores the measured ``mean_active`` experts per token
in ``metadata["routing_profile"]`` (which :mod:`moejax.stats` turns into active
expert FLOPs per token).

This module also holds the re-measurement helpers that the prune and merge
passes share: :func:`calibration_batches`, :func:`measure_routing_local` and
:func:`refresh_profile`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from moejax import dialect
from moejax.pipeline import Pass, PassContext, PassError, register_pass
from moejax.program import InputSignatureError, Program

__all__ = ["DynamicGating", "calibration_batches", "measure_routing_local", "refresh_profile",
           "mean_active_experts"]

PROFILE_KEY = "routing_profile"


# --------------------------------------------------------------------------
# Calibration data and routing measurement (shared with prune / merge).
# --------------------------------------------------------------------------
def calibration_batches(program: Program, batches: Sequence[Any] | None) -> list[np.ndarray] | None:
    """Token batches cut to the program's input shape, or None if it does not take tokens alone.

    A program is traced for fixed shapes, so calibration text is re-chunked into
    ``[B, S]`` windows of the program's own token input. Programs with other
    inputs (a KV-cache decode step) return None: their profile comes from the
    prefill program of the same ``optimize`` call.
    """
    if not batches:
        return None
    if len(program.in_avals) != 1:
        return None
    want = program.in_avals[0]
    if len(want.shape) != 2 or not jnp.issubdtype(want.dtype, jnp.integer):
        return None
    b, s = want.shape
    rows = []
    for batch in batches:
        arr = np.asarray(batch)
        if arr.ndim == 1:
            arr = arr[None]
        for row in arr:
            for start in range(0, row.shape[0] - s + 1, s):
                rows.append(row[start:start + s])
    if len(rows) < b:
        return None
    out = [np.stack(rows[i:i + b]).astype(want.dtype) for i in range(0, len(rows) - b + 1, b)]
    try:
        program.check_inputs((out[0],), {})
    except InputSignatureError:
        return None
    return out


def _route_tap_rule(ctx):
    """Tap per-expert counts, weight mass, co-activation and valid slots of one route op."""
    w, ids = ctx.bind()
    routing: dialect.Routing = ctx.params["routing"]
    router = ctx.invals[1]
    n_exp = routing.num_selected_experts(router.shape[-1])
    valid = ids >= 0
    onehot = jax.nn.one_hot(jnp.where(valid, ids, n_exp), n_exp, dtype=jnp.float32)  # [T,K,E]; -1 -> zeros
    per_token = onehot.sum(1)  # [T,E]
    name = ctx.name
    ctx.tap(f"{name}|counts", per_token.sum(0))
    ctx.tap(f"{name}|mass", jnp.einsum("tke,tk->e", onehot, w))
    ctx.tap(f"{name}|coactivation", per_token.T @ per_token)
    # [1]-shaped so that scanned layers give [L, 1] like the per-expert taps give [L, E]
    ctx.tap(f"{name}|active", valid.sum().astype(jnp.float32)[None])
    ctx.tap(f"{name}|tokens", jnp.full((1,), ids.shape[0], jnp.float32))
    return [w, ids]


def measure_routing_local(program: Program, batches: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Routing statistics of every MoE layer on ``batches`` (routing part of the profile).

    Returns ``{layer: {"counts", "frequency", "mass", "coactivation" ([S, ...] float64),
    "tokens", "mean_active"}}`` following the routing-profile contract (S = stacked
    layers). Hidden-state samples and expert output means are not measured here.
    """
    sums: dict[str, np.ndarray] = {}
    rules = {dialect.route_p.name: _route_tap_rule}
    for batch in batches:
        _, taps = program.run_with_taps(rules, batch)
        for key, val in taps.items():
            val = np.asarray(val, np.float64)
            sums[key] = sums.get(key, 0.0) + val
    layers = sorted({k.split("|")[0] for k in sums})
    out = {}
    for name in layers:
        stacked = sums[f"{name}|counts"].ndim == 2
        lift = (lambda a: a) if stacked else (lambda a: a[None])  # leading stack axis S
        counts = lift(sums[f"{name}|counts"])
        tokens, active = lift(sums[f"{name}|tokens"]), lift(sums[f"{name}|active"])  # [S, 1]
        total = np.maximum(counts.sum(-1, keepdims=True), 1e-12)
        out[name] = {
            "counts": counts,
            "frequency": counts / total,
            "mass": lift(sums[f"{name}|mass"]),
            "coactivation": lift(sums[f"{name}|coactivation"]),
            "tokens": int(tokens[0, 0]),
            "mean_active": float(np.sum(active) / max(np.sum(tokens), 1e-12)),
        }
    return out


def _upstream_measure():
    """The profile pass's full ``measure_routing`` when that module exists."""
    try:
        from moejax.passes.profile import measure_routing  # type: ignore[import-not-found]
    except ImportError:
        return None
    return measure_routing


def refresh_profile(program: Program, ctx: PassContext, key: Any, stale: dict[str, Any] | None,
                    carry_over: Sequence[str] = ("inputs",)) -> dict[str, Any] | None:
    """Re-measure the routing profile of ``program`` after a routing-changing pass.

    Measured on the calibration tokens (the profile pass's ``measure_routing`` when
    available, else :func:`measure_routing_local` with ``carry_over`` entries such
    as the hidden-state sample copied from ``stale``). The result is stored in
    ``ctx.analysis[key]`` so the decode program of the same ``optimize`` call
    (which cannot run calibration tokens) reuses it. Returns None when there is
    nothing to measure on.
    """
    batches = calibration_batches(program, ctx.calibration)
    if batches is None and ctx.calibration is None and ctx.example_args:
        batches = calibration_batches(program, [ctx.example_args[0]])
    if batches is None:
        return ctx.analysis.get(key)
    upstream = _upstream_measure()
    if upstream is not None:
        profile = upstream(program, batches)
    else:
        profile = measure_routing_local(program, batches)
        for name, entry in profile.items():
            old = (stale or {}).get(name, {})
            for k in carry_over:
                if k in old:
                    entry[k] = old[k]
    ctx.analysis[key] = profile
    return profile


def mean_active_experts(profile: dict[str, Any]) -> float:
    """Token-weighted mean active experts per token over every profiled layer."""
    num = den = 0.0
    for entry in profile.values():
        stack = np.asarray(entry["counts"]).shape[0]
        num += entry["mean_active"] * entry["tokens"] * stack
        den += entry["tokens"] * stack
    return num / den if den else 0.0


# --------------------------------------------------------------------------
# The pass.
# --------------------------------------------------------------------------
@register_pass
@dataclasses.dataclass(frozen=True)
class DynamicGating(Pass):
    """Adaptive post-training routing: top-p, threshold, or skipping low-weight experts.

    Options (exactly one of the first three):
      top_p: keep the smallest set of experts whose probability mass reaches ``top_p``.
      threshold: keep the experts whose routing probability reaches ``threshold``.
      skip_ratio: keep top-k, but skip experts whose weight is below ``skip_ratio``
        times the top expert's weight.
      max_k: the cap on experts per token for ``top_p``/``threshold`` (default: the
        model's k). Every token keeps at least its best expert.
      renormalize: renormalise the kept weights to sum to 1 (default: keep the
        model's own ``norm_topk``).

    Pipeline spelling: ``gating(top_p=0.6,max_k=2)``.
    """

    name: ClassVar[str] = "gating"
    exact: ClassVar[bool] = False
    provides: ClassVar[tuple[str, ...]] = (PROFILE_KEY,)

    top_p: float | None = None
    threshold: float | None = None
    skip_ratio: float | None = None
    max_k: int | None = None
    renormalize: bool | None = None

    def __post_init__(self):
        modes = [m for m in ("top_p", "threshold", "skip_ratio") if getattr(self, m) is not None]
        if len(modes) != 1:
            got = ", ".join(f"{m}={getattr(self, m)}" for m in modes) or "none"
            raise ValueError(f"gating needs exactly one of top_p, threshold, skip_ratio (got {got}); "
                             "e.g. gating(top_p=0.6)")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"gating: top_p must be in (0, 1], got {self.top_p}")
        if self.threshold is not None and not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"gating: threshold must be in [0, 1), got {self.threshold}")
        if self.skip_ratio is not None and not 0.0 < self.skip_ratio <= 1.0:
            raise ValueError(f"gating: skip_ratio must be in (0, 1], got {self.skip_ratio}")
        if self.max_k is not None:
            if isinstance(self.max_k, bool) or not isinstance(self.max_k, int) or self.max_k < 1:
                raise ValueError(f"gating: max_k must be an integer >= 1, got {self.max_k!r}")
            if self.skip_ratio is not None:
                raise ValueError("gating: max_k caps top_p/threshold gating; skip_ratio keeps at most the "
                                 "model's k experts, so drop max_k")
        if self.renormalize is not None and not isinstance(self.renormalize, bool):
            raise ValueError(f"gating: renormalize must be true or false, got {self.renormalize!r}")

    @property
    def mode(self) -> str:
        if self.top_p is not None:
            return "top_p"
        return "threshold" if self.threshold is not None else "skip"

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
        else:
            changes.update(skip_ratio=float(self.skip_ratio))
        if self.renormalize is not None:
            changes["norm_topk"] = self.renormalize
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
        stale = program.metadata.get(PROFILE_KEY)
        profile = refresh_profile(new, ctx, ("gating", id(self)), stale)
        if profile is None:
            return new
        notes = dict(new.metadata.get("notes", {}))
        notes[str(self)] = f"measured mean active experts per token: {mean_active_experts(profile):.3f}"
        return new.replace(metadata={**new.metadata, PROFILE_KEY: profile, "notes": notes})
