"""Storage layout of routed-expert weights: stacked ``[E, k, n]`` or one buffer per expert.

Models and most passes keep an expert weight as one stacked array (or a
quantized pytree of stacked arrays). XLA:CPU cannot point a ``dot`` at one
expert of a stacked array without copying that expert's weights first, so the
CPU implementation (``impl="blocked"``) runs fastest on
:class:`PerExpertWeights`: the same values as ``E`` separate buffers, each read
in place. ``select-impl`` converts between the two layouts; the conversion is
exact (a re-arrangement of the same numbers) and reversible with
:func:`stack_experts`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax import dialect

__all__ = ["PerExpertWeights", "split_experts", "stack_experts", "is_split", "with_layout_of", "RelaidLeaf",
           "regroup"]


@dataclasses.dataclass(frozen=True)
class PerExpertWeights:
    """An expert weight stored as one buffer per expert.

    ``experts[e]`` is expert ``e``'s ``[k, n]`` weight: a float array or a
    quantized tensor (anything with ``dequantize(dtype)``). The object behaves
    like the stacked weight it came from for ``shape``, ``format``, ``nbytes``
    and ``dequantize`` (which stacks, i.e. copies: fast paths index ``experts``).
    """

    experts: tuple[Any, ...]
    layout = "per-expert"  # class attribute: shown in the expert op's weight_format

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape of the stacked weight, ``(E, k, n)``."""
        return (len(self.experts), *tuple(self.experts[0].shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def format(self) -> str:
        """Storage format of the experts (``float``, ``int4-g64`` ...), as for the stacked weight."""
        return dialect.weight_format_of(self.experts)

    @property
    def nbytes(self) -> int:
        return int(sum(np.prod(np.shape(x)) * jnp.dtype(x.dtype).itemsize
                       for x in jax.tree_util.tree_leaves(self.experts)))

    def expert(self, e: int, dtype: Any) -> jax.Array:
        """Expert ``e``'s float weight ``[k, n]`` (dequantized when stored quantized)."""
        return dialect.materialize(self.experts[e], dtype)

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The stacked float weight ``[E, k, n]`` (a copy of every expert)."""
        return jnp.stack([self.expert(e, dtype) for e in range(len(self.experts))])

    def __repr__(self) -> str:
        return f"PerExpertWeights({len(self.experts)} x {self.format})"


jax.tree_util.register_dataclass(PerExpertWeights, data_fields=["experts"], meta_fields=[])


def is_split(w: Any) -> bool:
    """True for a weight stored one buffer per expert."""
    return isinstance(w, PerExpertWeights)


def _expert_of(w: Any, e: int) -> Any:
    """Expert ``e`` of a stacked weight ``[E, k, n]`` (array or quantized pytree)."""
    if hasattr(w, "parts") and hasattr(w, "perm"):  # MixedExpertTensor: experts live in per-width parts
        perm = np.asarray(w.perm)
        offsets = np.cumsum([0] + [p.shape[0] for p in w.parts])
        row = int(perm[e])
        part = int(np.searchsorted(offsets, row, side="right") - 1)
        return _expert_of(w.parts[part], row - int(offsets[part]))
    return jax.tree_util.tree_map(lambda a: a[e], w)


def split_experts(w: Any) -> PerExpertWeights:
    """One buffer per expert from a stacked ``[E, k, n]`` weight (float or quantized).

    Raises ``ValueError`` for weights with extra leading axes (scanned layers
    stack ``[L, E, k, n]``; their per-layer slices are made by the scan).
    """
    if is_split(w):
        return w
    if len(w.shape) != 3:
        raise ValueError(f"split_experts: expected a stacked expert weight [E, k, n], got shape {tuple(w.shape)} "
                         "(weights of scanned layers keep the stacked layout)")
    return PerExpertWeights(tuple(_expert_of(w, e) for e in range(int(w.shape[0]))))


def stack_experts(w: Any) -> Any:
    """The stacked layout of a weight (inverse of :func:`split_experts`; stacked weights pass through).

    Experts stored in different formats (mixed precision) are stacked per
    format again, as a ``MixedExpertTensor``.
    """
    if not is_split(w):
        return w
    groups: dict[Any, list[int]] = {}
    for e, x in enumerate(w.experts):
        groups.setdefault(jax.tree_util.tree_structure(x), []).append(e)
    stack = [jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[w.experts[e] for e in es])
             for es in groups.values()]
    if len(stack) == 1:
        return stack[0]
    from moejax.passes.quantize import MixedExpertTensor  # noqa: PLC0415 - the format lives with its pass

    order = [e for es in groups.values() for e in es]  # expert at each row of the concatenated parts
    perm = np.empty(len(order), np.int32)
    perm[order] = np.arange(len(order), dtype=np.int32)
    return MixedExpertTensor(tuple(stack), jnp.asarray(perm))


def with_layout_of(w: Any, split: bool) -> Any:
    """``w`` split per expert (``split``) or stacked; formats are unchanged."""
    return split_experts(w) if split else stack_experts(w)


@dataclasses.dataclass(frozen=True)
class RelaidLeaf:
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

    def dequantize(self, dtype: Any = None) -> jax.Array:
        return jax.tree_util.tree_leaves(with_layout_of(self.value, self.old_split))[self.index]


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
