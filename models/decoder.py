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
from moejax.models.layers import Attention, DenseFFN, KVCache, Linear, RMSNorm, SparseMoE, init_cache


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
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    scan_layers: bool = False
    family: str = "mixtral"

    def __post_init__(self):
        if self.d_model % self.n_heads and self.head_dim is None:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.routing.k > self.n_experts:
            raise ValueError(f"routing.k={self.routing.k} exceeds n_experts={self.n_experts}")
        if self.scan_layers and self.first_dense_layers:
            raise ValueError("scan_layers needs identical layers; first_dense_layers > 0 is not scannable")

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def replace(self, **changes: Any) -> "MoEConfig":
        return dataclasses.replace(self, **changes)


class DecoderLayer(nnx.Module):
    """Pre-norm attention plus a MoE (or, for leading dense layers, dense) FFN."""

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs, dense: bool = False, name: str = "", dtype=jnp.float32):
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype)
        self.self_attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.hd, rope_theta=cfg.rope_theta,
                                   rngs=rngs, qkv_bias=cfg.qkv_bias, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype)
        if dense:
            self.mlp = DenseFFN(cfg.d_model, cfg.d_ff_dense or cfg.d_ff_expert, rngs=rngs,
                                activation=cfg.activation, dtype=dtype)
        else:
            self.mlp = SparseMoE(cfg.d_model, cfg.d_ff_expert, cfg.n_experts, cfg.routing, rngs=rngs,
                                 activation=cfg.activation, n_shared=cfg.n_shared_experts,
                                 d_ff_shared=cfg.d_ff_shared, shared_gate=cfg.shared_expert_gate,
                                 selection_bias=cfg.selection_bias, name=name, dtype=dtype)

    def __call__(self, x, positions, cache=None, cache_index=None):
        h, cache = self.self_attn(self.input_layernorm(x), positions, cache, cache_index)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


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
                DecoderLayer(cfg, rngs=rngs, dense=i < cfg.first_dense_layers, name=f"layers/{i}/mlp", dtype=dtype)
                for i in range(cfg.n_layers)
            ])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size, rngs=rngs, dtype=dtype)

    def __call__(self, tokens: jax.Array, *, cache: Any = None, cache_index: jax.Array | None = None):
        b, s = tokens.shape
        start = jnp.zeros((), jnp.int32) if cache_index is None else jnp.asarray(cache_index, jnp.int32)
        positions = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32), (b, s))
        x = self.embed_tokens(tokens)
        x, new_cache = self._run_layers(x, positions, cache, start if cache is not None else None)
        x = self.norm(x)
        if self.lm_head is None:
            logits = jnp.dot(x, self.embed_tokens.embedding[...].T.astype(x.dtype))
        else:
            logits = self.lm_head(x)
        logits = logits.astype(jnp.float32)
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
        return init_cache(batch, max_len, c.n_layers, c.n_kv_heads, c.hd, dtype, stacked=c.scan_layers)

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
