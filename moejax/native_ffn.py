"""impl ``"native"`` of ``moe_expert_ffn``: a C++ kernel for decode-sized inputs on CPU.

Decode multiplies a few rows by each used expert, so its time is the time to
read those experts' bytes. XLA:CPU runs a one-row dot on one thread and does
not fuse dequantization into it, so int8/int4 experts decoded no faster than
float ones (``benchmarks/moe_layer.py``). The C++ kernel (``moejax/csrc``, an
XLA FFI custom call built on first use by :mod:`moejax.native_build`) reads the
used experts' float32, int8 or int4 weights in place, dequantizes in registers,
and splits the columns over XLA's intra-op threads.

For inputs with many rows per expert (prefill) the work is compute-bound and
XLA's dots are the better engine: this implementation then runs
:func:`moejax.blocked_ffn.ffn_blocked`. It also does so for weights the kernel
does not read (2/3-bit formats, bf16, experts of mixed formats) and when the
kernel is unavailable (no C++ compiler). Either way it computes what
:func:`moejax.dialect.ffn_reference` computes: same formulation
(:func:`moejax.dialect.expert_ffn_math`), float32 sums in another order.

The kernel has no derivative of its own: ``jax.grad`` through the expert op
works (its JVP rule differentiates the reference), but :func:`ffn_native`
called directly cannot be differentiated.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax import dialect, native_build
from moejax.blocked_ffn import ffn_blocked
from moejax.expert_layout import is_split
from moejax.weight_formats import QuantizedTensor, is_structured

__all__ = ["ffn_native", "grouped_matmul", "uses_kernel", "portable", "MAX_ROWS_PER_EXPERT"]

# The kernel reads a weight tile once per 4 rows, so with many rows per expert
# XLA's compute-bound dots win. The limit lies between measured points
# (benchmarks/moe_layer.py): at <= 2 rows per expert (decode, T <= 8) the kernel beat
# `blocked` 1.4-1.9x on float experts; at 128 rows per expert (prefill) `blocked` is the engine.
# The crossover itself was not measured.
MAX_ROWS_PER_EXPERT = 8
_MIN_ROWS_LIMIT = 32  # a few rows always go to the kernel, however few experts


def _leaves(w: Any) -> tuple[list[jax.Array], dict[str, Any]] | None:
    """One expert's (or a stack's) leaves and kernel attributes; None if the kernel cannot read it."""
    if isinstance(w, QuantizedTensor):
        if w.bits not in (4, 8) or w.axis != -2 or w.scale.dtype != jnp.float32 or (
                w.zero is not None and w.zero.dtype != jnp.float32):
            return None
        leaves = [w.q, w.scale] + ([] if w.zero is None else [w.zero])
        return leaves, {"bits": w.bits, "group_size": w.group_size or 0, "has_zero": w.zero is not None}
    if is_structured(w) or jnp.dtype(w.dtype) != jnp.float32:
        return None
    return [w], {"bits": 0, "group_size": 0, "has_zero": False}


def _kernel_args(w: Any) -> tuple[list[jax.Array], dict[str, Any]] | None:
    """Leaves in the kernel's order and its attributes, or None for weights it does not read."""
    if is_split(w):
        parts = [_leaves(x) for x in w.experts]
        if any(p is None for p in parts) or len({tuple(sorted(p[1].items())) for p in parts}) != 1:
            return None
        return [leaf for p in parts for leaf in p[0]], {**parts[0][1], "per_expert": True}
    one = _leaves(w)
    return None if one is None else (one[0], {**one[1], "per_expert": False})


def grouped_matmul(rows: jax.Array, group_sizes: jax.Array, *weights: Any) -> list[jax.Array]:
    """``rows [N, k] f32`` sorted by expert times each group's expert weight ``[k, n]``: ``[N, n] f32`` each.

    Each weight is a stacked ``[E, k, n]`` float32 array or int8/int4
    :class:`~moejax.weight_formats.QuantizedTensor` (contraction axis -2), or
    such a weight split per expert. Rows past ``sum(group_sizes)`` are zero.
    Weights of one format and shape share one kernel call (gate and up: the
    rows are read once and the threads split both). Raises ``ValueError`` for
    a weight the kernel cannot read.
    """
    native_build.load()  # registers the FFI target (NativeBuildError without a compiler)
    args = [_kernel_args(w) for w in weights]
    for w, a in zip(weights, args):
        if a is None:
            raise ValueError(f"grouped_matmul: the native kernel reads float32, int8 and int4 weights, "
                             f"not {dialect.weight_format_of([w])}")
    if len({(tuple(sorted(a[1].items())), tuple(w.shape)) for w, a in zip(weights, args)}) > 1:
        return [y for w in weights for y in grouped_matmul(rows, group_sizes, w)]
    n_out = weights[0].shape[-1]
    attrs = args[0][1]
    out = jax.ShapeDtypeStruct((rows.shape[0], n_out * len(weights)), jnp.float32)
    call = jax.ffi.ffi_call(native_build.FFI_TARGET, out, vmap_method="sequential")
    y = call(rows.astype(jnp.float32), group_sizes.astype(jnp.int32), *(leaf for a in args for leaf in a[0]),
             bits=np.int32(attrs["bits"]), group_size=np.int64(attrs["group_size"]),
             has_zero=bool(attrs["has_zero"]), per_expert=bool(attrs["per_expert"]),
             num_mats=np.int64(len(weights)))
    return [y[:, i * n_out:(i + 1) * n_out] for i in range(len(weights))]


def uses_kernel(grouped: jax.Array, group_sizes: jax.Array, weights: Sequence[Any]) -> bool:
    """Whether :func:`ffn_native` runs the C++ kernel for these shapes and weights (else ffn_blocked)."""
    n_rows, num_experts = grouped.shape[0], group_sizes.shape[0]
    small = n_rows <= max(_MIN_ROWS_LIMIT, MAX_ROWS_PER_EXPERT * num_experts)
    return (small and grouped.dtype == jnp.float32 and all(_kernel_args(w) is not None for w in weights)
            and native_build.available())


def ffn_native(grouped: jax.Array, group_sizes: jax.Array, weights: Sequence[Any], *,
               activation: str) -> jax.Array:
    """Dropless expert FFN: the C++ kernel for decode-sized inputs, else :func:`ffn_blocked`.

    Same contract as :func:`moejax.dialect.ffn_reference`: ``grouped [N, d]``
    rows sorted by expert, ``group_sizes [E]``, ``weights`` ``(w_gate, w_up,
    w_down)`` or ``(w_up, w_down)`` (stacked or per expert, any format);
    returns ``[N, d]`` in ``grouped.dtype``, zero on padding rows.
    """
    weights = tuple(weights)
    if grouped.shape[0] == 0 or not uses_kernel(grouped, group_sizes, weights):
        return ffn_blocked(grouped, group_sizes, weights, activation=activation)

    def matmul(a: jax.Array, w: Any) -> jax.Array:
        return grouped_matmul(a, group_sizes, w)[0]

    def input_matmuls(a: jax.Array, ws: Sequence[Any]) -> list[jax.Array]:
        return grouped_matmul(a, group_sizes, *ws)

    return dialect.expert_ffn_math(grouped, weights, activation, matmul=matmul,
                                   input_matmuls=input_matmuls).astype(grouped.dtype)


def portable(program: Any) -> Any:
    """``program`` with every ``impl="native"`` expert op on ``"blocked"``: the same function, no custom call.

    For artifacts that must run where moejax (and its C++ library) is absent,
    e.g. :func:`moejax.serialization.export_program`.
    """
    from moejax import rewrite

    def rule(rc: Any) -> Any:
        return rewrite.rebind_expert_ffn(rc, **({"impl": "blocked"} if rc.params["impl"] == "native" else {}))

    return program.rewrite({dialect.expert_ffn_p.name: rule})


dialect.register_ffn_impl("native", ffn_native)
