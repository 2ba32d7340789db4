"""Storage formats of expert weights: one protocol, one registry, every format.

An expert weight is either a plain array (``float``: any dtype, used as is) or
a *structured* weight: an instance of :class:`ExpertWeight`, a frozen dataclass
registered as a JAX pytree by :func:`register_format`. Its data fields are
pytree leaves (arrays whose leading axes are the stacking axes, so
``jax.lax.scan`` over stacked layers and ``vmap`` slice them consistently); its
meta fields are static. Every format answers the same protocol:

=====================  =====================================================
``shape``              logical float shape: ``(E, k, n)`` or ``(L, E, k, n)``
``format``             printed name: ``int8``, ``int4-g64``, ``int3-g64-asym``,
                       ``fp8-e4m3-b128``, ``mxfp4``, ``mixed(int8x2,int4-g64x6)``
``nbytes``             stored bytes of all leaves
``dequantize(dtype)``  the whole float weight
``expert(e)``          expert ``e`` of a stacked ``[E, k, n]`` weight, same format
``to_tensors(prefix)`` the leaves as named numpy arrays (safetensors-ready)
``from_tensors(...)``  classmethod: the inverse
=====================  =====================================================

Module-level helpers accept plain arrays too: :func:`is_structured`,
:func:`dequantize`, :func:`format_of`, :func:`nbytes_of`, :func:`expert_slice`,
:func:`to_tensors`, :func:`tensors_metadata`, :func:`from_tensors`.

moejax's expert matrices are ``[..., k, n]`` with the contraction (input) axis
``k = -2``. Formats defined here:

* :class:`QuantizedTensor` -- ``int8`` per output channel (or group-wise) and
  ``int4-g<G>`` (two nibbles per byte along ``k``), the format the Pallas
  kernels dequantize in registers.
* :class:`LowBitTensor` -- ``int3``/``int2`` group-wise, bit-plane packed.
* :class:`MixedExpertTensor` -- a bit-width per expert.
* :class:`Fp8BlockTensor` -- FP8 e4m3 with 128x128 block scales, DeepSeek-V3
  checkpoint layout.
* :class:`Mxfp4Tensor` -- MXFP4 (e2m1 values, e8m0 scale per 32), gpt-oss
  checkpoint layout.

Checkpoint formats keep the checkpoint's orientation (why: reading a checkpoint
is then a wrap, not a transpose, and :meth:`ExpertWeight.to_tensors` writes the
checkpoint's tensors bit for bit). Both checkpoints store a linear layer as
``[out, in] = [n, k]``, the transpose of moejax's ``[k, n]``; ``dequantize``
returns the moejax orientation ``[..., k, n]``.

This module is core: it imports no pass (passes that add a format subclass
:class:`ExpertWeight` and decorate it with :func:`register_format`).
"""
from __future__ import annotations

import abc
import dataclasses
import json
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    # protocol and registry
    "ExpertWeight", "register_format", "registered_formats", "format_class",
    "is_structured", "dequantize", "format_of", "nbytes_of", "expert_slice",
    "to_tensors", "tensors_metadata", "from_tensors", "describe", "from_description",
    # integer formats
    "QuantizedTensor", "quantize", "quantize_array", "dequantize_array", "pack_int4", "unpack_int4",
    "implicit_zero", "dequant_values", "format_name", "SUPPORTED_BITS",
    "LowBitTensor", "quantize_lowbit", "pack_bitplanes", "unpack_bitplanes", "LOW_BITS",
    "MixedExpertTensor",
    # checkpoint formats
    "Fp8BlockTensor", "quantize_fp8_block", "FP8_E4M3_MAX",
    "Mxfp4Tensor", "quantize_mxfp4", "E2M1_VALUES", "MXFP4_BLOCK",
]

W = TypeVar("W", bound="ExpertWeight")


# --------------------------------------------------------------------------
# The protocol.
# --------------------------------------------------------------------------
class ExpertWeight(abc.ABC):
    """Base class of structured expert weights (see the module doc for the protocol).

    Subclasses are frozen dataclasses decorated with :func:`register_format`;
    static fields carry ``metadata=dict(static=True)``. No validation runs in
    ``__init__``: JAX rebuilds pytrees with placeholder leaves.
    """

    data_fields: ClassVar[tuple[str, ...]] = ()  # set by register_format
    meta_fields: ClassVar[tuple[str, ...]] = ()  # set by register_format
    # Tensor-name suffix of each data field in to_tensors (default "." + field name).
    tensor_suffixes: ClassVar[Mapping[str, str]] = {}
    # "stacked" (leaves stacked over experts) or "per-expert" (one buffer per expert).
    layout: ClassVar[str] = "stacked"

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]:
        """Logical shape of the float weight, e.g. ``(E, k, n)``."""

    @property
    @abc.abstractmethod
    def format(self) -> str:
        """Printed storage format, e.g. ``int4-g64``."""

    @abc.abstractmethod
    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The whole float weight of logical :attr:`shape`, cast to ``dtype``."""

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Stored bytes of every leaf."""
        return _leaf_bytes(self)

    def expert(self: W, e: int) -> W:
        """Expert ``e`` of a stacked ``[E, k, n]`` weight, in the same format.

        The default slices axis 0 of every leaf, which is right for formats whose
        leaves all lead with the expert axis.
        """
        if self.ndim != 3:
            raise ValueError(f"{type(self).__name__}.expert: needs a stacked expert weight [E, k, n], got shape "
                             f"{self.shape}; slice the leading layer axes first")
        return jax.tree_util.tree_map(lambda a: a[e], self)

    def meta(self) -> dict[str, Any]:
        """The static fields (JSON-able values)."""
        return {f: getattr(self, f) for f in self.meta_fields}

    # ---- tensors (safetensors) ----------------------------------------------
    @classmethod
    def _suffix(cls, field: str) -> str:
        return cls.tensor_suffixes.get(field, "." + field)

    def to_tensors(self, prefix: str) -> dict[str, np.ndarray]:
        """The data leaves as ``{prefix + suffix: numpy array}``; ``None`` leaves are left out.

        The arrays keep their stored dtypes (``float8_e4m3fn`` via ml_dtypes),
        so saving them with ``safetensors.numpy.save`` is bit-exact.
        """
        out = {}
        for f in self.data_fields:
            v = getattr(self, f)
            if v is not None:
                out[prefix + self._suffix(f)] = np.ascontiguousarray(np.asarray(v))
        return out

    @classmethod
    def from_tensors(cls: type[W], tensors: Mapping[str, Any], prefix: str, **meta: Any) -> W:
        """Rebuild from :meth:`to_tensors` output; ``meta`` gives the static fields (defaults otherwise)."""
        data = {}
        for f in cls.data_fields:
            name = prefix + cls._suffix(f)
            data[f] = jnp.asarray(tensors[name]) if name in tensors else None
        missing = [prefix + cls._suffix(f) for f in cls._required_fields() if data[f] is None]
        if missing:
            raise KeyError(f"{cls.__name__}.from_tensors: tensors {missing} are missing; pass the dict "
                           f"to_tensors({prefix!r}) produced")
        return cls(**data, **meta)

    @classmethod
    def _required_fields(cls) -> list[str]:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        return [f for f in cls.data_fields if fields[f].default is not None]

    def describe(self) -> dict[str, Any]:
        """JSON-able description (registered class name and static fields) for :func:`from_tensors`."""
        return {"class": _class_name(type(self)), "meta": self.meta()}

    @classmethod
    def from_description(cls: type[W], tensors: Mapping[str, Any], prefix: str, desc: Mapping[str, Any]) -> W:
        """Rebuild from tensors and a :meth:`describe` result."""
        return cls.from_tensors(tensors, prefix, **desc.get("meta", {}))


_REGISTRY: dict[str, type[ExpertWeight]] = {}


def register_format(cls: type[W]) -> type[W]:
    """Class decorator: register a dataclass :class:`ExpertWeight` as a pytree and as a format.

    Fields with ``metadata=dict(static=True)`` are static (pytree metadata);
    the others are leaves. The class is recorded under its name, which
    :func:`from_tensors` uses to rebuild it from a tensors description.
    """
    if not (isinstance(cls, type) and issubclass(cls, ExpertWeight) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"register_format: {cls!r} must be a dataclass subclass of ExpertWeight; decorate it "
                        "with @register_format above @dataclasses.dataclass(frozen=True)")
    name = cls.__name__
    old = _REGISTRY.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"register_format: a format class named {name!r} is already registered "
                         f"({old.__module__}.{old.__qualname__}); give the new class another name")
    fields = dataclasses.fields(cls)
    cls.meta_fields = tuple(f.name for f in fields if f.metadata.get("static"))
    cls.data_fields = tuple(f.name for f in fields if not f.metadata.get("static"))
    jax.tree_util.register_dataclass(cls, data_fields=list(cls.data_fields), meta_fields=list(cls.meta_fields))
    _REGISTRY[name] = cls
    return cls


def registered_formats() -> dict[str, type[ExpertWeight]]:
    """Registered format classes by name."""
    return dict(_REGISTRY)


def format_class(name: str) -> type[ExpertWeight]:
    """The registered format class called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no weight format class {name!r} is registered (known: {sorted(_REGISTRY)}); import the "
                       "module that defines it before reading the tensors") from None


def _class_name(cls: type) -> str:
    return cls.__name__


def _leaf_bytes(tree: Any) -> int:
    return int(sum(np.prod(np.shape(x), dtype=np.int64) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree)))


# --------------------------------------------------------------------------
# Helpers that accept plain arrays too.
# --------------------------------------------------------------------------
def is_structured(x: Any) -> bool:
    """True for a structured expert weight (an :class:`ExpertWeight`), False for a plain array."""
    return isinstance(x, ExpertWeight)


def dequantize(x: Any, dtype: Any = None) -> jax.Array:
    """A float array for ``x``: structured weights are dequantized, arrays cast.

    ``dtype=None`` keeps a plain array's dtype and dequantizes to float32.
    """
    if is_structured(x):
        return x.dequantize(jnp.float32 if dtype is None else dtype)
    x = jnp.asarray(x)
    return x if dtype is None else x.astype(dtype)


def format_of(x: Any) -> str:
    """The storage format name of ``x`` (``"float"`` for plain arrays)."""
    return x.format if is_structured(x) else "float"


def nbytes_of(x: Any) -> int:
    """Stored bytes of ``x`` (a plain array or a structured weight)."""
    return x.nbytes if is_structured(x) else _leaf_bytes(x)


def expert_slice(x: Any, e: int) -> Any:
    """Expert ``e`` of a stacked ``[E, k, n]`` weight, in its format (plain arrays: ``x[e]``)."""
    if is_structured(x):
        return x.expert(e)
    if np.ndim(x) != 3:
        raise ValueError(f"expert_slice: needs a stacked expert weight [E, k, n], got shape {np.shape(x)}; "
                         "slice the leading layer axes first")
    return x[e]


def to_tensors(x: Any, prefix: str) -> dict[str, np.ndarray]:
    """Named numpy arrays for ``x``: ``{prefix: x}`` for a plain array, else ``x.to_tensors(prefix)``."""
    if is_structured(x):
        return x.to_tensors(prefix)
    return {prefix: np.ascontiguousarray(np.asarray(x))}


def describe(x: Any) -> dict[str, Any] | None:
    """:meth:`ExpertWeight.describe` of ``x``, ``None`` for a plain array."""
    return x.describe() if is_structured(x) else None


def tensors_metadata(x: Any, prefix: str) -> dict[str, str]:
    """Header metadata (safetensors ``metadata=``) that lets :func:`from_tensors` rebuild ``x``.

    ``{prefix: json}`` for structured weights, ``{}`` for plain arrays.
    """
    d = describe(x)
    return {} if d is None else {prefix: json.dumps(d, sort_keys=True)}


def from_tensors(tensors: Mapping[str, Any], prefix: str, metadata: Mapping[str, str] | None = None) -> Any:
    """Rebuild the weight saved as ``to_tensors(x, prefix)`` with ``tensors_metadata(x, prefix)``."""
    raw = (metadata or {}).get(prefix)
    if raw is None:
        if prefix not in tensors:
            raise KeyError(f"from_tensors: no tensor {prefix!r} and no format metadata for it; pass the "
                           "metadata tensors_metadata() produced when saving")
        return jnp.asarray(tensors[prefix])
    return from_description(tensors, prefix, json.loads(raw))


def from_description(tensors: Mapping[str, Any], prefix: str, desc: Mapping[str, Any] | None) -> Any:
    """Rebuild a weight from its tensors and :func:`describe` result (``None``: a plain array)."""
    if desc is None:
        return jnp.asarray(tensors[prefix])
    return format_class(desc["class"]).from_description(tensors, prefix, desc)


# --------------------------------------------------------------------------
# int8 / int4: the format the Pallas kernels dequantize in registers.
# --------------------------------------------------------------------------
# A weight ``w[..., k, n]`` (``k`` the contraction axis, ``axis=-2``) is stored as
# integers ``q``, a float ``scale`` and, for asymmetric quantization, a float
# ``zero``:  ``w ~= (q - zero) * scale`` (f32 math, then cast).
#
# * Groups run along ``k``: ``group_size`` consecutive rows share one scale (and
#   zero) per output column. ``group_size=None`` is one group spanning ``k``
#   (per output channel). ``scale``/``zero`` are ``[..., k // group_size, n]``.
# * ``bits=8``: ``q`` int8 ``[..., k, n]``; symmetric uses zero 0, values in [-127, 127].
# * ``bits=4``: unsigned nibbles in [0, 15], two per uint8 along ``k``: byte ``i``
#   holds row ``2i`` in its low nibble and ``2i+1`` in its high nibble. Symmetric
#   int4 is offset binary (zero is the constant 8, values in [1, 15]).
# * Error bound (any mode): ``|w - dequantize(q)| <= scale / 2`` per element.
SUPPORTED_BITS = (4, 8)
_QRANGE = {8: (-128, 127), 4: (0, 15)}


def implicit_zero(bits: int) -> float:
    """The zero point of symmetric quantization (0 for int8, 8 for offset-binary int4)."""
    return 8.0 if bits == 4 else 0.0


def dequant_values(q_ints: jax.Array, scale: jax.Array, zero: jax.Array | float, dtype: Any) -> jax.Array:
    """``((q - zero) * scale).astype(dtype)`` in f32: the one integer dequantization formula.

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
    """Quantize ``w`` along ``axis`` to int8/int4; returns ``(q, scale, zero_or_None)``."""
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
    q = ints.astype(jnp.int8) if bits == 8 else pack_int4(ints.astype(jnp.uint8), axis=axis)
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
    """The printed integer format: ``int8``, ``int4-g128``, ``int3-g64-asym`` ..."""
    name = f"int{bits}" + (f"-g{group_size}" if group_size else "")
    return name if symmetric else name + "-asym"


@register_format
@dataclasses.dataclass(frozen=True)
class QuantizedTensor(ExpertWeight):
    """int8 / int4 weight: leaves ``q``, ``scale``, ``zero`` (or None); see the section comment.

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


def quantize(w: jax.Array, bits: int = 8, group_size: int | None = None, symmetric: bool = True,
             axis: int = -2) -> QuantizedTensor:
    """Quantize ``w[E, k, n]`` or ``w[k, n]`` along the contraction axis to int8 / int4.

    ``bits=8`` with ``group_size=None`` is int8 per output channel; ``bits=4``
    with ``group_size=128`` is the usual int4 group-wise format (two values per
    byte along ``k``). Raises if ``k`` is not a multiple of ``group_size``.
    """
    q, scale, zero = quantize_array(w, bits, group_size, symmetric, axis)
    return QuantizedTensor(q, scale, zero, bits=bits, group_size=group_size, symmetric=symmetric, axis=axis)


# --------------------------------------------------------------------------
# int3 / int2: bit-plane packing.
# --------------------------------------------------------------------------
LOW_BITS = (2, 3)


def pack_bitplanes(u: jax.Array, bits: int) -> jax.Array:
    """Unsigned codes ``[..., k, n]`` (< 2**bits) -> ``uint8 [..., bits * k // 8, n]`` bit-planes.

    Plane ``j`` holds bit ``j`` of every code; byte ``i`` of a plane holds rows
    ``8i .. 8i+7`` (row ``8i + r`` in bit ``r``). ``k`` must be a multiple of 8.
    """
    k = u.shape[-2]
    if k % 8:
        raise ValueError(f"pack_bitplanes: contraction dim {k} must be a multiple of 8 for {bits}-bit packing")
    u = jnp.asarray(u).astype(jnp.uint8)
    rows = u.reshape(*u.shape[:-2], k // 8, 8, u.shape[-1])
    shifts = jnp.arange(8, dtype=jnp.uint8)[:, None]
    planes = [jnp.sum(((rows >> j) & 1) << shifts, axis=-2, dtype=jnp.uint8) for j in range(bits)]
    return jnp.concatenate(planes, axis=-2)


def unpack_bitplanes(p: jax.Array, bits: int) -> jax.Array:
    """Inverse of :func:`pack_bitplanes`: ``uint8`` codes ``[..., k, n]``."""
    kb = p.shape[-2] // bits
    planes = p.reshape(*p.shape[:-2], bits, kb, p.shape[-1])
    shifts = jnp.arange(8, dtype=jnp.uint8)[:, None]
    bits_rows = (planes[..., :, :, None, :] >> shifts) & 1  # [..., bits, k/8, 8, n]
    weights = (jnp.uint8(1) << jnp.arange(bits, dtype=jnp.uint8)).reshape((bits, 1, 1, 1))
    codes = jnp.sum(bits_rows * weights, axis=-4, dtype=jnp.uint8)
    return codes.reshape(*p.shape[:-2], kb * 8, p.shape[-1])


@register_format
@dataclasses.dataclass(frozen=True)
class LowBitTensor(ExpertWeight):
    """A 2- or 3-bit weight: bit-plane packed codes ``q uint8 [..., bits*k/8, n]``, per-group scale (and zero).

    ``w ~= (code - zero) * scale``. Symmetric codes are offset binary (zero
    ``2**(bits-1)``, codes in ``[1, 2**bits - 1]``); asymmetric codes use all
    ``2**bits`` levels with a float zero per group. ``scale``/``zero`` are
    ``[..., k // group_size, n]`` as for :class:`QuantizedTensor`; so int3
    really costs 3/8 byte per weight.
    """

    q: Any
    scale: Any
    zero: Any = None
    bits: int = dataclasses.field(default=2, metadata=dict(static=True))
    group_size: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    symmetric: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        s = list(np.shape(self.q))
        s[-2] = s[-2] // self.bits * 8
        return tuple(s)

    @property
    def format(self) -> str:
        return format_name(self.bits, self.group_size, self.symmetric)

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        codes = unpack_bitplanes(self.q, self.bits)
        k = codes.shape[-2]
        s = jnp.repeat(self.scale, k // self.scale.shape[-2], axis=-2, total_repeat_length=k)
        z = float(2 ** (self.bits - 1)) if self.zero is None else jnp.repeat(
            self.zero, k // self.zero.shape[-2], axis=-2, total_repeat_length=k)
        return dequant_values(codes, s, z, dtype)

    def __repr__(self) -> str:
        return f"LowBitTensor({self.format})"


def quantize_lowbit(w: jax.Array, bits: int, group_size: int | None = None,
                    symmetric: bool = False) -> LowBitTensor:
    """Quantize ``w [..., k, n]`` along ``k`` to 2 or 3 bits (same rounding rules as :func:`quantize`)."""
    if bits not in LOW_BITS:
        raise ValueError(f"quantize_lowbit: bits must be one of {LOW_BITS}, got {bits}; use quantize() for 4 or 8")
    w = jnp.asarray(w)
    k = w.shape[-2]
    gs = group_size or k
    if k % gs:
        raise ValueError(f"quantize_lowbit: contraction dim {k} is not a multiple of group_size={group_size}")
    g = w.astype(jnp.float32).reshape(*w.shape[:-2], k // gs, gs, w.shape[-1])
    if symmetric:
        half = 2.0 ** (bits - 1) - 1
        amax = jnp.max(jnp.abs(g), axis=-2)
        scale = jnp.where(amax > 0, amax / half, 1.0)
        zero, zero_v = None, 2.0 ** (bits - 1)
    else:
        lo, hi = jnp.min(g, axis=-2), jnp.max(g, axis=-2)
        scale = jnp.where(hi > lo, (hi - lo) / (2 ** bits - 1), 1.0)
        zero = -lo / scale
        zero_v = zero[..., None, :]
    codes = jnp.clip(jnp.round(g / scale[..., None, :] + zero_v), 0, 2 ** bits - 1)
    codes = codes.reshape(w.shape).astype(jnp.uint8)
    return LowBitTensor(pack_bitplanes(codes, bits), scale, zero, bits=bits, group_size=group_size,
                        symmetric=symmetric)


# --------------------------------------------------------------------------
# Mixed precision: a bit-width per expert.
# --------------------------------------------------------------------------
@register_format
@dataclasses.dataclass(frozen=True)
class MixedExpertTensor(ExpertWeight):
    """Stacked experts ``[..., E, k, n]`` with a format per expert.

    ``parts`` holds one weight per format with that format's experts stacked
    ``[..., E_b, k, n]``; ``perm int32 [..., E]``: expert ``e`` is row
    ``perm[e]`` of the parts concatenated in their order. ``perm`` is a leaf, so
    layers stacked under ``scan`` can give different experts different widths,
    provided every layer has the same number of experts per part.
    """

    parts: tuple[Any, ...]
    perm: Any

    tensor_suffixes: ClassVar[Mapping[str, str]] = {"perm": ".perm"}

    @property
    def shape(self) -> tuple[int, ...]:
        s = list(np.shape(self.parts[0]) if not is_structured(self.parts[0]) else self.parts[0].shape)
        s[-3] = int(np.shape(self.perm)[-1])
        return tuple(s)

    @property
    def format(self) -> str:
        return "mixed(" + ",".join(f"{format_of(p)}x{_shape_of(p)[-3]}" for p in self.parts) + ")"

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        cat = jnp.concatenate([dequantize(p, dtype) for p in self.parts], axis=-3)
        return jnp.take_along_axis(cat, self.perm[..., None, None], axis=-3)

    def expert(self, e: int) -> Any:
        """Expert ``e`` in its own part's format (``perm`` must be concrete)."""
        if self.ndim != 3:
            raise ValueError(f"MixedExpertTensor.expert: needs a stacked expert weight [E, k, n], got shape "
                             f"{self.shape}; slice the leading layer axes first")
        offsets = np.cumsum([0] + [_shape_of(p)[0] for p in self.parts])
        row = int(np.asarray(self.perm)[e])
        part = int(np.searchsorted(offsets, row, side="right") - 1)
        return expert_slice(self.parts[part], row - int(offsets[part]))

    def to_tensors(self, prefix: str) -> dict[str, np.ndarray]:
        out = {prefix + ".perm": np.ascontiguousarray(np.asarray(self.perm))}
        for i, p in enumerate(self.parts):
            out.update(to_tensors(p, f"{prefix}.parts.{i}"))
        return out

    def describe(self) -> dict[str, Any]:
        return {"class": _class_name(type(self)), "parts": [describe(p) for p in self.parts]}

    @classmethod
    def from_description(cls, tensors: Mapping[str, Any], prefix: str, desc: Mapping[str, Any]) -> MixedExpertTensor:
        parts = tuple(from_description(tensors, f"{prefix}.parts.{i}", d) for i, d in enumerate(desc["parts"]))
        return cls(parts, jnp.asarray(tensors[prefix + ".perm"]))

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Any], prefix: str, **meta: Any) -> MixedExpertTensor:
        raise TypeError("MixedExpertTensor.from_tensors: the parts' formats are not in the tensors; use "
                        "weight_formats.from_tensors(tensors, prefix, metadata) with tensors_metadata(w, prefix)")

    def __repr__(self) -> str:
        return f"MixedExpertTensor({self.format})"


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if is_structured(x) else tuple(np.shape(x))


# --------------------------------------------------------------------------
# FP8 e4m3 with block scales (DeepSeek-V3 checkpoints).
# --------------------------------------------------------------------------
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def _repeat_blocks(s: jax.Array, size: int, block: int, axis: int) -> jax.Array:
    """Repeat each block's scale ``block`` times along ``axis`` and cut to ``size`` (edge blocks may be partial)."""
    return jax.lax.slice_in_dim(jnp.repeat(s, block, axis=axis), 0, size, axis=axis % s.ndim)


@register_format
@dataclasses.dataclass(frozen=True)
class Fp8BlockTensor(ExpertWeight):
    """FP8 e4m3 weight with one float32 scale per ``block_n x block_k`` block (DeepSeek-V3 layout).

    Leaves, exactly as in a DeepSeek-V3 checkpoint (``config.quantization_config
    = {"fmt": "e4m3", "weight_block_size": [128, 128]}``), for a linear layer
    ``[out, in] = [n, k]``:

    * ``weight``: ``float8_e4m3fn [..., n, k]`` (checkpoint ``weight``),
    * ``scale_inv``: ``float32 [..., ceil(n / block_n), ceil(k / block_k)]``
      (checkpoint ``weight_scale_inv``).

    The logical (moejax) weight is ``[..., k, n]``, the transpose::

        w[..., i, j] = f32(weight[..., j, i]) * scale_inv[..., j // block_n, i // block_k]

    Dimensions that are not multiples of the block end in a partial block that
    uses its block's scale. Tensor names: ``prefix + ".weight"`` and
    ``prefix + ".weight_scale_inv"`` (``prefix`` = the checkpoint module, e.g.
    ``model.layers.3.mlp.experts.7.gate_proj``).
    """

    weight: Any
    scale_inv: Any
    block_n: int = dataclasses.field(default=128, metadata=dict(static=True))
    block_k: int = dataclasses.field(default=128, metadata=dict(static=True))

    tensor_suffixes: ClassVar[Mapping[str, str]] = {"weight": ".weight", "scale_inv": ".weight_scale_inv"}

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, n, k = np.shape(self.weight)
        return (*lead, k, n)

    @property
    def format(self) -> str:
        b = f"{self.block_n}" if self.block_n == self.block_k else f"{self.block_n}x{self.block_k}"
        return f"fp8-e4m3-b{b}"

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        *_, n, k = np.shape(self.weight)
        s = _repeat_blocks(_repeat_blocks(self.scale_inv.astype(jnp.float32), n, self.block_n, -2), k,
                           self.block_k, -1)
        return jnp.swapaxes((self.weight.astype(jnp.float32) * s).astype(dtype), -1, -2)

    def __repr__(self) -> str:
        return f"Fp8BlockTensor({self.format})"


def quantize_fp8_block(w: jax.Array, block_n: int = 128, block_k: int = 128) -> Fp8BlockTensor:
    """Quantize ``w [..., k, n]`` to FP8 e4m3 with a scale per ``block_n x block_k`` block.

    Per block, ``scale_inv = amax / 448`` (1 for an all-zero block) and
    ``weight = e4m3(w / scale_inv)`` rounded to nearest even, so the block's
    largest magnitude maps to 448 (the e4m3fn maximum).
    """
    w = jnp.asarray(w)
    if w.ndim < 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"quantize_fp8_block: expected a float weight [..., k, n], got {w.dtype}{list(w.shape)}")
    wt = jnp.swapaxes(w.astype(jnp.float32), -1, -2)  # [..., n, k]: the checkpoint orientation
    *lead, n, k = wt.shape
    bn, bk = -(-n // block_n), -(-k // block_k)
    padded = jnp.pad(wt, [(0, 0)] * len(lead) + [(0, bn * block_n - n), (0, bk * block_k - k)])
    blocks = padded.reshape(*lead, bn, block_n, bk, block_k)
    amax = jnp.max(jnp.abs(blocks), axis=(-3, -1))
    scale_inv = jnp.where(amax > 0, amax / FP8_E4M3_MAX, 1.0).astype(jnp.float32)
    s = _repeat_blocks(_repeat_blocks(scale_inv, n, block_n, -2), k, block_k, -1)
    q = jnp.clip(wt / s, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(jnp.float8_e4m3fn)
    return Fp8BlockTensor(q, scale_inv, block_n=block_n, block_k=block_k)


# --------------------------------------------------------------------------
# MXFP4 (gpt-oss checkpoints).
# --------------------------------------------------------------------------
MXFP4_BLOCK = 32  # values per e8m0 scale
# e2m1 code -> value: bit 3 is the sign, bits 0-2 index (0, .5, 1, 1.5, 2, 3, 4, 6).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@register_format
@dataclasses.dataclass(frozen=True)
class Mxfp4Tensor(ExpertWeight):
    """MXFP4 weight in the gpt-oss checkpoint layout (OCP microscaling: e2m1 values, e8m0 scales).

    Leaves, exactly as in a gpt-oss checkpoint (``*_blocks`` / ``*_scales``),
    for expert matrices ``[..., out, in] = [..., n, k]``:

    * ``blocks``: ``uint8 [..., n, k / 32, 16]``: 32 e2m1 codes per block along
      ``k``, two per byte, the **low nibble first** (byte ``b`` holds values
      ``2b`` (low) and ``2b + 1`` (high) of its block);
    * ``scales``: ``uint8 [..., n, k / 32]``: e8m0 exponents, one per block.

    ``value = E2M1_VALUES[code] * 2 ** (scale - 127)``. The logical (moejax)
    weight is the transpose ``[..., k, n]``: this is what transformers'
    ``convert_moe_packed_tensors`` computes (dequantize to ``[..., n, k]``, then
    ``transpose(1, 2)`` to the ``[E, in, out]`` its GptOss experts multiply
    by). ``k`` is a whole number of blocks. Tensor names: ``prefix + "_blocks"``
    and ``prefix + "_scales"`` (``prefix`` e.g.
    ``model.layers.0.mlp.experts.gate_up_proj``).
    """

    blocks: Any
    scales: Any

    tensor_suffixes: ClassVar[Mapping[str, str]] = {"blocks": "_blocks", "scales": "_scales"}

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, n, g, b = np.shape(self.blocks)
        return (*lead, g * b * 2, n)

    @property
    def format(self) -> str:
        return "mxfp4"

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        *lead, n, g, b = np.shape(self.blocks)
        lut = jnp.asarray(E2M1_VALUES, jnp.float32)
        codes = jnp.stack([self.blocks & 0xF, self.blocks >> 4], axis=-1)  # low nibble first
        vals = lut[codes.astype(jnp.int32)].reshape(*lead, n, g, 2 * b)
        # ldexp is exact: a power-of-two scale only moves the exponent.
        vals = jnp.ldexp(vals, (self.scales.astype(jnp.int32) - 127)[..., None])
        return jnp.swapaxes(vals.reshape(*lead, n, g * 2 * b).astype(dtype), -1, -2)

    def __repr__(self) -> str:
        return f"Mxfp4Tensor({self.format})"


def quantize_mxfp4(w: jax.Array) -> Mxfp4Tensor:
    """Quantize ``w [..., k, n]`` to MXFP4 (blocks of 32 along ``k``), OCP MX rules.

    Per block the shared exponent is ``floor(log2(amax)) - 2`` (2 = the largest
    e2m1 exponent); each value divided by ``2**exponent`` is rounded to the
    nearest e2m1 value (ties to the smaller magnitude) and saturated at 6.
    """
    w = jnp.asarray(w)
    if w.ndim < 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"quantize_mxfp4: expected a float weight [..., k, n], got {w.dtype}{list(w.shape)}")
    k = w.shape[-2]
    if k % MXFP4_BLOCK:
        raise ValueError(f"quantize_mxfp4: contraction dim k={k} must be a multiple of {MXFP4_BLOCK} (one e8m0 "
                         f"scale per {MXFP4_BLOCK} values); pad the weight's k axis with zero rows")
    wt = jnp.swapaxes(w.astype(jnp.float32), -1, -2)  # [..., n, k]: the checkpoint orientation
    *lead, n, _ = wt.shape
    g = wt.reshape(*lead, n, k // MXFP4_BLOCK, MXFP4_BLOCK)
    amax = jnp.max(jnp.abs(g), axis=-1)
    _, e = jnp.frexp(jnp.where(amax > 0, amax, 1.0))  # amax = m * 2**e, m in [0.5, 1)
    exp = jnp.clip(e - 1 - 2, -127, 127)  # floor(log2 amax) - emax(e2m1)
    x = jnp.ldexp(g, -exp[..., None])
    mags = jnp.asarray(E2M1_VALUES[:8], jnp.float32)
    idx = jnp.argmin(jnp.abs(jnp.abs(x)[..., None] - mags), axis=-1).astype(jnp.uint8)  # first = smaller on ties
    codes = jnp.where((x < 0) & (idx > 0), idx | 8, idx).astype(jnp.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exp + 127).astype(jnp.uint8)
    return Mxfp4Tensor(packed.astype(jnp.uint8), scales)

