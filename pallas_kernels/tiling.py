"""Backend selection and per-shape tile sizes for the grouped-matmul kernels.

``choose_tiling(m, k, n, dtype, platform)`` is a small table; a device run can
install measured choices with :func:`set_tiling_override` (e.g. from an
autotuning sweep) without touching the kernels.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["choose_tiling", "set_tiling_override", "tiling_override", "resolve_backend", "DRIVERS"]

# Kernel drivers: "mosaic" (TPU grid with scalar prefetch), "triton" (GPU).
DRIVERS = ("mosaic", "triton")
_BACKEND_ALIASES = {"tpu": "mosaic", "mosaic": "mosaic", "gpu": "triton", "cuda": "triton", "rocm": "triton",
                    "triton": "triton", "interpret": "mosaic"}

TilingFn = Callable[..., "tuple[int, int, int] | None"]
_OVERRIDE: list[TilingFn] = []


def resolve_backend(backend: str | None, interpret: bool | None) -> tuple[str, bool]:
    """``(driver, interpret)`` for a requested backend.

    ``backend=None`` follows ``jax.default_backend()``: TPU -> Mosaic, GPU ->
    Triton, CPU -> the Mosaic driver in interpret mode. ``interpret=None``
    means interpret exactly when the default backend is CPU (or backend is
    ``"interpret"``).
    """
    default = jax.default_backend()
    if backend is None:
        backend = {"tpu": "mosaic", "gpu": "triton", "cuda": "triton", "rocm": "triton"}.get(default, "interpret")
    try:
        driver = _BACKEND_ALIASES[backend]
    except KeyError:
        raise ValueError(f"unknown Pallas backend {backend!r}; use one of {sorted(_BACKEND_ALIASES)} "
                         "or None to follow jax.default_backend()") from None
    if interpret is None:
        interpret = backend == "interpret" or default == "cpu"
    return driver, bool(interpret)


def set_tiling_override(fn: TilingFn | None) -> None:
    """Install ``fn(m, k, n, dtype, platform, **quant) -> (tm, tk, tn) | None``.

    It is asked first; ``None`` falls back to the built-in table. Pass ``None``
    to remove all overrides.
    """
    _OVERRIDE.clear()
    if fn is not None:
        _OVERRIDE.append(fn)


@contextlib.contextmanager
def tiling_override(fn: TilingFn) -> Iterator[None]:
    """Context manager form of :func:`set_tiling_override` (restores the previous one)."""
    saved = list(_OVERRIDE)
    set_tiling_override(fn)
    try:
        yield
    finally:
        _OVERRIDE[:] = saved


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _fit(dim: int, target: int) -> int:
    """Full dim when it fits in the target tile (always a legal TPU block), else the target."""
    return dim if dim <= target else target


def _largest_multiple_dividing(k: int, unit: int, target: int) -> int:
    """Largest ``unit * d <= max(target, unit)`` with ``unit * d`` dividing ``k``."""
    best = unit
    d = 1
    while unit * d <= max(target, unit):
        if k % (unit * d) == 0:
            best = unit * d
        d += 1
    return best


def choose_tiling(m: int, k: int, n: int, dtype: Any, platform: str, *, bits: int | None = None,
                  group_size: int | None = None) -> tuple[int, int, int]:
    """Tile sizes ``(tm, tk, tn)`` for a grouped matmul of ``[m,k] x [G,k,n]``.

    ``platform`` is ``"tpu"``, ``"gpu"`` or ``"cpu"`` (interpret mode).
    ``bits``/``group_size`` describe a quantized right-hand side: for int4 the
    ``k`` tile is a multiple of the group size that divides ``k``; on GPU it
    equals the group size.
    """
    for fn in _OVERRIDE:
        got = fn(m, k, n, dtype, platform, bits=bits, group_size=group_size)
        if got is not None:
            return tuple(int(t) for t in got)  # type: ignore[return-value]
    itemsize = jnp.dtype(dtype).itemsize
    gs = group_size or k
    if platform == "gpu":
        # Triton: power-of-two blocks, dot operands at least 16 on each side.
        tm = min(128, max(16, _next_pow2(m)))
        tn = min(128, max(16, _next_pow2(n)))
        if bits == 4:
            tk = gs
        else:
            tk = min(64 if itemsize >= 4 else 128, max(16, _next_pow2(k)))
        return tm, tk, tn
    if platform == "tpu":
        # 128-row tiles fill the MXU; bf16 prefill affords 256; decode uses one small tile.
        tm = 256 if m >= 1024 and itemsize < 4 else 128 if m >= 128 else max(16, -(-m // 16) * 16)
        tn = _fit(n, 512)
        if bits == 4:
            # Packed half tiles (tk/2 lanes of lhs) must be 128-aligned or the full k/2.
            unit = gs if gs % 256 == 0 else 2 * gs if (2 * gs) % 256 == 0 else 256 * gs // _gcd(256, gs)
            tk = k if k <= 1024 or k % unit else _largest_multiple_dividing(k, unit, 1024)
        else:
            tk = _fit(k, 512)
        return tm, tk, tn
    # CPU interpret mode: every grid step costs a dynamic slice, so big tiles.
    tm = min(128, max(8, -(-m // 8) * 8))
    tn = _fit(n, 1024)
    if bits == 4:
        tk = k if k <= 2048 else _largest_multiple_dividing(k, gs, 2048)
    else:
        tk = _fit(k, 2048)
    return tm, tk, tn


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a
