"""Weight data flow: which equations read a program's weights unchanged, at any depth.

Passes that edit stored weights (quantize, prune, merge, expert parallelism)
and the statistics need to know which weight leaf reaches which operand of
which ``moe_*`` equation. :func:`input_reads` follows the top-level inputs of
a jaxpr into nested bodies (``jit``, ``scan``, ``remat``, ``cond``,
``shard_map``, custom-derivative calls) and reports, for every equation it is
asked about, which operands are one of those inputs passed through unchanged
and how many leading axes enclosing ``scan`` bodies sliced off on the way (1
for a layer stacked under one scan). A value computed from an input (a slice,
a cast, a dequantization) is not followed: it is no longer the stored weight.

``while`` bodies are not entered: their carried values change per iteration
and none of the callers edits weights inside one.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
from jax.extend import core as jcore

from moejax import weight_formats as wf
from moejax.rewrite import sub_jaxprs

__all__ = ["Source", "Read", "input_reads", "weight_reads", "LeafOwner", "leaf_owners"]


@dataclasses.dataclass(frozen=True)
class Source:
    """An operand that is top-level input ``input`` unchanged, minus ``sliced_axes`` leading scan axes."""

    input: int
    sliced_axes: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class Read:
    """An equation (at any depth) and, per operand, the top-level input it reads unchanged (or None)."""

    eqn: Any
    operands: tuple[Source | None, ...]

    @property
    def name(self) -> str:
        """The layer name of a dialect equation, else ''."""
        return self.eqn.params.get("name", "")

    def sources(self, start: int = 0) -> Iterator[tuple[int, Source]]:
        """``(operand position, source)`` for the operands from ``start`` on that are inputs."""
        for pos in range(start, len(self.operands)):
            src = self.operands[pos]
            if src is not None:
                yield pos, src


def _walk(jaxpr, env: dict[Any, Source], want: Callable[[Any], bool], out: list[Read]) -> None:
    for eqn in jaxpr.eqns:
        if want(eqn):
            out.append(Read(eqn, tuple(None if isinstance(v, jcore.Literal) else env.get(v) for v in eqn.invars)))
        if eqn.primitive.name == "while":
            continue
        for _, sub in sub_jaxprs(eqn):
            # Bodies take the equation's trailing operands (cond's branches skip the predicate).
            offset = len(eqn.invars) - len(sub.invars)
            if offset < 0:
                continue
            # scan slices its xs (after the consts and the carry) along the leading axis
            unsliced = (eqn.params["num_consts"] + eqn.params["num_carry"] if eqn.primitive.name == "scan"
                        else len(sub.invars))
            inner: dict[Any, Source] = {}
            for i, (sv, ov) in enumerate(zip(sub.invars, eqn.invars[offset:])):
                if isinstance(ov, jcore.Literal) or ov not in env:
                    continue
                src = env[ov]
                inner[sv] = Source(src.input, src.sliced_axes + (1 if i >= unsliced else 0))
            _walk(sub, inner, want, out)


def input_reads(jaxpr: Any, inputs: Iterable[int], want: Callable[[Any], bool]) -> list[Read]:
    """Every equation ``want(eqn)`` accepts, at any depth, with the inputs among ``inputs`` it reads unchanged.

    ``jaxpr`` is a Jaxpr or ClosedJaxpr; ``inputs`` are indices of its
    top-level invars. Equations are reported in program order (depth first),
    including those that read none of the inputs.
    """
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, jcore.ClosedJaxpr) else jaxpr
    env = {jaxpr.invars[i]: Source(i) for i in inputs}
    out: list[Read] = []
    _walk(jaxpr, env, want, out)
    return out


def weight_reads(program: Any, want: Callable[[Any], bool]) -> list[Read]:
    """:func:`input_reads` of a Program's weight leaves (``Source.input`` is the weight leaf index)."""
    return input_reads(program.jaxpr, range(program.num_weight_leaves), want)


@dataclasses.dataclass(frozen=True)
class LeafOwner:
    """The weight a jaxpr weight input belongs to: its path, the leaf's position in it, and its kind."""

    path: str
    position: int
    num_leaves: int
    structured: bool  # a weight-format value or any multi-leaf pytree, not a plain array


def leaf_owners(program: Any) -> list[LeafOwner]:
    """One :class:`LeafOwner` per weight leaf of ``program``, in jaxpr input order."""
    out: list[LeafOwner] = []
    for path, w in program.weights.items():
        n = len(jax.tree_util.tree_leaves(w))
        structured = wf.is_structured(w) or n > 1
        out.extend(LeafOwner(path, i, n, structured) for i in range(n))
    return out
