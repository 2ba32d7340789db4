"""Hugging Face checkpoints <-> :class:`MoEDecoder`: config translation and tensor mapping.

:func:`from_pretrained` reads ``config.json`` (its ``architectures`` field picks the
family), translates it to a :class:`MoEConfig`, and maps every safetensors tensor
onto the NNX model through a list of :class:`Rule` s (one per model parameter).
Nothing is pickled and no remote code runs. :func:`save_pretrained_hf` writes a
Mixtral-family model back as a Hugging Face ``MixtralForCausalLM`` checkpoint.
Every field the translation reads is declared, with its type and range, in
``_HF_FIELDS`` and checked before use, so a malformed ``config.json`` fails with
one :class:`CheckpointError` line naming the field.

Layout conventions: Hugging Face ``Linear`` weights are ``[out, in]``, ours are
``[in, out]``; per-expert tensors ``experts.{e}.*`` are stacked into ``[E, d, f]`` /
``[E, f, d]``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from moejax import dialect, numerics
from moejax import weight_formats as wf
from moejax.models import default_model, fp8_checkpoint, mxfp4_checkpoint
from moejax.models.byte_level import mark_byte_level
from moejax.models.decoder import MoEConfig, MoEDecoder
from moejax.models.layers import Llama3Rope, LongRope, Yarn
from moejax.models.safetensors_io import Checkpoint, save_file
from moejax.models.sharded_load import ShardingRules, load_onto_mesh, shard_model
from moejax.models.validation import (BOOL, EXPERT_COUNT, LAYER_COUNT, NON_NEGATIVE_INT, NON_NEGATIVE_INTS, NUMBER,
                                      OBJECT, POSITIVE_INT, POSITIVE_NUMBER, STRING, STRINGS, CheckpointError, Kind,
                                      check_fields, describe, one_of, read_json_object)

__all__ = ["from_pretrained", "save_pretrained_hf", "export_tensors", "config_from_hf", "weight_rules",
           "SUPPORTED_ARCHITECTURES", "Rule", "CheckpointError"]


# --------------------------------------------------------------------------
# config.json -> MoEConfig
# --------------------------------------------------------------------------
_CONFIG_FIX = "fix the checkpoint's config.json"

# Partial rotary fraction of each head (GLM-4.5, MiniMax-M2 via rotary_dim / head_dim).
_FRACTION = Kind("a number in (0, 1]", lambda v: NUMBER.accepts(v) and 0 < v <= 1)
_NON_NEGATIVE_NUMBER = Kind("a non-negative number", lambda v: NUMBER.accepts(v) and v >= 0)
def _int_at_least(lo: int) -> Callable[[Any], bool]:
    return lambda v: POSITIVE_INT.accepts(v - lo + 1) if isinstance(v, int) and not isinstance(v, bool) else False


# Llama 4's no_rope_layers: one 0/1 flag per layer (1: the layer uses RoPE).
_ROPE_FLAGS = Kind("a list of 0/1 flags (1: the layer uses RoPE)",
                   lambda v: isinstance(v, list) and all(type(x) in (int, bool) and x in (0, 1) for x in v))
# Llama 4's attn_temperature_tuning: a boolean (transformers) or a number, read as a truth value (as transformers
# does) since some released configs hold an integer there.
_FLAG = Kind("true, false or a number", lambda v: isinstance(v, bool) or NUMBER.accepts(v))
# LongRoPE's per-dimension short_factor / long_factor lists.
_POSITIVE_NUMBERS = Kind("a non-empty list of positive numbers", lambda v: isinstance(v, list) and bool(v) and all(
    POSITIVE_NUMBER.accepts(x) for x in v))
# Hunyuan's moe_topk: one k, or one per layer.
_POSITIVE_INT_OR_INTS = Kind("a positive integer or a list of them", lambda v: POSITIVE_INT.accepts(v) or (
    isinstance(v, list) and bool(v) and all(POSITIVE_INT.accepts(x) for x in v)))

# Every config.json field the parsers below read, and what it may hold. Fields the
# parsers read with ``hf[...]`` or use unguarded are not nullable; ``.get(...) or default``
# ones are. Dotted names reach into DBRX's nested objects.
_HF_FIELDS: dict[str, Kind] = {
    "architectures": STRINGS.or_null(), "model_type": STRING.or_null(),
    "dtype": one_of("float32", "float16", "bfloat16").or_null(),
    "torch_dtype": one_of("float32", "float16", "bfloat16").or_null(),
    # shared by most families
    "vocab_size": POSITIVE_INT, "hidden_size": POSITIVE_INT, "num_hidden_layers": LAYER_COUNT,
    "num_attention_heads": POSITIVE_INT, "num_key_value_heads": POSITIVE_INT.or_null(),
    "head_dim": POSITIVE_INT.or_null(), "hidden_act": STRING, "activation_function": STRING,
    "rms_norm_eps": POSITIVE_NUMBER, "tie_word_embeddings": BOOL.or_null(),
    "rope_theta": POSITIVE_NUMBER, "rope_parameters": OBJECT.or_null(), "rope_scaling": OBJECT.or_null(),
    "rope_parameters.rope_theta": POSITIVE_NUMBER, "rope_parameters.rope_type": STRING.or_null(),
    "rope_scaling.rope_type": STRING.or_null(), "rope_scaling.type": STRING.or_null(),
    **{f"{group}.{name}": kind for group in ("rope_parameters", "rope_scaling") for name, kind in (
        ("factor", POSITIVE_NUMBER.or_null()), ("original_max_position_embeddings", POSITIVE_INT.or_null()),
        ("beta_fast", POSITIVE_NUMBER.or_null()), ("beta_slow", POSITIVE_NUMBER.or_null()),
        ("mscale", NUMBER.or_null()), ("mscale_all_dim", NUMBER.or_null()),
        ("attention_factor", POSITIVE_NUMBER.or_null()), ("truncate", BOOL.or_null()),
        ("partial_rotary_factor", _FRACTION.or_null()), ("low_freq_factor", POSITIVE_NUMBER.or_null()),
        ("high_freq_factor", POSITIVE_NUMBER.or_null()), ("short_factor", _POSITIVE_NUMBERS.or_null()),
        ("long_factor", _POSITIVE_NUMBERS.or_null()), ("short_mscale", POSITIVE_NUMBER.or_null()),
        ("long_mscale", POSITIVE_NUMBER.or_null()))},
    "partial_rotary_factor": _FRACTION.or_null(), "rotary_dim": POSITIVE_INT.or_null(),
    "max_position_embeddings": POSITIVE_INT.or_null(),
    "sliding_window": NON_NEGATIVE_INT.or_null(), "use_sliding_window": BOOL.or_null(),
    "attention_bias": BOOL.or_null(), "mlp_bias": BOOL.or_null(), "qkv_bias": BOOL.or_null(),
    "clip_qkv": POSITIVE_NUMBER.or_null(), "use_qk_norm": BOOL.or_null(),
    "quantization_config": OBJECT.or_null(),  # its fields: fp8_checkpoint.fp8_blocks_from_config
    # experts and routing
    "intermediate_size": POSITIVE_INT, "moe_intermediate_size": POSITIVE_INT,
    "num_local_experts": EXPERT_COUNT, "num_experts": EXPERT_COUNT, "n_routed_experts": EXPERT_COUNT,
    "num_experts_per_tok": POSITIVE_INT, "norm_topk_prob": BOOL.or_null(),
    "shared_expert_intermediate_size": NON_NEGATIVE_INT.or_null(), "n_shared_experts": NON_NEGATIVE_INT.or_null(),
    "decoder_sparse_step": POSITIVE_INT.or_null(), "mlp_only_layers": NON_NEGATIVE_INTS.or_null(),
    "moe_layer_freq": POSITIVE_INT.or_null(), "first_k_dense_replace": NON_NEGATIVE_INT,
    "routed_scaling_factor": POSITIVE_NUMBER, "n_group": POSITIVE_INT.or_null(), "topk_group": POSITIVE_INT.or_null(),
    "topk_method": STRING.or_null(), "scoring_func": STRING,
    # DeepSeek MLA
    "q_lora_rank": POSITIVE_INT.or_null(), "kv_lora_rank": POSITIVE_INT, "qk_nope_head_dim": NON_NEGATIVE_INT,
    "qk_rope_head_dim": POSITIVE_INT, "v_head_dim": POSITIVE_INT,
    # JetMoE
    "kv_channels": POSITIVE_INT,
    # DBRX
    "d_model": POSITIVE_INT, "n_layers": LAYER_COUNT, "n_heads": POSITIVE_INT,
    "attn_config": OBJECT.or_null(), "attn_config.kv_n_heads": POSITIVE_INT,
    "attn_config.clip_qkv": POSITIVE_NUMBER.or_null(), "attn_config.rope_theta": POSITIVE_NUMBER.or_null(),
    "ffn_config": OBJECT.or_null(), "ffn_config.ffn_hidden_size": POSITIVE_INT,
    "ffn_config.moe_num_experts": EXPERT_COUNT, "ffn_config.moe_top_k": POSITIVE_INT,
    "ffn_config.moe_normalize_expert_weights": NUMBER.or_null(), "ffn_config.ffn_act_fn": OBJECT.or_null(),
    "ffn_config.ffn_act_fn.name": STRING,
    # PhiMoE
    "router_jitter_noise": _NON_NEGATIVE_NUMBER.or_null(), "lm_head_bias": BOOL.or_null(),
    # ERNIE 4.5 MoE
    "use_bias": BOOL.or_null(), "moe_num_experts": EXPERT_COUNT, "moe_k": POSITIVE_INT,
    "moe_num_shared_experts": NON_NEGATIVE_INT.or_null(), "moe_layer_start_index": NON_NEGATIVE_INT.or_null(),
    "moe_layer_end_index": Kind("an integer >= -1 (-1: the last layer)",
                                _int_at_least(-1)).or_null(),
    "moe_layer_interval": POSITIVE_INT.or_null(), "moe_norm_min": POSITIVE_NUMBER.or_null(),
    # Hunyuan v1 MoE (rope alpha: NTK scaling of the base)
    "moe_topk": _POSITIVE_INT_OR_INTS,
    "rope_parameters.alpha": POSITIVE_NUMBER.or_null(), "rope_scaling.alpha": POSITIVE_NUMBER.or_null(),
    # gpt-oss (its sliding_window and attention_bias are above)
    "swiglu_limit": POSITIVE_NUMBER.or_null(), "swiglu_alpha": POSITIVE_NUMBER.or_null(),  # (layer_types: below)
    # Llama 4 (layer_types: its values are checked by _llama4_layers)
    "intermediate_size_mlp": POSITIVE_INT, "moe_layers": NON_NEGATIVE_INTS.or_null(),
    "interleave_moe_layer_step": POSITIVE_INT.or_null(), "no_rope_layers": _ROPE_FLAGS.or_null(),
    "no_rope_layer_interval": POSITIVE_INT.or_null(), "attention_chunk_size": POSITIVE_INT.or_null(),
    "layer_types": STRINGS.or_null(), "attn_temperature_tuning": _FLAG.or_null(),
    "floor_scale": POSITIVE_NUMBER.or_null(), "attn_scale": NUMBER.or_null(), "text_config": OBJECT.or_null(),
    # Granite MoE (muP multipliers)
    "embedding_multiplier": POSITIVE_NUMBER.or_null(), "attention_multiplier": POSITIVE_NUMBER.or_null(),
    "residual_multiplier": POSITIVE_NUMBER.or_null(), "logits_scaling": POSITIVE_NUMBER.or_null(),
    "shared_intermediate_size": NON_NEGATIVE_INT.or_null(),
}


def _rope_theta(hf: dict, default: float = 10000.0) -> float:
    return float((hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", default)))


def _rope_scaling(hf: dict) -> Yarn | None:
    """The YaRN scaling of ``rope_parameters`` (transformers 5) or ``rope_scaling`` (released configs).

    transformers fills defaults the same way: ``original_max_position_embeddings`` from
    ``max_position_embeddings``, ``factor`` from their ratio, ``beta_fast`` 32, ``beta_slow`` 1.
    """
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return None
    if rope_type == "llama3":
        return _llama3_rope(hf, params)
    if rope_type != "yarn":
        raise NotImplementedError(
            f"rope_type {rope_type!r} is not implemented (only 'default', 'yarn' and 'llama3' RoPE are); "
            "remove rope scaling from config.json only if your sequences stay within the original context")
    original = params.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
    if original is None:
        raise CheckpointError("config.json: yarn rope scaling needs 'original_max_position_embeddings' (or "
                              f"'max_position_embeddings'); {_CONFIG_FIX}")
    factor = params.get("factor") or hf.get("max_position_embeddings", original) / original
    return Yarn(factor=float(factor), original_max_position_embeddings=original,
                beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
                attention_factor=params.get("attention_factor"), truncate=params.get("truncate", True) is not False)


def _llama3_rope(hf: dict, params: dict) -> Llama3Rope:
    """``rope_type: "llama3"`` (Llama 4 Scout as released): transformers needs factor, low/high_freq_factor and
    original_max_position_embeddings (else max_position_embeddings)."""
    original = params.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
    missing = [k for k, v in (("factor", params.get("factor")), ("low_freq_factor", params.get("low_freq_factor")),
                              ("high_freq_factor", params.get("high_freq_factor")),
                              ("original_max_position_embeddings", original)) if v is None]
    if missing:
        raise CheckpointError(f"config.json: llama3 rope scaling needs {missing[0]!r}; {_CONFIG_FIX}")
    return Llama3Rope(factor=float(params["factor"]), original_max_position_embeddings=original,
                      low_freq_factor=float(params["low_freq_factor"]),
                      high_freq_factor=float(params["high_freq_factor"]))


def _rotary_dim(hf: dict, head_dim: int, default_factor: float = 1.0) -> int | None:
    """Rotated dimensions per head (``None``: all), with transformers' precedence.

    ``rope_parameters`` / ``rope_scaling`` ``partial_rotary_factor``, then the top-level
    ``partial_rotary_factor`` (released GLM-4.5), then ``rotary_dim`` (released MiniMax-M2),
    then the family's default factor (GLM-4.5: 0.5).
    """
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    factor = params.get("partial_rotary_factor") or hf.get("partial_rotary_factor")
    if factor is None and hf.get("rotary_dim"):
        factor = hf["rotary_dim"] / head_dim
    dim = int(head_dim * (factor or default_factor))  # transformers truncates the same way
    if dim % 2 or not 0 < dim <= head_dim:
        raise CheckpointError(f"config.json: partial rotary gives {dim} rotary dimensions of head_dim={head_dim}; "
                              f"they must be even, positive and at most head_dim; {_CONFIG_FIX}")
    return None if dim == head_dim else dim


def _activation(name: str) -> str:
    gated = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "gelu_pytorch_tanh": None}
    act = gated.get(name)
    if act is None:
        raise NotImplementedError(f"hidden activation {name!r} is not supported (supported: silu, gelu)")
    return act


def _no_bias(hf: dict, key: str, arch: str) -> None:
    if hf.get(key):
        raise NotImplementedError(f"{arch}: {key}=True is not supported by moejax's {arch} mapping")


def _base(hf: dict, arch: str) -> dict[str, Any]:
    if hf.get("sliding_window") and hf.get("use_sliding_window", True):
        warnings.warn(f"{arch}: sliding_window={hf['sliding_window']} is ignored (full causal attention); "
                      "results differ only for sequences longer than the window", stacklevel=3)
    return dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                n_heads=hf["num_attention_heads"],
                n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                head_dim=hf.get("head_dim"), activation=_activation(hf.get("hidden_act", "silu")),
                rope_theta=_rope_theta(hf), rope_scaling=_rope_scaling(hf),
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def _mixtral(hf: dict) -> MoEConfig:
    return MoEConfig(**_base(hf, "Mixtral"), d_ff_expert=hf["intermediate_size"], n_experts=hf["num_local_experts"],
                     routing=dialect.Routing(k=hf["num_experts_per_tok"]), family="mixtral")


def _qwen_dense_layers(hf: dict) -> tuple[int, ...]:
    """Qwen-MoE's dense-FFN layers: those in ``mlp_only_layers`` or off the ``decoder_sparse_step`` grid."""
    step = hf.get("decoder_sparse_step", 1) or 1
    only = set(hf.get("mlp_only_layers") or [])
    return tuple(i for i in range(hf["num_hidden_layers"]) if i in only or (i + 1) % step != 0)


def _qwen2_moe(hf: dict) -> MoEConfig:
    shared = hf.get("shared_expert_intermediate_size", 0)
    return MoEConfig(**_base(hf, "Qwen2MoE"), d_ff_expert=hf["moe_intermediate_size"], n_experts=hf["num_experts"],
                     routing=dialect.Routing(k=hf["num_experts_per_tok"], norm_topk=bool(hf.get("norm_topk_prob"))),
                     n_shared_experts=1 if shared else 0, d_ff_shared=shared or None, shared_expert_gate=bool(shared),
                     dense_layers=_qwen_dense_layers(hf), d_ff_dense=hf.get("intermediate_size"),
                     qkv_bias=bool(hf.get("qkv_bias", True)), family="qwen2_moe")


def _qwen3_moe(hf: dict) -> MoEConfig:
    """Qwen3-MoE: Qwen2-MoE without shared expert or qkv bias, plus per-head q/k RMS norms."""
    _no_bias(hf, "attention_bias", "Qwen3MoE")  # it would also add an o_proj bias
    dense = _qwen_dense_layers(hf)
    # Released configs say num_experts; transformers 5 writes num_local_experts (its attribute map).
    n_experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]
    return MoEConfig(**_base(hf, "Qwen3MoE"), d_ff_expert=hf["moe_intermediate_size"], n_experts=n_experts,
                     routing=dialect.Routing(k=hf["num_experts_per_tok"], norm_topk=bool(hf.get("norm_topk_prob"))),
                     dense_layers=dense, d_ff_dense=hf["intermediate_size"] if dense else None,
                     qk_norm=True, qk_norm_per_head=True, family="qwen3_moe")


def _olmoe(hf: dict) -> MoEConfig:
    _no_bias(hf, "attention_bias", "OLMoE")
    return MoEConfig(**_base(hf, "OLMoE"), d_ff_expert=hf["intermediate_size"], n_experts=hf["num_experts"],
                     routing=dialect.Routing(k=hf["num_experts_per_tok"], norm_topk=bool(hf.get("norm_topk_prob"))),
                     qk_norm=True, clip_qkv=hf.get("clip_qkv"), family="olmoe")


def _v3_routing(hf: dict) -> dialect.Routing:
    """DeepSeek-V3's router (also GLM-4.5's): sigmoid scores, group-limited selection (group score = sum of its
    top 2), renormalised top-k, ``routed_scaling_factor``; the correction bias is ``MoEConfig.selection_bias``."""
    return dialect.Routing(k=hf["num_experts_per_tok"], score="sigmoid", norm_topk=bool(hf.get("norm_topk_prob", True)),
                           scale=float(hf.get("routed_scaling_factor", 1.0)), n_group=hf.get("n_group") or 1,
                           topk_group=hf.get("topk_group") or 1, group_score="top2_sum")


def _deepseek(hf: dict, v3: bool) -> MoEConfig:
    arch = "DeepseekV3" if v3 else "DeepseekV2"
    _no_bias(hf, "attention_bias", arch)
    _no_bias(hf, "mlp_bias", arch)
    base = _base(hf, arch)
    base["n_kv_heads"] = base["n_heads"]  # MLA has no KV-head grouping
    base["head_dim"] = None
    n_group = hf.get("n_group") or 1
    if v3:
        routing = _v3_routing(hf)
    else:
        # transformers' DeepseekV2 router never renormalises (norm_topk_prob is unused there).
        grouped = hf.get("topk_method", "greedy") == "group_limited_greedy"
        routing = dialect.Routing(k=hf["num_experts_per_tok"], score="softmax", norm_topk=False,
                                  scale=float(hf.get("routed_scaling_factor", 1.0)),
                                  n_group=n_group if grouped else 1,
                                  topk_group=(hf.get("topk_group") or 1) if grouped else 1, group_score="max")
    n_shared = hf.get("n_shared_experts") or 0
    return MoEConfig(**base, d_ff_expert=hf["moe_intermediate_size"], n_experts=hf["n_routed_experts"],
                     routing=routing, n_shared_experts=n_shared, d_ff_shared=hf["moe_intermediate_size"],
                     selection_bias=v3, first_dense_layers=hf.get("first_k_dense_replace", 0),
                     d_ff_dense=hf["intermediate_size"], attention="mla", q_lora_rank=hf.get("q_lora_rank"),
                     kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
                     qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
                     rope_interleave=True, family="deepseek_v3" if v3 else "deepseek_v2")


def _deepseek_moe(hf: dict) -> MoEConfig:
    """DeepSeekMoE-16B (``DeepseekForCausalLM``, remote code upstream): MHA plus fine-grained and shared experts."""
    _no_bias(hf, "attention_bias", "Deepseek")
    if hf.get("scoring_func", "softmax") != "softmax":
        raise NotImplementedError(f"Deepseek scoring_func={hf['scoring_func']!r}: only softmax is supported")
    freq = hf.get("moe_layer_freq", 1) or 1
    first = hf.get("first_k_dense_replace", 0) or 0
    dense = tuple(i for i in range(first, hf["num_hidden_layers"]) if i % freq != 0)
    return MoEConfig(**_base(hf, "Deepseek"), d_ff_expert=hf["moe_intermediate_size"], n_experts=hf["n_routed_experts"],
                     routing=dialect.Routing(k=hf["num_experts_per_tok"], norm_topk=bool(hf.get("norm_topk_prob"))),
                     n_shared_experts=hf.get("n_shared_experts") or 0, d_ff_shared=hf["moe_intermediate_size"],
                     first_dense_layers=first, dense_layers=dense, d_ff_dense=hf["intermediate_size"],
                     family="deepseek_moe")


def _glm4_moe(hf: dict) -> MoEConfig:
    """GLM-4.5 / GLM-4.5-Air: GQA with q/k/v bias, optional per-head q/k norm and partial rotary (default half of
    each head), DeepSeek-V3 routing and shared experts, leading dense layers (``first_k_dense_replace``)."""
    n_shared = hf.get("n_shared_experts", 1)
    if not n_shared:  # transformers would still build a zero-width shared MLP
        raise NotImplementedError("Glm4Moe: n_shared_experts=0 is not supported (transformers' Glm4Moe always has "
                                  "shared experts)")
    base = _base(hf, "Glm4Moe")
    qk_norm = bool(hf.get("use_qk_norm", False))
    hd = base["head_dim"] or base["d_model"] // base["n_heads"]
    return MoEConfig(**base, d_ff_expert=hf["moe_intermediate_size"], n_experts=hf["n_routed_experts"],
                     routing=_v3_routing(hf), n_shared_experts=n_shared, d_ff_shared=hf["moe_intermediate_size"],
                     selection_bias=True, first_dense_layers=hf.get("first_k_dense_replace", 1),
                     d_ff_dense=hf["intermediate_size"], qkv_bias=bool(hf.get("attention_bias", False)),
                     qk_norm=qk_norm, qk_norm_per_head=qk_norm, rotary_dim=_rotary_dim(hf, hd, default_factor=0.5),
                     family="glm4_moe")


def _minimax_m2(hf: dict) -> MoEConfig:
    """MiniMax-M2: GQA with RMS q/k norms over the whole projections, partial rotary (``rotary_dim``), sigmoid
    routing with a selection-only correction bias, always renormalised; every layer MoE, no shared expert."""
    base = _base(hf, "MiniMaxM2")
    base["head_dim"] = hf.get("head_dim", 128)  # transformers' MiniMaxM2Config default, not hidden / heads
    base["rope_theta"] = _rope_theta(hf, default=5e6)
    hd = base["head_dim"] or base["d_model"] // base["n_heads"]
    n_experts = hf["num_local_experts"] if "num_local_experts" in hf else hf["num_experts"]
    return MoEConfig(**base, d_ff_expert=hf["intermediate_size"], n_experts=n_experts,
                     routing=dialect.Routing(k=hf["num_experts_per_tok"], score="sigmoid", norm_topk=True),
                     selection_bias=True, qk_norm=True, rotary_dim=_rotary_dim(hf, hd), family="minimax_m2")


def _phimoe_longrope(hf: dict, params: dict, head_dim: int) -> LongRope:
    """PhiMoE's ``rope_type: "longrope"`` as transformers' ``PhimoeRotaryEmbedding`` runs it.

    That class recomputes its inverse frequencies on every call with ``rope_init_fn(config)``, i.e. with no sequence
    length, so ``_compute_longrope_parameters`` always returns the ``short_factor`` ones (the long ones that
    ``dynamic_rope_update`` writes to its ``inv_freq`` buffer are never read); what switches at
    ``max(position_ids) + 1 > original_max_position_embeddings`` is the cos/sin multiplier, ``short_mscale`` ->
    ``long_mscale`` (required, as PhimoeConfig requires them; they replace the generic attention factor). The
    released config has equal mscales (1.2432), so there the scaling is static. (The released remote code, and vLLM,
    do switch to ``long_factor`` past 4096 tokens: to follow them, pass ``long_factor`` through below.)
    ``original_max_position_embeddings``: the rope dict's, else ``max_position_embeddings`` (default 131072); a
    top-level field of that name is ignored, as transformers 5 ignores it when it loads a PhiMoE config.json."""
    missing = [k for k in ("short_factor", "long_factor", "short_mscale", "long_mscale") if params.get(k) is None]
    if missing:
        raise CheckpointError(f"config.json: PhimoeForCausalLM's longrope rope scaling needs {missing[0]!r} (as "
                              f"transformers' PhimoeConfig does); {_CONFIG_FIX}")
    for key in ("short_factor", "long_factor"):
        if len(params[key]) != head_dim // 2:
            raise CheckpointError(f"config.json: longrope {key} has {len(params[key])} entries; head_dim={head_dim} "
                                  f"needs {head_dim // 2}; {_CONFIG_FIX}")
    original = params.get("original_max_position_embeddings") or hf.get("max_position_embeddings") or 131072
    short = tuple(float(f) for f in params["short_factor"])
    return LongRope(short_factor=short, long_factor=short,  # transformers' PhiMoE never uses long_factor
                    original_max_position_embeddings=int(original), short_scale=float(params["short_mscale"]),
                    long_scale=float(params["long_mscale"]))


def _phimoe(hf: dict) -> MoEConfig:
    """PhiMoE (Phi-3.5-MoE): SparseMixer routing (eval mode), LayerNorm with bias everywhere, q/k/v/o biases
    (``attention_bias``), optional ``lm_head`` bias, every layer MoE; default or ``longrope`` RoPE (released)."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ("default", "longrope"):  # before _base, whose generic refusal does not say what PhiMoE does
        raise NotImplementedError(
            f"PhimoeForCausalLM: rope_type {rope_type!r} is not implemented (PhiMoE loads 'default' and 'longrope', "
            "the released one)")
    if hf.get("num_experts_per_tok", 2) != 2:
        raise CheckpointError(f"config.json: num_experts_per_tok={hf['num_experts_per_tok']}, but PhiMoE's "
                              f"SparseMixer router always picks 2 experts; set it to 2 ({_CONFIG_FIX})")
    bias = bool(hf.get("attention_bias", False))
    base = _base({**hf, "rope_scaling": None, "rope_parameters": None}, "Phimoe")
    base.update(norm_eps=float(hf.get("rms_norm_eps", 1e-5)),  # the LayerNorms' eps
                rope_theta=_rope_theta(hf, default=1e6))  # transformers' PhimoeConfig default
    if rope_type == "longrope":
        base["rope_scaling"] = _phimoe_longrope(hf, params, base["head_dim"] or base["d_model"] // base["n_heads"])
    jitter = hf.get("router_jitter_noise")
    routing = dialect.Routing(k=2, score="sparsemixer", norm_topk=False,
                              jitter_eps=float(0.01 if jitter is None else jitter))
    return MoEConfig(**base, d_ff_expert=hf["intermediate_size"], n_experts=hf["num_local_experts"],
                     routing=routing, norm="layer_bias", qkv_bias=bias, o_bias=bias,
                     lm_head_bias=bool(hf.get("lm_head_bias", False)), family="phimoe")


def _ernie4_5_moe(hf: dict) -> MoEConfig:
    """ERNIE 4.5 MoE: softmax router whose selection adds ``moe_statics.e_score_correction_bias``, renormalised with
    the sum clamped at ``moe_norm_min``; shared experts; MoE layers on the ``moe_layer_start_index`` ..
    ``moe_layer_end_index`` / ``moe_layer_interval`` grid, dense elsewhere; RoPE on adjacent pairs."""
    if hf.get("use_bias"):
        raise NotImplementedError("Ernie4_5_Moe: use_bias=True (biases on attention, dense/shared MLPs and lm_head) "
                                  "is not supported")
    n = hf["num_hidden_layers"]
    start, interval = hf.get("moe_layer_start_index", 1), hf.get("moe_layer_interval", 1) or 1
    end = hf.get("moe_layer_end_index", -1)
    end = n - 1 if end in (None, -1) else end
    start = 1 if start is None else start
    dense = tuple(i for i in range(n) if not ((i + 1) % interval == 0 and start <= i <= end))
    if len(dense) == n:
        raise CheckpointError(f"config.json: moe_layer_start_index={start}, moe_layer_end_index={end} and "
                              f"moe_layer_interval={interval} leave no MoE layer among {n}; {_CONFIG_FIX}")
    base = _base(hf, "Ernie4_5_Moe")
    base.update(rope_theta=_rope_theta(hf, default=500000.0), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)))  # transformers' defaults
    norm_min = hf.get("moe_norm_min")
    routing = dialect.Routing(k=hf["moe_k"], norm_topk=True, norm_min=float(1e-12 if norm_min is None else norm_min))
    n_shared = hf.get("moe_num_shared_experts", 2) or 0
    return MoEConfig(**base, d_ff_expert=hf["moe_intermediate_size"], n_experts=hf["moe_num_experts"],
                     routing=routing, selection_bias=True, n_shared_experts=n_shared,
                     d_ff_shared=hf["moe_intermediate_size"] if n_shared else None, dense_layers=dense,
                     d_ff_dense=hf["intermediate_size"] if dense else None, rope_adjacent_pairs=True,
                     family="ernie4_5_moe")


def _per_layer(hf: dict, key: str) -> int:
    """A field transformers allows per layer (a list): its one value if all layers agree, else NotImplementedError."""
    v = hf[key]
    if isinstance(v, list):
        if len(set(v)) != 1:
            raise NotImplementedError(f"HunYuanMoEV1: per-layer {key}={v} is not supported (one value for all "
                                      "layers is)")
        return v[0]
    return v


def _hunyuan_v1_moe(hf: dict) -> MoEConfig:
    """Hunyuan v1 MoE: renormalised softmax top-k (no capacity or token dropping at inference in transformers), a
    shared MLP of ``intermediate_size`` in every layer, per-head q/k RMS norms after RoPE, optional q/k/v/o bias
    (``attention_bias``), RoPE base stretched by a fixed NTK ``alpha`` (released ``type: dynamic`` + ``alpha``)."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    base = _base({**hf, "rope_scaling": None, "rope_parameters": None}, "HunYuanMoEV1")
    hd = base["head_dim"] or base["d_model"] // base["n_heads"]
    theta = _rope_theta(hf)
    if (params.get("rope_type") or params.get("type")) == "dynamic" and params.get("alpha"):
        # transformers' compute_ntk_alpha_rope_parameters: a static base change, exact at any length
        base["rope_theta"] = theta * params["alpha"] ** (hd / (hd - 2))
    else:
        base.update(rope_theta=theta, rope_scaling=_rope_scaling(hf))  # default or yarn; others refused there
    base["norm_eps"] = float(hf.get("rms_norm_eps", 1e-5))
    bias = bool(hf.get("attention_bias", False))
    # (a per-layer num_experts list fails the field check: num_experts is an integer for every family)
    return MoEConfig(**base, d_ff_expert=hf["intermediate_size"], n_experts=hf["num_experts"],
                     routing=dialect.Routing(k=_per_layer(hf, "moe_topk"), norm_topk=True), n_shared_experts=1,
                     d_ff_shared=hf["intermediate_size"], qkv_bias=bias, o_bias=bias, qk_norm=True,
                     qk_norm_per_head=True, qk_norm_after_rope=True, family="hunyuan_v1_moe")


def _jetmoe(hf: dict) -> MoEConfig:
    """JetMoE: attention experts (MoA) and FFN experts share num_local_experts and top-k."""
    if float(hf.get("rms_norm_eps", 1e-6)) != 1e-6:
        raise NotImplementedError("JetMoE with rms_norm_eps != 1e-6: transformers uses 1e-6 in the layer norms and "
                                  "rms_norm_eps in the final norm; moejax has one eps")
    k, nkv = hf["num_experts_per_tok"], hf["num_key_value_heads"]
    act = _activation(hf.get("activation_function", "silu"))
    return MoEConfig(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                     n_heads=nkv * k, n_kv_heads=nkv, head_dim=hf.get("kv_channels", 128),
                     d_ff_expert=hf["intermediate_size"], n_experts=hf["num_local_experts"],
                     routing=dialect.Routing(k=k), activation=act, rope_theta=_rope_theta(hf),
                     rope_scaling=_rope_scaling(hf), norm_eps=1e-6,
                     tie_embeddings=bool(hf.get("tie_word_embeddings", True)), attention="moa",
                     expert_out_bias=True, family="jetmoe")


def _jetmoe_rules(cfg: MoEConfig) -> list[Rule]:
    e, d, f, hq = cfg.n_experts, cfg.d_model, cfg.d_ff_expert, cfg.n_kv_heads * cfg.hd
    r: list[Rule] = [Rule("embed_tokens/embedding", ("model.embed_tokens.weight",), "copy")]
    t = lambda w: w.transpose(0, 2, 1)  # noqa: E731  [E, out, in] -> [E, in, out]
    for i in range(cfg.n_layers):
        p, a, m = f"model.layers.{i}", f"layers/{i}/self_attn", f"layers/{i}/mlp"
        _norm(r, f"layers/{i}/input_layernorm", f"{p}.input_layernorm")
        _norm(r, f"layers/{i}/post_attention_layernorm", f"{p}.post_attention_layernorm")
        s = f"{p}.self_attention"
        _linear(r, f"{a}/kv_proj", f"{s}.kv_proj")
        _linear(r, f"{a}/router", f"{s}.experts.router.layer")
        r.append(Rule(f"{a}/w_in", (f"{s}.experts.input_linear.weight",), "custom", ((e, hq, d),), t, t))
        r.append(Rule(f"{a}/w_out", (f"{s}.experts.output_linear.weight",), "custom", ((e, d, hq),), t, t))
        r.append(Rule(f"{a}/bias", (f"{s}.experts.bias",), "copy"))
        _linear(r, f"{m}/gate", f"{p}.mlp.router.layer")
        _fused_linear_experts(r, f"{m}/experts", f"{p}.mlp", e, d, f)
        r.append(Rule(f"{m}/bias", (f"{p}.mlp.bias",), "copy"))
    _norm(r, "norm", "model.norm")
    if not cfg.tie_embeddings:
        _linear(r, "lm_head", "lm_head")
    return r


def _dbrx(hf: dict) -> MoEConfig:
    attn, ffn = hf.get("attn_config") or {}, hf.get("ffn_config") or {}
    p = ffn.get("moe_normalize_expert_weights", 1.0)
    if p not in (None, 1, 1.0):
        raise NotImplementedError(f"DBRX moe_normalize_expert_weights={p}: only the L1 norm (1.0) or None maps "
                                  "onto Routing.norm_topk")
    act = (ffn.get("ffn_act_fn") or {}).get("name", "silu")
    theta = attn.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return MoEConfig(vocab_size=hf["vocab_size"], d_model=hf["d_model"], n_layers=hf["n_layers"],
                     n_heads=hf["n_heads"], n_kv_heads=attn.get("kv_n_heads", 1), d_ff_expert=ffn["ffn_hidden_size"],
                     n_experts=ffn["moe_num_experts"],
                     routing=dialect.Routing(k=ffn["moe_top_k"], norm_topk=p is not None),
                     activation=_activation(act), rope_theta=float(theta), norm="layer", norm_eps=1e-5,
                     clip_qkv=attn.get("clip_qkv"), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                     family="dbrx")


def _llama4_layers(hf: dict) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int | None]:
    """Llama 4's per-layer schedule, with transformers' defaults: (dense layers, NoPE layers, chunked layers,
    chunk size).

    MoE layers: ``moe_layers``, else every ``interleave_moe_layer_step``-th layer; the others are dense.
    ``no_rope_layers`` flags the RoPE layers (default: every ``no_rope_layer_interval``-th layer is NoPE);
    ``layer_types`` (default: the RoPE layers chunked when ``attention_chunk_size`` is set) picks chunked layers.
    """
    n = hf["num_hidden_layers"]
    moe = hf.get("moe_layers")
    if moe is None:
        step = hf.get("interleave_moe_layer_step") or 1
        moe = list(range(step - 1, n, step))
    if any(i >= n for i in moe):
        raise CheckpointError(f"config.json: field 'moe_layers' names layer {max(moe)}, but num_hidden_layers={n}; "
                              f"{_CONFIG_FIX}")
    if not moe:
        raise NotImplementedError("Llama4: a model without MoE layers (empty moe_layers) is a dense model; moejax "
                                  "loads MoE models only")
    interval = hf.get("no_rope_layer_interval") or 4
    flags = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    if len(flags) < n:
        raise CheckpointError(f"config.json: field 'no_rope_layers' has {len(flags)} flags for num_hidden_layers={n} "
                              f"layers; {_CONFIG_FIX}")
    chunk = hf.get("attention_chunk_size", 8192)  # transformers' default when the field is absent
    types = hf.get("layer_types") or ["chunked_attention" if flags[i] and chunk is not None else "full_attention"
                                      for i in range(n)]
    odd = [t for t in types if t not in ("full_attention", "chunked_attention")]
    if len(types) != n or odd:
        why = f"holds {odd[0]!r}" if odd else f"has {len(types)} entries for {n} layers"
        raise CheckpointError(f"config.json: field 'layer_types' {why}; Llama 4 layers are 'full_attention' or "
                              f"'chunked_attention', one per layer; {_CONFIG_FIX}")
    chunked = tuple(i for i, t in enumerate(types) if t == "chunked_attention")
    if chunked and chunk is None:
        raise CheckpointError("config.json: field 'layer_types' has chunked_attention layers but "
                              f"'attention_chunk_size' is null; {_CONFIG_FIX}")
    dense = tuple(i for i in range(n) if i not in set(moe))
    return dense, tuple(i for i in range(n) if not flags[i]), chunked, chunk if chunked else None


def _llama4(hf: dict) -> MoEConfig:
    """Llama 4 text model: top-k sigmoid router whose weight scales the expert's input (``weight_on="input"``), a
    shared expert in every MoE layer, dense layers of ``intermediate_size_mlp``, NoPE layers with attention
    temperature tuning, weightless q/k norm on the RoPE layers, chunked attention, RoPE on adjacent pairs, optional
    q/k/v/o biases (``attention_bias``)."""
    bias = bool(hf.get("attention_bias", False))  # q/k/v and o_proj, as transformers' Llama4TextAttention
    base = _base(hf, "Llama4")
    base.update(rope_theta=_rope_theta(hf, default=500000.0), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                head_dim=hf.get("head_dim", 128))  # transformers' defaults (null head_dim: hidden / heads)
    dense, nope, chunked, chunk = _llama4_layers(hf)
    temperature = None
    if hf.get("attn_temperature_tuning", True) and nope:
        temperature = (float(hf.get("floor_scale", 8192)), float(hf.get("attn_scale", 0.1)))
    f = hf["intermediate_size"]
    return MoEConfig(**base, d_ff_expert=f, n_experts=hf["num_local_experts"],
                     routing=dialect.Routing(k=hf.get("num_experts_per_tok", 1), score="sigmoid", norm_topk=False,
                                             weight_on="input"),
                     n_shared_experts=1, d_ff_shared=f, dense_layers=dense,
                     d_ff_dense=hf["intermediate_size_mlp"] if dense else None, nope_layers=nope,
                     attn_temperature=temperature, qk_l2_norm=bool(hf.get("use_qk_norm", True)),
                     attention_chunk_size=chunk, chunked_layers=chunked, rope_adjacent_pairs=True, qkv_bias=bias,
                     o_bias=bias, family="llama4")


def _llama4_multimodal(hf: dict) -> MoEConfig:
    """``Llama4ForConditionalGeneration``: its text model (``text_config``); the vision tower is not loaded."""
    text = hf.get("text_config")
    if text is None:
        raise CheckpointError(f"config.json lacks field 'text_config', which Llama4ForConditionalGeneration needs; "
                              f"{_CONFIG_FIX}")
    check_fields(text, _HF_FIELDS, file="config.json text_config", fix=_CONFIG_FIX)
    return _llama4(text)


def _granitemoe(hf: dict, shared: bool) -> MoEConfig:
    """Granite MoE (and its shared-MLP variant): muP multipliers on embeddings, residual branches, logits and the
    softmax scale (``attention_multiplier``), softmax over the top-k logits (= renormalised softmax top-k), optional
    q/k/v/o biases (``attention_bias``)."""
    arch = "GraniteMoeShared" if shared else "GraniteMoe"
    bias = bool(hf.get("attention_bias", False))  # q/k/v and o_proj, as transformers' GraniteMoeAttention
    fs = (hf.get("shared_intermediate_size") or 0) if shared else 0
    return MoEConfig(**_base(hf, arch), d_ff_expert=hf["intermediate_size"], n_experts=hf["num_local_experts"],
                     routing=dialect.Routing(k=hf["num_experts_per_tok"], norm_topk=True),
                     n_shared_experts=1 if fs else 0, d_ff_shared=fs or None,
                     softmax_scale=float(hf.get("attention_multiplier", 1.0)),
                     embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
                     residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
                     logits_scaling=float(hf.get("logits_scaling", 1.0)), qkv_bias=bias, o_bias=bias,
                     family="granitemoeshared" if shared else "granitemoe")


def _gpt_oss(hf: dict) -> MoEConfig:
    """gpt-oss: GQA with q/k/v/o biases (``attention_bias``) and a learned sink logit per head, sliding-window
    attention on the ``layer_types`` "sliding_attention" layers (default: every even layer), a router with a bias
    on its logits and softmax over the top-k logits (= softmax, top-k, renormalised), experts with biases and the
    clamped SwiGLU (``swiglu_limit``, ``swiglu_alpha``), YaRN RoPE (transformers' defaults when none is given)."""
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if len(types) != n:
        raise CheckpointError(f"config.json: layer_types has {len(types)} entries for num_hidden_layers={n}; give "
                              f"one per layer ({_CONFIG_FIX})")
    if bad := sorted(set(types) - {"sliding_attention", "full_attention"}):
        raise CheckpointError(f"config.json: layer_types holds {bad[0]!r}; gpt-oss layers are 'sliding_attention' or "
                              f"'full_attention' ({_CONFIG_FIX})")
    if not (hf.get("rope_parameters") or hf.get("rope_scaling")):  # GptOssConfig's default RoPE
        hf = {**hf, "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                        "truncate": False, "original_max_position_embeddings": 4096}}
    window = hf.get("sliding_window", 128)  # GptOssConfig's default
    base = _base({**hf, "sliding_window": None}, "GptOss")  # its sliding window is implemented, not ignored
    base.update(head_dim=hf.get("head_dim", 64), rope_theta=_rope_theta(hf, default=150000.0),
                norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                activation=dialect.clamped_swiglu(float(hf.get("swiglu_limit") or 7.0),
                                                  float(hf.get("swiglu_alpha") or 1.702)))
    bias = bool(hf.get("attention_bias", True))
    if mxfp4_checkpoint.is_mxfp4(hf):
        mxfp4_checkpoint.check_dims(hf["hidden_size"], hf["intermediate_size"])
    return MoEConfig(**base, d_ff_expert=hf["intermediate_size"], n_experts=hf["num_local_experts"],
                     routing=dialect.Routing(k=hf["num_experts_per_tok"], norm_topk=True, bias_on_logits=True),
                     qkv_bias=bias, o_bias=bias, sliding_window=window or None,
                     sliding_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention") if window else (),
                     attention_sinks=True, expert_bias=True, family="gpt_oss")


def _gpt_oss_rules(cfg: MoEConfig, mxfp4: bool) -> list[Rule]:
    """gpt-oss's tensors: fused experts ``gate_up_proj [E, d, 2f]`` (gate = columns ``0::2``, up = ``1::2``) with
    ``gate_up_proj_bias [E, 2f]``, ``down_proj [E, f, d]`` and ``down_proj_bias [E, d]``; with ``mxfp4`` the two
    matrices are ``*_blocks`` / ``*_scales`` in the ``[E, out, in]`` orientation (``models/mxfp4_checkpoint.py``)."""
    e, d, f = cfg.n_experts, cfg.d_model, cfg.d_ff_expert
    r: list[Rule] = [Rule("embed_tokens/embedding", ("model.embed_tokens.weight",), "copy")]
    for i in range(cfg.n_layers):
        p, m = f"model.layers.{i}", f"layers/{i}/mlp/experts"
        r += _layer_rules(cfg, i, p)
        r.append(Rule(f"layers/{i}/self_attn/sinks", (f"{p}.self_attn.sinks",), "copy"))
        _linear(r, f"layers/{i}/mlp/gate", f"{p}.mlp.router", bias=True)
        x = f"{p}.mlp.experts"
        for ours, rows in (("gate", slice(0, None, 2)), ("up", slice(1, None, 2))):
            if mxfp4:
                names = (f"{x}.gate_up_proj_blocks", f"{x}.gate_up_proj_scales")
                r.append(Rule(f"{m}/w_{ours}", names, "custom", ((e, 2 * f, d // 32, 16), (e, 2 * f, d // 32)),
                              lambda b, s, names=names, rows=rows: mxfp4_checkpoint.experts(b, s, names, rows)))
            else:
                r.append(Rule(f"{m}/w_{ours}", (f"{x}.gate_up_proj",), "custom", ((e, d, 2 * f),),
                              lambda w, rows=rows: w[..., rows]))
            r.append(Rule(f"{m}/b_{ours}", (f"{x}.gate_up_proj_bias",), "custom", ((e, 2 * f),),
                          lambda b, rows=rows: b[..., rows]))
        if mxfp4:
            names = (f"{x}.down_proj_blocks", f"{x}.down_proj_scales")
            r.append(Rule(f"{m}/w_down", names, "custom", ((e, d, f // 32, 16), (e, d, f // 32)),
                          lambda b, s, names=names: mxfp4_checkpoint.experts(b, s, names)))
        else:
            r.append(Rule(f"{m}/w_down", (f"{x}.down_proj",), "copy"))
        r.append(Rule(f"{m}/b_down", (f"{x}.down_proj_bias",), "copy"))
    _norm(r, "norm", "model.norm")
    if not cfg.tie_embeddings:
        _linear(r, "lm_head", "lm_head")
    return r


def _gpt_oss_interleave(tensors: dict[str, np.ndarray], rule: Rule, value: np.ndarray) -> None:
    """Export: put gate (``w_gate`` / ``b_gate``) back in the even, up in the odd columns of the fused tensor."""
    out = tensors.setdefault(rule.srcs[0], np.zeros((*value.shape[:-1], 2 * value.shape[-1]), value.dtype))
    first = 0 if rule.dst.endswith(("w_gate", "b_gate")) else 1
    out[..., first::2] = value


_CONFIG_PARSERS: dict[str, Callable[[dict], MoEConfig]] = {
    "MixtralForCausalLM": _mixtral,
    "Qwen2MoeForCausalLM": _qwen2_moe,
    "Qwen3MoeForCausalLM": _qwen3_moe,
    "OlmoeForCausalLM": _olmoe,
    "DeepseekForCausalLM": _deepseek_moe,
    "DeepseekV2ForCausalLM": lambda hf: _deepseek(hf, v3=False),
    "DeepseekV3ForCausalLM": lambda hf: _deepseek(hf, v3=True),
    "DbrxForCausalLM": _dbrx,
    "JetMoeForCausalLM": _jetmoe,
    "Glm4MoeForCausalLM": _glm4_moe,
    "MiniMaxM2ForCausalLM": _minimax_m2,
    "PhimoeForCausalLM": _phimoe,
    "PhiMoEForCausalLM": _phimoe,  # the released checkpoints' remote-code name; same tensors
    "Ernie4_5_MoeForCausalLM": _ernie4_5_moe,
    "HunYuanMoEV1ForCausalLM": _hunyuan_v1_moe,
    "GptOssForCausalLM": _gpt_oss,
    "Llama4ForCausalLM": _llama4,
    "Llama4ForConditionalGeneration": _llama4_multimodal,
    "GraniteMoeForCausalLM": lambda hf: _granitemoe(hf, shared=False),
    "GraniteMoeSharedForCausalLM": lambda hf: _granitemoe(hf, shared=True),
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_CONFIG_PARSERS)


def _architecture(hf: dict) -> str:
    archs = hf.get("architectures") or []
    for a in archs:
        if a in _CONFIG_PARSERS:
            return a
    if not archs and not hf.get("model_type"):
        raise NotImplementedError("config.json names no architecture (no 'architectures' or 'model_type' field) and "
                                  "is not a moejax MoEConfig; pass a Hugging Face checkpoint of one of "
                                  f"{list(SUPPORTED_ARCHITECTURES)} or a copy of the bundled model's folder")
    raise NotImplementedError(
        f"unsupported architecture {archs or hf.get('model_type')!r}; supported: {list(SUPPORTED_ARCHITECTURES)}")


def config_from_hf(hf: dict, **overrides: Any) -> MoEConfig:
    """Translate a Hugging Face ``config.json`` dict into a :class:`MoEConfig`.

    Raises:
      CheckpointError: ``hf`` is not an object, a field has the wrong type or range
        (see ``_HF_FIELDS``), a field the architecture needs is missing, or the
        fields contradict each other.
      NotImplementedError: the architecture or one of its options is not supported.
    """
    if not isinstance(hf, dict):
        raise CheckpointError(f"config.json must hold a JSON object, got {describe(hf)}; {_CONFIG_FIX}")
    check_fields(hf, _HF_FIELDS, file="config.json", fix=_CONFIG_FIX)
    arch = _architecture(hf)
    try:
        cfg = _CONFIG_PARSERS[arch](hf)
    except KeyError as e:
        raise CheckpointError(f"config.json lacks field {e.args[0]!r}, which {arch} needs; {_CONFIG_FIX}") from None
    except CheckpointError:
        raise
    except ValueError as e:  # MoEConfig's and Routing's cross-field checks
        raise CheckpointError(f"config.json: {e}; {_CONFIG_FIX}") from None
    return cfg.replace(**overrides) if overrides else cfg


# --------------------------------------------------------------------------
# Tensor mapping rules
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rule:
    """How one model parameter is built from checkpoint tensors.

    ``kind``: ``"copy"`` (same layout), ``"linear"`` (transpose ``[out,in] -> [in,out]``),
    ``"experts"`` (stack per-expert ``[out,in]`` tensors, each transposed), or
    ``"custom"`` (``fn(*tensors)``, with the tensors' expected shapes in ``src_shapes``; ``inverse(value)``, if
    given, rebuilds a one-tensor rule's checkpoint tensor for export).
    """

    dst: str
    srcs: tuple[str, ...]
    kind: str = "linear"
    src_shapes: tuple[tuple[int, ...], ...] | None = None
    fn: Callable[..., np.ndarray] | None = None
    inverse: Callable[[np.ndarray], np.ndarray] | None = None

    def expected_src_shapes(self, dst_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        if self.kind == "copy":
            return (dst_shape,)
        if self.kind == "linear":
            return (dst_shape[::-1],)
        if self.kind == "experts":
            return tuple((dst_shape[2], dst_shape[1]) for _ in self.srcs)
        return self.src_shapes or ()

    def build(self, tensors: list[np.ndarray]) -> np.ndarray:
        if self.kind == "copy":
            return tensors[0]
        if self.kind == "linear":
            return tensors[0].T
        if self.kind == "experts":
            return np.stack([t.T for t in tensors])
        return self.fn(*tensors)


@dataclasses.dataclass(frozen=True)
class FusedPart:
    """What a :class:`Rule`'s ``inverse`` returns when its parameter is one part of a fused checkpoint tensor
    (Llama 4's ``gate_up_proj``, Granite's ``input_linear``): ``value`` goes at ``index`` of a ``shape`` tensor,
    which the other parts' rules fill in turn."""

    shape: tuple[int, ...]
    index: Any
    value: np.ndarray

    def into(self, tensor: np.ndarray | None) -> np.ndarray:
        out = np.zeros(self.shape, self.value.dtype) if tensor is None else tensor
        out[self.index] = self.value
        return out


def _fused_linear_experts(rules: list[Rule], dst: str, src: str, e: int, d: int, f: int) -> None:
    """JetMoE / Granite experts: fused ``{src}.input_linear [E, 2f, d]`` (gate rows first) and
    ``{src}.output_linear [E, d, f]``, stored ``[E, out, in]``; export writes each part back into the fusion."""
    t = lambda w: w.transpose(0, 2, 1)  # noqa: E731  [E, out, in] -> [E, in, out]
    gate_up, fused = (f"{src}.input_linear.weight",), (e, 2 * f, d)
    rules.append(Rule(f"{dst}/w_gate", gate_up, "custom", (fused,), lambda w: t(w[:, :f]),
                      lambda v: FusedPart(fused, np.s_[:, :f], t(v))))
    rules.append(Rule(f"{dst}/w_up", gate_up, "custom", (fused,), lambda w: t(w[:, f:]),
                      lambda v: FusedPart(fused, np.s_[:, f:], t(v))))
    rules.append(Rule(f"{dst}/w_down", (f"{src}.output_linear.weight",), "custom", ((e, d, f),), t, t))


def _linear(rules: list[Rule], dst: str, src: str, bias: bool = False) -> None:
    rules.append(Rule(f"{dst}/kernel", (f"{src}.weight",)))
    if bias:
        rules.append(Rule(f"{dst}/bias", (f"{src}.bias",), "copy"))


def _norm(rules: list[Rule], dst: str, src: str, bias: bool = False) -> None:
    rules.append(Rule(f"{dst}/weight", (f"{src}.weight",), "copy"))
    if bias:
        rules.append(Rule(f"{dst}/bias", (f"{src}.bias",), "copy"))


def _attention_rules(cfg: MoEConfig, i: int, p: str) -> list[Rule]:
    r: list[Rule] = []
    a, s = f"layers/{i}/self_attn", f"{p}.self_attn"
    if cfg.attention == "mla":
        if cfg.q_lora_rank:
            _linear(r, f"{a}/q_a_proj", f"{s}.q_a_proj")
            _norm(r, f"{a}/q_a_layernorm", f"{s}.q_a_layernorm")
            _linear(r, f"{a}/q_b_proj", f"{s}.q_b_proj")
        else:
            _linear(r, f"{a}/q_proj", f"{s}.q_proj")
        _linear(r, f"{a}/kv_a_proj_with_mqa", f"{s}.kv_a_proj_with_mqa")
        _norm(r, f"{a}/kv_a_layernorm", f"{s}.kv_a_layernorm")
        _linear(r, f"{a}/kv_b_proj", f"{s}.kv_b_proj")
    else:
        for n in ("q_proj", "k_proj", "v_proj"):
            _linear(r, f"{a}/{n}", f"{s}.{n}", bias=cfg.qkv_bias)
        if cfg.qk_norm:
            names = ("query_layernorm", "key_layernorm") if cfg.family == "hunyuan_v1_moe" else ("q_norm", "k_norm")
            _norm(r, f"{a}/q_norm", f"{s}.{names[0]}")
            _norm(r, f"{a}/k_norm", f"{s}.{names[1]}")
    _linear(r, f"{a}/o_proj", f"{s}.o_proj", bias=cfg.o_bias)
    return r


def _layer_rules(cfg: MoEConfig, i: int, p: str) -> list[Rule]:
    """Decoder layer ``i``'s two norms and its attention (Llama naming, prefix ``p``)."""
    r: list[Rule] = []
    _norm(r, f"layers/{i}/input_layernorm", f"{p}.input_layernorm")
    _norm(r, f"layers/{i}/post_attention_layernorm", f"{p}.post_attention_layernorm")
    return r + _attention_rules(cfg, i, p)


def _ffn_rules(r: list[Rule], dst: str, src: str, names=("gate_proj", "up_proj", "down_proj")) -> None:
    for ours, theirs in zip(("gate_proj", "up_proj", "down_proj"), names):
        _linear(r, f"{dst}/{ours}", f"{src}.{theirs}")


# Architectures whose routed experts are block_sparse_moe.experts.{e}.w1/w3/w2 (gate/up/down).
_MIXTRAL_NAMING = ("MixtralForCausalLM", "MiniMaxM2ForCausalLM", "PhimoeForCausalLM", "PhiMoEForCausalLM")
# Shared-expert module names where not "shared_experts"; router names where not "gate".
_SHARED_NAMES = {"Qwen2MoeForCausalLM": "shared_expert", "HunYuanMoEV1ForCausalLM": "shared_mlp"}
_ROUTER_NAMES = {"HunYuanMoEV1ForCausalLM": "gate.wg"}


def _llama_like_rules(cfg: MoEConfig, arch: str) -> list[Rule]:
    """Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GLM-4.5 and MiniMax-M2 share the Llama naming scheme."""
    r: list[Rule] = [Rule("embed_tokens/embedding", ("model.embed_tokens.weight",), "copy")]
    e_range = range(cfg.n_experts)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}"
        _norm(r, f"layers/{i}/input_layernorm", f"{p}.input_layernorm", bias=cfg.norm == "layer_bias")
        _norm(r, f"layers/{i}/post_attention_layernorm", f"{p}.post_attention_layernorm",
              bias=cfg.norm == "layer_bias")
        r += _attention_rules(cfg, i, p)
        m = f"layers/{i}/mlp"
        if cfg.is_dense(i):
            _ffn_rules(r, m, f"{p}.mlp")
            continue
        if arch in _MIXTRAL_NAMING:
            s, names = f"{p}.block_sparse_moe", ("w1", "w3", "w2")
        else:
            s, names = f"{p}.mlp", ("gate_proj", "up_proj", "down_proj")
        _linear(r, f"{m}/gate", f"{s}.{_ROUTER_NAMES.get(arch, 'gate')}")
        for ours, theirs in zip(("w_gate", "w_up", "w_down"), names):
            r.append(Rule(f"{m}/experts/{ours}", tuple(f"{s}.experts.{e}.{theirs}.weight" for e in e_range),
                          "experts"))
        if arch == "Ernie4_5_MoeForCausalLM":  # stored [1, E] (one expert group)
            r.append(Rule(f"{m}/selection_bias", (f"{s}.moe_statics.e_score_correction_bias",), "custom",
                          ((1, cfg.n_experts),), lambda b: b.reshape(-1), lambda b: b.reshape(1, -1)))
        elif cfg.selection_bias:  # MiniMax-M2 keeps it on the MoE block, DeepSeek-V3 and GLM-4.5 on the gate
            bias = "e_score_correction_bias" if arch == "MiniMaxM2ForCausalLM" else "gate.e_score_correction_bias"
            r.append(Rule(f"{m}/selection_bias", (f"{s}.{bias}",), "copy"))
        if cfg.n_shared_experts:
            _ffn_rules(r, f"{m}/shared", f"{s}.{_SHARED_NAMES.get(arch, 'shared_experts')}")
        if cfg.shared_expert_gate:
            _linear(r, f"{m}/shared_gate", f"{s}.shared_expert_gate")
    _norm(r, "norm", "model.norm", bias=cfg.norm == "layer_bias")
    if not cfg.tie_embeddings:
        _linear(r, "lm_head", "lm_head", bias=cfg.lm_head_bias)
    return r


def _dbrx_rules(cfg: MoEConfig) -> list[Rule]:
    d, hd, e, f = cfg.d_model, cfg.hd, cfg.n_experts, cfg.d_ff_expert
    nq, nkv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    r: list[Rule] = [Rule("embed_tokens/embedding", ("transformer.wte.weight",), "copy")]
    for i in range(cfg.n_layers):
        p, a = f"transformer.blocks.{i}", f"layers/{i}/self_attn"
        qkv = (f"{p}.norm_attn_norm.attn.Wqkv.weight",)
        for n, lo, hi in (("q_proj", 0, nq), ("k_proj", nq, nq + nkv), ("v_proj", nq + nkv, nq + 2 * nkv)):
            r.append(Rule(f"{a}/{n}/kernel", qkv, "custom", ((nq + 2 * nkv, d),),
                          lambda w, lo=lo, hi=hi: w[lo:hi].T,
                          lambda v, lo=lo, hi=hi: FusedPart((nq + 2 * nkv, d), np.s_[lo:hi], v.T)))
        _linear(r, f"{a}/o_proj", f"{p}.norm_attn_norm.attn.out_proj")
        _norm(r, f"layers/{i}/input_layernorm", f"{p}.norm_attn_norm.norm_1")
        _norm(r, f"layers/{i}/post_attention_layernorm", f"{p}.norm_attn_norm.norm_2")
        m, s = f"layers/{i}/mlp", f"{p}.ffn"
        _linear(r, f"{m}/gate", f"{s}.router.layer")
        # DBRX stores experts as [E*f, d]; w1/v1 act as x @ w.T, w2 as h @ w.
        to_in = lambda w: w.reshape(e, f, d).transpose(0, 2, 1)  # noqa: E731
        from_in = lambda v: v.transpose(0, 2, 1).reshape(-1, d)  # noqa: E731  (export: [E, d, f] -> [E*f, d])
        r.append(Rule(f"{m}/experts/w_gate", (f"{s}.experts.mlp.w1",), "custom", ((e * f, d),), to_in, from_in))
        r.append(Rule(f"{m}/experts/w_up", (f"{s}.experts.mlp.v1",), "custom", ((e * f, d),), to_in, from_in))
        r.append(Rule(f"{m}/experts/w_down", (f"{s}.experts.mlp.w2",), "custom", ((e * f, d),),
                      lambda w: w.reshape(e, f, d), lambda v: v.reshape(-1, d)))
    _norm(r, "norm", "transformer.norm_f")
    if not cfg.tie_embeddings:
        _linear(r, "lm_head", "lm_head")
    return r


# Llama 4: where the text model's tensors live (the multimodal checkpoint nests them under language_model.).
_LLAMA4_PREFIX = {"Llama4ForCausalLM": "", "Llama4ForConditionalGeneration": "language_model."}


def _llama4_rules(cfg: MoEConfig, prefix: str) -> list[Rule]:
    """Llama 4: ``feed_forward.router``, fused ``experts.gate_up_proj [E, d, 2f]`` (gate first) and
    ``experts.down_proj [E, f, d]`` (already ``[in, out]``), ``shared_expert``; dense layers' ``feed_forward``."""
    e, d, f = cfg.n_experts, cfg.d_model, cfg.d_ff_expert
    r: list[Rule] = [Rule("embed_tokens/embedding", (f"{prefix}model.embed_tokens.weight",), "copy")]
    for i in range(cfg.n_layers):
        p, m = f"{prefix}model.layers.{i}", f"layers/{i}/mlp"
        r += _layer_rules(cfg, i, p)
        s = f"{p}.feed_forward"
        if cfg.is_dense(i):
            _ffn_rules(r, m, s)
            continue
        _linear(r, f"{m}/gate", f"{s}.router")
        gate_up, fused = (f"{s}.experts.gate_up_proj",), (e, d, 2 * f)
        r.append(Rule(f"{m}/experts/w_gate", gate_up, "custom", (fused,), lambda w: w[..., :f],
                      lambda v: FusedPart(fused, np.s_[..., :f], v)))
        r.append(Rule(f"{m}/experts/w_up", gate_up, "custom", (fused,), lambda w: w[..., f:],
                      lambda v: FusedPart(fused, np.s_[..., f:], v)))
        r.append(Rule(f"{m}/experts/w_down", (f"{s}.experts.down_proj",), "copy"))
        _ffn_rules(r, f"{m}/shared", f"{s}.shared_expert")
    _norm(r, "norm", f"{prefix}model.norm")
    if not cfg.tie_embeddings:
        _linear(r, "lm_head", f"{prefix}lm_head")
    return r


def _granitemoe_rules(cfg: MoEConfig) -> list[Rule]:
    """Granite MoE as saved (the released names): ``block_sparse_moe.router.layer``, fused
    ``input_linear [E, 2f, d]`` (gate rows first) and ``output_linear [E, d, f]``; the shared variant's
    ``shared_mlp.input_linear [2fs, d]`` / ``output_linear [d, fs]``."""
    e, d, f, fs = cfg.n_experts, cfg.d_model, cfg.d_ff_expert, cfg.d_ff_shared
    r: list[Rule] = [Rule("embed_tokens/embedding", ("model.embed_tokens.weight",), "copy")]
    for i in range(cfg.n_layers):
        p, m = f"model.layers.{i}", f"layers/{i}/mlp"
        r += _layer_rules(cfg, i, p)
        s = f"{p}.block_sparse_moe"
        _linear(r, f"{m}/gate", f"{s}.router.layer")
        _fused_linear_experts(r, f"{m}/experts", s, e, d, f)
        if cfg.n_shared_experts:
            shared_in, sfused = (f"{p}.shared_mlp.input_linear.weight",), (2 * fs, d)
            r.append(Rule(f"{m}/shared/gate_proj/kernel", shared_in, "custom", (sfused,), lambda w: w[:fs].T,
                          lambda v: FusedPart(sfused, np.s_[:fs], v.T)))
            r.append(Rule(f"{m}/shared/up_proj/kernel", shared_in, "custom", (sfused,), lambda w: w[fs:].T,
                          lambda v: FusedPart(sfused, np.s_[fs:], v.T)))
            _linear(r, f"{m}/shared/down_proj", f"{p}.shared_mlp.output_linear")
    _norm(r, "norm", "model.norm")
    if not cfg.tie_embeddings:
        _linear(r, "lm_head", "lm_head")
    return r


def weight_rules(cfg: MoEConfig, architecture: str, mxfp4: bool = False) -> list[Rule]:
    """The rules that build every parameter of an unrolled ``MoEDecoder(cfg)`` from a checkpoint.

    ``mxfp4``: the checkpoint's experts are MXFP4 (``quant_method: "mxfp4"``; gpt-oss only).
    """
    if architecture == "GptOssForCausalLM":
        return _gpt_oss_rules(cfg, mxfp4)
    if mxfp4:
        raise NotImplementedError(f"{architecture}: MXFP4 checkpoints (quantization_config.quant_method 'mxfp4') load "
                                  "for GptOssForCausalLM only; load an unquantized checkpoint")
    if architecture == "DbrxForCausalLM":
        return _dbrx_rules(cfg)
    if architecture == "JetMoeForCausalLM":
        return _jetmoe_rules(cfg)
    if architecture in _LLAMA4_PREFIX:
        return _llama4_rules(cfg, _LLAMA4_PREFIX[architecture])
    if architecture in ("GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM"):
        return _granitemoe_rules(cfg)
    if architecture in _CONFIG_PARSERS:
        return _llama_like_rules(cfg, architecture)
    raise NotImplementedError(f"unsupported architecture {architecture!r}; supported: {list(SUPPORTED_ARCHITECTURES)}")


# Checkpoint tensors that carry no model parameter (rotary caches, DeepSeek-V3's and GLM-4.5's
# multi-token-prediction layers past num_hidden_layers, a tied lm_head copy).
_IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"),)
_MTP_ARCHITECTURES = ("DeepseekV3ForCausalLM", "Glm4MoeForCausalLM")
# ERNIE 4.5's multi-token-prediction tensors: any name holding "mtp", as transformers skips them.
_ERNIE_MTP = re.compile(r"mtp")
# Llama 4's multimodal checkpoint: the vision tower and projector (moejax loads the text model).
_LLAMA4_VISION = ("vision_model.", "multi_modal_projector.", "model.vision_model.", "model.multi_modal_projector.")


def _ignorable(name: str, cfg: MoEConfig, architecture: str) -> bool:
    if any(p.match(name) for p in _IGNORED):
        return True
    if cfg.tie_embeddings and name == "lm_head.weight":
        return True
    if architecture == "Ernie4_5_MoeForCausalLM" and _ERNIE_MTP.search(name):
        return True
    if architecture == "Llama4ForConditionalGeneration" and name.startswith(_LLAMA4_VISION):
        return True
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return architecture in _MTP_ARCHITECTURES and m is not None and int(m.group(1)) >= cfg.n_layers


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------
def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _resolve_dtype(dtype: Any, hf: dict) -> Any:  # hf's dtype fields are checked by config_from_hf
    if dtype is not None:
        return jnp.dtype(dtype)
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return jnp.dtype({"bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(name, jnp.float32))


def check_checkpoint(path: str) -> None:
    """Validate a checkpoint folder without reading any tensor: what :func:`from_pretrained` checks first.

    ``config.json`` (fields, types, ranges, architecture; Hugging Face or the bundled
    model's format), the safetensors headers and the shard index. Cheap, so a command
    line can refuse a bad folder before any slow work.

    Raises:
      FileNotFoundError, NotImplementedError, CheckpointError: as :func:`from_pretrained`.
    """
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: from_pretrained needs a Hugging Face model folder")
    hf = read_json_object(cfg_path, fix=_CONFIG_FIX)
    if default_model.is_moejax_config(hf):
        default_model.config_from_dict(hf)
    else:
        config_from_hf(hf)
        fp8_checkpoint.fp8_blocks_from_config(hf)
        _architecture(hf)
    Checkpoint(path)  # reads and checks every header and the index, not the tensors


def from_pretrained(path: str, dtype: Any = None, *, scan_layers: bool = False, strict: bool = True,
                    mesh: Mesh | None = None, rules: ShardingRules | None = None,
                    **config_overrides: Any) -> MoEDecoder:
    """Load a Hugging Face MoE checkpoint folder as a :class:`MoEDecoder`.

    A folder in the bundled default model's own format (``config.json`` of
    :class:`MoEConfig` fields, see :mod:`moejax.models.default_model`) loads the way
    the bundled model does. Either way the model records whether it is byte-level
    (:func:`moejax.models.is_byte_level`).

    Args:
      path: folder with ``config.json`` and ``model.safetensors`` (or sharded
        ``*.safetensors`` plus ``model.safetensors.index.json``).
      dtype: parameter dtype; ``None`` takes ``config.json``'s ``dtype``/``torch_dtype``.
      scan_layers: build stacked layers run under ``jax.lax.scan``.
      strict: raise on checkpoint tensors that map to no parameter.
      mesh: load straight onto this mesh: every parameter becomes a global array
        with a ``NamedSharding`` (experts over ``expert``, attention and dense
        matrices over ``model``, the rest replicated; see
        :mod:`moejax.models.sharded_load`), and each process reads only the
        slices its own devices hold. ``None`` loads into one process's memory.
      rules: ``(regex, spec)`` sharding rules replacing the defaults (with ``mesh``).
      config_overrides: fields of :class:`MoEConfig` to change (e.g. ``routing=``).

    Raises:
      FileNotFoundError: ``path`` has no ``config.json`` or no ``*.safetensors`` file.
      NotImplementedError: the architecture (or one of its options) is not supported.
      CheckpointError: a file is corrupt or malformed (safetensors header, index,
        config field), or a tensor is missing, unexpected, or has the wrong shape.
    """
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: from_pretrained needs a Hugging Face model folder")
    hf = read_json_object(cfg_path, fix=_CONFIG_FIX)
    if default_model.is_moejax_config(hf):
        if dtype is not None or config_overrides:
            raise NotImplementedError(f"{path} is a moejax-format checkpoint (like the bundled default model); "
                                      "it loads in float32 without config overrides: drop dtype= and overrides")
        model = default_model.load_checkpoint(path, scan_layers=scan_layers)
        return model if mesh is None else shard_model(model, mesh, rules)  # small by construction
    cfg = config_from_hf(hf, **config_overrides)
    arch = _architecture(hf)
    dtype = _resolve_dtype(dtype, hf)
    blocks = fp8_checkpoint.fp8_blocks_from_config(hf)
    ckpt = Checkpoint(path)
    mxfp4 = mxfp4_checkpoint.is_mxfp4(hf)
    if mxfp4 and mesh is not None:
        raise NotImplementedError("from_pretrained(mesh=...): MXFP4 experts do not load onto a mesh yet; load without "
                                  "mesh= (the ep pass then places the experts)")
    tensor_rules = weight_rules(cfg.replace(scan_layers=False), arch, mxfp4)
    check_rules(tensor_rules, ckpt, cfg.replace(scan_layers=False), arch, strict, blocks)
    reader = RuleReader(ckpt, blocks, dtype)
    if mesh is not None:
        model = load_onto_mesh(cfg.replace(scan_layers=scan_layers), {r.dst: r for r in tensor_rules}, reader, mesh,
                               rules)
        return _loaded(model, path, hf)
    if rules is not None:
        raise ValueError("from_pretrained: rules= places parameters on a mesh; pass mesh= too")
    values = {rule.dst: reader.value(rule) for rule in tensor_rules}
    if scan_layers:
        cfg = cfg.replace(scan_layers=True)
        values = _stack_layers(values, cfg.n_layers)
    abstract = nnx.eval_shape(lambda: MoEDecoder(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, state = nnx.split(abstract)
    flat = []
    for p, var in nnx.to_flat_state(state):
        key = _path_str(p)
        if key not in values:
            raise CheckpointError(f"no checkpoint tensor maps to parameter {key} (internal mapping gap for {arch})")
        arr = values[key]
        if tuple(arr.shape) != tuple(var.shape):
            raise CheckpointError(f"parameter {key}: built shape {arr.shape}, model expects {var.shape}")
        value = (jax.tree_util.tree_map(jnp.asarray, arr) if wf.is_structured(arr)  # FP8 experts, as shipped
                 else jnp.asarray(arr, dtype=var.dtype))
        flat.append((p, var.replace(value)))
    return _loaded(nnx.merge(graphdef, nnx.from_flat_state(flat)), path, hf)


def _loaded(model: MoEDecoder, path: str, hf: dict) -> MoEDecoder:
    """Record where ``model`` came from: byte-level or not, and its config.json (export_hf writes it back)."""
    model.hf_config_json = json.dumps(hf)  # text: a static attribute, not model state
    return mark_byte_level(model, path)


def check_rules(rules: list[Rule], ckpt: Checkpoint, cfg: MoEConfig, arch: str, strict: bool,
                blocks: fp8_checkpoint.Fp8Blocks | None = None) -> None:
    """Check, from the headers alone, that ``ckpt`` holds exactly the tensors ``rules`` read, in their shapes.

    FP8 tensors need their block scales beside them (``blocks``: the config's
    block shape). Raises :class:`CheckpointError` naming the first missing,
    unexpected (when ``strict``) or mis-shaped tensor.
    """
    abstract = nnx.eval_shape(lambda: MoEDecoder(cfg, rngs=nnx.Rngs(0)))
    shapes = {_path_str(p): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract))}
    needed = [s for rule in rules for s in rule.srcs]
    missing = [s for s in dict.fromkeys(needed) if s not in ckpt]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint {ckpt.folder} is missing tensor {missing[0]!r}{more} "
                              f"needed by {arch}")
    used = set(needed) | {scale for src in needed if (scale := fp8_checkpoint.check_scale(ckpt, src, blocks))}
    unexpected = sorted(k for k in ckpt if k not in used and not _ignorable(k, cfg, arch))
    if unexpected and strict:
        raise CheckpointError(f"unexpected tensor {unexpected[0]!r} in {ckpt.folder} ({len(unexpected)} in all) "
                              f"for {arch} with this config; pass strict=False to ignore them")
    for rule in rules:
        if rule.dst not in shapes:
            raise CheckpointError(f"mapping rule targets unknown parameter {rule.dst}")
        exp = rule.expected_src_shapes(shapes[rule.dst])
        for src, es in zip(rule.srcs, exp):
            got = ckpt.shape(src)
            if tuple(got) != tuple(es):
                raise CheckpointError(f"tensor {src!r} has shape {tuple(got)}, expected {tuple(es)} "
                                      f"(for parameter {rule.dst}); check config.json against the weights")


class RuleReader:
    """Builds a parameter (or a block of one) from the checkpoint tensors its :class:`Rule` names.

    Every tensor read is checked for NaN/Inf. FP8 tensors are dequantized with
    their block scales, except a layer's routed experts, which stay one
    :class:`~moejax.weight_formats.Fp8BlockTensor` (see :mod:`moejax.models.fp8_checkpoint`).
    """

    def __init__(self, ckpt: Checkpoint, blocks: fp8_checkpoint.Fp8Blocks | None, dtype: Any):
        self.ckpt, self.blocks, self.dtype = ckpt, blocks, dtype

    def tensor(self, src: str, dst: str, index: tuple[slice, ...] = (), float_only: bool = True) -> np.ndarray:
        """``src[index]`` as stored (owned memory; an FP8 tensor dequantized when ``float_only``)."""
        if fp8_checkpoint.is_fp8(self.ckpt, src) and float_only:
            # the rows asked for, widened to whole scale blocks, with those blocks' scales
            bn = self.blocks.block_n
            start, stop, _ = (index[0] if index else slice(None)).indices(self.ckpt.shape(src)[0])
            first, end = start // bn, -(-stop // bn)
            weight = self.tensor(src, dst, (slice(first * bn, end * bn),), float_only=False)
            scale = self.tensor(fp8_checkpoint.scale_name(src), dst, (slice(first, end),))
            rows = slice(start - first * bn, stop - first * bn)
            return fp8_checkpoint.dequantize(weight, scale, self.blocks)[(rows, *index[1:])]
        t = self.ckpt.read(src, index)
        check_finite_tensor(t, src, dst, self.ckpt.folder)
        return t

    def is_fp8_experts(self, rule: Rule) -> bool:
        return rule.kind == "experts" and all(fp8_checkpoint.is_fp8(self.ckpt, s) for s in rule.srcs)

    def fp8_experts(self, rule: Rule, experts: range | None = None) -> wf.Fp8BlockTensor:
        """Experts ``experts`` (default all) of an FP8 experts rule, stacked, still FP8."""
        chosen = [rule.srcs[e] for e in (experts if experts is not None else range(len(rule.srcs)))]
        return fp8_checkpoint.stack_experts(
            [self.tensor(s, rule.dst, float_only=False) for s in chosen],
            [self.tensor(fp8_checkpoint.scale_name(s), rule.dst) for s in chosen], self.blocks)

    def fp8_experts_shapes(self, rule: Rule, experts: int = 1) -> wf.Fp8BlockTensor:
        """The leaves' shapes of ``experts`` stacked FP8 experts (from the headers: nothing is read)."""
        w, s = rule.srcs[0], fp8_checkpoint.scale_name(rule.srcs[0])
        return fp8_checkpoint.stack_experts(
            [jax.ShapeDtypeStruct((experts, *self.ckpt.shape(w)), self.ckpt.dtype(w))],
            [jax.ShapeDtypeStruct((experts, *self.ckpt.shape(s)), np.float32)], self.blocks, stacked=True)

    def value(self, rule: Rule) -> Any:
        """The whole parameter ``rule.dst``."""
        if self.is_fp8_experts(rule):
            return self.fp8_experts(rule)
        built = rule.build([self.tensor(s, rule.dst) for s in rule.srcs])
        if wf.is_structured(built):  # MXFP4 experts, as shipped
            return built
        return np.asarray(built).astype(self.dtype)


def check_finite_tensor(t: np.ndarray, src: str, dst: str, folder: str) -> None:
    """The one place checkpoint tensors come in: NaN/Inf stop here, named."""
    if n := numerics.count_nonfinite(t):
        raise CheckpointError(f"tensor {src!r} (parameter {dst}) holds {n} NaN/Inf values: the "
                              f"checkpoint {folder} is corrupt; re-download or re-export it")


def _stack_layers(values: dict[str, Any], n_layers: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    per: dict[str, list] = {}
    for k, v in values.items():
        m = re.match(r"layers/(\d+)/(.*)", k)
        if m:
            per.setdefault(m.group(2), [None] * n_layers)[int(m.group(1))] = v
        else:
            out[k] = v
    for suffix, arrs in per.items():  # (FP8 experts: each leaf stacked)
        out[f"layers/{suffix}"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *arrs)
    return out


# --------------------------------------------------------------------------
# Export (Mixtral family)
# --------------------------------------------------------------------------
def save_pretrained_hf(model: MoEDecoder, path: str, dtype: Any = None) -> None:
    """Write ``model`` as a Hugging Face checkpoint (``config.json`` + ``model.safetensors`` in ``path``).

    A model :func:`from_pretrained` loaded is written in its own architecture's
    layout (see :func:`moejax.models.export_hf.export_hf`, which also writes
    optimized models). A model built in code is written as ``MixtralForCausalLM``,
    which needs plain softmax top-k routing with renormalisation, swiglu experts, GQA
    attention without biases or q/k norms, no shared experts and no dense layers.
    """
    from moejax.models.export_hf import export_hf, hf_config_of

    if hf_config_of(model) is not None:
        return export_hf(model, path, dtype=dtype)
    cfg: MoEConfig = model.config
    r = cfg.routing
    problems = [name for name, bad in (
        ("routing must be softmax top-k renormalised with scale 1 and no groups",
         (r.score, r.norm_topk, r.scale, r.n_group, r.gating, r.expert_map) != ("softmax", True, 1.0, 1, "topk", None)),
        ("activation must be swiglu", cfg.activation != "swiglu"),
        ("attention must be GQA without qkv bias, q/k norm or clipping",
         cfg.attention != "gqa" or cfg.qkv_bias or cfg.qk_norm or cfg.clip_qkv is not None),
        ("no shared experts, selection bias or dense layers",
         cfg.n_shared_experts or cfg.selection_bias or cfg.first_dense_layers or cfg.dense_layers),
        ("norm must be rms", cfg.norm != "rms"),
    ) if bad]
    if problems:
        raise ValueError(f"save_pretrained_hf: this model is not a Mixtral: {'; '.join(problems)}")
    os.makedirs(path, exist_ok=True)
    tensors = export_tensors(model, "MixtralForCausalLM")
    out_dtype = np.dtype(dtype) if dtype is not None else next(iter(tensors.values())).dtype
    tensors = {k: np.ascontiguousarray(v.astype(out_dtype)) for k, v in tensors.items()}
    save_file(tensors, os.path.join(path, "model.safetensors"))
    names = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", np.dtype(jnp.bfloat16): "bfloat16"}
    if out_dtype not in names:
        raise ValueError(f"save_pretrained_hf: dtype {out_dtype} unsupported; use float32, float16 or bfloat16")
    dtype_name = names[out_dtype]
    hf = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff_expert, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.hd,
        "hidden_act": "silu", "num_local_experts": cfg.n_experts, "num_experts_per_tok": r.k,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_embeddings, "sliding_window": None, "max_position_embeddings": 32768,
        "router_jitter_noise": 0.0, "attention_dropout": 0.0, "dtype": dtype_name, "use_cache": True,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


def parameter_values(model: MoEDecoder) -> dict[str, Any]:
    """``{parameter path: value}`` of ``model`` (arrays as numpy; structured weights, e.g. FP8 experts, as is)."""
    return {_path_str(p): v.get_value() if wf.is_structured(v.get_value()) else np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def export_tensors(model: MoEDecoder, architecture: str) -> dict[str, np.ndarray]:
    """The checkpoint tensors of ``architecture``'s layout holding ``model``'s parameters (see
    :func:`export_tensors_from`)."""
    return export_tensors_from(parameter_values(model), model.config, architecture)


def export_tensors_from(state: dict[str, Any], cfg: MoEConfig, architecture: str, keep_fp8: bool = False,
                        keep_mxfp4: bool = False) -> dict[str, np.ndarray]:
    """The checkpoint tensors of ``architecture``'s layout holding parameters ``state`` of a ``cfg`` model.

    Inverts the loading rules (fused checkpoint tensors are rebuilt from their parts).
    Structured expert weights are dequantized, except FP8 experts when ``keep_fp8``
    (written with their block scales, as loaded) and gpt-oss MXFP4 experts when
    ``keep_mxfp4`` (written as ``*_blocks`` / ``*_scales``, as released; every expert
    matrix must then be an :class:`~moejax.weight_formats.Mxfp4Tensor`).
    """
    from moejax.models.export_hf import fp8_expert_tensors, mxfp4_expert_tensors

    if architecture == "Llama4ForConditionalGeneration":  # the written folder would lack the vision tower
        raise NotImplementedError("export of a Llama4ForConditionalGeneration checkpoint: moejax loads only its text "
                                  "model, not the vision tower; export the text model from a Llama4ForCausalLM "
                                  "checkpoint")
    if cfg.scan_layers:
        state = _unstack_layers(state)
    tensors: dict[str, np.ndarray] = {}
    for rule in weight_rules(cfg.replace(scan_layers=False), architecture, mxfp4=keep_mxfp4):
        val = state[rule.dst]
        if keep_fp8 and rule.kind == "experts" and isinstance(val, wf.Fp8BlockTensor):
            tensors.update(fp8_expert_tensors(val, rule.srcs))
            continue
        if keep_mxfp4 and rule.srcs[0].endswith("_blocks"):
            if not isinstance(val, wf.Mxfp4Tensor):
                raise NotImplementedError(f"export to {architecture} as MXFP4: parameter {rule.dst} is "
                                          f"{wf.format_of(val)}, not MXFP4")
            mxfp4_expert_tensors(tensors, val, rule.srcs, rule.dst.rsplit("/", 1)[-1])
            continue
        val = np.asarray(wf.dequantize(val)) if wf.is_structured(val) else np.asarray(val)
        if rule.kind == "copy":
            tensors[rule.srcs[0]] = val
        elif rule.kind == "linear":
            tensors[rule.srcs[0]] = val.T
        elif rule.kind == "experts":
            for e, src in enumerate(rule.srcs):
                tensors[src] = val[e].T
        elif rule.kind == "custom" and rule.inverse is not None and len(rule.srcs) == 1:
            out = rule.inverse(val)  # a whole tensor, or one part of a fused one
            tensors[rule.srcs[0]] = out.into(tensors.get(rule.srcs[0])) if isinstance(out, FusedPart) else out
        elif rule.kind == "custom" and architecture == "GptOssForCausalLM":
            _gpt_oss_interleave(tensors, rule, val)
        else:
            raise NotImplementedError(f"export to {architecture}: parameter {rule.dst} has no inverse mapping")
    return tensors


def _unstack_layers(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        if k.startswith("layers/"):
            for i in range(v.shape[0]):
                out[f"layers/{i}/{k[len('layers/'):]}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], v)
        else:
            out[k] = v
    return out
