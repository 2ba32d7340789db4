"""Expert FFN on grouped rows with the Pallas kernels: the ``"pallas"`` implementation.

``ffn_pallas`` computes exactly what :func:`moejax.dialect.ffn_reference`
computes: for gated activations ``act(x W_gate, x W_up) W_down`` (gate and up
fused in one kernel, activation in the kernel epilogue), otherwise
``act(x W_up) W_down``; f32 accumulation, hidden activations cast to the input
dtype, rows past ``sum(group_sizes)`` zero.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from moejax import weight_formats
from moejax.pallas_kernels.gmm import gmm, gmm_gated, rhs_spec
from moejax.pallas_kernels.quant_format import QuantizedTensor
from moejax.pallas_kernels.tile_math import GATED

__all__ = ["ffn_pallas", "kernel_weight"]


def _kernel_can_take(w: QuantizedTensor, k: int) -> bool:
    """Whether the in-kernel dequantization supports this quantized weight."""
    if w.axis != -2 or w.bits not in (4, 8):
        return False
    if w.bits == 8:
        return w.group_size is None
    gs = w.group_size or k
    # Triton needs the k tile (= group) to be a power of two >= 16.
    return gs % 2 == 0 and gs >= 16 and gs & (gs - 1) == 0


def kernel_weight(w: Any, dtype: Any) -> Any:
    """The form of an expert weight the kernels consume.

    A :class:`QuantizedTensor` the kernel dequantizes stays quantized; other
    structured weights (:mod:`moejax.weight_formats`) are dequantized to
    ``dtype``; float arrays are cast to ``dtype`` (as the reference does).
    """
    if isinstance(w, QuantizedTensor) and _kernel_can_take(w, w.shape[-2]):
        return w
    return weight_formats.dequantize(w, dtype)


def ffn_pallas(grouped: jax.Array, group_sizes: jax.Array, weights: Sequence[Any], *, activation: str,
               backend: str | None = None, interpret: bool | None = None) -> jax.Array:
    """Expert FFN over rows sorted by expert; the ``"pallas"`` ``moe_expert_ffn`` impl.

    Args:
      grouped: ``[N, d]`` rows sorted by expert.
      group_sizes: ``[E]`` rows per expert.
      weights: ``(w_gate, w_up, w_down)`` for ``swiglu``/``geglu`` or
        ``(w_up, w_down)``; float arrays or :class:`QuantizedTensor`.
      activation: one of ``moejax.dialect.ACTIVATIONS``.
      backend, interpret: as for :func:`gmm` (default: chosen per platform).

    Differentiable (forward and reverse mode): the kernels compute the value,
    the tangent is the JVP of the same function written with ``ragged_dot``
    (``moejax.dialect.ffn_ragged``), so calibration and fine-tuning work.
    """
    return _ffn_diff(grouped, group_sizes, tuple(weights), activation, backend, interpret)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _ffn_diff(grouped, group_sizes, weights, activation, backend, interpret):
    return _ffn_forward(grouped, group_sizes, weights, activation=activation, backend=backend, interpret=interpret)


@_ffn_diff.defjvp
def _ffn_diff_jvp(activation, backend, interpret, primals, tangents):
    from moejax.dialect import ffn_ragged

    grouped, group_sizes, weights = primals
    out = _ffn_diff(grouped, group_sizes, weights, activation, backend, interpret)
    _, tangent = jax.jvp(lambda x, w: ffn_ragged(x, group_sizes, w, activation=activation),
                         (grouped, weights), (tangents[0], tangents[2]))
    return out, tangent


def _ffn_forward(grouped, group_sizes, weights, *, activation, backend, interpret):
    dtype = grouped.dtype
    mats = [kernel_weight(w, dtype) for w in weights]
    kw = dict(backend=backend, interpret=interpret)
    gated = activation in GATED
    if len(mats) != (3 if gated else 2):
        raise ValueError(f"ffn_pallas: activation {activation!r} needs {3 if gated else 2} weights, got {len(mats)}")
    if gated:
        w_gate, w_up = mats[0], mats[1]
        if rhs_spec(w_gate)[0] == rhs_spec(w_up)[0]:
            h = gmm_gated(grouped, w_gate, w_up, group_sizes, activation=activation, out_dtype=dtype, **kw)
        else:  # mixed storage formats cannot share one kernel: two products, activation in XLA
            from moejax.dialect import activation_fn
            g = gmm(grouped, w_gate, group_sizes, **kw)
            u = gmm(grouped, w_up, group_sizes, **kw)
            h = activation_fn(activation)(g, u).astype(dtype)
    else:
        h = gmm(grouped, mats[0], group_sizes, epilogue=activation, preferred_element_type=dtype, **kw)
    out = gmm(h, mats[-1], group_sizes, preferred_element_type=jnp.float32, **kw)
    return out.astype(dtype)
