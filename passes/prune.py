"""``prune``: remove experts per layer (survey sections 3.2.1 / 3.3.2), plus expert-surgery helpers.

:class:`PruneExperts` keeps ``num_experts`` experts (or a fraction ``keep``) in every
MoE layer, chosen by

* ``reap``: REAP (arXiv 2510.13999), the experts with the largest mean over the
  tokens routed to them of gate weight x expert output norm, on the profile's
  hidden-state sample (:func:`reap_saliency`);
* ``naee`` (also ``reconstruction``): NAEE-style, the subset whose layer output on
  the profile's hidden-state sample is closest (squared error) to the output with
  every expert; exhaustive over subsets when there are at most ``exhaustive_limit``
  of them, greedy (drop the least harmful expert, repeat) otherwise;
* ``frequency``: the most often routed experts of the routing profile;
* ``mass``: the experts with the largest summed routing weight.

With ``budget=global`` the same total is spread over layers: each layer's experts
are ranked by the method, the change of each layer's output as it loses experts is
measured (:func:`removal_errors`) and experts are taken where they cost least
(:func:`allocate_global`). For input-weighted routing (Llama 4) the reconstruction
and REAP scores use the unscaled tokens, an approximation.

The pruned experts' weight slices, router columns and selection-bias entries
are removed, so routing renormalises over the survivors; ``moe_dispatch`` gets
the new expert count. Layers stacked under ``scan`` keep the same count per
layer; each layer keeps its own experts (the stacked weights are sliced row by
row). Quantized experts in a stacked format (int8/int4, FP8 blocks loaded from a
DeepSeek-V3 checkpoint, ...) are sliced as stored, so a model pruned from an FP8
checkpoint stays FP8 (the reconstruction method scores their dequantized values).

This module also holds what the merge pass shares: :func:`find_moe_layers`
(which program weights feed each MoE layer), :func:`check_float_experts` and
:func:`expert_outputs`.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from moejax import analysis, dataflow, dialect
from moejax import weight_formats as wf
from moejax.passes.gating import PROFILE_KEY, with_remeasured_profile
from moejax.pipeline import Pass, PassContext, PassError, register_pass, with_note
from moejax.program import Program

__all__ = ["PruneExperts", "MoELayer", "reap_saliency", "removal_errors", "allocate_global", "find_moe_layers",
           "check_float_experts", "check_sliceable_experts",
           "expert_outputs",
           "layer_output", "dense_gates", "layer_gates", "prune_plan_reconstruction", "apply_expert_rewrite",
           "layer_profile"]


# --------------------------------------------------------------------------
# Which program weights feed each MoE layer.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MoELayer:
    """The weights and routing of one MoE layer name, as found by data flow.

    ``stacked``: the weights carry a leading layer axis (the layer runs under
    ``scan``); ``num_experts`` is the number of experts the routed ids name (the
    expert weights' expert axis), ``num_router`` the router's columns (they
    differ after merging, where ``routing.expert_map`` maps columns to experts).
    """

    name: str
    router: str
    bias: str | None
    experts: tuple[str, ...]
    stacked: bool
    routing: dialect.Routing
    num_experts: int
    num_router: int
    activation: str
    weight_format: str

    def stack_size(self, program: Program) -> int:
        return int(np.shape(program.weights[self.router])[0]) if self.stacked else 1


def find_moe_layers(program: Program, who: str) -> dict[str, MoELayer]:
    """Every MoE layer of ``program`` with the weight paths feeding its router and experts.

    ``who`` names the calling pass in errors. Raises :class:`PassError` when a
    layer's weights are not program weights passed unchanged (e.g. computed
    inside the program) or are sliced by nested scans.
    """
    leaves = dataflow.leaf_owners(program)
    by_name: dict[str, dict[str, Any]] = {}
    for read in dataflow.weight_reads(program, lambda e: dialect.is_dialect_primitive(e.primitive)):
        eqn, srcs = read.eqn, read.operands
        entry = by_name.setdefault(eqn.params.get("name", ""), {})
        op = eqn.primitive.name
        if op in entry and entry[op][1] != srcs:
            raise PassError(f"{who}: layer name {eqn.params.get('name')!r} is used by two {op} ops with different "
                            "weights; every MoE layer needs a unique name")
        entry[op] = (eqn, srcs)
    layers = {}
    for name, entry in by_name.items():
        missing = [op for op in ("moe_route", "moe_dispatch", "moe_expert_ffn") if op not in entry]
        if missing:
            raise PassError(f"{who}: layer {name!r} has no {', '.join(missing)} op (replaced by an expert-parallel "
                            f"or fused region?); run {who} before such passes")
        route, rsrc = entry["moe_route"]
        ffn, fsrc = entry["moe_expert_ffn"]
        dispatch, _ = entry["moe_dispatch"]
        operands = [("router", rsrc[1])] + ([("selection bias", rsrc[2])] if len(rsrc) > 2 else []) + \
            [(f"expert weight {i}", s) for i, s in enumerate(fsrc[2:])]
        depths = set()
        for what, src in operands:
            if src is None:
                raise PassError(f"{who}: the {what} of layer {name!r} is computed inside the program, not a program "
                                f"weight passed unchanged; {who} can only edit stored weights (run it earlier)")
            depths.add(src.sliced_axes)
        if len(depths) != 1 or max(depths) > 1:
            raise PassError(f"{who}: the weights of layer {name!r} are sliced by {sorted(depths)} nested scans; "
                            f"{who} supports unrolled layers or one scan over stacked layers")
        expert_paths = []
        for _, src in operands[len(rsrc) - 1:]:
            path = leaves[src.input].path
            if path not in expert_paths:
                expert_paths.append(path)
        router_path = leaves[rsrc[1].input].path
        if leaves[rsrc[1].input].structured:
            raise PassError(f"{who}: the router weight of layer {name!r} ({router_path}) is a structured "
                            f"(quantized or merged) value; {who} needs a plain float router")
        layers[name] = MoELayer(
            name=name, router=router_path, bias=leaves[rsrc[2].input].path if len(rsrc) > 2 else None,
            experts=tuple(expert_paths), stacked=depths.pop() == 1, routing=route.params["routing"],
            num_experts=int(dispatch.params["num_experts"]), num_router=int(route.invars[1].aval.shape[-1]),
            activation=ffn.params["activation"], weight_format=ffn.params["weight_format"])
    if not layers:
        raise PassError(f"{who}: the program has no MoE layers (no moe_* ops)")
    return layers


def check_float_experts(program: Program, layers: dict[str, MoELayer], who: str) -> None:
    """Reject quantized expert weights: merging or pruning must come before quantization."""
    for layer in layers.values():
        quantized = [p for p in layer.experts if wf.is_structured(program.weights[p])]
        if layer.weight_format != "float" or quantized:
            fmt = layer.weight_format if layer.weight_format != "float" else program.weights[quantized[0]].format
            raise PassError(f"{who}: layer {layer.name!r} has quantized expert weights ({fmt}); {who} averages or "
                            f"slices float weights, so it must run before quantize: reorder the pipeline, "
                            f"e.g. 'profile,{who}(...),quantize(...)'")


def check_sliceable_experts(program: Program, layers: dict[str, MoELayer], who: str) -> None:
    """Reject expert weights that cannot be cut along their expert axis leaf by leaf.

    Float experts and every stacked storage format (int8/int4, FP8 blocks as a
    DeepSeek-V3 checkpoint ships them, MXFP4, ...) keep the expert axis leading in
    each leaf, so keeping experts is slicing; a width per expert (mixed) or one
    buffer per expert (select-impl's layout) is not.
    """
    for layer in layers.values():
        for p in layer.experts:
            w = program.weights[p]
            if isinstance(w, wf.MixedExpertTensor) or (wf.is_structured(w) and getattr(w, "layout", "") ==
                                                       "per-expert"):
                raise PassError(f"{who}: expert weight {p} of layer {layer.name!r} is stored as {w.format} "
                                f"({type(w).__name__}), which cannot be cut along one expert axis; run {who} before "
                                f"quantize(mixed=true) and select-impl")


def layer_profile(program: Program, layer: MoELayer, who: str, keys: Sequence[str]) -> analysis.LayerRouting:
    """The routing-profile entry of ``layer``, checked to describe the current experts and to hold ``keys``."""
    profile = analysis.read(program.metadata, analysis.RoutingProfile)
    entry = profile.layers.get(layer.name) if profile is not None else None
    if entry is None:
        raise PassError(f"{who}: the routing profile has no entry for layer {layer.name!r}; run 'profile' "
                        f"right before {who}")
    stack = layer.stack_size(program)
    counts = entry.counts
    if counts.shape != (stack, layer.num_experts):
        raise PassError(f"{who}: the routing profile of layer {layer.name!r} describes {counts.shape[-1]} experts "
                        f"x {counts.shape[0]} stacked layers but the program has {layer.num_experts} x {stack} "
                        f"(stale profile); run 'profile' again right before {who}")
    missing = [k for k in keys if getattr(entry, k) is None]
    if missing:
        raise PassError(f"{who}: the routing profile of layer {layer.name!r} lacks {missing}; run 'profile' "
                        f"right before {who}")
    return entry


# --------------------------------------------------------------------------
# Expert outputs and layer outputs on the profile's hidden-state sample.
# --------------------------------------------------------------------------
def _row(program: Program, path: str, layer: MoELayer, s: int) -> np.ndarray:
    w = program.weights[path]
    w = np.asarray(wf.dequantize(w) if wf.is_structured(w) else w, np.float32)  # quantized experts: their values
    return w[s] if layer.stacked else w


def expert_outputs(program: Program, layer: MoELayer, s: int, x: np.ndarray) -> np.ndarray:
    """Output of every expert of stack row ``s`` on tokens ``x [n, d]``: ``[E, n, d]`` float32."""
    mats = [jnp.asarray(_row(program, p, layer, s)) for p in layer.experts]
    return np.asarray(dialect.expert_ffn_math(jnp.asarray(x, jnp.float32), mats, layer.activation))


_route_jit = jax.jit(dialect.route_reference, static_argnames=("routing", "name", "impl"))


def dense_gates(x: np.ndarray, router: np.ndarray, bias: np.ndarray | None, routing: dialect.Routing,
                num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Route ``x [n, d]``: the gate weight of every (token, expert) pair ``[n, E]`` (0 where not picked) and
    the ``[n, E]`` mask of the pairs that were picked."""
    args = (x, router) if bias is None else (x, router, bias)
    w, ids = (np.asarray(a) for a in _route_jit(*args, routing=routing))
    gates = np.zeros((x.shape[0], num_experts), np.float64)
    picked = np.zeros((x.shape[0], num_experts), bool)
    rows, flat = np.repeat(np.arange(x.shape[0]), ids.shape[1]), ids.reshape(-1)
    ok = flat >= 0
    np.add.at(gates, (rows[ok], flat[ok]), w.reshape(-1)[ok])
    picked[rows[ok], flat[ok]] = True
    return gates, picked


def layer_gates(program: Program, layer: MoELayer, s: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`dense_gates` of stack row ``s`` of ``layer`` with the program's router weights."""
    router = _row(program, layer.router, layer, s)
    bias = _row(program, layer.bias, layer, s) if layer.bias else None
    return dense_gates(x, router, bias, layer.routing, layer.num_experts)


def layer_output(x: np.ndarray, router: np.ndarray, bias: np.ndarray | None, routing: dialect.Routing,
                 outputs: np.ndarray) -> np.ndarray:
    """MoE output ``[n, d]`` from routing ``x`` and per-expert outputs ``[E, n, d]``."""
    gates, _ = dense_gates(x, router, bias, routing, outputs.shape[0])
    return np.einsum("ne,end->nd", gates.astype(np.float32), outputs)


def _subset_routing(routing: dialect.Routing, num_router: int, keep: Sequence[int]) -> tuple[list[int], dialect.Routing]:
    """Router columns that survive keeping experts ``keep`` (sorted), and the routing over them."""
    if routing.expert_map is None:
        return list(keep), routing
    pos = {e: i for i, e in enumerate(keep)}
    cols = [c for c in range(num_router) if routing.expert_map[c] in pos]
    new_map = tuple(pos[routing.expert_map[c]] for c in cols)
    return cols, dataclasses.replace(routing, expert_map=new_map)


def prune_plan_reconstruction(program: Program, layer: MoELayer, s: int, x: np.ndarray, keep_count: int,
                              exhaustive_limit: int) -> tuple[list[int], float]:
    """NAEE: the ``keep_count`` experts whose layer output best reconstructs the full layer on ``x``.

    Returns (kept expert ids, relative squared error).
    """
    router = _row(program, layer.router, layer, s)
    bias = _row(program, layer.bias, layer, s) if layer.bias else None
    outs = expert_outputs(program, layer, s, x)
    full = layer_output(x, router, bias, layer.routing, outs)
    norm = max(float(np.sum(full ** 2)), 1e-30)

    def error(keep):
        cols, routing = _subset_routing(layer.routing, layer.num_router, keep)
        y = layer_output(x, router[:, cols], None if bias is None else bias[cols], routing, outs[list(keep)])
        return float(np.sum((y - full) ** 2)) / norm

    e = layer.num_experts
    if math.comb(e, keep_count) <= exhaustive_limit:
        best = min(itertools.combinations(range(e), keep_count), key=error)
        return list(best), error(best)
    keep = list(range(e))
    while len(keep) > keep_count:  # greedy: drop the expert whose removal hurts least
        keep = min(([x_ for x_ in keep if x_ != d] for d in keep), key=error)
    return keep, error(keep)


# --------------------------------------------------------------------------
# Applying a new expert set: weights, router columns, routing params.
# --------------------------------------------------------------------------
def apply_expert_rewrite(program: Program, layers: dict[str, MoELayer], new_weights: dict[str, Any],
                         routings: dict[str, dialect.Routing], num_experts: dict[str, int]) -> Program:
    """Re-trace with replaced weights and each layer's new routing param and expert count."""

    def route_rule(ctx):
        if ctx.name in routings:
            return ctx.bind(routing=routings[ctx.name])
        return None

    def dispatch_rule(ctx):
        if ctx.name in num_experts:
            return ctx.bind(num_experts=num_experts[ctx.name])
        return None

    return program.rewrite({dialect.route_p.name: route_rule, dialect.dispatch_p.name: dispatch_rule},
                           weights=new_weights)


def _check_target(layer: MoELayer, target: int, who: str) -> None:
    if target > layer.num_experts:
        raise PassError(f"{who}: num_experts={target} is above the {layer.num_experts} experts layer {layer.name!r} "
                        f"has now; choose num_experts <= {layer.num_experts}")
    if layer.routing.n_group > 1:
        raise PassError(f"{who}: layer {layer.name!r} uses group-limited routing (n_group={layer.routing.n_group}); "
                        f"removing experts would break its expert groups. {who} supports n_group=1 only")


def _with_profile(new: Program, ctx: PassContext, step: str, note_key: str, note: str,
                  plan: analysis.AnalysisResult) -> Program:
    """``new`` with ``plan`` and the re-measured profile in its metadata, and a note."""
    meta = analysis.write(with_remeasured_profile(new, ctx, step), plan)
    return new.replace(metadata=with_note(meta, note_key, note))


PRUNE_METHODS = ("reap", "naee", "reconstruction", "frequency", "mass")
BUDGETS = ("uniform", "global")


def reap_saliency(program: Program, layer: MoELayer, s: int, x: np.ndarray) -> np.ndarray:
    """REAP (arXiv 2510.13999): per expert, the mean over the tokens routed to it of gate weight x output norm.

    ``x [n, d]`` are the layer's input tokens (the profile's sample). An expert no
    sampled token routes to scores 0: it is the first to go.
    """
    gates, picked = layer_gates(program, layer, s, x)
    norms = np.linalg.norm(expert_outputs(program, layer, s, x), axis=-1)  # [E, n]
    routed = picked.sum(axis=0)
    return np.where(routed > 0, (gates * norms.T).sum(axis=0) / np.maximum(routed, 1), 0.0)


def removal_errors(program: Program, layer: MoELayer, s: int, x: np.ndarray, order: Sequence[int],
                   smallest: int) -> np.ndarray:
    """Relative squared change of the layer output when keeping the first ``k`` of ``order``.

    Returns ``err [E + 1]`` with ``err[k]`` for ``k`` from ``smallest`` to E (NaN below):
    how much a layer's output moves as it loses experts, relative to the output itself
    so that layers compare (deeper layers write larger vectors into the residual
    stream; an absolute error would send every removal to the early layers).
    """
    router = _row(program, layer.router, layer, s)
    bias = _row(program, layer.bias, layer, s) if layer.bias else None
    outs = expert_outputs(program, layer, s, x)
    full = layer_output(x, router, bias, layer.routing, outs)
    err = np.full(layer.num_experts + 1, np.nan)
    err[layer.num_experts] = 0.0
    for k in range(smallest, layer.num_experts):
        keep = sorted(order[:k])
        cols, routing = _subset_routing(layer.routing, layer.num_router, keep)
        y = layer_output(x, router[:, cols], None if bias is None else bias[cols], routing, outs[keep])
        err[k] = float(np.sum((y - full) ** 2)) / max(float(np.sum(full ** 2)), 1e-30)
    return err


def allocate_global(curves: Mapping[str, Sequence[float]], total: int, smallest: Mapping[str, int],
                    who: str = "prune") -> dict[str, int]:
    """Experts per layer summing to ``total``: greedily take away the expert whose loss moves a layer least.

    ``curves[name][k]`` is the layer's error when it keeps ``k`` experts (see
    :func:`removal_errors`); no layer goes below ``smallest[name]``. ``who`` names
    the calling pass in the error.
    """
    counts = {name: len(c) - 1 for name, c in curves.items()}
    while sum(counts.values()) > total:
        options = [(curves[n][counts[n] - 1] - curves[n][counts[n]], n) for n in counts if counts[n] > smallest[n]]
        if not options:
            raise PassError(f"{who}: a global budget of {total} experts is below what the layers must keep "
                            f"({sum(smallest.values())}: each layer keeps at least its experts per token)")
        counts[min(options)[1]] -= 1
    return counts


@register_pass
@dataclasses.dataclass(frozen=True)
class PruneExperts(Pass):
    """Keep ``num_experts`` experts (or a fraction ``keep``) per MoE layer; the rest are removed.

    Options:
      num_experts: experts kept per layer; or
      keep: the fraction of each layer's experts kept (rounded, at least the experts per token).
      method: how the kept experts are chosen:
        ``reap`` (router-weighted expert activation pruning: mean gate weight x output norm
        over the tokens routed to each expert), ``naee`` (also spelled ``reconstruction``:
        the subset whose layer output changes least on the profile's sample), the most often
        routed (``frequency``) or the largest summed routing weight (``mass``).
      budget: ``uniform`` (every layer keeps the same count) or ``global`` (the same total,
        distributed over layers by measured sensitivity: an expert is taken from the layer
        whose output moves least; unrolled layers only).
      exhaustive_limit: ``naee`` tries every subset when there are at most this many, else
        prunes greedily.

    Needs a routing profile (``profile`` before it). Pipeline spelling:
    ``prune(keep=0.75,method=reap,budget=global)``.
    """

    name: ClassVar[str] = "prune"
    exact: ClassVar[bool] = False
    needs_stacked_experts: ClassVar[bool] = True
    needs: ClassVar[tuple[str, ...]] = (PROFILE_KEY,)
    provides: ClassVar[tuple[str, ...]] = (analysis.PrunePlan.key,)
    # What __post_init__ and check accept; shown by `moejax passes`.
    option_ranges: ClassVar[Mapping[str, str]] = {
        "num_experts": "integer >= 1, at most the layer's experts, at least its experts per token",
        "keep": "number in (0, 1]: fraction of each layer's experts kept",
        "method": ", ".join(PRUNE_METHODS),
        "budget": "uniform or global",
        "exhaustive_limit": "integer >= 1",
    }

    num_experts: int | None = None
    keep: float | None = None
    method: str = "frequency"
    budget: str = "uniform"
    exhaustive_limit: int = 5000

    def __post_init__(self):
        if (self.num_experts is None) == (self.keep is None):
            raise ValueError("prune needs exactly one of num_experts=N (experts kept per layer) or keep=FRACTION, "
                             "e.g. prune(num_experts=6) or prune(keep=0.75)")
        if self.num_experts is not None and (isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int)
                                             or self.num_experts < 1):
            raise ValueError(f"prune: num_experts must be an integer >= 1, got {self.num_experts!r}")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, (int, float))
                                      or not 0 < self.keep <= 1):
            raise ValueError(f"prune: keep must be a fraction in (0, 1], got {self.keep!r}")
        if self.method not in PRUNE_METHODS:
            raise ValueError(f"prune: method must be one of {PRUNE_METHODS}, got {self.method!r}")
        if self.budget not in BUDGETS:
            raise ValueError(f"prune: budget must be one of {BUDGETS}, got {self.budget!r}")
        if self.exhaustive_limit < 1:
            raise ValueError(f"prune: exhaustive_limit must be >= 1, got {self.exhaustive_limit}")

    @staticmethod
    def _min_keep(layer: MoELayer) -> int:
        r = layer.routing
        return r.slots if r.expert_map is None else 1

    def target(self, layer: MoELayer) -> int:
        """Experts ``layer`` keeps under a uniform budget."""
        if self.num_experts is not None:
            return self.num_experts
        return max(self._min_keep(layer), min(layer.num_experts, round(self.keep * layer.num_experts)))

    def _needed(self) -> tuple[str, ...]:
        needed = {"frequency": (), "mass": ("mass",)}.get(self.method, ("inputs",))
        return needed + (("inputs",) if self.budget == "global" and "inputs" not in needed else ())

    def check(self, program: Program, ctx: PassContext) -> None:
        layers = find_moe_layers(program, self.name)
        check_sliceable_experts(program, layers, self.name)
        for layer in layers.values():
            _check_target(layer, self.target(layer), self.name)
            r = layer.routing
            kept_slots = self._min_keep(layer)
            if kept_slots > self.target(layer):
                raise PassError(f"prune: layer {layer.name!r} routes every token to {kept_slots} experts; keep at "
                                f"least that many (num_experts >= {kept_slots})")
            if layer.stacked and r.expert_map is not None:
                raise PassError(f"prune: layer {layer.name!r} is stacked under scan and already merged "
                                "(expert_map); pruning merged experts differently per layer needs a per-layer "
                                "expert_map. Prune before merging, or unroll the layers (scan_layers=False)")
            if layer.stacked and self.budget == "global":
                raise PassError(f"prune: budget=global gives layers different expert counts, but layer "
                                f"{layer.name!r} is stacked under scan (one count for all); use budget=uniform "
                                "or unroll the layers (scan_layers=False)")
            layer_profile(program, layer, self.name, self._needed())

    def ranking(self, program: Program, layer: MoELayer, s: int) -> tuple[list[int], float | None]:
        """Experts of stack row ``s`` best first, and (``naee``) the relative error of keeping the target count."""
        entry = layer_profile(program, layer, self.name, self._needed())
        if self.method in ("naee", "reconstruction"):
            x = np.asarray(entry.inputs[s], np.float32)
            keep, err = prune_plan_reconstruction(program, layer, s, x, self.target(layer), self.exhaustive_limit)
            rest = [e for e in range(layer.num_experts) if e not in keep]
            return list(keep) + rest, err  # (a global budget re-ranks the rest by removal error)
        if self.method == "reap":
            score = reap_saliency(program, layer, s, np.asarray(entry.inputs[s], np.float32))
        else:
            score = np.asarray((entry.counts if self.method == "frequency" else entry.mass)[s], np.float64)
        return [int(e) for e in np.argsort(-score, kind="stable")], None

    def plans(self, program: Program, layers: Mapping[str, MoELayer]) -> dict[str, analysis.LayerPrune]:
        """Kept experts per layer and stack row, under the chosen budget."""
        ranked = {name: [self.ranking(program, layer, s) for s in range(layer.stack_size(program))]
                  for name, layer in layers.items()}
        counts = {name: self.target(layer) for name, layer in layers.items()}
        if self.budget == "global":
            entry = {n: layer_profile(program, l, self.name, ("inputs",)) for n, l in layers.items()}
            curves = {n: removal_errors(program, l, 0, np.asarray(entry[n].inputs[0], np.float32),
                                        ranked[n][0][0], self._min_keep(l)) for n, l in layers.items()}
            counts = allocate_global(curves, sum(counts.values()), {n: self._min_keep(l) for n, l in layers.items()})
        return {name: analysis.LayerPrune(tuple(tuple(sorted(order[:counts[name]])) for order, _ in rows),
                                          tuple(err if counts[name] == self.target(layers[name]) else None
                                                for _, err in rows))
                for name, rows in ranked.items()}

    def run(self, program: Program, ctx: PassContext) -> Program:
        layers = find_moe_layers(program, self.name)
        step = ctx.step(self)
        shared = ctx.analysis.get(analysis.PrunePlan, step)  # made by the first program of this optimize call
        plans = dict(shared.layers) if shared is not None else self.plans(program, layers)
        total = sum(len(plans[n].kept[0]) for n in layers)
        plan = ctx.analysis.put(step, analysis.PrunePlan(self.method, total, plans))
        new_weights: dict[str, Any] = {}
        routings, counts, kept_note = {}, {}, {}
        for name, layer in layers.items():
            keeps, errors = [list(k) for k in plans[name].kept], list(plans[name].relative_error)
            rows = [(keep, _subset_routing(layer.routing, layer.num_router, keep)[0]) for keep in keeps]
            routings[name] = _subset_routing(layer.routing, layer.num_router, keeps[0])[1]
            counts[name] = len(keeps[0])

            def take(path, axis, use_cols, layer=layer, rows=rows):
                def leaf(a):  # a structured (quantized) expert weight is cut leaf by leaf, each expert-major
                    a = np.asarray(a)
                    picked = [np.take(a[s] if layer.stacked else a, cols if use_cols else keep, axis=axis)
                              for s, (keep, cols) in enumerate(rows)]
                    return jnp.asarray(np.stack(picked) if layer.stacked else picked[0])
                return jax.tree_util.tree_map(leaf, program.weights[path])

            new_weights[layer.router] = take(layer.router, 1, True)
            if layer.bias:
                new_weights[layer.bias] = take(layer.bias, 0, True)
            for p in layer.experts:
                new_weights[p] = take(p, 0, False)
            kept_note[name] = [k for k, _ in rows] if layer.stacked else rows[0][0]
            if errors[0] is not None:
                kept_note[name] = {"kept": kept_note[name], "relative_error": errors}
        new = apply_expert_rewrite(program, layers, new_weights, routings, counts)
        return _with_profile(new, ctx, step, str(self), f"kept experts per layer: {kept_note}", plan)
