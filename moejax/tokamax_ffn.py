"""The ``"tokamax"`` implementation of ``moe_expert_ffn``: tokamax's ``ragged_dot``.

`tokamax <https://github.com/openxla/tokamax>`_ is a library of Pallas kernels
(optional dependency, ``pip install tokamax``). Its ``tokamax.ragged_dot`` has
the signature of ``jax.lax.ragged_dot`` and picks the best kernel it has for
the device (Mosaic GPU on Hopper and later, Triton, Mosaic TPU), falling back
to XLA's ``ragged_dot`` elsewhere (CPU included).

:func:`ffn_tokamax` computes exactly what :func:`moejax.dialect.ffn_reference`
computes: it is :func:`moejax.dialect.ffn_ragged` with tokamax's
``ragged_dot`` for the grouped matmuls: structured (quantized) weights are
dequantized to the rows' dtype first, matmuls accumulate in f32, the
activation runs in f32, the hidden state is cast to the rows' dtype before the
down projection, and rows past ``sum(group_sizes)`` are zero.

Importing this module registers the implementation when tokamax is installed
(``select-impl(impl=tokamax)``); without tokamax it imports cleanly and
registers nothing. tokamax itself is imported on the first call, so that
``import moejax`` does not pay for it (about a second).
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from moejax import dialect

__all__ = ["ffn_tokamax", "load_tokamax", "AVAILABLE", "UNAVAILABLE_REASON"]

AVAILABLE: bool = importlib.util.find_spec("tokamax") is not None
UNAVAILABLE_REASON: str | None = None if AVAILABLE else "tokamax not installed (pip install tokamax)"


def load_tokamax() -> Any:
    """Import tokamax, ready to call from a program with its own command line.

    tokamax reads its options from absl flags and, on first use, parses
    ``sys.argv`` with them unless absl has parsed it already: any other
    program's flags (``--out``, ``--passes`` ...) would stop the first call
    with ``UnrecognizedFlagError``. Unless the program runs under absl, the
    flags are marked parsed here, so tokamax uses its defaults.
    """
    try:
        module = importlib.import_module("tokamax")
        from absl import flags  # a dependency of tokamax

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        return module
    except Exception as e:  # installed but broken (e.g. a missing dependency): say so in one line
        raise ImportError(f"impl='tokamax': tokamax is installed but does not import: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def ffn_tokamax(grouped: jax.Array, group_sizes: jax.Array, weights: Sequence[Any], *,
                activation: str) -> jax.Array:
    """Expert FFN over rows sorted by expert with ``tokamax.ragged_dot``.

    Args:
      grouped: ``[N, d]`` rows sorted by expert.
      group_sizes: ``[E]`` rows per expert.
      weights: ``(w_gate, w_up, w_down)`` for gated activations or
        ``(w_up, w_down)``; float arrays or structured weights
        (:mod:`moejax.weight_formats`), which are dequantized to ``grouped.dtype``.
      activation: one of ``moejax.dialect.ACTIVATIONS``.

    Returns ``[N, d]`` in ``grouped.dtype``.
    """
    out = dialect.ffn_ragged(grouped, group_sizes, weights, activation=activation,
                             ragged_dot=load_tokamax().ragged_dot)
    # XLA's ragged_dot zeroes rows past the groups; a kernel need not write them at all.
    rows = jnp.arange(grouped.shape[0], dtype=jnp.int32)
    return jnp.where((rows < jnp.sum(group_sizes))[:, None], out, jnp.zeros((), out.dtype))

if AVAILABLE:
    dialect.register_ffn_impl("tokamax", ffn_tokamax)
