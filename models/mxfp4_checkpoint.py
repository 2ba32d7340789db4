"""MXFP4 expert checkpoints as gpt-oss ships them.

``config.json`` says ``"quantization_config": {"quant_method": "mxfp4", ...}``; each
layer's routed experts are stored packed, the rest (attention, router, expert biases,
embeddings, norms, head) as floats:

* ``model.layers.{i}.mlp.experts.gate_up_proj_blocks``: ``uint8 [E, 2f, d / 32, 16]``,
  32 e2m1 codes per block, two per byte (low nibble first);
* ``model.layers.{i}.mlp.experts.gate_up_proj_scales``: ``uint8 [E, 2f, d / 32]``, the
  e8m0 exponent of each block (value ``2 ** (s - 127)``);
* ``down_proj_blocks`` / ``down_proj_scales``: ``[E, d, f / 32, 16]`` / ``[E, d, f / 32]``.

That is the ``[out, in]`` orientation transformers' ``convert_moe_packed_tensors``
dequantizes and then transposes to ``[E, in, out]``; gate and up are interleaved along
``2f`` (rows ``0::2`` gate, ``1::2`` up). On load each matrix becomes one
:class:`~moejax.weight_formats.Mxfp4Tensor` holding those bytes (gate and up split by
row, still packed): no float copy is made, the expert op dequantizes.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from moejax.models.validation import CheckpointError
from moejax.weight_formats import MXFP4_BLOCK, Mxfp4Tensor

__all__ = ["is_mxfp4", "check_dims", "experts"]

_E8M0_NAN = 255  # the one e8m0 code that is not a power of two


def is_mxfp4(hf: dict[str, Any]) -> bool:
    """Whether ``config.json`` declares an MXFP4 checkpoint (``quantization_config.quant_method == "mxfp4"``)."""
    q = hf.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "mxfp4"


def check_dims(d_model: int, d_ff: int) -> None:
    """MXFP4 blocks run along each matrix's input: ``hidden_size`` and ``intermediate_size`` must be whole blocks."""
    bad = [f"{n}={v}" for n, v in (("hidden_size", d_model), ("intermediate_size", d_ff)) if v % MXFP4_BLOCK]
    if bad:
        raise CheckpointError(f"config.json: MXFP4 experts pack blocks of {MXFP4_BLOCK} values along each matrix's "
                              f"input, but {', '.join(bad)} is not a multiple of {MXFP4_BLOCK}; fix the checkpoint's "
                              "config.json")


def experts(blocks: np.ndarray, scales: np.ndarray, names: tuple[str, str], rows: slice = slice(None)
            ) -> Mxfp4Tensor:
    """Rows ``rows`` of the stored ``[E, n, ...]`` blocks and scales as one stacked :class:`Mxfp4Tensor`.

    Raises :class:`CheckpointError` naming the tensor for a dtype other than uint8
    or an e8m0 NaN scale (255).
    """
    for t, name in zip((blocks, scales), names):
        if t.dtype != np.uint8:
            raise CheckpointError(f"MXFP4 tensor {name!r} is stored as {t.dtype}, expected uint8 (packed e2m1 codes "
                                  "or e8m0 exponents); re-download the checkpoint")
    if n := int(np.count_nonzero(scales == _E8M0_NAN)):
        raise CheckpointError(f"MXFP4 scale tensor {names[1]!r} holds {n} NaN exponents (e8m0 255): the checkpoint "
                              "is corrupt; re-download it")
    return Mxfp4Tensor(np.ascontiguousarray(blocks[:, rows]), np.ascontiguousarray(scales[:, rows]))
