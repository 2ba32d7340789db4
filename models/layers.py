"""Building blocks shared by the model families: norms, RoPE, attention, FFNs, MoE.

Every routed-expert block calls the ``moe_*`` dialect (:func:`moejax.dialect.sparse_moe`),
so a traced model shows its MoE structure by name. Shared experts and dense FFNs
are ordinary matmuls.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import dialect

KVCache = dict[str, jax.Array]  # {"k": [B, S_max, H_kv, hd], "v": [B, S_max, H_kv, hd]}


def _init(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype) -> nnx.Param:
    return nnx.Param(jax.random.normal(rngs.params(), shape, dtype) / math.sqrt(fan_in))


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm (computed in float32)."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` with the kernel stored as [in, out]."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, bias: bool = False, dtype=jnp.float32):
        self.kernel = _init(rngs, (d_in, d_out), d_in, dtype)
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x, self.kernel[...].astype(x.dtype))
        return y + self.bias[...].astype(x.dtype) if self.bias is not None else y


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, half-split convention (as Hugging Face Llama/Mixtral)."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    ang = positions[..., None].astype(jnp.float32) * inv  # [B, S, hd/2]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[:, :, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    rotated = jnp.concatenate([-x2, x1], -1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query attention with RoPE and an optional KV cache."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, rope_theta: float,
                 rngs: nnx.Rngs, qkv_bias: bool = False, dtype=jnp.float32):
        self.n_heads, self.n_kv_heads, self.head_dim, self.rope_theta = n_heads, n_kv_heads, head_dim, rope_theta
        self.q_proj = Linear(d_model, n_heads * head_dim, rngs=rngs, bias=qkv_bias, dtype=dtype)
        self.k_proj = Linear(d_model, n_kv_heads * head_dim, rngs=rngs, bias=qkv_bias, dtype=dtype)
        self.v_proj = Linear(d_model, n_kv_heads * head_dim, rngs=rngs, bias=qkv_bias, dtype=dtype)
        self.o_proj = Linear(n_heads * head_dim, d_model, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None,
                 cache_index: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        b, s, _ = x.shape
        q = rope(self.q_proj(x).reshape(b, s, self.n_heads, self.head_dim), positions, self.rope_theta)
        k = rope(self.k_proj(x).reshape(b, s, self.n_kv_heads, self.head_dim), positions, self.rope_theta)
        v = self.v_proj(x).reshape(b, s, self.n_kv_heads, self.head_dim)
        out, cache = attend(q, k, v, positions, cache, cache_index)
        return self.o_proj(out.reshape(b, s, -1)), cache


def attend(q, k, v, positions, cache: KVCache | None, cache_index):
    """Causal softmax attention; with a cache, new keys are written at ``cache_index``."""
    if cache is not None:
        zero = jnp.zeros((), jnp.int32)
        k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (zero, cache_index, zero, zero))
        v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (zero, cache_index, zero, zero))
        cache = {"k": k_all, "v": v_all}
        key_pos = jnp.arange(k_all.shape[1])[None, :]
        k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
    else:
        key_pos = positions[0][None, :]
    rep = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, rep, axis=2)
    v = jnp.repeat(v, rep, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    mask = key_pos[None, None, :, :] <= positions[:, None, :, None]
    scores = jnp.where(mask, scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v), cache


class DenseFFN(nnx.Module):
    """A gated (SwiGLU) or plain feed-forward block; also used for shared experts."""

    def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, activation: str = "swiglu", dtype=jnp.float32):
        self.activation = activation
        gated = activation in dialect.GATED_ACTIVATIONS
        self.gate_proj = Linear(d_model, d_ff, rngs=rngs, dtype=dtype) if gated else None
        self.up_proj = Linear(d_model, d_ff, rngs=rngs, dtype=dtype)
        self.down_proj = Linear(d_ff, d_model, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = dialect.activation_fn(self.activation)
        h = act(self.gate_proj(x), self.up_proj(x)) if self.gate_proj is not None else act(self.up_proj(x))
        return self.down_proj(h)


class Experts(nnx.Module):
    """Stacked expert weights ``w_gate/w_up [E,d,f]`` and ``w_down [E,f,d]``."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int, *, rngs: nnx.Rngs, activation: str = "swiglu",
                 dtype=jnp.float32):
        gated = activation in dialect.GATED_ACTIVATIONS
        self.w_gate = _init(rngs, (n_experts, d_model, d_ff), d_model, dtype) if gated else None
        self.w_up = _init(rngs, (n_experts, d_model, d_ff), d_model, dtype)
        self.w_down = _init(rngs, (n_experts, d_ff, d_model), d_ff, dtype)

    def weights(self) -> tuple[Any, ...]:
        mats = (self.w_gate, self.w_up, self.w_down) if self.w_gate is not None else (self.w_up, self.w_down)
        return tuple(m[...] for m in mats)


class SparseMoE(nnx.Module):
    """Router plus routed experts (plus optional shared experts), via the dialect.

    ``shared_gate`` adds Qwen-MoE's sigmoid gate on the shared expert output.
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, routing: dialect.Routing, *, rngs: nnx.Rngs,
                 activation: str = "swiglu", n_shared: int = 0, d_ff_shared: int | None = None,
                 shared_gate: bool = False, selection_bias: bool = False, name: str = "",
                 dtype=jnp.float32):
        self.routing, self.activation, self.name = routing, activation, name
        self.gate = Linear(d_model, n_experts, rngs=rngs, dtype=dtype)
        self.experts = Experts(n_experts, d_model, d_ff, rngs=rngs, activation=activation, dtype=dtype)
        self.selection_bias = nnx.Param(jnp.zeros((n_experts,), jnp.float32)) if selection_bias else None
        self.shared = (DenseFFN(d_model, (d_ff_shared or d_ff) * max(n_shared, 1), rngs=rngs,
                                activation=activation, dtype=dtype) if n_shared else None)
        self.shared_gate = Linear(d_model, 1, rngs=rngs, dtype=dtype) if (n_shared and shared_gate) else None

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = self.selection_bias[...] if self.selection_bias is not None else None
        y = dialect.sparse_moe(x, self.gate.kernel[...], self.experts.weights(), routing=self.routing,
                               activation=self.activation, selection_bias=bias, name=self.name)
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                s = jax.nn.sigmoid(self.shared_gate(x)) * s
            y = y + s
        return y

    def router_logits(self, x: jax.Array) -> jax.Array:
        """Router logits [T, E] (for load-balancing losses during training)."""
        return jnp.dot(x.reshape(-1, x.shape[-1]).astype(jnp.float32), self.gate.kernel[...].astype(jnp.float32))


def init_cache(batch: int, max_len: int, n_layers: int, n_kv_heads: int, head_dim: int, dtype=jnp.float32,
               stacked: bool = False):
    """An empty KV cache: a list per layer, or one stacked [L, ...] dict for scanned models."""
    shape = (batch, max_len, n_kv_heads, head_dim)
    if stacked:
        return {"k": jnp.zeros((n_layers, *shape), dtype), "v": jnp.zeros((n_layers, *shape), dtype)}
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(n_layers)]
