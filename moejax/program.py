"""``Program``: a traced model — a ClosedJaxpr plus its bound weights — and tracing.

A Program's jaxpr takes the weight leaves first, then the free inputs. Weights
are kept by their pytree path (``layers/3/mlp/experts/w_up``); a weight may be a
plain array or a structured value (a quantized tensor pytree) whose leaves are
consecutive jaxpr inputs.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from moejax import abstract, expert_layout, numerics, rewrite, weight_formats

__all__ = ["Program", "trace", "InputSignatureError", "path_to_str"]


class InputSignatureError(TypeError):
    """Inputs given to a Program do not match the signature it was traced with."""


def path_to_str(path: Sequence[Any]) -> str:
    """``layers/0/mlp/gate/kernel`` from a jax key path (drops NNX's ``value``)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    if parts and parts[-1] in ("value", "raw_value"):
        parts.pop()
    return "/".join(parts)


def _aval(x: Any) -> jax.core.ShapedArray:
    a = jax.typeof(x) if not isinstance(x, jax.ShapeDtypeStruct) else x
    return jax.core.ShapedArray(tuple(a.shape), a.dtype)


def _fmt_aval(a) -> str:
    return f"{jnp.dtype(a.dtype).name}[{','.join(map(str, a.shape))}]"


@dataclasses.dataclass(frozen=True, eq=False)  # identity equality: each trace is its own program
class Program:
    """A traced MoE program: jaxpr + bound weights + input signature + metadata.

    Call it like the traced function (``program(tokens)``); it runs jitted. It is
    jittable itself (``jax.jit(program)``), prints as readable text, and saves
    and restores with :mod:`moejax.serialization` (``program.save(dir)``).
    """

    jaxpr: jcore.ClosedJaxpr
    weights: dict[str, Any]
    in_tree: Any
    in_avals: tuple[Any, ...]
    out_tree: Any
    input_names: tuple[str, ...] = ()
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    # ---- structure -------------------------------------------------------
    @property
    def weight_leaves(self) -> list[Any]:
        return jax.tree_util.tree_leaves(list(self.weights.values()))

    @property
    def num_weight_leaves(self) -> int:
        return len(self.weight_leaves)

    @property
    def is_abstract(self) -> bool:
        """Whether the weights are shapes only (``jax.ShapeDtypeStruct``): the program can be
        rewritten, inspected and counted but not run, saved or exported (see :mod:`moejax.abstract`)."""
        return abstract.is_abstract(self.weights)

    def weight_leaf_paths(self) -> list[str]:
        """One path per weight leaf (``path`` or ``path.field`` for structured weights)."""
        out = []
        for path, w in self.weights.items():
            leaves = jax.tree_util.tree_flatten_with_path(w)[0]
            if len(leaves) == 1 and not leaves[0][0]:
                out.append(path)
            else:
                out.extend(f"{path}.{path_to_str(p)}" for p, _ in leaves)
        return out

    def replace(self, **changes: Any) -> "Program":
        new = dataclasses.replace(self, **changes)
        if "jaxpr" not in changes and "_jitted_eval" in self.__dict__:  # same jaxpr: keep the compiled function
            new.__dict__["_jitted_eval"] = self.__dict__["_jitted_eval"]
        if "jaxpr" not in changes and "weights" not in changes and "_inlined" in self.__dict__:
            new.__dict__["_inlined"] = self.__dict__["_inlined"]  # same computation: same delivered program
        return new

    # ---- running ----------------------------------------------------------
    def check_inputs(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[Any]:
        """Flatten inputs and check them against the traced signature."""
        leaves, tree = jax.tree_util.tree_flatten((tuple(args), dict(kwargs)))
        if tree != self.in_tree:
            raise InputSignatureError(
                f"inputs have structure {tree}, but the program was traced with {self.in_tree}; "
                "call it with the same arguments (and keyword arguments) as the example inputs")
        arrays = []
        for i, (x, want) in enumerate(zip(leaves, self.in_avals)):
            x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
            got = _aval(x)
            if got.shape != want.shape or got.dtype != want.dtype:
                name = self.input_names[i] if i < len(self.input_names) else f"input {i}"
                raise InputSignatureError(
                    f"{name}: expected {_fmt_aval(want)}, got {_fmt_aval(got)}; the program was traced for "
                    f"{self.signature()} — trace (or optimize) again with example inputs of the new shape/dtype")
            arrays.append(x)
        return arrays

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_abstract:
            raise abstract.refuse("run this program")
        inputs = self.check_inputs(args, kwargs)
        outs = self._jitted_eval(self.weight_leaves, inputs)
        return jax.tree_util.tree_unflatten(self.out_tree, outs)

    # Compiled functions live on the instance (not in a module-level cache), so deleting
    # a program frees its jaxpr, its weights and its executables.
    @functools.cached_property
    def _jitted_eval(self) -> Callable[..., Any]:
        return _jitted_eval(self.jaxpr)

    @functools.cached_property
    def _tapped_fns(self) -> dict[Any, Callable[..., Any]]:
        return {}

    def as_function(self) -> Callable[..., Any]:
        """A pure function ``f(weight_leaves, *input_leaves) -> output leaves``."""
        jaxpr = self.jaxpr
        return lambda weights, *inputs: jcore.jaxpr_as_fun(jaxpr)(*weights, *inputs)

    # ---- text -----------------------------------------------------------
    def signature(self) -> str:
        names = self.input_names or tuple(f"in{i}" for i in range(len(self.in_avals)))
        return "(" + ", ".join(f"{n}: {_fmt_aval(a)}" for n, a in zip(names, self.in_avals)) + ")"

    def __str__(self) -> str:
        return self.pretty()

    def pretty(self, show_weights: bool = True) -> str:
        """Readable text: signature, weight table, metadata keys, the jaxpr."""
        from moejax.inspection import program_text  # local: inspection imports program

        return program_text(self, show_weights=show_weights)

    def __repr__(self) -> str:
        return (f"Program(inputs={self.signature()}, weights={len(self.weights)} tensors, "
                f"eqns={len(self.jaxpr.jaxpr.eqns)})")

    # ---- persistence ---------------------------------------------------------
    def save(self, directory: str) -> None:
        """Save weights (orbax) and structure; see :func:`moejax.serialization.save_program`."""
        from moejax.serialization import save_program

        if self.is_abstract:
            raise abstract.refuse("save this program (saving writes its weight values)")
        save_program(self, directory)

    @staticmethod
    def restore(directory: str) -> "Program":
        from moejax.serialization import restore_program

        return restore_program(directory)

    def export(self, directory: str, platforms: Sequence[str] = ("cpu",)) -> str:
        """Export for serving without moejax (``jax.export`` StableHLO + safetensors weights + JSON signature).

        Read it back with :func:`moejax.serialization.load_exported`; see
        :func:`moejax.serialization.export_program`.
        """
        from moejax.serialization import export_program

        if self.is_abstract:
            raise abstract.refuse("export this program with its weights (to lower it for other platforms without "
                                  "values use moejax.sharding.export_program)")
        return str(export_program(self, directory, platforms=platforms))

    # ---- rewriting --------------------------------------------------------
    def rewrite(self, rules: Mapping[str, rewrite.Rule] | None = None, *, weights: Mapping[str, Any] | None = None,
                drop_weights: Sequence[str] = (), metadata: Mapping[str, Any] | None = None) -> "Program":
        """A new Program re-traced with ``rules`` and replaced/added/dropped ``weights``."""
        program = retrace_program(self, rules or {}, weights=weights, drop_weights=drop_weights)
        if metadata:
            program = program.replace(metadata={**program.metadata, **metadata})
        return program

    def run_with_taps(self, rules: Mapping[str, rewrite.Rule], *args: Any, **kwargs: Any):
        """Run once with tapping ``rules``; returns (outputs, taps dict of arrays)."""
        if self.is_abstract:
            raise abstract.refuse("run this program (with taps)")
        inputs = self.check_inputs(args, kwargs)
        key = tuple(sorted(rules.items(), key=lambda kv: kv[0]))
        fn = self._tapped_fns.get(key)
        if fn is None:
            if len(self._tapped_fns) >= _MAX_TAPPED_FNS:  # rules made afresh per call never hit: stay bounded
                del self._tapped_fns[next(iter(self._tapped_fns))]
            fn = self._tapped_fns[key] = _tapped_fn(self.jaxpr, dict(key))
        outs, taps = fn(self.weight_leaves, inputs)
        return jax.tree_util.tree_unflatten(self.out_tree, outs), taps


_MAX_TAPPED_FNS = 8  # compiled tapping functions kept per program


def _jitted_eval(closed: jcore.ClosedJaxpr) -> Callable[..., Any]:
    """``jit`` of evaluating ``closed`` on (weight leaves, input leaves); cached per Program instance."""
    @jax.jit
    def run(weights, inputs):
        return jcore.jaxpr_as_fun(closed)(*weights, *inputs)

    return run


def _tapped_fn(closed: jcore.ClosedJaxpr, rules: dict[str, rewrite.Rule]) -> Callable[..., Any]:
    """``jit`` of re-tracing ``closed`` with tapping ``rules``; cached per Program instance and rules."""
    @jax.jit
    def run(weights, inputs):
        return rewrite.retrace(closed, rules, list(weights) + list(inputs))

    return run


def retrace_program(program: Program, rules: Mapping[str, rewrite.Rule], *,
                    weights: Mapping[str, Any] | None = None, drop_weights: Sequence[str] = ()) -> Program:
    """Re-trace ``program`` with ``rules``; ``weights`` replace or add bound weights.

    Weights under new paths are appended and readable by rules through
    :func:`extra_weight`; ``drop_weights`` removes weights the rules no longer use.
    """
    weights = dict(weights or {})
    for p in drop_weights:
        if p not in program.weights:
            raise KeyError(f"cannot drop weight {p!r}: not a weight of this program")
    new_weights = {p: weights.get(p, w) for p, w in program.weights.items() if p not in drop_weights}
    added = {p: w for p, w in weights.items() if p not in program.weights}
    new_weights.update(added)
    new_paths = list(new_weights)

    def fn(weight_values, inputs):
        by_path = dict(zip(new_paths, weight_values))
        args = []
        for p, old in program.weights.items():
            val = by_path.get(p, _Dropped(p))
            n_old = len(jax.tree_util.tree_leaves(old))
            old_split = expert_layout.is_split(old)
            if not isinstance(val, _Dropped) and expert_layout.is_split(val) != old_split:  # a layout change
                args.extend(rewrite.RelaidLeaf(val, old_split, i) for i in range(n_old))
            elif n_old == 1 and not weight_formats.is_structured(old):  # a plain array, or what replaces it
                args.append(val)
            else:  # an already-structured weight: the old jaxpr takes its leaves
                leaves = jax.tree_util.tree_leaves(val)
                if len(leaves) != n_old:
                    raise ValueError(f"weight {p!r}: a structured weight can only be replaced by one with the "
                                     f"same number of leaves ({n_old}), got {len(leaves)}")
                args.extend(leaves)
        with _ExtraWeights({p: by_path[p] for p in added}):
            outs, _ = rewrite.retrace(program.jaxpr, rules, args + list(inputs))
        return outs

    abstract_inputs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in program.in_avals]
    weight_structs = [jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), w)
                      for w in new_weights.values()]
    closed = jax.make_jaxpr(fn)(weight_structs, abstract_inputs)
    return program.replace(jaxpr=closed, weights=new_weights)


class _Dropped(rewrite.Placeholder):
    """Stands in for a dropped weight; any use is an error naming it."""

    def __init__(self, path: str):
        self.path = path

    def resolve(self) -> Any:
        raise ValueError(f"weight {self.path!r} was dropped by this pass but the program still uses it")


class _ExtraWeights:
    """Makes weights added by a pass readable to rules via :func:`extra_weight`."""

    stack: list[dict[str, Any]] = []

    def __init__(self, extra):
        self.extra = extra

    def __enter__(self):
        _ExtraWeights.stack.append(self.extra)

    def __exit__(self, *exc):
        _ExtraWeights.stack.pop()


def extra_weight(path: str) -> Any:
    """Inside a rewrite: the traced value of a weight the pass adds at ``path``."""
    if not _ExtraWeights.stack or path not in _ExtraWeights.stack[-1]:
        raise KeyError(f"weight {path!r} was not added by this rewrite; pass it in weights={{...}}")
    return _ExtraWeights.stack[-1][path]


# --------------------------------------------------------------------------
# Tracing.
# --------------------------------------------------------------------------
def _split_model(model: Any, params: Any):
    """(leaves-with-paths, rebuild(leaves) -> callable) for the supported model kinds."""
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        nnx = None
    if nnx is not None and isinstance(model, nnx.Module):
        if params is not None:
            raise TypeError("trace(nnx_module, ...) takes no params; the module holds its own state")
        graphdef, state = nnx.split(model)
        # A structured weight (e.g. FP8 experts loaded as shipped) stays one weight of the program.
        flat, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=weight_formats.is_structured)

        def rebuild(leaves):
            return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))

        return flat, rebuild
    try:
        from flax import linen
    except ImportError:  # pragma: no cover
        linen = None
    if linen is not None and isinstance(model, linen.Module):
        if params is None:
            raise TypeError("trace(linen_module, *args, params=variables): a Linen module needs its variables")
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        return flat, lambda leaves: functools.partial(model.apply, jax.tree_util.tree_unflatten(treedef, leaves))
    if callable(model):
        if params is None:
            raise TypeError("trace(fn, *args, params=...): a pure function fn(params, *args) needs its params")
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        return flat, lambda leaves: functools.partial(model, jax.tree_util.tree_unflatten(treedef, leaves))
    raise TypeError(f"trace: cannot trace a {type(model).__name__}; pass a Flax NNX module, a Linen module with "
                    "params=variables, or a function fn(params, *args) with params=...")


def trace(model: Any, *example_args: Any, params: Any = None, **example_kwargs: Any) -> Program:
    """Trace ``model`` on example inputs into a :class:`Program`.

    ``model`` is a Flax NNX module, a Linen module (with ``params=variables``) or
    a pure function ``fn(params, *args)`` (with ``params=...``). Keyword inputs
    (e.g. ``cache=...``, ``cache_index=...``) become free inputs too.

    Weights (or inputs) given as ``jax.ShapeDtypeStruct`` (a model built under
    ``nnx.eval_shape``, see ``moejax.models.abstract_model``) give an abstract
    program: ``program.is_abstract``, shapes only (see :mod:`moejax.abstract`).

    Raises:
      moejax.numerics.NonFiniteError: a float weight holds NaN/Inf (named by path).
    """
    flat, rebuild = _split_model(model, params)
    paths = [path_to_str(p) for p, _ in flat]
    if len(set(paths)) != len(paths):
        paths = [f"{p}#{i}" for i, p in enumerate(paths)]
    leaves = [_leaf(x) for _, x in flat]
    # A NaN/Inf weight spreads silently through every later pass (quantize makes it finite garbage): stop here.
    numerics.check_finite_weights(dict(zip(paths, leaves)), "the traced model")
    in_leaves_with_path, in_tree = jax.tree_util.tree_flatten_with_path((tuple(example_args), dict(example_kwargs)))
    input_names = tuple(_input_name(p) for p, _ in in_leaves_with_path)
    in_leaves = [_leaf(x) for _, x in in_leaves_with_path]

    def fn(weight_leaves, input_leaves):
        args, kwargs = jax.tree_util.tree_unflatten(in_tree, input_leaves)
        return rebuild(weight_leaves)(*args, **kwargs)

    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(leaves, in_leaves)
    out_tree = jax.tree_util.tree_structure(out_shape)
    return Program(jaxpr=closed, weights=dict(zip(paths, leaves)), in_tree=in_tree,
                   in_avals=tuple(_aval(x) for x in in_leaves), out_tree=out_tree, input_names=input_names,
                   metadata={})


def _leaf(x: Any) -> Any:
    """An array for a traced weight or input; a ``ShapeDtypeStruct`` (an abstract program) or a
    structured weight stays one."""
    return x if isinstance(x, jax.ShapeDtypeStruct) or weight_formats.is_structured(x) else jnp.asarray(x)


def _input_name(path) -> str:
    # path[0] is the (args, kwargs) tuple index: 0 for positional, 1 for keywords.
    rest = path_to_str(path[1:])
    return f"arg{rest}" if path and getattr(path[0], "idx", 0) == 0 else rest
