"""Tiny DeepSeek-V3 checkpoints in the released FP8 layout, for the FP8 loading tests.

``write_fp8_pair(folder)`` saves a random tiny DeepSeek-V3 with transformers, then
writes two copies of it: ``fp8/`` as DeepSeek ships it (every ``*_proj.weight`` as
``F8_E4M3`` with a ``weight_scale_inv`` block-scale tensor, ``quantization_config``
in config.json; router, norms, embeddings and head unquantized) and ``float/`` with
the same values dequantized to float32 (what loading must be equivalent to).
"""
from __future__ import annotations

import json
import os

import numpy as np

from moejax import weight_formats as wf
from moejax.models.fp8_checkpoint import scale_name
from moejax.models.safetensors_io import Checkpoint, save_file

BLOCK = (8, 8)  # tiny dims: several blocks per matrix, and partial edge blocks (20 = 8 + 8 + 4)
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": list(BLOCK)}


def tiny_deepseek_v3(folder: str, **overrides) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(**{
        "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 4, "q_lora_rank": 8, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8,
        "v_head_dim": 8, "intermediate_size": 64, "moe_intermediate_size": 16, "n_routed_experts": 8,
        "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "n_shared_experts": 1,
        "routed_scaling_factor": 2.5, "initializer_range": 0.2, **overrides})
    transformers.DeepseekV3ForCausalLM(cfg).save_pretrained(folder)


def is_quantized(name: str) -> bool:
    """The tensors DeepSeek-V3 ships in FP8: every projection matrix (not the router, norms, embeddings, head)."""
    return name.endswith("_proj.weight") or name.endswith("_proj_with_mqa.weight")


def write_fp8_pair(folder: str) -> tuple[str, str]:
    """``(fp8 folder, float folder)`` holding the same model (see the module doc)."""
    source = os.path.join(folder, "source")
    tiny_deepseek_v3(source)
    ckpt = Checkpoint(source)
    fp8, flt = {}, {}
    for name in ckpt:
        t = ckpt.read(name)
        if is_quantized(name):
            q = wf.quantize_fp8_block(t.T, *BLOCK)  # quantize takes moejax's [in, out]
            fp8[name], fp8[scale_name(name)] = np.asarray(q.weight), np.asarray(q.scale_inv)
            flt[name] = np.asarray(q.dequantize()).T
        else:
            fp8[name] = flt[name] = t
    config = json.load(open(os.path.join(source, "config.json")))
    out = []
    for sub, tensors, extra in (("fp8", fp8, {"quantization_config": QUANTIZATION_CONFIG}), ("float", flt, {})):
        path = os.path.join(folder, sub)
        os.makedirs(path)
        save_file(tensors, os.path.join(path, "model.safetensors"))
        json.dump({**config, **extra}, open(os.path.join(path, "config.json"), "w"))
        out.append(path)
    return out[0], out[1]
