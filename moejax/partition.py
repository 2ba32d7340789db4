"""Cut a program at its expert ops, so a runtime can act between the parts.

Expert offloading needs to see which experts a layer routed to *before* the
layer's expert FFN runs, and to hand the FFN weights it placed itself. This
module turns a :class:`~moejax.program.Program` into

* ``segments``: jitted pieces of the program between consecutive
  ``moe_expert_ffn`` ops (the first runs from the inputs, the last ends at the
  outputs), each compiled once per traced signature;
* ``sites``: one per expert op, with the operands a runtime needs (grouped
  rows, group sizes), the op's params, its expert weights as values, and, for
  a prefetcher, the router that feeds it.

Layers stacked under ``lax.scan`` are unrolled first (:func:`flatten`) so every
expert op sits at the top level. Values that depend on weights only (the
expert weights of layer ``i`` sliced from a stacked ``[L, E, k, n]`` array,
router weights) are evaluated once, here, not per call.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax._src import core as jax_core
from jax._src.interpreters import partial_eval as pe
from jax.extend import core as jcore

from moejax import dialect, rewrite
from moejax.program import Program

__all__ = ["flatten", "ExpertSite", "Router", "Partition", "partition"]

# Higher-order primitives whose bodies are inlined (scan: unrolled) when they hold dialect ops.
_INLINED = ("jit", "pjit", "remat2", "checkpoint")


def _inline_body_rule(ctx: rewrite.RuleContext) -> Any:
    body = ctx.params["jaxpr"]
    if not rewrite._contains_dialect(body.jaxpr if isinstance(body, jcore.ClosedJaxpr) else body):
        return None
    jaxpr, consts = (body.jaxpr, body.consts) if isinstance(body, jcore.ClosedJaxpr) else (body, ())
    return rewrite._interpret(jaxpr, consts, list(ctx.invals), _FLATTEN_RULES, ctx.path, {})


def _unroll_scan_rule(ctx: rewrite.RuleContext) -> Any:
    p = ctx.params
    if not rewrite._contains_dialect(p["jaxpr"].jaxpr):
        return None
    nc, nk = p["num_consts"], p["num_carry"]
    consts, carry, xs = ctx.invals[:nc], list(ctx.invals[nc:nc + nk]), ctx.invals[nc + nk:]
    steps = range(p["length"] - 1, -1, -1) if p["reverse"] else range(p["length"])
    ys: dict[int, list[Any]] = {}
    for i in steps:
        outs = rewrite._interpret(p["jaxpr"].jaxpr, p["jaxpr"].consts, [*consts, *carry, *(x[i] for x in xs)],
                                  _FLATTEN_RULES, ctx.path, {})
        carry = list(outs[:nk])
        ys[i] = list(outs[nk:])
    stacked = [jnp.stack([ys[i][j] for i in range(p["length"])]) for j in range(len(p["jaxpr"].jaxpr.outvars) - nk)]
    return carry + stacked


_FLATTEN_RULES: dict[str, rewrite.Rule] = {"scan": _unroll_scan_rule, **{n: _inline_body_rule for n in _INLINED}}


def flatten(closed: jcore.ClosedJaxpr) -> jcore.ClosedJaxpr:
    """``closed`` with every dialect op at the top level: scans holding one unrolled, jit bodies inlined.

    Other constructs holding a dialect op (``cond``, ``while``, ``shard_map``) are
    refused with ``ValueError``: the runtime could not act between their parts.
    """
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
    flat = jax.make_jaxpr(lambda *a: rewrite.retrace(closed, _FLATTEN_RULES, a)[0])(*avals)
    nested = [s for s in rewrite.dialect_sites(flat) if s.path]
    if nested:
        raise ValueError(f"a MoE op sits inside {nested[0].path[0].split('#')[0]!r}, which cannot be cut at its "
                         f"layers; only scan-stacked and jit-wrapped layers are supported")
    return flat


@dataclasses.dataclass(frozen=True)
class Router:
    """The router of an expert op: its input variable, weight values and routing (for prediction)."""

    x: Any  # the moe_route equation's token input (a top-level variable)
    weights: tuple[Any, ...]  # router weight (and selection bias), evaluated
    routing: dialect.Routing


@dataclasses.dataclass(frozen=True, eq=False)
class ExpertSite:
    """One ``moe_expert_ffn`` of the flattened program."""

    index: int
    eqn: Any
    weights: tuple[Any, ...]  # the op's expert weights (stacked or per-expert), evaluated
    router: Router | None

    @property
    def grouped(self) -> Any:
        return self.eqn.invars[0]

    @property
    def group_sizes(self) -> Any:
        return self.eqn.invars[1]

    @property
    def output(self) -> Any:
        return self.eqn.outvars[0]

    @property
    def params(self) -> dict[str, Any]:
        return self.eqn.params

    @property
    def num_experts(self) -> int:
        return int(self.eqn.invars[1].aval.shape[0])

    @property
    def name(self) -> str:
        return self.eqn.params.get("name", "")


@dataclasses.dataclass(frozen=True, eq=False)
class Segment:
    """A piece of the program: ``fn(*inputs) -> outputs`` (plain JAX, to be jitted by the caller)."""

    fn: Callable[..., Any]
    inputs: tuple[Any, ...]
    outputs: tuple[Any, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Partition:
    """A program cut at its expert ops: ``segments[i]`` runs before ``sites[i]``, the last one after all.

    Running it: bind ``initial`` and the inputs, then for each ``i`` run
    ``segments[i]``, compute ``sites[i]``'s output, and drop ``release_after[i]``;
    the outputs are ``outvars`` (see :class:`moejax.offload.OffloadRuntime`).
    ``initial`` binds the flattened jaxpr's weight and constant variables to
    their values (the expert weights are not among them unless another
    equation reads them too); ``input_vars`` are the free inputs, in order.
    """

    segments: tuple[Segment, ...]
    sites: tuple[ExpertSite, ...]
    initial: dict[Any, Any]
    input_vars: tuple[Any, ...]
    outvars: tuple[Any, ...]
    release_after: tuple[frozenset, ...]  # variables no later step reads, dropped after segment i (+ site i)
    flat: jcore.ClosedJaxpr | None = None  # the flattened program the parts were cut from


def _weight_only_vars(jaxpr: jcore.Jaxpr, roots: set) -> set:
    """Variables computed from ``roots`` (weights, constants) and literals only."""
    known = set(roots)
    for eqn in jaxpr.eqns:
        if eqn.effects:
            continue
        if all(isinstance(v, jcore.Literal) or v in known for v in eqn.invars):
            known.update(v for v in eqn.outvars if not isinstance(v, jcore.DropVar))
    return known


def _evaluate(jaxpr: jcore.Jaxpr, env: dict[Any, Any], wanted: Sequence[Any]) -> list[Any]:
    """Values of ``wanted`` variables computed from ``env`` (weights) by the equations that produce them."""
    targets = [v for v in wanted if not isinstance(v, jcore.Literal) and v not in env]
    if targets:
        sub = jcore.Jaxpr([], list(env), targets, jaxpr.eqns, jax_core.join_effects(*(e.effects for e in jaxpr.eqns)))
        sub, used = pe.dce_jaxpr(sub, [True] * len(targets))
        args = [x for x, u in zip(env.values(), used) if u]
        values = dict(zip(targets, jax.jit(jcore.jaxpr_as_fun(jcore.ClosedJaxpr(sub, ())))(*args)))
    else:
        values = {}
    return [v.val if isinstance(v, jcore.Literal) else env[v] if v in env else values[v] for v in wanted]


def _producers(jaxpr: jcore.Jaxpr) -> dict[Any, Any]:
    return {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars if not isinstance(v, jcore.DropVar)}


def _router_of(eqn: Any, producers: dict[Any, Any]) -> Any | None:
    """The ``moe_route`` equation whose expert ids the expert op ``eqn`` groups by (through its dispatch)."""
    dispatch = producers.get(eqn.invars[1])
    if dispatch is None or dispatch.primitive is not dialect.dispatch_p:
        return None
    route = producers.get(dispatch.invars[1])
    return route if route is not None and route.primitive is dialect.route_p else None


def partition(program: Program) -> Partition:
    """Cut ``program`` at its ``moe_expert_ffn`` ops (see the module docstring).

    Raises ``ValueError`` when the program has no expert op, or holds one where it
    cannot be cut (inside ``cond``/``while``/``shard_map``), or when an expert op's
    weights depend on the inputs (they must be stored weights).
    """
    closed = flatten(program.jaxpr)
    jaxpr = closed.jaxpr
    n_weights = program.num_weight_leaves
    weight_env = dict(zip(jaxpr.invars[:n_weights], program.weight_leaves))
    weight_env.update(zip(jaxpr.constvars, closed.consts))
    weight_only = _weight_only_vars(jaxpr, set(weight_env))
    producers = _producers(jaxpr)

    site_eqns = [(i, e) for i, e in enumerate(jaxpr.eqns) if e.primitive is dialect.expert_ffn_p]
    if not site_eqns:
        raise ValueError("the program has no moe_expert_ffn op: there are no experts to offload")
    routes = [_router_of(eqn, producers) for _, eqn in site_eqns]
    for n, (_, eqn) in enumerate(site_eqns):
        if not all(isinstance(v, jcore.Literal) or v in weight_only for v in eqn.invars[2:]):
            raise ValueError(f"expert op {eqn.params.get('name', n)!r}: its weights are computed from the inputs, "
                             f"not stored; only stored expert weights can be offloaded")
    routes = [r if r is not None and all(isinstance(v, jcore.Literal) or v in weight_only for v in r.invars[1:])
              else None for r in routes]
    # every expert and router weight in one evaluation (a scanned model slices its stacked weights here)
    wanted = [v for _, eqn in site_eqns for v in eqn.invars[2:]] + [v for r in routes if r for v in r.invars[1:]]
    values = iter(_evaluate(jaxpr, weight_env, wanted))
    expert_values = [[next(values) for _ in eqn.invars[2:]] for _, eqn in site_eqns]
    sites: list[ExpertSite] = []
    for n, ((_, eqn), route) in enumerate(zip(site_eqns, routes)):
        weights = jax.tree_util.tree_unflatten(eqn.params["weights_tree"], expert_values[n])
        router = None if route is None else Router(route.invars[0], tuple(next(values) for _ in route.invars[1:]),
                                                   route.params["routing"])
        sites.append(ExpertSite(n, eqn, tuple(rewrite.regroup(weights)), router))

    # Segment k: the equations after expert op k-1 and before expert op k (the last: after all).
    bounds = [-1] + [i for i, _ in site_eqns] + [len(jaxpr.eqns)]
    chunks = [jaxpr.eqns[bounds[k] + 1: bounds[k + 1]] for k in range(len(bounds) - 1)]
    # Variables a later step reads: later chunks' operands, the sites' row/size operands and
    # routers' token inputs (the runtime reads them), and the program outputs.
    def site_reads(k: int) -> set:
        if k >= len(sites):
            return set()
        s = sites[k]
        return {v for v in (s.grouped, s.group_sizes, s.router.x if s.router else None)
                if v is not None and not isinstance(v, jcore.Literal)}

    def reads_of(k: int) -> set:
        return _chunk_reads(chunks[k]) | site_reads(k)

    later: list[set] = [set() for _ in chunks]
    acc = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
    for k in range(len(chunks) - 1, -1, -1):
        later[k] = set(acc)  # read after step k
        acc |= reads_of(k)
    segments, defined = [], set(jaxpr.invars) | set(jaxpr.constvars)
    release = []
    for k, eqns in enumerate(chunks):
        here = [v for e in eqns for v in e.outvars if not isinstance(v, jcore.DropVar)]
        wanted = later[k] | site_reads(k)
        needed = list(dict.fromkeys(v for v in here if v in wanted))
        defined_here = set(here)
        free = list(dict.fromkeys(v for v in _chunk_reads(eqns) if v not in defined_here))
        seg = jcore.Jaxpr([], free, needed, eqns, jax_core.join_effects(*(e.effects for e in eqns)))
        seg, used = pe.dce_jaxpr(seg, [True] * len(needed))
        inputs = tuple(v for v, u in zip(free, used) if u)
        segments.append(Segment(jcore.jaxpr_as_fun(jcore.ClosedJaxpr(seg, ())), inputs, tuple(needed)))
        defined |= set(here)
        if k < len(sites):
            defined.add(sites[k].output)
        release.append(frozenset(v for v in defined if v not in later[k] and v not in weight_env))
    initial = {v: x for v, x in weight_env.items() if any(v in s.inputs for s in segments) or v in jaxpr.outvars}
    return Partition(tuple(segments), tuple(sites), initial, tuple(jaxpr.invars[n_weights:]),
                     tuple(jaxpr.outvars), tuple(release), closed)


def _chunk_reads(eqns: Sequence[Any]) -> set:
    return {v for e in eqns for v in e.invars if not isinstance(v, jcore.Literal)}
