"""Per-tile math shared by every grouped-matmul driver (TPU Mosaic, GPU Triton).

A driver moves tiles; these functions turn a tile of ``lhs`` and a tile of one
right-hand side (float, int8 or packed int4, with its scales) into an f32
``[tm, tn]`` partial product, and apply the fused epilogue. Dequantization uses
:func:`quant_format.dequant_values`, the same formula as
``QuantizedTensor.dequantize``, so kernels reproduce the reference element for
element before the dot.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from moejax.pallas_kernels.quant_format import dequant_values, implicit_zero

__all__ = ["RhsSpec", "tile_product", "apply_epilogue", "EPILOGUES"]

EPILOGUES = ("none", "swiglu", "geglu", "gelu", "relu", "silu")
GATED = ("swiglu", "geglu")


@dataclasses.dataclass(frozen=True)
class RhsSpec:
    """How one right-hand side is stored (static, hashable).

    kind: ``"float"``, ``"int8"`` or ``"int4"``; ``group_size`` in rows of k
    (int4; ``None`` = per channel); ``has_zero``: asymmetric (a zero array
    follows the scale).
    """

    kind: str = "float"
    group_size: int | None = None
    has_zero: bool = False

    @property
    def num_arrays(self) -> int:
        return 1 if self.kind == "float" else 2 + int(self.has_zero)

    @property
    def lhs_parts(self) -> int:
        """int4 consumes lhs as (even columns, odd columns)."""
        return 2 if self.kind == "int4" else 1


def _expand_rows(a: jax.Array, rows: int) -> jax.Array:
    """Repeat each of ``a``'s ``g`` rows ``rows // g`` times (g=1: plain broadcast)."""
    g, tn = a.shape
    if g == 1:
        return a
    return jnp.broadcast_to(a[:, None, :], (g, rows // g, tn)).reshape(rows, tn)


def tile_product(spec: RhsSpec, x_parts: Sequence[jax.Array], rhs_tiles: Sequence[jax.Array],
                 compute_dtype: Any) -> jax.Array:
    """f32 ``[tm, tn]`` product of an lhs tile with one rhs tile.

    * float: ``rhs_tiles = (w [tk, tn],)``
    * int8: ``(q [tk, tn], scale [1, tn][, zero [1, tn]])``
    * int4: ``(packed [tk/2, tn], scale [tk/gs, tn][, zero])`` with
      ``x_parts = (lhs[:, 0::2] tile, lhs[:, 1::2] tile)``.
    """
    dot = lambda a, b: jax.lax.dot_general(  # noqa: E731
        a.astype(compute_dtype), b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    if spec.kind == "float":
        return dot(x_parts[0], rhs_tiles[0].astype(compute_dtype))
    if spec.kind == "int8":
        q, scale = rhs_tiles[0], rhs_tiles[1]
        zero = rhs_tiles[2] if spec.has_zero else implicit_zero(8)
        return dot(x_parts[0], dequant_values(q, scale, zero, compute_dtype))
    if spec.kind == "int4":
        packed, scale = rhs_tiles[0], rhs_tiles[1]
        half = packed.shape[0]
        scale = _expand_rows(scale, half)
        zero = _expand_rows(rhs_tiles[2], half) if spec.has_zero else implicit_zero(4)
        packed = packed.astype(jnp.int32)  # shifts on 32-bit lanes lower everywhere
        lo = dequant_values(packed & 0xF, scale, zero, compute_dtype)   # rows 2i
        hi = dequant_values(packed >> 4, scale, zero, compute_dtype)    # rows 2i+1
        return dot(x_parts[0], lo) + dot(x_parts[1], hi)
    raise ValueError(f"unknown rhs kind {spec.kind!r}")


def sigmoid(x: jax.Array) -> jax.Array:
    """Logistic as ``1 / (1 + exp(-x))``: Mosaic's ``logistic`` rule needs a live TPU to lower."""
    return 1.0 / (1.0 + jnp.exp(-x))


def _erf_poly(z: jax.Array) -> jax.Array:
    """erf via Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): Triton lowers exp, not erf."""
    a = jnp.abs(z)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    r = 1.0 - poly * jnp.exp(-a * a)
    return jnp.where(z < 0, -r, r)


def _gelu_exact(x: jax.Array, poly_erf: bool) -> jax.Array:
    # erf form of jax.nn.gelu(approximate=False); Pallas TPU lowers erf but not erfc.
    z = x * 0.7071067811865476
    return 0.5 * x * (1.0 + (_erf_poly(z) if poly_erf else jax.lax.erf(z)))


def apply_epilogue(epilogue: str, accs: Sequence[jax.Array], poly_erf: bool = False) -> jax.Array:
    """Combine f32 accumulators: identity, gated ``act(gate, up)`` or ``act(x)``.

    ``poly_erf`` replaces ``erf`` (GELU) by a polynomial for backends without it.
    """
    if epilogue == "none":
        return accs[0]
    if epilogue == "swiglu":
        g, u = accs
        return g * sigmoid(g) * u
    if epilogue == "geglu":
        g, u = accs
        return _gelu_exact(g, poly_erf) * u
    x = accs[0]
    if epilogue == "gelu":
        return _gelu_exact(x, poly_erf)
    if epilogue == "relu":
        return jnp.maximum(x, 0.0)
    if epilogue == "silu":
        return x * sigmoid(x)
    raise ValueError(f"unknown epilogue {epilogue!r}; expected one of {EPILOGUES}")
