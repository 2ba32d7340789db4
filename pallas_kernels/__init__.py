"""moejax.pallas_kernels: Pallas kernels for the MoE hot loop (survey section 5).

* :func:`gmm` -- grouped matmul ``lhs[m,k] x rhs[G,k,n]`` by group sizes, with
  ``group_offset`` (local expert block), ragged m/k/n, f32/bf16 (f32
  accumulation), float / int8 / int4 right-hand sides dequantized in the
  kernel, a ``custom_vjp`` for float weights.
* :func:`gmm_gated` -- gate and up projections with SwiGLU/GeGLU in one kernel.
* :func:`fused_route` -- router logits, scores, bias, group limit, top-k, renorm.
* :class:`QuantizedTensor`, :func:`quantize`, :func:`pack_int4`,
  :func:`unpack_int4` -- the quantized weight format (see ``quant_format``).
* :func:`ffn_pallas` / :func:`route_pallas` -- registered with the dialect at
  import as the ``"pallas"`` implementations of ``moe_expert_ffn`` and
  ``moe_route``.
* :class:`LowerToPallas` -- the ``pallas`` pipeline pass that selects them.

Drivers: TPU (Mosaic, scalar-prefetch grid), GPU (Triton), and the Pallas
interpreter on CPU. With ``backend=None, interpret=None`` the driver is picked
per platform at lowering time, so ``jax.export(..., platforms=["tpu"])`` from a
CPU host produces Mosaic kernels and ``["cuda"]`` Triton kernels.
"""
from moejax import dialect as _dialect
from moejax.pallas_kernels.ffn import ffn_pallas, kernel_weight
from moejax.pallas_kernels.gmm import gmm, gmm_gated, tgmm
from moejax.pallas_kernels.lower_pass import LowerToPallas
from moejax.pallas_kernels.metadata import GroupMetadata, make_group_metadata
from moejax.pallas_kernels.quant_format import (
    QuantizedTensor,
    dequantize_array,
    pack_int4,
    quantize,
    quantize_array,
    unpack_int4,
)
from moejax.pallas_kernels.router import fused_route, route_pallas
from moejax.pallas_kernels.tiling import choose_tiling, resolve_backend, set_tiling_override, tiling_override

__all__ = [
    "LowerToPallas",
    "gmm",
    "gmm_gated",
    "tgmm",
    "fused_route",
    "ffn_pallas",
    "route_pallas",
    "kernel_weight",
    "QuantizedTensor",
    "quantize",
    "quantize_array",
    "dequantize_array",
    "pack_int4",
    "unpack_int4",
    "make_group_metadata",
    "GroupMetadata",
    "choose_tiling",
    "set_tiling_override",
    "tiling_override",
    "resolve_backend",
]

_dialect.register_ffn_impl("pallas", ffn_pallas)
_dialect.register_route_impl("pallas", route_pallas)
