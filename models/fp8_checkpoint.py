"""FP8 block-scaled checkpoints as DeepSeek-V3 and Kimi K2 ship them.

``config.json`` says ``"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
"weight_block_size": [128, 128], ...}``; every quantized linear layer stores
``<module>.weight`` as ``F8_E4M3 [out, in]`` and ``<module>.weight_scale_inv`` as
``F32 [ceil(out / 128), ceil(in / 128)]`` (the scale each block is multiplied by);
embeddings, norms, routers and the LM head stay in bfloat16.

On load the routed experts stay FP8: each layer's experts become one
:class:`~moejax.weight_formats.Fp8BlockTensor` (no float copy is made; the expert
op dequantizes block by block), the format `quantize` and the kernels already know.
Other FP8 matrices (attention, dense and shared-expert FFNs) are dequantized to the
model dtype, since only the expert op runs on structured weights.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from moejax.models.validation import CheckpointError
from moejax.weight_formats import Fp8BlockTensor

__all__ = ["Fp8Blocks", "fp8_blocks_from_config", "scale_name", "is_fp8", "dequantize", "stack_experts"]

_FIX = "fix the checkpoint's config.json"


@dataclasses.dataclass(frozen=True)
class Fp8Blocks:
    """The block shape of an FP8 checkpoint: one scale per ``block_n`` output x ``block_k`` input values."""

    block_n: int = 128
    block_k: int = 128

    def scale_shape(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        *lead, n, k = weight_shape
        return (*lead, -(-n // self.block_n), -(-k // self.block_k))


def fp8_blocks_from_config(hf: dict[str, Any]) -> Fp8Blocks | None:
    """The FP8 block shape ``config.json`` declares, ``None`` for an unquantized checkpoint.

    Raises ``NotImplementedError`` for other quantization methods and
    :class:`CheckpointError` for a malformed ``quantization_config``.
    """
    q = hf.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise CheckpointError(f"config.json: field 'quantization_config' must be an object; {_FIX}")
    method = q.get("quant_method")
    if method == "mxfp4":
        return None  # gpt-oss's MXFP4 experts: moejax.models.mxfp4_checkpoint
    if method != "fp8":
        raise NotImplementedError(f"config.json: quantization_config.quant_method {method!r} is not supported (FP8 "
                                  "block-scaled checkpoints, quant_method 'fp8', and gpt-oss MXFP4 ones, 'mxfp4', "
                                  "are); load the unquantized checkpoint and quantize with moejax's quantize pass")
    if q.get("fmt", "e4m3") != "e4m3":
        raise NotImplementedError(f"config.json: FP8 format {q.get('fmt')!r} is not supported (only e4m3)")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(
            isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 2**16 for b in block)):
        raise CheckpointError(f"config.json: quantization_config.weight_block_size must be two positive integers "
                              f"[block_out, block_in] (e.g. [128, 128]), got {block!r}; {_FIX}")
    return Fp8Blocks(*block)


def scale_name(weight_name: str) -> str:
    """``model.layers.3.mlp.experts.7.up_proj.weight`` -> ``...up_proj.weight_scale_inv``."""
    return weight_name + "_scale_inv"


def is_fp8(ckpt: Any, name: str) -> bool:
    """Whether tensor ``name`` is stored as FP8 e4m3 (with a block scale beside it)."""
    return str(ckpt.dtype(name)) == "float8_e4m3fn"


def check_scale(ckpt: Any, name: str, blocks: Fp8Blocks | None) -> str | None:
    """The scale tensor of an FP8 tensor ``name`` (checked against its shape), ``None`` for a float tensor."""
    if not is_fp8(ckpt, name):
        return None
    scale = scale_name(name)
    if blocks is None:
        raise CheckpointError(f"tensor {name!r} is FP8 but config.json has no quantization_config; {_FIX} "
                              "(add the model's quantization_config)")
    if scale not in ckpt:
        raise CheckpointError(f"FP8 tensor {name!r} has no {scale!r} beside it; re-download the checkpoint")
    want = blocks.scale_shape(tuple(ckpt.shape(name)))
    if tuple(ckpt.shape(scale)) != want:
        raise CheckpointError(f"tensor {scale!r} has shape {tuple(ckpt.shape(scale))}, expected {want} for blocks "
                              f"of {blocks.block_n}x{blocks.block_k}; check quantization_config.weight_block_size")
    return scale


def dequantize(weight: np.ndarray, scale: np.ndarray, blocks: Fp8Blocks) -> np.ndarray:
    """``weight [..., n, k]`` (FP8) times its block scales, as float32 (the checkpoint orientation)."""
    n, k = weight.shape[-2:]
    s = np.repeat(np.repeat(scale.astype(np.float32), blocks.block_n, axis=-2)[..., :n, :], blocks.block_k, axis=-1)
    return weight.astype(np.float32) * s[..., :k]


def stack_experts(weights: list[Any], scales: list[Any], blocks: Fp8Blocks, stacked: bool = False
                  ) -> Fp8BlockTensor:
    """One layer's per-expert FP8 ``[n, k]`` tensors and scales as one stacked ``Fp8BlockTensor [E, k, n]``
    (``stacked``: the single entries are already ``[E, ...]``, e.g. shapes only)."""
    if stacked:
        (w,), (s,) = weights, scales
    else:
        w, s = np.stack(weights), np.stack(scales).astype(np.float32)
    return Fp8BlockTensor(w, s, block_n=blocks.block_n, block_k=blocks.block_k)
