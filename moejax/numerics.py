"""Finding NaN/Inf in weights and outputs, with errors that say where.

A NaN in a weight spreads silently: quantization turns it into finite garbage,
and an exactness check that compares NaN outputs blames an innocent pass. So
weights are checked where they come in (:func:`moejax.trace`, checkpoint
loading) and outputs after every stage of a pipeline.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["NonFiniteError", "is_float", "count_nonfinite", "nonfinite_leaves", "describe", "check_finite_weights"]


class NonFiniteError(ValueError):
    """A weight or an output holds NaN or Inf values."""


def is_float(x: Any) -> bool:
    """Whether ``x`` is an array of a floating dtype (including bfloat16 and float8)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return False
    try:
        return bool(jnp.issubdtype(dtype, jnp.floating))
    except TypeError:  # extended dtypes (PRNG keys) are not numeric
        return False


def count_nonfinite(x: Any) -> int:
    """Number of NaN/Inf elements of a float array (0 for non-float arrays and for shapes, ``ShapeDtypeStruct``)."""
    if not is_float(x) or isinstance(x, jax.ShapeDtypeStruct):  # a shape has no values to check
        return 0
    if isinstance(x, jax.Array) and x.is_fully_addressable and all(d.platform == "cpu" for d in x.devices()):
        # host memory already: numpy reads it in place, where jnp would compile two programs per shape
        x = np.asarray(x)
    if isinstance(x, np.ndarray):
        # numpy cannot run isfinite on ml_dtypes (bfloat16) arrays: widen first
        a = x if x.dtype.kind == "f" else x.astype(np.float32)
        return int(a.size - np.count_nonzero(np.isfinite(a)))
    # on an accelerator: one reduction, no copy of the weight to the host
    finite = jnp.isfinite(x)
    if bool(jnp.all(finite)):
        return 0
    return int(finite.size - jnp.count_nonzero(finite))


def _leaf_name(path: tuple[Any, ...]) -> str:
    from moejax.program import path_to_str  # local: program imports this module

    return path_to_str(path)


def nonfinite_leaves(tree: Any) -> list[tuple[str, int]]:
    """``(leaf path, NaN/Inf count)`` for every float leaf of ``tree`` that is not all finite."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        n = count_nonfinite(leaf)
        if n:
            bad.append((_leaf_name(path), n))
    return bad


def describe(bad: Iterable[tuple[str, int]], limit: int = 3) -> str:
    """``'a' (3 NaN/Inf values), 'b' (1 ...)`` for the first ``limit`` entries."""
    bad = list(bad)
    text = ", ".join(f"{name!r} ({n} NaN/Inf value{'s' if n != 1 else ''})" for name, n in bad[:limit])
    return text + (f" and {len(bad) - limit} more" if len(bad) > limit else "")


def check_finite_weights(weights: Mapping[str, Any], where: str) -> None:
    """Raise :class:`NonFiniteError` naming every weight (path) with NaN/Inf values.

    ``weights`` maps weight paths to arrays or structured weights (pytrees);
    ``where`` says what holds them (``"the model"``, ``"checkpoint DIR"``).
    """
    bad = []
    for path, w in weights.items():
        for leaf_path, n in nonfinite_leaves(w):
            bad.append((f"{path}.{leaf_path}" if leaf_path else path, n))
    if bad:
        raise NonFiniteError(f"weight {describe(bad)} of {where}: the weights are corrupt (a damaged checkpoint or "
                             f"a diverged training run); reload or re-export the checkpoint")
