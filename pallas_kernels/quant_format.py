"""Storage format of quantized expert weights the Pallas kernels read (int8 per channel, int4 group-wise).

The format itself lives in the core, :mod:`moejax.weight_formats` (class
:class:`~moejax.weight_formats.QuantizedTensor` and its quantize/pack helpers,
documented there); this module re-exports it so the kernels and existing
imports (``from moejax.pallas_kernels.quant_format import QuantizedTensor``)
keep working. The kernels call :func:`dequant_values` on tiles, so they
reproduce :meth:`QuantizedTensor.dequantize` element for element.
"""
from __future__ import annotations

from moejax.weight_formats import (
    SUPPORTED_BITS,
    QuantizedTensor,
    dequant_values,
    dequantize_array,
    format_name,
    implicit_zero,
    pack_int4,
    quantize,
    quantize_array,
    unpack_int4,
)

__all__ = [
    "QuantizedTensor",
    "quantize",
    "quantize_array",
    "dequantize_array",
    "pack_int4",
    "unpack_int4",
    "implicit_zero",
    "dequant_values",
    "format_name",
    "SUPPORTED_BITS",
]
