"""Storage layout of routed-expert weights: stacked ``[E, k, n]`` or one buffer per expert.

Models and most passes keep an expert weight as one stacked array (or a
structured weight of stacked leaves, :mod:`moejax.weight_formats`). XLA:CPU
cannot point a ``dot`` at one expert of a stacked array without copying that
expert's weights first, so the CPU implementation (``impl="blocked"``) runs
fastest on :class:`PerExpertWeights`: the same values as ``E`` separate
buffers, each read in place. ``select-impl`` converts between the two layouts;
the conversion is exact (a re-arrangement of the same numbers, through the
format protocol's ``expert(e)``) and reversible with :func:`stack_experts`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from moejax import weight_formats as wf
from moejax.weight_formats import ExpertWeight, MixedExpertTensor, register_format

__all__ = ["PerExpertWeights", "split_experts", "stack_experts", "is_split", "with_layout_of"]


@register_format
@dataclasses.dataclass(frozen=True)
class PerExpertWeights(ExpertWeight):
    """An expert weight stored as one buffer per expert.

    ``experts[e]`` is expert ``e``'s ``[k, n]`` weight: a float array or a
    structured weight of any format. The object answers the format protocol
    like the stacked weight it came from (``shape``, ``format``, ``nbytes``,
    ``dequantize``, which stacks, i.e. copies: fast paths index ``experts``).
    """

    experts: tuple[Any, ...]
    layout: ClassVar[str] = "per-expert"  # shown in the expert op's weight_format

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape of the stacked weight, ``(E, k, n)``."""
        first = self.experts[0]
        return (len(self.experts), *(first.shape if wf.is_structured(first) else np.shape(first)))

    @property
    def format(self) -> str:
        """Storage format of the experts (``float``, ``int4-g64``, ``int4-g64+int8`` ...)."""
        fmts = sorted({wf.format_of(x) for x in self.experts})
        return "+".join(fmts)

    def expert(self, e: int) -> Any:
        """Expert ``e``'s buffer ``[k, n]`` in its stored format (no copy)."""
        return self.experts[e]

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The stacked float weight ``[E, k, n]`` (a copy of every expert)."""
        return jnp.stack([wf.dequantize(x, dtype) for x in self.experts])

    def to_tensors(self, prefix: str) -> dict[str, np.ndarray]:
        """Expert ``e``'s tensors under ``f"{prefix}.{e}"``."""
        out: dict[str, np.ndarray] = {}
        for e, x in enumerate(self.experts):
            out.update(wf.to_tensors(x, f"{prefix}.{e}"))
        return out

    def describe(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "experts": [wf.describe(x) for x in self.experts]}

    @classmethod
    def from_description(cls, tensors, prefix: str, desc) -> PerExpertWeights:
        return cls(tuple(wf.from_description(tensors, f"{prefix}.{e}", d) for e, d in enumerate(desc["experts"])))

    @classmethod
    def from_tensors(cls, tensors, prefix: str, **meta: Any) -> PerExpertWeights:
        raise TypeError("PerExpertWeights.from_tensors: the experts' formats are not in the tensors; use "
                        "weight_formats.from_tensors(tensors, prefix, metadata) with tensors_metadata(w, prefix)")

    def __repr__(self) -> str:
        return f"PerExpertWeights({len(self.experts)} x {self.format})"


def is_split(w: Any) -> bool:
    """True for a weight stored one buffer per expert."""
    return isinstance(w, PerExpertWeights)


def split_experts(w: Any) -> PerExpertWeights:
    """One buffer per expert from a stacked ``[E, k, n]`` weight (any format).

    Raises ``ValueError`` for weights with extra leading axes (scanned layers
    stack ``[L, E, k, n]``; their per-layer slices are made by the scan).
    """
    if is_split(w):
        return w
    shape = w.shape if wf.is_structured(w) else np.shape(w)
    if len(shape) != 3:
        raise ValueError(f"split_experts: expected a stacked expert weight [E, k, n], got shape {tuple(shape)} "
                         "(weights of scanned layers keep the stacked layout)")
    return PerExpertWeights(tuple(wf.expert_slice(w, e) for e in range(int(shape[0]))))


def stack_experts(w: Any) -> Any:
    """The stacked layout of a weight (inverse of :func:`split_experts`; stacked weights pass through).

    Experts stored in different formats (mixed precision) are stacked per
    format again, as a :class:`~moejax.weight_formats.MixedExpertTensor`.
    """
    if not is_split(w):
        return w
    groups: dict[Any, list[int]] = {}
    for e, x in enumerate(w.experts):
        groups.setdefault(jax.tree_util.tree_structure(x), []).append(e)
    # Same pytree structure = same format with the same static fields: stack leaf by leaf.
    stack = [jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[w.experts[e] for e in es])
             for es in groups.values()]
    if len(stack) == 1:
        return stack[0]
    order = [e for es in groups.values() for e in es]  # expert at each row of the concatenated parts
    perm = np.empty(len(order), np.int32)
    perm[order] = np.arange(len(order), dtype=np.int32)
    return MixedExpertTensor(tuple(stack), jnp.asarray(perm))


def with_layout_of(w: Any, split: bool) -> Any:
    """``w`` split per expert (``split``) or stacked; formats are unchanged."""
    return split_experts(w) if split else stack_experts(w)
