"""A config-driven MoE decoder covering the common families (Mixtral-like core).

One :class:`MoEConfig` describes a model; :class:`MoEDecoder` builds it as a Flax
NNX module with its decoder layers either unrolled (``layers/0/...``) or stacked
and run under ``jax.lax.scan`` (``layers/...`` with a leading layer axis).

Call forms:

* ``model(tokens)`` -> logits ``[B, S, V]`` (full causal forward);
* ``model(tokens, cache=cache, cache_index=i)`` -> ``(logits, new_cache)``, the
  prefill/decode step with a KV cache (see :func:`moejax.models.generate`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import dialect
from moejax.models.layers import (NORMS, Attention, DenseFFN, KVCache, Linear, MLAttention, MoAttention, SparseMoE,
                                  Yarn, init_cache_from_shapes, make_norm)
from moejax.models.layers import Llama3Rope, LongRope

ATTENTIONS = ("gqa", "mla", "moa")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Hyper-parameters of a MoE decoder (names follow Hugging Face where they exist)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff_expert: int
    n_experts: int
    routing: dialect.Routing
    head_dim: int | None = None
    activation: str = "swiglu"
    n_shared_experts: int = 0
    d_ff_shared: int | None = None
    shared_expert_gate: bool = False
    selection_bias: bool = False
    first_dense_layers: int = 0  # DeepSeek: leading layers with a dense FFN
    d_ff_dense: int | None = None
    qkv_bias: bool = False
    rope_theta: float = 10000.0
    # YaRN-scaled RoPE (released DeepSeek-V2/V3, Kimi K2), Llama 3 scaling (released Llama 4 Scout) or LongRoPE
    # (released Phi-3.5-MoE)
    rope_scaling: Yarn | Llama3Rope | LongRope | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    scan_layers: bool = False
    family: str = "mixtral"
    # Layers with a dense FFN besides the leading ones (Qwen-MoE's mlp_only_layers / sparse step).
    dense_layers: tuple[int, ...] = ()
    norm: str = "rms"  # "rms" or "layer" (bias-free LayerNorm, DBRX)
    qk_norm: bool = False  # OLMoE: RMS norm on the full q and k projections
    qk_norm_per_head: bool = False  # with qk_norm, Qwen3-MoE: the norms act on each head (weights [head_dim])
    clip_qkv: float | None = None  # DBRX / OLMoE: clamp q, k, v
    # "gqa", "mla" (DeepSeek-V2/V3 multi-head latent attention) or "moa" (JetMoE attention experts:
    # n_experts experts with routing.k per token, each giving n_kv_heads query heads)
    attention: str = "gqa"
    q_lora_rank: int | None = None  # MLA only
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True  # MLA: DeepSeek's adjacent-pair rotary layout
    # MLA: overrides qk_head_dim ** -0.5 (and its YaRN mscale); GQA: overrides head_dim ** -0.5 (Granite's
    # attention_multiplier)
    softmax_scale: float | None = None
    expert_out_bias: bool = False  # JetMoE: a bias added to the routed-expert output
    # Partial rotary (GLM-4.5, MiniMax-M2): RoPE on the first rotary_dim dimensions of each head (None: all).
    rotary_dim: int | None = None
    o_bias: bool = False  # PhiMoE: attention_bias also puts a bias on o_proj
    lm_head_bias: bool = False  # PhiMoE's lm_head_bias
    qk_norm_after_rope: bool = False  # Hunyuan: per-head q/k norms on the rotated q and k
    # Llama 4 (GQA only): layers without RoPE (NoPE), whose queries get attention temperature tuning
    # (floor_scale, attn_scale); a weightless RMS ("L2") norm of the rotated q and k heads on the other layers;
    # chunked attention (attention_chunk_size tokens per chunk) on chunked_layers; RoPE on adjacent pairs.
    nope_layers: tuple[int, ...] = ()
    attn_temperature: tuple[float, float] | None = None
    qk_l2_norm: bool = False
    attention_chunk_size: int | None = None
    chunked_layers: tuple[int, ...] = ()
    rope_adjacent_pairs: bool = False
    # Granite (muP): embeddings times embedding_multiplier, each residual branch times residual_multiplier,
    # logits divided by logits_scaling (its attention_multiplier is softmax_scale).
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    # gpt-oss (GQA only): sliding-window attention (a query sees its last sliding_window keys) on
    # sliding_layers, a learned sink logit per head in every softmax, biases on the experts' matmuls
    # (its router bias on the logits is routing.bias_on_logits).
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    attention_sinks: bool = False
    expert_bias: bool = False

    def __post_init__(self):
        if self.d_model % self.n_heads and self.head_dim is None:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.routing.k > self.n_experts:
            raise ValueError(f"routing.k={self.routing.k} exceeds n_experts={self.n_experts}")
        if self.n_experts % self.routing.n_group or self.routing.topk_group > self.routing.n_group:
            raise ValueError(f"group-limited routing: n_experts={self.n_experts} must split into "
                             f"n_group={self.routing.n_group} groups, of which topk_group={self.routing.topk_group} "
                             "are kept")
        if self.scan_layers and (self.first_dense_layers or self.dense_layers):
            raise ValueError("scan_layers needs identical layers; dense layers (first_dense_layers / dense_layers) "
                             "are not scannable: set scan_layers=False")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r} is not one of {NORMS}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention={self.attention!r} is not one of {ATTENTIONS}")
        if self.attention == "mla" and not (self.kv_lora_rank and self.qk_rope_head_dim and self.v_head_dim):
            raise ValueError("attention='mla' needs kv_lora_rank, qk_rope_head_dim and v_head_dim > 0")
        if self.qk_norm_per_head and not (self.qk_norm and self.attention == "gqa"):
            raise ValueError("qk_norm_per_head needs qk_norm=True and attention='gqa'")
        if self.qk_norm_after_rope and not self.qk_norm_per_head:
            raise ValueError("qk_norm_after_rope needs qk_norm_per_head=True")
        if self.o_bias and self.attention != "gqa":
            raise ValueError("o_bias needs attention='gqa'")
        if self.lm_head_bias and self.tie_embeddings:
            raise ValueError("lm_head_bias needs an untied lm_head (tie_embeddings=False)")
        if (self.sliding_layers or self.attention_sinks) and self.attention != "gqa":
            raise ValueError("sliding_layers and attention_sinks need attention='gqa'")
        if self.sliding_layers and not (self.sliding_window and self.sliding_window >= 1):
            raise ValueError(f"sliding_layers need sliding_window >= 1, got {self.sliding_window}")
        if self.scan_layers and self.sliding_layers and set(self.sliding_layers) != set(range(self.n_layers)):
            raise ValueError("scan_layers needs identical layers; sliding-window layers mixed with full-attention "
                             "ones are not scannable: set scan_layers=False")
        if self.routing.bias_on_logits and self.selection_bias:
            raise ValueError("the route op takes one bias: a router bias on the logits (routing.bias_on_logits) "
                             "or a selection bias, not both")
        if self.rotary_dim is not None and not (self.attention == "gqa" and self.rotary_dim % 2 == 0
                                                and 0 < self.rotary_dim <= self.hd):
            raise ValueError(f"rotary_dim={self.rotary_dim} must be even, in 1..head_dim={self.hd}, and needs "
                             "attention='gqa'")
        self._check_llama4_attention()

    def _check_llama4_attention(self) -> None:
        """Llama 4's per-layer attention options: GQA only, unrolled layers. (Indices past ``n_layers`` are
        allowed and unused, so ``replace(n_layers=...)`` keeps a config valid, as ``dense_layers`` does.)"""
        llama4 = (self.nope_layers, self.attn_temperature, self.qk_l2_norm, self.attention_chunk_size,
                  self.chunked_layers, self.rope_adjacent_pairs)
        if any(llama4) and self.attention != "gqa":
            raise ValueError("nope_layers, attn_temperature, qk_l2_norm, attention_chunk_size, chunked_layers and "
                             "rope_adjacent_pairs need attention='gqa'")
        if self.chunked_layers and not (self.attention_chunk_size or 0) > 0:
            raise ValueError("chunked_layers need a positive attention_chunk_size")
        if self.scan_layers and (self.nope_layers or self.chunked_layers):
            raise ValueError("scan_layers needs identical layers; NoPE or chunked-attention layers (nope_layers / "
                             "chunked_layers) are not scannable: set scan_layers=False")

    def is_dense(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` has a dense FFN instead of a MoE block."""
        return layer < self.first_dense_layers or layer in self.dense_layers

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-token shapes of one layer's KV-cache entries."""
        if self.attention == "mla":
            return MLAttention.cache_shapes(self.kv_lora_rank, self.qk_rope_head_dim)
        return Attention.cache_shapes(self.n_kv_heads, self.hd)

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def replace(self, **changes: Any) -> "MoEConfig":
        return dataclasses.replace(self, **changes)


class DecoderLayer(nnx.Module):
    """Pre-norm attention plus a MoE (or, for leading dense layers, dense) FFN."""

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs, dense: bool = False, name: str = "", dtype=jnp.float32,
                 index: int | None = None):
        # ``index`` (None for scanned layers, which are identical) selects per-layer attention options (Llama 4).
        self.residual_multiplier = cfg.residual_multiplier
        self.input_layernorm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, dtype)
        if cfg.attention == "mla":
            self.self_attn = MLAttention(
                cfg.d_model, cfg.n_heads, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
                qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                v_head_dim=cfg.v_head_dim, rope_theta=cfg.rope_theta, rope_interleave=cfg.rope_interleave,
                softmax_scale=cfg.softmax_scale, rope_scaling=cfg.rope_scaling, rngs=rngs, dtype=dtype)
        elif cfg.attention == "moa":
            self.self_attn = MoAttention(cfg.d_model, cfg.n_experts, cfg.n_kv_heads, cfg.hd, cfg.routing,
                                         rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, rngs=rngs,
                                         name=name.replace("/mlp", "/self_attn"), dtype=dtype)
        else:
            self.self_attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.hd, rope_theta=cfg.rope_theta,
                                       rngs=rngs, qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm,
                                       qk_norm_per_head=cfg.qk_norm_per_head, norm_eps=cfg.norm_eps,
                                       clip_qkv=cfg.clip_qkv, rope_scaling=cfg.rope_scaling,
                                       rotary_dim=cfg.rotary_dim, o_bias=cfg.o_bias,
                                       qk_norm_after_rope=cfg.qk_norm_after_rope, dtype=dtype,
                                       sliding_window=cfg.sliding_window if _is_sliding(cfg, index) else None,
                                       sinks=cfg.attention_sinks, **_llama4_attention(cfg, index))
        self.post_attention_layernorm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, dtype)
        if dense:
            self.mlp = DenseFFN(cfg.d_model, cfg.d_ff_dense or cfg.d_ff_expert, rngs=rngs,
                                activation=cfg.activation, dtype=dtype)
        else:
            self.mlp = SparseMoE(cfg.d_model, cfg.d_ff_expert, cfg.n_experts, cfg.routing, rngs=rngs,
                                 activation=cfg.activation, n_shared=cfg.n_shared_experts,
                                 d_ff_shared=cfg.d_ff_shared, shared_gate=cfg.shared_expert_gate,
                                 selection_bias=cfg.selection_bias, out_bias=cfg.expert_out_bias, name=name,
                                 router_bias=cfg.routing.bias_on_logits, expert_bias=cfg.expert_bias, dtype=dtype)

    def __call__(self, x, positions, cache=None, cache_index=None):
        h, cache = self.self_attn(self.input_layernorm(x), positions, cache, cache_index)
        m = self.residual_multiplier
        x = x + h if m == 1.0 else x + h * m
        y = self.mlp(self.post_attention_layernorm(x))
        return (x + y if m == 1.0 else x + y * m), cache


def _is_sliding(cfg: MoEConfig, index: int | None) -> bool:
    """Whether layer ``index`` attends over a sliding window (scanned layers, ``None``: all are alike)."""
    return index in cfg.sliding_layers if index is not None else bool(cfg.sliding_layers)


def _llama4_attention(cfg: MoEConfig, index: int | None) -> dict[str, Any]:
    """Attention options of layer ``index``: Llama 4's NoPE / chunked layers, and the softmax scale."""
    use_rope = index not in cfg.nope_layers
    return dict(use_rope=use_rope, rope_interleave=cfg.rope_adjacent_pairs, qk_l2_norm=cfg.qk_l2_norm and use_rope,
                temperature=None if use_rope else cfg.attn_temperature, softmax_scale=cfg.softmax_scale,
                chunk_size=cfg.attention_chunk_size if index in cfg.chunked_layers else None)


class MoEDecoder(nnx.Module):
    """A decoder-only MoE language model built from a :class:`MoEConfig`."""

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, param_dtype=dtype,
                                      embedding_init=nnx.initializers.normal(0.02))
        if cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.n_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(r):
                return DecoderLayer(cfg, rngs=r, name="layers/*/mlp", dtype=dtype)

            self.layers = make(rngs)
        else:
            self.layers = nnx.List([
                DecoderLayer(cfg, rngs=rngs, dense=cfg.is_dense(i), name=f"layers/{i}/mlp", dtype=dtype, index=i)
                for i in range(cfg.n_layers)
            ])
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, dtype)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size, rngs=rngs,
                                                              bias=cfg.lm_head_bias, dtype=dtype)

    def __call__(self, tokens: jax.Array, *, cache: Any = None, cache_index: jax.Array | None = None):
        b, s = tokens.shape
        start = jnp.zeros((), jnp.int32) if cache_index is None else jnp.asarray(cache_index, jnp.int32)
        positions = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32), (b, s))
        x = self.embed_tokens(tokens)
        if self.config.embedding_multiplier != 1.0:  # Granite
            x = x * self.config.embedding_multiplier
        x, new_cache = self._run_layers(x, positions, cache, start if cache is not None else None)
        x = self.norm(x)
        if self.lm_head is None:
            logits = jnp.dot(x, self.embed_tokens.embedding[...].T.astype(x.dtype))
        else:
            logits = self.lm_head(x)
        logits = logits.astype(jnp.float32)
        if self.config.logits_scaling != 1.0:  # Granite
            logits = logits / self.config.logits_scaling
        return logits if cache is None else (logits, new_cache)

    def _run_layers(self, x, positions, cache, cache_index):
        if not self.config.scan_layers:
            new_cache = []
            for i, layer in enumerate(self.layers):
                x, c = layer(x, positions, None if cache is None else cache[i], cache_index)
                new_cache.append(c)
            return x, (new_cache if cache is not None else None)
        graphdef, state = nnx.split(self.layers)

        def body(h, xs):
            layer_state, layer_cache = xs
            h, c = nnx.merge(graphdef, layer_state)(h, positions, layer_cache, cache_index)
            return h, c

        x, new_cache = jax.lax.scan(body, x, (state, cache))
        return x, new_cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> Any:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` tokens."""
        c = self.config
        return init_cache_from_shapes(batch, max_len, c.n_layers, c.cache_shapes(), dtype, stacked=c.scan_layers)

    def moe_layers(self) -> list[SparseMoE]:
        """The MoE blocks (one stacked block when layers are scanned)."""
        layers = [self.layers] if self.config.scan_layers else list(self.layers)
        return [l.mlp for l in layers if isinstance(l.mlp, SparseMoE)]


def tiny_mixtral(scan_layers: bool = False, **overrides: Any) -> MoEConfig:
    """A few-thousand-parameter Mixtral-style config for tests."""
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff_expert=48, n_experts=4,
                routing=dialect.Routing(k=2), scan_layers=scan_layers)
    base.update(overrides)
    return MoEConfig(**base)


__all__ = ["MoEConfig", "MoEDecoder", "DecoderLayer", "tiny_mixtral", "KVCache"]
