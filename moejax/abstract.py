"""Abstract programs: weights that are shapes only (``jax.ShapeDtypeStruct``).

A model built under ``nnx.eval_shape`` (``moejax.models.abstract_model``) has
no parameter values, only shapes and dtypes: a 671B-parameter preset fits in a
few megabytes of Python objects. Tracing it gives a :class:`~moejax.Program`
whose weights are ``ShapeDtypeStruct`` leaves (``program.is_abstract``). Passes
that only read shapes (``ep``, ``select-impl``, ``quantize``, ``pallas``) run on
it and their stages report bytes and FLOPs; ``offload`` records its plan (cache
budget, expert bytes) without building a store; passes that read weight values
(``profile``, ``prune``, ``merge``, ``gating``) refuse with one
:class:`~moejax.pipeline.PassError`; running, saving or exporting an abstract
program raises :class:`AbstractProgramError`.

This module holds the few helpers every part uses, so the rule "shapes in,
shapes out" is written once.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

__all__ = ["AbstractProgramError", "is_abstract", "eval_or_shape", "refuse", "LOAD_HINT"]

# The one fix for every refusal: get values.
LOAD_HINT = ("the model is abstract (shapes only: its weights are jax.ShapeDtypeStruct); load weights with "
             "moejax.models.from_pretrained(path) (or build the model with real parameters) to run it")


class AbstractProgramError(TypeError):
    """An operation needs weight values but the program holds shapes only."""


def is_abstract(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is a ``jax.ShapeDtypeStruct`` (shape and dtype, no value)."""
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(tree))


def eval_or_shape(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or, when an argument is abstract, the shapes ``fn`` would return (``jax.eval_shape``).

    Passes transform weights through this so that an abstract weight gets the
    abstract result of the same function: a quantized ``ShapeDtypeStruct`` pytree
    whose leaves have the packed dtypes and shapes, so byte counts are exact.
    """
    if is_abstract(args):
        return _keep_leading_sharding(args, jax.eval_shape(fn, *args))
    return fn(*args)


def _keep_leading_sharding(args: Any, out: Any) -> Any:
    """Give ``out``'s leaves the input's sharding of its leading (expert / stacked-layer) axes.

    ``jax.eval_shape`` drops shardings, but a weight transform (quantization, a
    format change) keeps a weight's leading axes, so a weight ``ep`` sharded over
    its expert axis stays sharded so: with real arrays XLA propagates it the same
    way. Only applied when the input has one ``NamedSharding`` that shards
    leading axes only (not the ``[k, n]`` matrix) and an output leaf has those axes.
    """
    inputs = [x for x in jax.tree_util.tree_leaves(args) if isinstance(x, jax.ShapeDtypeStruct)]
    shardings = {x.sharding for x in inputs if x.sharding is not None}
    if len(shardings) != 1:
        return out
    sharding = shardings.pop()
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return out
    ref = inputs[0]
    spec = tuple(sharding.spec)
    sharded = [i for i, a in enumerate(spec) if a is not None]
    if not sharded or max(sharded) >= len(ref.shape) - 2:
        return out
    lead = max(sharded) + 1
    keep = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[:lead]))

    def place(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct) and tuple(x.shape[:lead]) == tuple(ref.shape[:lead]):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=keep)
        return x

    return jax.tree_util.tree_map(place, out)


def refuse(what: str) -> AbstractProgramError:
    """The error for ``what`` (``"running it"``, ``"saving it"``) on an abstract program."""
    return AbstractProgramError(f"cannot {what}: {LOAD_HINT}")
