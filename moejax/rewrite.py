"""Jaxpr rewriting: find dialect equations at any depth and re-trace with changes.

The one mechanism behind every pass is :func:`retrace`: it re-evaluates a jaxpr
under ``jax.make_jaxpr`` and, at each equation a *rule* claims, calls the rule
instead of binding the original primitive. Rules are ordinary JAX code, so
"replace an equation by a function" and "change params" are the same thing, and
the new program is type-checked by construction.

Higher-order primitives that contain dialect ops (``jit``, ``scan``,
``remat``, ``cond``, ``while``, ``shard_map``) are re-built through their public
APIs around a recursive interpretation of their bodies, so rules reach into
stacked layers and checkpointed blocks, and values of new *kinds* (e.g. a
quantized weight pytree in place of a float array) flow through scans and jits
unchanged. A structured weight (:mod:`moejax.weight_formats`) reaching an
equation no rule claims is materialised (dequantized), which keeps the program
correct; binding ``moe_expert_ffn`` again keeps structured weights
(:func:`bind_expert_ffn`), so its implementations see the stored format.

Rules may also record *taps* (extra named outputs for analysis); taps made
inside a scan body come out stacked along the scan axis.
"""
from __future__ import annotations

import abc
import dataclasses
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.extend import core as jcore

from moejax import dialect, expert_layout
from moejax import weight_formats as wf

__all__ = ["EqnSite", "Replace", "RuleContext", "iter_eqns", "dialect_sites", "retrace", "inline_dialect_rule",
           "sub_jaxprs", "materialize", "Placeholder", "RelaidLeaf", "regroup", "bind_expert_ffn",
           "rebind_expert_ffn"]


# --------------------------------------------------------------------------
# Finding equations.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EqnSite:
    """An equation and where it sits: ``path`` names the enclosing bodies."""

    eqn: Any
    path: tuple[str, ...]
    trip_count: int  # how many times it runs per program call (scan lengths multiply)

    @property
    def name(self) -> str:
        """The layer name carried by a dialect op (``layers/3/mlp``), else ''."""
        return self.eqn.params.get("name", "")

    def __str__(self) -> str:
        return "/".join(self.path + (self.eqn.primitive.name,))


def sub_jaxprs(eqn) -> list[tuple[str, Any]]:
    """The (param name, Jaxpr) pairs nested in an equation's params."""
    found = []
    for key, val in eqn.params.items():
        vals = val if isinstance(val, (tuple, list)) else (val,)
        for i, v in enumerate(vals):
            j = v.jaxpr if isinstance(v, jcore.ClosedJaxpr) else v
            if isinstance(j, jcore.Jaxpr):
                found.append((f"{key}[{i}]" if len(vals) > 1 else key, j))
    return found


def iter_eqns(jaxpr, path: tuple[str, ...] = (), trip_count: int = 1) -> Iterator[EqnSite]:
    """Every equation of ``jaxpr`` and of its nested bodies, in program order."""
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, jcore.ClosedJaxpr) else jaxpr
    for i, eqn in enumerate(jaxpr.eqns):
        yield EqnSite(eqn, path, trip_count)
        inner_trips = trip_count * (eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1)
        for key, sub in sub_jaxprs(eqn):
            yield from iter_eqns(sub, path + (f"{eqn.primitive.name}#{i}.{key}",), inner_trips)


def dialect_sites(jaxpr, op: str | None = None) -> list[EqnSite]:
    """The ``moe_*`` equations (optionally only ``op``) at any depth."""
    return [s for s in iter_eqns(jaxpr)
            if dialect.is_dialect_primitive(s.eqn.primitive) and (op is None or s.eqn.primitive.name == op)]


# Weakly keyed: the answer lives as long as the jaxpr does and never keeps one alive.
_CONTAINS_DIALECT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _contains_dialect(jaxpr) -> bool:
    """Whether ``jaxpr`` holds a ``moe_*`` op at any depth (memoised per jaxpr object)."""
    try:
        return _CONTAINS_DIALECT[jaxpr]
    except KeyError:
        pass
    except TypeError:  # not weakly referenceable: compute each time
        return any(dialect.is_dialect_primitive(s.eqn.primitive) for s in iter_eqns(jaxpr))
    found = any(dialect.is_dialect_primitive(s.eqn.primitive) for s in iter_eqns(jaxpr))
    _CONTAINS_DIALECT[jaxpr] = found
    return found


# --------------------------------------------------------------------------
# Re-tracing with rules.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Replace:
    """A rule's answer that defines several variables at once and skips equations.

    Used to replace a run of equations (e.g. dispatch -> expert ffn -> combine)
    by one function: give the values of the run's final outputs in ``values``
    and list the run's other equations in ``skip``.
    """

    values: Mapping[Any, Any]
    skip: Sequence[Any] = ()


@dataclasses.dataclass
class RuleContext:
    """What a rule sees: the equation, its input values and its surroundings."""

    eqn: Any
    invals: list[Any]
    jaxpr: Any  # the enclosing open Jaxpr
    path: tuple[str, ...]
    _taps: dict[str, Any]

    @property
    def params(self) -> dict[str, Any]:
        return self.eqn.params

    @property
    def name(self) -> str:
        return self.eqn.params.get("name", "")

    def consumers(self, var) -> list[Any]:
        """Equations of the enclosing jaxpr that read ``var``."""
        return [e for e in self.jaxpr.eqns if any(v is var for v in e.invars)]

    def bind(self, *invals, **param_changes) -> Any:
        """Bind the equation's primitive on ``invals`` (default: the originals).

        Operands are materialised, except the expert op's weights: it is
        re-bound through :func:`bind_expert_ffn`, which keeps structured weights.
        """
        if self.eqn.primitive is dialect.expert_ffn_p:
            return bind_expert_ffn(self.eqn.params, list(invals or self.invals), **param_changes)
        params = {**self.eqn.params, **param_changes}
        args = [materialize(v, var) for v, var in zip(invals or self.invals, self.eqn.invars)]
        return self.eqn.primitive.bind(*args, **params)

    def tap(self, key: str, value: Any) -> None:
        """Record ``value`` as an extra output named ``key`` (stacked in scans)."""
        if key in self._taps:
            raise ValueError(f"tap {key!r} recorded twice; give each tap a unique key")
        self._taps[key] = value


Rule = Callable[[RuleContext], Any]


class Placeholder(abc.ABC):
    """A retrace-time stand-in for one jaxpr operand that is not a weight (see :class:`RelaidLeaf`).

    Any equation that is not rewritten to understand it reads :meth:`resolve`.
    """

    @abc.abstractmethod
    def resolve(self) -> Any:
        """The operand this placeholder stands for."""


@dataclasses.dataclass(frozen=True)
class RelaidLeaf(Placeholder):
    """Leaf ``index`` of an expert weight whose layout a pass changed (see :func:`regroup`).

    A program traced before the change reads the old layout's leaves; while it
    is re-traced, each of them stands for the new ``value`` (a pytree, so it
    passes through ``jit``, ``checkpoint`` and ``cond`` bodies). Rules that
    understand the new layout recover it with :func:`regroup`; any other use
    reads the old leaf, recomputed from the new value (a copy, same numbers).
    """

    value: Any
    old_split: bool = dataclasses.field(metadata=dict(static=True))
    index: int = dataclasses.field(metadata=dict(static=True))

    def resolve(self) -> jax.Array:
        return jax.tree_util.tree_leaves(expert_layout.with_layout_of(self.value, self.old_split))[self.index]


jax.tree_util.register_dataclass(RelaidLeaf, data_fields=["value"], meta_fields=["old_split", "index"])


def regroup(weights: Any) -> tuple[Any, ...]:
    """Replace each weight whose leaves are the :class:`RelaidLeaf` proxies of one old weight by the new value."""
    def fix(w):
        leaves = jax.tree_util.tree_leaves(w, is_leaf=lambda x: isinstance(x, RelaidLeaf))
        if leaves and all(isinstance(x, RelaidLeaf) for x in leaves) and \
                [x.index for x in leaves] == list(range(len(leaves))):
            return leaves[0].value
        return w
    return tuple(fix(w) for w in weights)


def materialize(value: Any, var: Any = None) -> Any:
    """A plain array for ``value``: structured weights are dequantized (to ``var``'s dtype), placeholders resolved."""
    if isinstance(value, Placeholder):
        return value.resolve()
    if wf.is_structured(value):
        dtype = var.aval.dtype if var is not None and hasattr(var, "aval") else None
        return wf.dequantize(value, dtype)
    return value


def _is_structured(v: Any) -> bool:
    """A value the plain jaxpr cannot take as is: a structured weight or a placeholder."""
    return wf.is_structured(v) or isinstance(v, Placeholder)


def retrace(closed_jaxpr, rules: Mapping[str, Rule], args: Sequence[Any]) -> tuple[list[Any], dict[str, Any]]:
    """Evaluate ``closed_jaxpr`` on ``args`` (inside a trace) applying ``rules``.

    ``rules`` maps primitive names to rules. A rule returns ``None`` to keep the
    equation, the equation's output value(s), or a :class:`Replace`. Returns the
    outputs and the taps recorded.
    """
    taps: dict[str, Any] = {}
    outs = _interpret(closed_jaxpr.jaxpr, closed_jaxpr.consts, list(args), rules, (), taps)
    return outs, taps


def _interpret(jaxpr, consts, args, rules, path, taps) -> list[Any]:
    env: dict[Any, Any] = {}
    skipped: set[int] = set()

    def read(v):
        if isinstance(v, jcore.Literal):
            return v.val
        try:
            return env[v]
        except KeyError:
            raise RuntimeError(f"rewrite at {'/'.join(path) or 'top level'}: variable {v} was removed by a "
                               "rule's Replace(skip=...) but is still used; define it in Replace.values") from None

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    if len(args) != len(jaxpr.invars):
        raise TypeError(f"rewrite: jaxpr takes {len(jaxpr.invars)} inputs, got {len(args)}")
    for v, x in zip(jaxpr.invars, args):
        env[v] = x

    for idx, eqn in enumerate(jaxpr.eqns):
        if id(eqn) in skipped:
            continue
        if all(not isinstance(v, jcore.DropVar) and v in env for v in eqn.outvars) and eqn.outvars:
            continue  # defined by an earlier Replace
        invals = [read(v) for v in eqn.invars]
        rule = rules.get(eqn.primitive.name)
        result = None
        if rule is not None:
            result = rule(RuleContext(eqn, invals, jaxpr, path, taps))
        if result is None:
            result = _default(eqn, invals, rules, path + (f"{eqn.primitive.name}#{idx}",), taps)
        if isinstance(result, Replace):
            env.update(result.values)
            skipped.update(id(e) for e in result.skip)
            continue
        outs = result if eqn.primitive.multiple_results else [result]
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _default(eqn, invals, rules, path, taps):
    """Bind an unclaimed equation, recursing into bodies that hold dialect ops."""
    needs_recursion = any(_is_structured(v) for v in invals) or any(
        _contains_dialect(sub) for _, sub in sub_jaxprs(eqn))
    handler = _HOP_HANDLERS.get(eqn.primitive.name)
    if handler is not None and needs_recursion:
        return handler(eqn, invals, rules, path, taps)
    args = [materialize(v, var) for v, var in zip(invals, eqn.invars)]
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: tuple = ()
    if isinstance(bind_params, tuple):  # older JAX returns (subfuns, params)
        subfuns, bind_params = bind_params
    with eqn.ctx.manager:
        return eqn.primitive.bind(*subfuns, *args, **bind_params)


def _body_fn(closed_or_open, rules, path, taps_sink: list):
    """A Python function evaluating a body jaxpr with the rules; taps go to the output."""
    if isinstance(closed_or_open, jcore.ClosedJaxpr):
        jaxpr, consts = closed_or_open.jaxpr, closed_or_open.consts
    else:
        jaxpr, consts = closed_or_open, ()

    def fn(*args):
        inner_taps: dict[str, Any] = {}
        outs = _interpret(jaxpr, consts, list(args), rules, path, inner_taps)
        taps_sink.append(tuple(inner_taps))
        return outs, inner_taps

    return fn


def _merge_taps(taps, new, path):
    for k, v in new.items():
        if k in taps:
            raise ValueError(f"tap {k!r} recorded twice (at {'/'.join(path)})")
        taps[k] = v


def _no_taps(kind, inner, path):
    if inner:
        raise NotImplementedError(f"taps inside a {kind} body are not supported (at {'/'.join(path)}); "
                                  "tap outside it or unroll the construct")


def _jit_handler(eqn, invals, rules, path, taps):
    fn = _body_fn(eqn.params["jaxpr"], rules, path, [])
    fn.__name__ = str(eqn.params.get("name", "jit"))
    outs, inner = jax.jit(fn, inline=eqn.params.get("inline", False))(*invals)
    _merge_taps(taps, inner, path)
    return outs


def _remat_handler(eqn, invals, rules, path, taps):
    fn = _body_fn(eqn.params["jaxpr"], rules, path, [])
    outs, inner = jax.checkpoint(fn, prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])(*invals)
    _merge_taps(taps, inner, path)
    return outs


def _scan_handler(eqn, invals, rules, path, taps):
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
    body = _body_fn(p["jaxpr"], rules, path, [])

    def step(carry, x):
        outs, inner = body(*consts, *carry, *x)
        return list(outs[:nk]), (list(outs[nk:]), inner)

    carry, (ys, inner) = jax.lax.scan(step, list(init), list(xs), length=p["length"], reverse=p["reverse"],
                                      unroll=p["unroll"])
    _merge_taps(taps, inner, path)
    return list(carry) + list(ys)


def _cond_handler(eqn, invals, rules, path, taps):
    index, ops = invals[0], invals[1:]
    branches = []
    for i, br in enumerate(eqn.params["branches"]):
        fn = _body_fn(br, rules, path + (f"branch{i}",), [])
        branches.append(lambda *a, fn=fn: fn(*a))
    outs, inner = jax.lax.switch(index, branches, *ops)
    _no_taps("cond", inner, path)
    return outs


def _while_handler(eqn, invals, rules, path, taps):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
    cond_fn = _body_fn(p["cond_jaxpr"], rules, path + ("cond",), [])
    body_fn = _body_fn(p["body_jaxpr"], rules, path + ("body",), [])

    def body(c):
        outs, inner = body_fn(*bconsts, *c)
        _no_taps("while", inner, path)
        return list(outs)

    return jax.lax.while_loop(lambda c: cond_fn(*cconsts, *c)[0][0], body, list(init))


def _shard_map_handler(eqn, invals, rules, path, taps):
    p = eqn.params
    body_fn = _body_fn(p["jaxpr"], rules, path, [])

    def body(*a):
        outs, inner = body_fn(*a)
        _no_taps("shard_map", inner, path)
        return list(outs)

    f = jax.shard_map(body, mesh=p["mesh"], in_specs=tuple(p["in_specs"]), out_specs=list(p["out_specs"]),
                      axis_names=set(p.get("newly_manual_axes", frozenset())) or frozenset(),
                      check_vma=p.get("check_vma", True))
    return f(*invals)


_HOP_HANDLERS: dict[str, Callable] = {
    "jit": _jit_handler,
    "pjit": _jit_handler,
    "remat2": _remat_handler,
    "checkpoint": _remat_handler,
    "scan": _scan_handler,
    "cond": _cond_handler,
    "while": _while_handler,
    "shard_map": _shard_map_handler,
}


# --------------------------------------------------------------------------
# Inlining: the final lowering to plain JAX.
# --------------------------------------------------------------------------
def inline_dialect_rule(ctx: RuleContext) -> Any:
    """Replace a dialect op by its implementation's equations (plain JAX)."""
    args = [materialize(v, var) for v, var in zip(ctx.invals, ctx.eqn.invars)]
    return ctx.eqn.primitive.implementation(*args, **ctx.eqn.params)


def bind_expert_ffn(params: dict[str, Any], invals: Sequence[Any], **param_changes: Any) -> Any:
    """Bind ``moe_expert_ffn`` on an equation's operands, keeping structured weights.

    ``invals`` are the equation's operands (grouped rows, group sizes, then the
    weight leaves, any of which may already be a structured weight that
    replaced a plain one, or :class:`RelaidLeaf` proxies of a re-laid weight).
    The weights are rebuilt from them and bound through
    :func:`moejax.dialect.moe_expert_ffn`, so the new equation flattens them
    afresh and its ``weight_format`` names their format. ``weights_tree`` and
    ``weight_format`` follow from the weights; other params may be changed.
    """
    weights = jax.tree_util.tree_unflatten(params["weights_tree"], list(invals[2:]))
    derived = ("weights_tree", "weight_format")
    new_params = {k: v for k, v in {**params, **param_changes}.items() if k not in derived}
    return dialect.moe_expert_ffn(invals[0], invals[1], regroup(weights), **new_params)


def rebind_expert_ffn(ctx: RuleContext, **param_changes: Any) -> Any:
    """Bind ``moe_expert_ffn`` again on the equation's operands, with changed params (see :func:`bind_expert_ffn`)."""
    return bind_expert_ffn(ctx.params, ctx.invals, **param_changes)
