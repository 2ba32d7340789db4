"""Public grouped-matmul entry points: ``gmm`` and the fused gated ``gmm_gated``.

``gmm(lhs[m,k], rhs[G,k,n], group_sizes[G_total])`` computes, for every group
``g`` of the local block ``[group_offset, group_offset + G)``,
``out[rows of g] = lhs[rows of g] @ rhs[g - group_offset]``; all other rows are
zero. ``rhs`` may be a float array or a :class:`QuantizedTensor` (int8 per
channel or int4 group-wise, dequantized tile by tile inside the kernel).

Float ``gmm`` has a ``custom_vjp``: d lhs is a grouped matmul against the
transposed weights (the same kernel), d rhs a transposed grouped matmul
(``jax.lax.ragged_dot_general`` with a ragged contracting dimension).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from moejax.pallas_kernels.grouped import grouped_call, split_even_odd
from moejax.pallas_kernels.quant_format import QuantizedTensor
from moejax.weight_formats import is_structured
from moejax.pallas_kernels.tile_math import EPILOGUES, GATED, RhsSpec
from moejax.pallas_kernels.tiling import choose_tiling, resolve_backend

__all__ = ["gmm", "gmm_gated", "tgmm", "rhs_spec"]

Rhs = Any  # jax.Array | QuantizedTensor


def rhs_spec(rhs: Rhs) -> tuple[RhsSpec, tuple[jax.Array, ...]]:
    """Spec and kernel operands of a right-hand side (float array or QuantizedTensor)."""
    if isinstance(rhs, QuantizedTensor):
        if rhs.axis != -2:
            raise ValueError(f"gmm: quantized rhs must be packed along the contraction axis (-2), got axis={rhs.axis}")
        kind = f"int{rhs.bits}"
        if kind == "int8" and rhs.group_size is not None:
            raise ValueError(f"gmm: int8 rhs must be per output channel (group_size=None), got {rhs.format}; "
                             "dequantize it first or quantize with group_size=None")
        arrays = (rhs.q, rhs.scale) + (() if rhs.zero is None else (rhs.zero,))
        return RhsSpec(kind, rhs.group_size, rhs.zero is not None), arrays
    if is_structured(rhs):
        raise TypeError(f"gmm: rhs {type(rhs).__name__} is not a moejax QuantizedTensor; call .dequantize(dtype) first")
    rhs = jnp.asarray(rhs)
    if not jnp.issubdtype(rhs.dtype, jnp.floating):
        raise TypeError(f"gmm: float rhs expected, got dtype {rhs.dtype} (wrap quantized weights in QuantizedTensor)")
    return RhsSpec("float"), (rhs,)


def _rhs_shape(rhs: Rhs) -> tuple[int, ...]:
    return tuple(rhs.shape)


def _validate(lhs, rhs_list, group_sizes, group_offset, name):
    if lhs.ndim != 2:
        raise ValueError(f"{name}: lhs must be [m, k], got shape {lhs.shape}")
    if lhs.shape[0] == 0:
        raise ValueError(f"{name}: lhs has no rows")
    if not jnp.issubdtype(lhs.dtype, jnp.floating):
        raise TypeError(f"{name}: lhs must be float, got {lhs.dtype}")
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"{name}: group_sizes must be a 1-D integer array, got {group_sizes.shape} {group_sizes.dtype}")
    shapes = [_rhs_shape(r) for r in rhs_list]
    for s in shapes:
        if len(s) != 3 or s[1] != lhs.shape[1]:
            raise ValueError(f"{name}: rhs must be [G, k={lhs.shape[1]}, n], got {s}")
        if s != shapes[0]:
            raise ValueError(f"{name}: fused right-hand sides differ in shape: {shapes}")
    if shapes[0][0] > group_sizes.shape[0]:
        raise ValueError(f"{name}: rhs has {shapes[0][0]} groups but group_sizes only {group_sizes.shape[0]}")
    if group_offset is None:
        if shapes[0][0] != group_sizes.shape[0]:
            raise ValueError(f"{name}: rhs holds {shapes[0][0]} of {group_sizes.shape[0]} groups; pass group_offset "
                             "(the first local group) for a local block of experts")
        group_offset = jnp.zeros((), jnp.int32)
    group_offset = jnp.asarray(group_offset, jnp.int32)
    if group_offset.shape not in ((), (1,)):
        raise ValueError(f"{name}: group_offset must be a scalar, got shape {group_offset.shape}")
    return group_sizes.astype(jnp.int32), group_offset.reshape(())


def _platform(driver: str, interpret: bool) -> str:
    return "cpu" if interpret else ("tpu" if driver == "mosaic" else "gpu")


def _run(lhs, rhs_list, group_sizes, group_offset, *, epilogue, tiling, out_dtype, interpret, backend, name):
    group_sizes, group_offset = _validate(lhs, rhs_list, group_sizes, group_offset, name)
    ops = [rhs_spec(r) for r in rhs_list]
    if len({s for s, _ in ops}) != 1:
        raise ValueError(f"{name}: fused right-hand sides must share one storage format, got "
                         f"{[s for s, _ in ops]}")
    spec = ops[0][0]
    m, k = lhs.shape
    n = _rhs_shape(rhs_list[0])[2]
    lhs_parts = split_even_odd(lhs) if spec.kind == "int4" else (lhs,)

    def call(driver: str, interp: bool) -> jax.Array:
        til = tiling
        if til is None:
            bits = {"int8": 8, "int4": 4}.get(spec.kind)
            til = choose_tiling(m, k, n, lhs.dtype, _platform(driver, interp), bits=bits, group_size=spec.group_size)
        return grouped_call(lhs_parts, ops, group_sizes, group_offset, k=k, n=n, tiling=tuple(til),
                            epilogue=epilogue, out_dtype=jnp.dtype(out_dtype), driver=driver, interpret=interp)

    if backend is None and interpret is None:
        # Chosen when lowering, per platform: exporting for TPU/CUDA from a CPU
        # host gets the real kernels, a CPU run the interpreter.
        return jax.lax.platform_dependent(
            tpu=lambda: call("mosaic", False), cuda=lambda: call("triton", False),
            rocm=lambda: call("triton", False), default=lambda: call("mosaic", True))
    return call(*resolve_backend(backend, interpret))


def gmm(lhs: jax.Array, rhs: Rhs, group_sizes: jax.Array, *, group_offset: jax.Array | int | None = None,
        tiling: tuple[int, int, int] | None = None, preferred_element_type: Any = jnp.float32,
        interpret: bool | None = None, backend: str | None = None, epilogue: str = "none") -> jax.Array:
    """Grouped matmul: rows of ``lhs`` grouped by ``group_sizes`` times ``rhs[group]``.

    Args:
      lhs: ``[m, k]`` float (f32 / bf16), rows sorted by group; rows past
        ``sum(group_sizes)`` are padding and give zero rows.
      rhs: ``[G, k, n]`` float array or :class:`QuantizedTensor` (int8 per
        channel, int4 group-wise). With ``group_offset``, ``G`` may be a local
        block of the ``len(group_sizes)`` groups.
      group_sizes: ``[G_total]`` integer rows per group (zeros allowed).
      group_offset: first local group (scalar, may be traced) when ``rhs``
        holds only a block of experts; rows of other groups are zero.
      tiling: ``(tm, tk, tn)``; ``None`` asks :func:`choose_tiling`.
      preferred_element_type: output dtype (accumulation is always f32).
      interpret: run the Pallas interpreter; ``None`` = only on CPU.
      backend: ``"tpu"``/``"mosaic"``, ``"gpu"``/``"triton"``, ``"interpret"``,
        or ``None``: with ``interpret=None`` too, the kernel is picked when
        lowering, per platform (TPU: Mosaic, CUDA/ROCm: Triton, else the
        interpreter), so ``jax.export(..., platforms=["tpu"])`` gets Mosaic.
      epilogue: pointwise activation applied to the f32 result (``"none"``,
        ``"gelu"``, ``"relu"``, ``"silu"``).

    Returns ``[m, n]`` in ``preferred_element_type``.
    """
    if epilogue in GATED or epilogue not in EPILOGUES:
        raise ValueError(f"gmm: epilogue must be one of {[e for e in EPILOGUES if e not in GATED]}, got {epilogue!r} "
                         "(gated activations take two weights: use gmm_gated)")
    cfg = dict(tiling=None if tiling is None else tuple(tiling), out_dtype=jnp.dtype(preferred_element_type),
               interpret=interpret, backend=backend, epilogue=epilogue)
    if isinstance(rhs, QuantizedTensor) or epilogue != "none":
        return _run(lhs, [rhs], group_sizes, group_offset, name="gmm", **cfg)
    group_sizes, group_offset = _validate(lhs, [rhs], group_sizes, group_offset, "gmm")
    return _gmm_float(lhs, jnp.asarray(rhs), group_sizes, group_offset, tuple(sorted(cfg.items())))


def gmm_gated(lhs: jax.Array, w_gate: Rhs, w_up: Rhs, group_sizes: jax.Array, *, activation: str = "swiglu",
              group_offset: jax.Array | int | None = None, tiling: tuple[int, int, int] | None = None,
              out_dtype: Any = None, interpret: bool | None = None, backend: str | None = None) -> jax.Array:
    """Fused gate and up projections: ``act(lhs_g @ w_gate[g], lhs_g @ w_up[g])`` in one kernel.

    Both products accumulate in f32 side by side over the same lhs tiles; the
    activation (``"swiglu"`` or ``"geglu"``) runs on the accumulators before
    the single store. Output dtype defaults to ``lhs.dtype``. Weights must share
    one storage format (both float, both int8, or both int4 with one group size).
    """
    if activation not in GATED:
        raise ValueError(f"gmm_gated: activation must be one of {GATED}, got {activation!r}")
    return _run(lhs, [w_gate, w_up], group_sizes, group_offset, epilogue=activation,
                tiling=None if tiling is None else tuple(tiling),
                out_dtype=jnp.dtype(out_dtype or lhs.dtype), interpret=interpret, backend=backend, name="gmm_gated")


def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, group_offset: jax.Array,
         num_local: int) -> jax.Array:
    """``[G_local, k, n]``: ``lhs_g^T @ dout_g`` per local group (the weight gradient)."""
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(group_sizes)])
    start, end = offsets[group_offset], offsets[group_offset + num_local]
    rows = jnp.arange(lhs.shape[0])
    keep = ((rows >= start) & (rows < end))[:, None]
    lhs = jnp.where(keep, lhs, 0)
    dout = jnp.where(keep, dout, 0)
    local = jax.lax.dynamic_slice_in_dim(group_sizes, group_offset, num_local)
    local = local.at[0].add(start)  # rows before the block are zero: fold them into the first group
    dn = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                           lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    return jax.lax.ragged_dot_general(lhs, dout, local, dn, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm_float(lhs, rhs, group_sizes, group_offset, cfg):
    return _run(lhs, [rhs], group_sizes, group_offset, name="gmm", **dict(cfg))


def _gmm_float_fwd(lhs, rhs, group_sizes, group_offset, cfg):
    return _gmm_float(lhs, rhs, group_sizes, group_offset, cfg), (lhs, rhs, group_sizes, group_offset)


def _gmm_float_bwd(cfg, res, dout):
    lhs, rhs, group_sizes, group_offset = res
    c = dict(cfg)
    c.update(tiling=None, out_dtype=jnp.dtype(jnp.float32))  # the transposed problem picks its own tiles
    d_lhs = _run(dout.astype(lhs.dtype), [jnp.swapaxes(rhs, 1, 2)], group_sizes, group_offset, name="gmm(vjp)", **c)
    d_rhs = tgmm(lhs, dout.astype(lhs.dtype), group_sizes, group_offset, rhs.shape[0])
    return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype), None, None


_gmm_float.defvjp(_gmm_float_fwd, _gmm_float_bwd)
