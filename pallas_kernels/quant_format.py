"""Storage format of quantized expert weights (int8 per channel, int4 group-wise).

One format, shared by the quantization pass and the Pallas kernels that
dequantize it in registers. A weight ``w[..., k, n]`` (``k`` is the contraction
axis, ``axis=-2``) is stored as integers ``q``, a float ``scale`` and, for
asymmetric quantization, a float ``zero``:

    w ~= (q - zero) * scale          (elementwise, f32 math, then cast)

* Groups run along the contraction axis: ``group_size`` consecutive rows of
  ``k`` share one scale (and zero) per output column ``n``. ``group_size=None``
  means one group spanning all of ``k``: per-output-channel quantization.
  ``scale`` and ``zero`` have shape ``[..., k // group_size, n]`` (``[..., 1, n]``
  per channel).
* ``bits=8``: ``q`` is ``int8`` ``[..., k, n]`` in [-128, 127]; symmetric uses
  zero 0 and values in [-127, 127].
* ``bits=4``: values are unsigned nibbles ``u`` in [0, 15], packed two per
  ``uint8`` along ``k``: byte ``i`` holds row ``2i`` in its low nibble and row
  ``2i+1`` in its high nibble, so ``q`` is ``uint8`` ``[..., k // 2, n]``.
  Symmetric int4 is offset binary: zero is the constant 8 and values lie in
  [1, 15] (signed [-7, 7]).
* ``zero`` is ``None`` for symmetric quantization (the constant above) and a
  float array (not rounded to an integer, which keeps the rounding error at
  most ``scale / 2``) for asymmetric quantization.

Error bound (both modes, any bits): ``|w - dequantize(q)| <= scale / 2`` per
element, up to f32 rounding.

The pytree :class:`QuantizedTensor` carries only ``bits``, ``group_size``,
``symmetric`` and the packing ``axis`` (counted from the end) as static
metadata; the logical shape is derived from ``q``. That keeps the metadata
valid when ``q`` is sliced along leading axes (``jax.lax.scan`` over stacked
layers) or vmapped.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "QuantizedTensor",
    "quantize",
    "quantize_array",
    "dequantize_array",
    "pack_int4",
    "unpack_int4",
    "implicit_zero",
    "dequant_values",
    "SUPPORTED_BITS",
]

SUPPORTED_BITS = (4, 8)
_QRANGE = {8: (-128, 127), 4: (0, 15)}


def implicit_zero(bits: int) -> float:
    """The zero point of symmetric quantization (0 for int8, 8 for offset-binary int4)."""
    return 8.0 if bits == 4 else 0.0


def dequant_values(q_ints: jax.Array, scale: jax.Array, zero: jax.Array | float,
                   dtype: Any) -> jax.Array:
    """``((q - zero) * scale).astype(dtype)`` in f32: the one dequantization formula.

    The Pallas kernels call this on tiles so that they reproduce
    :meth:`QuantizedTensor.dequantize` element for element.
    """
    return ((q_ints.astype(jnp.float32) - zero) * scale.astype(jnp.float32)).astype(dtype)


def _check_axis(ndim: int, axis: int) -> int:
    if not -ndim <= axis < 0:
        raise ValueError(f"quantization axis must be counted from the end (e.g. -2) and lie within "
                         f"the array's {ndim} dims, got axis={axis}")
    return axis


def pack_int4(u: jax.Array, axis: int = -2) -> jax.Array:
    """Pack unsigned nibbles (values 0..15) two per ``uint8`` along ``axis``.

    Byte ``i`` = ``u[2i] | u[2i+1] << 4`` along ``axis``; the axis must be even.
    """
    axis = _check_axis(u.ndim, axis)
    if u.shape[axis] % 2:
        raise ValueError(f"pack_int4: axis {axis} has odd length {u.shape[axis]}; int4 packing "
                         "needs an even contraction dimension (pad the weight by one row)")
    u = jnp.asarray(u).astype(jnp.uint8)
    lo = jax.lax.slice_in_dim(u, 0, None, 2, axis=u.ndim + axis)
    hi = jax.lax.slice_in_dim(u, 1, None, 2, axis=u.ndim + axis)
    return (lo & 0xF) | ((hi & 0xF) << 4)


def unpack_int4(p: jax.Array, axis: int = -2) -> jax.Array:
    """Inverse of :func:`pack_int4`: ``uint8`` nibbles in 0..15, axis length doubled."""
    axis = _check_axis(p.ndim, axis)
    ax = p.ndim + axis
    lo = p & 0xF
    hi = p >> 4
    both = jnp.stack([lo, hi], axis=ax + 1)  # [..., k/2, 2, ...]: row 2i then 2i+1
    shape = list(p.shape)
    shape[ax] *= 2
    return both.reshape(shape).astype(jnp.uint8)


def quantize_array(w: jax.Array, bits: int, group_size: int | None = None, symmetric: bool = True,
                   axis: int = -2) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Quantize ``w`` along ``axis``; returns ``(q, scale, zero_or_None)`` (see module doc)."""
    # One compiled program per configuration instead of a dozen eager ops.
    return _quantize_jit(w, bits=bits, group_size=group_size, symmetric=symmetric, axis=axis)


def _quantize_impl(w, *, bits, group_size, symmetric, axis):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"quantize: bits must be one of {SUPPORTED_BITS}, got {bits}")
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"quantize: expected a float weight, got dtype {w.dtype}")
    if w.ndim < 2:
        raise ValueError(f"quantize: expected a weight [..., k, n] with at least 2 dims, got shape {w.shape}")
    axis = _check_axis(w.ndim, axis)
    ax = w.ndim + axis
    k = w.shape[ax]
    gs = k if group_size is None else int(group_size)
    if gs <= 0 or k % gs:
        raise ValueError(f"quantize: contraction dim {k} (axis {axis}) is not a multiple of group_size="
                         f"{group_size}; pick a group size dividing {k} or group_size=None (per channel)")
    if bits == 4 and (gs % 2 or k % 2):
        raise ValueError(f"quantize: int4 packs two rows per byte, so k={k} and group_size={gs} must be even")
    wf = w.astype(jnp.float32)
    grouped = wf.reshape(*w.shape[:ax], k // gs, gs, *w.shape[ax + 1:])  # group axis = ax, members ax+1
    qmin, qmax = _QRANGE[bits]
    if symmetric:
        half = 127.0 if bits == 8 else 7.0
        amax = jnp.max(jnp.abs(grouped), axis=ax + 1)
        scale = jnp.where(amax > 0, amax / half, 1.0)
        zero_v = implicit_zero(bits)
        zero = None
    else:
        lo = jnp.min(grouped, axis=ax + 1)
        hi = jnp.max(grouped, axis=ax + 1)
        scale = jnp.where(hi > lo, (hi - lo) / (qmax - qmin), 1.0)
        zero = qmin - lo / scale  # w/scale + zero lies in [qmin, qmax]
        zero_v = jnp.expand_dims(zero, ax + 1)
    ints = jnp.clip(jnp.round(grouped / jnp.expand_dims(scale, ax + 1) + zero_v), qmin, qmax)
    ints = ints.reshape(w.shape)
    if bits == 8:
        q = ints.astype(jnp.int8)
    else:
        q = pack_int4(ints.astype(jnp.uint8), axis=axis)
    return q, scale, zero


_quantize_jit = jax.jit(_quantize_impl, static_argnames=("bits", "group_size", "symmetric", "axis"))


def _expand_groups(a: jax.Array, k: int, axis: int) -> jax.Array:
    """Repeat per-group rows of ``a`` so the group axis has length ``k``."""
    ax = a.ndim + axis
    return jnp.repeat(a, k // a.shape[ax], axis=ax, total_repeat_length=k)


def dequantize_array(q: jax.Array, scale: jax.Array, zero: jax.Array | None, *, bits: int,
                     dtype: Any = jnp.float32, axis: int = -2) -> jax.Array:
    """Float weight from ``(q, scale, zero)``: ``((q - zero) * scale).astype(dtype)``."""
    return _dequantize_jit(q, scale, zero, bits=bits, dtype=jnp.dtype(dtype), axis=axis)


def _dequantize_impl(q, scale, zero, *, bits, dtype, axis):
    ints = unpack_int4(q, axis) if bits == 4 else q
    k = ints.shape[ints.ndim + axis]
    s = _expand_groups(scale, k, axis)
    z = implicit_zero(bits) if zero is None else _expand_groups(zero, k, axis)
    return dequant_values(ints, s, z, dtype)


_dequantize_jit = jax.jit(_dequantize_impl, static_argnames=("bits", "dtype", "axis"))


def format_name(bits: int, group_size: int | None, symmetric: bool) -> str:
    """The printed storage format: ``int8``, ``int4-g128``, ``int3-g64-asym`` ..."""
    name = f"int{bits}" + (f"-g{group_size}" if group_size else "")
    return name if symmetric else name + "-asym"


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A quantized weight as a pytree: leaves ``q``, ``scale``, ``zero`` (or None).

    Static metadata is only ``bits``, ``group_size`` (None = per output channel),
    ``symmetric`` and ``axis`` (the packed/contraction axis counted from the end).
    The logical shape is derived from ``q`` so that slices of stacked weights
    (``scan``, ``vmap``) stay consistent. Build one with :func:`quantize`.
    """

    q: Any
    scale: Any
    zero: Any = None
    bits: int = dataclasses.field(default=8, metadata=dict(static=True))
    group_size: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    symmetric: bool = dataclasses.field(default=True, metadata=dict(static=True))
    axis: int = dataclasses.field(default=-2, metadata=dict(static=True))

    # No validation in __init__: JAX rebuilds pytrees with placeholder leaves.
    @property
    def shape(self) -> tuple[int, ...]:
        """Logical (unpacked) shape of the float weight."""
        shape = list(np.shape(self.q))
        if self.bits == 4:
            shape[len(shape) + self.axis] *= 2
        return tuple(shape)

    @property
    def ndim(self) -> int:
        return len(np.shape(self.q))

    @property
    def format(self) -> str:
        """``"int8"``, ``"int4-g128"``, ``"int8-g64"``...; ``-asym`` when asymmetric."""
        return format_name(self.bits, self.group_size, self.symmetric)

    @property
    def nbytes(self) -> int:
        """Stored bytes of q, scale and zero."""
        leaves = [self.q, self.scale] + ([] if self.zero is None else [self.zero])
        return int(sum(np.prod(np.shape(x)) * jnp.dtype(x.dtype).itemsize for x in leaves))

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The float weight, ``((q - zero) * scale).astype(dtype)``."""
        return dequantize_array(self.q, self.scale, self.zero, bits=self.bits, dtype=dtype, axis=self.axis)

    def validate(self) -> QuantizedTensor:
        """Check leaf shapes and dtypes against the metadata; returns self or raises."""
        shape = self.shape
        ax = len(shape) + self.axis
        k = shape[ax]
        gs = self.group_size or k
        want_q = jnp.int8 if self.bits == 8 else jnp.uint8
        if jnp.dtype(self.q.dtype) != want_q:
            raise TypeError(f"QuantizedTensor[{self.format}]: q must be {jnp.dtype(want_q).name}, got {self.q.dtype}")
        if k % gs:
            raise ValueError(f"QuantizedTensor[{self.format}]: k={k} not a multiple of group_size={gs}")
        want_s = list(shape)
        want_s[ax] = k // gs
        if tuple(np.shape(self.scale)) != tuple(want_s):
            raise ValueError(f"QuantizedTensor[{self.format}]: scale shape {np.shape(self.scale)} != {tuple(want_s)}")
        if self.symmetric != (self.zero is None):
            raise ValueError(f"QuantizedTensor[{self.format}]: zero must be None exactly when symmetric")
        if self.zero is not None and tuple(np.shape(self.zero)) != tuple(want_s):
            raise ValueError(f"QuantizedTensor[{self.format}]: zero shape {np.shape(self.zero)} != {tuple(want_s)}")
        return self

    def __repr__(self) -> str:
        try:  # leaves may be placeholders while JAX rebuilds the pytree
            shape = self.shape
        except (TypeError, IndexError):
            shape = "?"
        return f"QuantizedTensor({self.format}, shape={shape})"


jax.tree_util.register_dataclass(
    QuantizedTensor, data_fields=["q", "scale", "zero"], meta_fields=["bits", "group_size", "symmetric", "axis"])


def quantize(w: jax.Array, bits: int = 8, group_size: int | None = None, symmetric: bool = True,
             axis: int = -2) -> QuantizedTensor:
    """Quantize ``w[E, k, n]`` or ``w[k, n]`` along the contraction axis.

    ``bits=8`` with ``group_size=None`` is int8 per output channel; ``bits=4``
    with ``group_size=128`` is the usual int4 group-wise format (two values per
    byte along ``k``). Raises if ``k`` is not a multiple of ``group_size``.
    """
    q, scale, zero = quantize_array(w, bits, group_size, symmetric, axis)
    return QuantizedTensor(q, scale, zero, bits=bits, group_size=group_size, symmetric=symmetric, axis=axis)
