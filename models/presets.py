"""Published full-size configs (the survey's Table 1) and tiny configs for tests.

Full-size presets are never materialised: :func:`param_count` builds the model
under ``nnx.eval_shape`` and sums the parameter shapes. ``PUBLISHED_PARAMS`` holds
the "Param." column of Table 1 of *A Survey on Inference Optimization Techniques
for Mixture of Experts Models* (total parameters, billions) and, for models newer than
the survey, the published totals named next to them; a test checks every preset
against it within 3% (1% for the newer ones).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import nnx

from moejax.dialect import Routing, clamped_swiglu, is_gated
from moejax.models.decoder import MoEConfig, MoEDecoder, tiny_mixtral
from moejax.models.layers import Llama3Rope, Yarn

__all__ = ["PRESETS", "PUBLISHED_PARAMS", "TINY", "preset", "tiny", "param_count", "active_param_count"]


def _mixtral(vocab: int, d: int, layers: int, heads: int, kv: int, ff: int, experts: int = 8, k: int = 2,
             **kw: Any) -> MoEConfig:
    return MoEConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, d_ff_expert=ff,
                     n_experts=experts, routing=Routing(k=k), rope_theta=1e6, family="mixtral").replace(**kw)


def mixtral_8x7b(**kw: Any) -> MoEConfig:
    """Mixtral-8x7B (mistralai/Mixtral-8x7B-v0.1)."""
    return _mixtral(32000, 4096, 32, 32, 8, 14336, **kw)


def mixtral_8x22b(**kw: Any) -> MoEConfig:
    """Mixtral-8x22B (mistralai/Mixtral-8x22B-v0.1)."""
    return _mixtral(32000, 6144, 56, 48, 8, 16384, **kw)


def qwen1_5_moe_a2_7b(**kw: Any) -> MoEConfig:
    """Qwen1.5-MoE-A2.7B: 60 fine-grained experts top-4 plus a gated shared expert."""
    return MoEConfig(vocab_size=151936, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=16, d_ff_expert=1408,
                     n_experts=60, routing=Routing(k=4, norm_topk=False), n_shared_experts=1, d_ff_shared=5632,
                     shared_expert_gate=True, qkv_bias=True, rope_theta=1e6, norm_eps=1e-6, family="qwen2_moe"
                     ).replace(**kw)


def qwen2_57b_a14b(**kw: Any) -> MoEConfig:
    """Qwen2-57B-A14B: 64 experts top-8 plus a gated shared expert."""
    return MoEConfig(vocab_size=151936, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, d_ff_expert=2560,
                     n_experts=64, routing=Routing(k=8, norm_topk=False), n_shared_experts=1, d_ff_shared=20480,
                     shared_expert_gate=True, qkv_bias=True, rope_theta=1e6, norm_eps=1e-6, family="qwen2_moe"
                     ).replace(**kw)


def _qwen3_moe(d: int, layers: int, heads: int, ff: int, **kw: Any) -> MoEConfig:
    """Qwen3-MoE: 128 experts top-8 (renormalised), 4 KV heads of 128, per-head q/k norm, no shared expert."""
    return MoEConfig(vocab_size=151936, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=4, head_dim=128,
                     d_ff_expert=ff, n_experts=128, routing=Routing(k=8, norm_topk=True), qk_norm=True,
                     qk_norm_per_head=True, rope_theta=1e6, norm_eps=1e-6, family="qwen3_moe").replace(**kw)


def qwen3_30b_a3b(**kw: Any) -> MoEConfig:
    """Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B config.json): 48 layers, 32 query heads, experts of 768."""
    return _qwen3_moe(2048, 48, 32, 768, **kw)


def qwen3_235b_a22b(**kw: Any) -> MoEConfig:
    """Qwen3-235B-A22B (Qwen/Qwen3-235B-A22B config.json): 94 layers, 64 query heads, experts of 1536."""
    return _qwen3_moe(4096, 94, 64, 1536, **kw)


def deepseek_moe_16b(**kw: Any) -> MoEConfig:
    """DeepSeekMoE-16B: 64 fine-grained experts top-6, 2 shared experts, 1 leading dense layer, MHA."""
    return MoEConfig(vocab_size=102400, d_model=2048, n_layers=28, n_heads=16, n_kv_heads=16, d_ff_expert=1408,
                     n_experts=64, routing=Routing(k=6, norm_topk=False), n_shared_experts=2, d_ff_shared=1408,
                     first_dense_layers=1, d_ff_dense=10944, norm_eps=1e-6, family="deepseek_moe").replace(**kw)


_MLA = dict(attention="mla", qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=512,
            q_lora_rank=1536, norm_eps=1e-6)


def deepseek_v2(**kw: Any) -> MoEConfig:
    """DeepSeek-V2 (236B): MLA, 160 routed experts top-6 (group-limited 8/3), 2 shared, 1 dense layer."""
    return MoEConfig(vocab_size=102400, d_model=5120, n_layers=60, n_heads=128, n_kv_heads=128, d_ff_expert=1536,
                     n_experts=160, routing=Routing(k=6, norm_topk=False, scale=16.0, n_group=8, topk_group=3),
                     n_shared_experts=2, d_ff_shared=1536, first_dense_layers=1, d_ff_dense=12288,
                     family="deepseek_v2", **_MLA).replace(**kw)


def deepseek_v3(**kw: Any) -> MoEConfig:
    """DeepSeek-V3 (671B, without the multi-token-prediction module): sigmoid routing with correction bias.

    RoPE as released (deepseek-ai/DeepSeek-V3 config.json): YaRN from 4K to 160K positions.
    """
    return MoEConfig(vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, n_kv_heads=128, d_ff_expert=2048,
                     n_experts=256, routing=Routing(k=8, score="sigmoid", norm_topk=True, scale=2.5, n_group=8,
                                                    topk_group=4, group_score="top2_sum"),
                     n_shared_experts=1, d_ff_shared=2048, selection_bias=True, first_dense_layers=3,
                     d_ff_dense=18432,
                     rope_scaling=Yarn(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                                       beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
                     family="deepseek_v3", **_MLA).replace(**kw)


def kimi_k2(**kw: Any) -> MoEConfig:
    """Kimi K2 (moonshotai/Kimi-K2-Instruct config.json): the DeepSeek-V3 architecture with 384 routed experts,
    one expert group, 64 heads, one leading dense layer, and YaRN from 4K to 128K positions (theta 50000)."""
    return MoEConfig(vocab_size=163840, d_model=7168, n_layers=61, n_heads=64, n_kv_heads=64, d_ff_expert=2048,
                     n_experts=384, routing=Routing(k=8, score="sigmoid", norm_topk=True, scale=2.827, n_group=1,
                                                    topk_group=1, group_score="top2_sum"),
                     n_shared_experts=1, d_ff_shared=2048, selection_bias=True, first_dense_layers=1,
                     d_ff_dense=18432, rope_theta=50000.0,
                     rope_scaling=Yarn(factor=32.0, original_max_position_embeddings=4096, beta_fast=1.0,
                                       beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
                     family="deepseek_v3", **_MLA).replace(**kw)


def _glm4_moe(d: int, layers: int, ff_dense: int, ff: int, experts: int, first_dense: int, scale: float,
              qk_norm: bool, **kw: Any) -> MoEConfig:
    """GLM-4.5 family: 96 query and 8 KV heads of 128 with q/k/v bias, RoPE (theta 1e6) on half of each head,
    DeepSeek-V3 routing (sigmoid, correction bias, one group, renormalised top-8) plus one shared expert."""
    return MoEConfig(vocab_size=151552, d_model=d, n_layers=layers, n_heads=96, n_kv_heads=8, head_dim=128,
                     d_ff_expert=ff, n_experts=experts,
                     routing=Routing(k=8, score="sigmoid", norm_topk=True, scale=scale, group_score="top2_sum"),
                     n_shared_experts=1, d_ff_shared=ff, selection_bias=True, first_dense_layers=first_dense,
                     d_ff_dense=ff_dense, qkv_bias=True, qk_norm=qk_norm, qk_norm_per_head=qk_norm, rotary_dim=64,
                     rope_theta=1e6, norm_eps=1e-5, family="glm4_moe").replace(**kw)


def glm_4_5(**kw: Any) -> MoEConfig:
    """GLM-4.5 (zai-org/GLM-4.5 config.json, without its MTP layer): 92 layers (3 dense), 160 experts of 1536,
    routed_scaling_factor 2.5, per-head q/k norm."""
    return _glm4_moe(5120, 92, 12288, 1536, 160, 3, 2.5, True, **kw)


def glm_4_5_air(**kw: Any) -> MoEConfig:
    """GLM-4.5-Air (zai-org/GLM-4.5-Air config.json, without its MTP layer): 46 layers (1 dense), 128 experts of
    1408, routed_scaling_factor 1.0, no q/k norm (the last two as remembered from the release, not re-checked)."""
    return _glm4_moe(4096, 46, 10944, 1408, 128, 1, 1.0, False, **kw)


def minimax_m2(**kw: Any) -> MoEConfig:
    """MiniMax-M2 (MiniMaxAI/MiniMax-M2 config.json, without its MTP modules; transformers' MiniMaxM2Config
    defaults are the same values): 62 layers, 48 query and 8 KV heads of 128, q/k norm over all heads, RoPE
    (theta 5e6) on 64 of 128 dimensions, 256 experts of 1536, sigmoid top-8 with correction bias, no shared expert."""
    return MoEConfig(vocab_size=200064, d_model=3072, n_layers=62, n_heads=48, n_kv_heads=8, head_dim=128,
                     d_ff_expert=1536, n_experts=256, routing=Routing(k=8, score="sigmoid", norm_topk=True),
                     selection_bias=True, qk_norm=True, rotary_dim=64, rope_theta=5e6, norm_eps=1e-6,
                     family="minimax_m2").replace(**kw)


def olmoe_1b_7b(**kw: Any) -> MoEConfig:
    """OLMoE-1B-7B: 64 experts top-8, no renormalisation, q/k norm."""
    return MoEConfig(vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, d_ff_expert=1024,
                     n_experts=64, routing=Routing(k=8, norm_topk=False), qk_norm=True, family="olmoe").replace(**kw)


def dbrx(**kw: Any) -> MoEConfig:
    """DBRX (132B): 16 experts top-4, bias-free LayerNorm, clipped qkv."""
    return MoEConfig(vocab_size=100352, d_model=6144, n_layers=40, n_heads=48, n_kv_heads=8, d_ff_expert=10752,
                     n_experts=16, routing=Routing(k=4), norm="layer", clip_qkv=8.0, rope_theta=5e5, family="dbrx"
                     ).replace(**kw)


def jetmoe_8b(**kw: Any) -> MoEConfig:
    """JetMoE-8B: 8 attention experts and 8 FFN experts, top-2 each, tied embeddings."""
    return MoEConfig(vocab_size=32000, d_model=2048, n_layers=24, n_heads=32, n_kv_heads=16, head_dim=128,
                     d_ff_expert=5632, n_experts=8, routing=Routing(k=2), attention="moa", expert_out_bias=True,
                     tie_embeddings=True, norm_eps=1e-6, family="jetmoe").replace(**kw)


def phi_3_5_moe(**kw: Any) -> MoEConfig:
    """Phi-3.5-MoE (microsoft/Phi-3.5-MoE-instruct): 16 experts, SparseMixer top-2 (jitter 0.01), LayerNorms with
    bias, q/k/v/o and lm_head biases. Default RoPE here: the released longrope (64 per-dimension factors, mscale
    1.2432; loaded from its config.json by ``hf._phimoe_longrope``) is not reproduced, as it changes no shape or
    parameter count."""
    return MoEConfig(vocab_size=32064, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff_expert=6400,
                     n_experts=16, routing=Routing(k=2, score="sparsemixer", norm_topk=False, jitter_eps=0.01),
                     norm="layer_bias", qkv_bias=True, o_bias=True, lm_head_bias=True, norm_eps=1e-5,
                     family="phimoe").replace(**kw)


def _gpt_oss(layers: int, experts: int, **kw: Any) -> MoEConfig:
    """gpt-oss (openai/gpt-oss-20b and -120b config.json): 64 query heads of 64, 8 KV heads, attention biases and
    sinks, sliding window 128 on every even layer, experts of 2880 with biases and the clamped SwiGLU (limit 7),
    router bias, top-4, YaRN (factor 32 over 4096, untruncated ramp)."""
    return MoEConfig(vocab_size=201088, d_model=2880, n_layers=layers, n_heads=64, n_kv_heads=8, head_dim=64,
                     d_ff_expert=2880, n_experts=experts, routing=Routing(k=4, norm_topk=True, bias_on_logits=True),
                     activation=clamped_swiglu(7.0), qkv_bias=True, o_bias=True, sliding_window=128,
                     sliding_layers=tuple(range(0, layers, 2)), attention_sinks=True, expert_bias=True,
                     rope_theta=150000.0, rope_scaling=Yarn(factor=32.0, original_max_position_embeddings=4096,
                                                            truncate=False),
                     norm_eps=1e-5, family="gpt_oss").replace(**kw)


def gpt_oss_20b(**kw: Any) -> MoEConfig:
    """gpt-oss-20b: 24 layers of 32 experts."""
    return _gpt_oss(24, 32, **kw)


def gpt_oss_120b(**kw: Any) -> MoEConfig:
    """gpt-oss-120b: 36 layers of 128 experts."""
    return _gpt_oss(36, 128, **kw)


def _llama4(experts: int, moe_step: int, qk_norm: bool, **kw: Any) -> MoEConfig:
    """Llama 4 text model (``text_config`` of the released config.json): 48 layers, 40 query and 8 KV heads of 128,
    routed experts of 8192 (top-1 sigmoid, weight on the expert input) plus a shared one, dense layers of 16384
    between MoE layers when ``moe_step`` > 1; every 4th layer NoPE with temperature tuning (floor 8192, scale
    0.1), the others RoPE (theta 5e5, adjacent pairs) with 8192-token chunked attention."""
    n = 48
    return MoEConfig(vocab_size=202048, d_model=5120, n_layers=n, n_heads=40, n_kv_heads=8, head_dim=128,
                     d_ff_expert=8192, n_experts=experts,
                     routing=Routing(k=1, score="sigmoid", norm_topk=False, weight_on="input"),
                     n_shared_experts=1, d_ff_shared=8192,
                     dense_layers=tuple(i for i in range(n) if (i + 1) % moe_step),
                     d_ff_dense=16384 if moe_step > 1 else None,
                     nope_layers=tuple(range(3, n, 4)), attn_temperature=(8192.0, 0.1), qk_l2_norm=qk_norm,
                     attention_chunk_size=8192, chunked_layers=tuple(i for i in range(n) if (i + 1) % 4),
                     rope_adjacent_pairs=True, rope_theta=500000.0, norm_eps=1e-5, family="llama4").replace(**kw)


def llama4_scout(**kw: Any) -> MoEConfig:
    """Llama 4 Scout (meta-llama/Llama-4-Scout-17B-16E, text model): 16 experts in every layer, L2 q/k norm,
    llama3-type RoPE scaling (factor 16 over 8192 positions, low and high frequency factors 1) as released."""
    return _llama4(16, 1, True, rope_scaling=Llama3Rope(factor=16.0, original_max_position_embeddings=8192,
                                                        low_freq_factor=1.0, high_freq_factor=1.0)).replace(**kw)


def llama4_maverick(**kw: Any) -> MoEConfig:
    """Llama 4 Maverick (meta-llama/Llama-4-Maverick-17B-128E, text model): 128 experts on every other layer
    (dense layers between), no q/k norm."""
    return _llama4(128, 2, False, **kw)


# name -> (config factory, published total parameters in billions)
PRESETS: dict[str, Callable[..., MoEConfig]] = {
    "mixtral-8x7b": mixtral_8x7b,
    "mixtral-8x22b": mixtral_8x22b,
    "qwen1.5-moe-a2.7b": qwen1_5_moe_a2_7b,
    "qwen2-57b-a14b": qwen2_57b_a14b,
    "deepseekmoe-16b": deepseek_moe_16b,
    "qwen3-30b-a3b": qwen3_30b_a3b,
    "qwen3-235b-a22b": qwen3_235b_a22b,
    "deepseek-v2": deepseek_v2,
    "deepseek-v3": deepseek_v3,
    "kimi-k2": kimi_k2,
    "glm-4.5": glm_4_5,
    "glm-4.5-air": glm_4_5_air,
    "minimax-m2": minimax_m2,
    "olmoe-1b-7b": olmoe_1b_7b,
    "dbrx": dbrx,
    "jetmoe-8b": jetmoe_8b,
    "phi-3.5-moe": phi_3_5_moe,
    "gpt-oss-20b": gpt_oss_20b,
    "gpt-oss-120b": gpt_oss_120b,
    "llama4-scout": llama4_scout,
    "llama4-maverick": llama4_maverick,
}
PUBLISHED_PARAMS: dict[str, float] = {
    "mixtral-8x7b": 46.7, "mixtral-8x22b": 141.0, "qwen1.5-moe-a2.7b": 14.3, "qwen2-57b-a14b": 57.4,
    "deepseekmoe-16b": 16.4, "deepseek-v2": 236.0, "deepseek-v3": 671.0, "olmoe-1b-7b": 6.9, "dbrx": 132.0,
    "jetmoe-8b": 8.5,
    # Phi-3.5-MoE: 41.9B total (6.6B active), microsoft/Phi-3.5-MoE-instruct.
    "phi-3.5-moe": 41.9,
    # Not in the survey's table. Qwen3: the totals on the Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B model cards.
    "qwen3-30b-a3b": 30.5, "qwen3-235b-a22b": 235.0,
    # Kimi K2: 1.026T, the total of the released checkpoint's weights as third-party cards quote it (e.g.
    # unsloth/Kimi-K2-Instruct-GGUF); Moonshot's model card says "1T" and the K2 tech report 1.04T (1.3% above).
    "kimi-k2": 1026.0,
    # The totals on the zai-org/GLM-4.5 model card (355B, and 106B for GLM-4.5-Air) and the MiniMaxAI/MiniMax-M2
    # card (230B); the presets leave out the MTP layers, which these totals do not count either.
    "glm-4.5": 355.0, "glm-4.5-air": 106.0, "minimax-m2": 230.0,
    # The totals of OpenAI's gpt-oss model card (20.9B and 116.8B, MXFP4 experts counted as parameters).
    "gpt-oss-20b": 20.9, "gpt-oss-120b": 116.8,
    # Meta's Llama 4 model card: 109B total (Scout) and 400B total (Maverick), 17B active each. These totals are
    # of the released multimodal checkpoints; the presets are the text models, so Scout's count (107.77B) is 1.1%
    # under its total, which also counts the vision encoder; Maverick's (400.71B) is 0.2% over.
    "llama4-scout": 109.0, "llama4-maverick": 400.0,
}


def preset(name: str, **overrides: Any) -> MoEConfig:
    """The full-size config ``name`` (see ``PRESETS``), with field overrides."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}") from None
    return factory(**overrides)


# ---------------------------------------------------------------------------
# Tiny configs: a few thousand parameters, same mechanics as the full models.
# ---------------------------------------------------------------------------
_T = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)

TINY: dict[str, Callable[..., MoEConfig]] = {
    "mixtral": lambda **kw: tiny_mixtral(**kw),
    "switch": lambda **kw: tiny_mixtral(**{"routing": Routing(k=1), **kw}),
    "qwen2_moe": lambda **kw: MoEConfig(**{**_T, "d_ff_expert": 16, "n_experts": 8,
                                           "routing": Routing(k=2, norm_topk=False), "n_shared_experts": 1,
                                           "d_ff_shared": 32, "shared_expert_gate": True, "qkv_bias": True,
                                           "family": "qwen2_moe", **kw}),
    "qwen3_moe": lambda **kw: MoEConfig(**{**_T, "head_dim": 16, "d_ff_expert": 16, "n_experts": 8,
                                           "routing": Routing(k=2, norm_topk=True), "qk_norm": True,
                                           "qk_norm_per_head": True, "norm_eps": 1e-6, "family": "qwen3_moe", **kw}),
    "olmoe": lambda **kw: MoEConfig(**{**_T, "d_ff_expert": 16, "n_experts": 8,
                                       "routing": Routing(k=4, norm_topk=False), "qk_norm": True,
                                       "family": "olmoe", **kw}),
    "deepseek_v2": lambda **kw: MoEConfig(**{**_T, "n_kv_heads": 4, "d_ff_expert": 16, "n_experts": 8,
                                             "routing": Routing(k=2, norm_topk=False, scale=1.5, n_group=4,
                                                                topk_group=2),
                                             "n_shared_experts": 2, "d_ff_shared": 16, "first_dense_layers": 1,
                                             "d_ff_dense": 64, "attention": "mla", "q_lora_rank": 8,
                                             "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
                                             "v_head_dim": 8, "family": "deepseek_v2", **kw}),
    "deepseek_v3": lambda **kw: MoEConfig(**{**_T, "n_kv_heads": 4, "d_ff_expert": 16, "n_experts": 8,
                                             "routing": Routing(k=2, score="sigmoid", scale=2.5, n_group=4,
                                                                topk_group=2, group_score="top2_sum"),
                                             "n_shared_experts": 1, "d_ff_shared": 16, "selection_bias": True,
                                             "first_dense_layers": 1, "d_ff_dense": 64, "attention": "mla",
                                             "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
                                             "v_head_dim": 8, "family": "deepseek_v3", **kw}),
    "glm4_moe": lambda **kw: MoEConfig(**{**_T, "head_dim": 16, "d_ff_expert": 16, "n_experts": 8,
                                          "routing": Routing(k=2, score="sigmoid", scale=2.5, n_group=4, topk_group=2,
                                                             group_score="top2_sum"),
                                          "n_shared_experts": 1, "d_ff_shared": 16, "selection_bias": True,
                                          "first_dense_layers": 1, "d_ff_dense": 64, "qkv_bias": True,
                                          "qk_norm": True, "qk_norm_per_head": True, "rotary_dim": 8,
                                          "family": "glm4_moe", **kw}),
    "minimax_m2": lambda **kw: MoEConfig(**{**_T, "head_dim": 16, "d_ff_expert": 16, "n_experts": 8,
                                            "routing": Routing(k=2, score="sigmoid"), "selection_bias": True,
                                            "qk_norm": True, "rotary_dim": 8, "norm_eps": 1e-6,
                                            "family": "minimax_m2", **kw}),
    "jetmoe": lambda **kw: MoEConfig(**{**_T, "head_dim": 8, "d_ff_expert": 48, "n_experts": 4,
                                        "routing": Routing(k=2), "attention": "moa", "expert_out_bias": True,
                                        "tie_embeddings": True, "norm_eps": 1e-6, "family": "jetmoe", **kw}),
    "dbrx": lambda **kw: MoEConfig(**{**_T, "d_ff_expert": 48, "n_experts": 4, "routing": Routing(k=2),
                                      "norm": "layer", "clip_qkv": 4.0, "family": "dbrx", **kw}),
    "phimoe": lambda **kw: MoEConfig(**{**_T, "d_ff_expert": 48, "n_experts": 4,
                                        "routing": Routing(k=2, score="sparsemixer", norm_topk=False,
                                                           jitter_eps=0.01),
                                        "norm": "layer_bias", "qkv_bias": True, "o_bias": True,
                                        "lm_head_bias": True, "family": "phimoe", **kw}),
    "ernie4_5_moe": lambda **kw: MoEConfig(**{**_T, "d_ff_expert": 16, "n_experts": 8,
                                              "routing": Routing(k=2, norm_min=1e-12), "selection_bias": True,
                                              "n_shared_experts": 2, "d_ff_shared": 16, "dense_layers": (0,),
                                              "d_ff_dense": 64, "rope_adjacent_pairs": True, "tie_embeddings": True,
                                              "family": "ernie4_5_moe", **kw}),
    "hunyuan_v1_moe": lambda **kw: MoEConfig(**{**_T, "head_dim": 8, "d_ff_expert": 16, "n_experts": 8,
                                                "routing": Routing(k=2), "n_shared_experts": 1, "d_ff_shared": 16,
                                                "qk_norm": True, "qk_norm_per_head": True,
                                                "qk_norm_after_rope": True, "family": "hunyuan_v1_moe", **kw}),
    "gpt_oss": lambda **kw: MoEConfig(**{**_T, "head_dim": 8, "d_ff_expert": 32, "n_experts": 4,
                                         "routing": Routing(k=2, bias_on_logits=True),
                                         "activation": clamped_swiglu(7.0), "qkv_bias": True, "o_bias": True,
                                         "sliding_window": 4, "sliding_layers": (0,), "attention_sinks": True,
                                         "expert_bias": True, "family": "gpt_oss", **kw}),
    "llama4": lambda **kw: MoEConfig(**{**_T, "head_dim": 8, "d_ff_expert": 16, "n_experts": 4,
                                        "routing": Routing(k=1, score="sigmoid", norm_topk=False, weight_on="input"),
                                        "n_shared_experts": 1, "d_ff_shared": 16, "dense_layers": (0,),
                                        "d_ff_dense": 24, "nope_layers": (1,), "attn_temperature": (2.0, 0.5),
                                        "qk_l2_norm": True, "attention_chunk_size": 4, "chunked_layers": (0,),
                                        "rope_adjacent_pairs": True, "family": "llama4", **kw}),
    "granitemoe": lambda **kw: MoEConfig(**{**_T, "d_ff_expert": 16, "n_experts": 6, "routing": Routing(k=2),
                                            "softmax_scale": 0.2, "embedding_multiplier": 2.0,
                                            "residual_multiplier": 0.5, "logits_scaling": 2.0,
                                            "family": "granitemoe", **kw}),
}


def tiny(family: str, **overrides: Any) -> MoEConfig:
    """A tiny config of ``family`` (see ``TINY``) for tests and examples."""
    try:
        factory = TINY[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}; available: {sorted(TINY)}") from None
    return factory(**overrides)


def _count(cfg: MoEConfig) -> int:
    abstract = nnx.eval_shape(lambda: MoEDecoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


def param_count(cfg: MoEConfig, *, direct: bool = False) -> int:
    """Total parameters of ``MoEDecoder(cfg)``, from shapes only (nothing is allocated).

    Building a 60-layer model even abstractly costs seconds, so by default the count
    is assembled from abstract 1- and 2-layer models: embeddings and head, plus
    ``n_moe`` times one MoE layer and ``n_dense`` times one dense layer (layers of a
    kind are identical, so this is exact; a test checks it against ``direct=True``).
    """
    if direct or cfg.n_layers <= 2:
        return _count(cfg)
    n_dense = sum(cfg.is_dense(i) for i in range(cfg.n_layers))
    one = cfg.replace(n_layers=1, first_dense_layers=0, dense_layers=(), scan_layers=False)
    c1, c2 = _count(one), _count(one.replace(n_layers=2))
    per_moe = c2 - c1
    base = c1 - per_moe
    per_dense = _count(one.replace(first_dense_layers=1)) - base if n_dense else 0
    return base + (cfg.n_layers - n_dense) * per_moe + n_dense * per_dense


def active_param_count(cfg: MoEConfig) -> int:
    """Parameters used per token: all but the unselected routed experts (top-k of E).

    Embedding and head count as active (published "active" figures sometimes exclude them).
    """
    total = param_count(cfg)
    mats = 3 if is_gated(cfg.activation) else 2
    n_moe = sum(not cfg.is_dense(i) for i in range(cfg.n_layers))
    per_expert = mats * cfg.d_model * cfg.d_ff_expert
    inactive = n_moe * (cfg.n_experts - cfg.routing.k) * per_expert
    if cfg.attention == "moa":  # JetMoE's attention experts: w_in and w_out per expert
        inactive += cfg.n_layers * (cfg.n_experts - cfg.routing.k) * 2 * cfg.d_model * cfg.n_kv_heads * cfg.hd
    return total - inactive
