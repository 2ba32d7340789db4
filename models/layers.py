"""Building blocks shared by the model families: norms, RoPE, attention, FFNs, MoE.

Every routed-expert block calls the ``moe_*`` dialect (:func:`moejax.dialect.sparse_moe`),
so a traced model shows its MoE structure by name. Shared experts and dense FFNs
are ordinary matmuls.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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


class LayerNorm(nnx.Module):
    """Layer norm (computed in float32), optionally without bias (DBRX)."""

    def __init__(self, dim: int, eps: float = 1e-5, dtype=jnp.float32, bias: bool = False):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype)) if bias else None
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        y = xf * self.weight[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


NORMS = ("rms", "layer", "layer_bias")


def make_norm(kind: str, dim: int, eps: float, dtype=jnp.float32) -> nnx.Module:
    """``"rms"`` -> :class:`RMSNorm`, ``"layer"`` -> bias-free :class:`LayerNorm` (DBRX),
    ``"layer_bias"`` -> :class:`LayerNorm` with bias (PhiMoE's ``nn.LayerNorm``)."""
    if kind == "rms":
        return RMSNorm(dim, eps, dtype)
    if kind in ("layer", "layer_bias"):
        return LayerNorm(dim, eps, dtype, bias=kind == "layer_bias")
    raise ValueError(f"unknown norm {kind!r}; choose one of {NORMS}")


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` with the kernel stored as [in, out]."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, bias: bool = False, dtype=jnp.float32):
        self.kernel = _init(rngs, (d_in, d_out), d_in, dtype)
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x, self.kernel[...].astype(x.dtype))
        return y + self.bias[...].astype(x.dtype) if self.bias is not None else y


@dataclasses.dataclass(frozen=True)
class Yarn:
    """YaRN RoPE scaling (``rope_type: "yarn"``), computed as transformers' ``_compute_yarn_parameters``.

    Rotary frequencies that turn fewer than ``beta_slow`` times over the original context
    (``original_max_position_embeddings``) are divided by ``factor`` (interpolated), those
    turning more than ``beta_fast`` times are kept (extrapolated), with a linear ramp over the
    dimensions between. cos/sin are multiplied by :meth:`attention_scale`; DeepSeek's MLA
    further multiplies its softmax scale by :meth:`mla_softmax_factor`.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # overrides the mscale-derived cos/sin multiplier
    truncate: bool = True  # round the ramp's ends to whole dimensions (gpt-oss: False)

    def __post_init__(self):
        if not (self.factor > 0 and self.original_max_position_embeddings > 0 and self.beta_fast > 0
                and self.beta_slow > 0):
            raise ValueError(f"yarn rope scaling needs positive factor, original_max_position_embeddings, "
                             f"beta_fast and beta_slow, got {self}")

    def inv_freq(self, dim: int, theta: float) -> np.ndarray:
        """Inverse frequencies ``[dim / 2]`` (float32, the arithmetic of transformers)."""
        pos_freqs = theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (np.float32(self.factor) * pos_freqs)

        def correction_dim(rotations: float) -> float:
            return dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
                2 * math.log(theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # as transformers: no zero-width ramp
        # 0 below ``low`` (high frequencies: extrapolate), 1 above ``high`` (low frequencies: interpolate)
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
        return (interpolation * ramp + extrapolation * (1 - ramp)).astype(np.float32)

    def attention_scale(self) -> float:
        """The factor applied to cos and sin (so attention logits scale by its square)."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim)
        return _yarn_mscale(self.factor)

    def mla_softmax_factor(self) -> float:
        """DeepSeek-V2/V3 MLA: softmax scale multiplier ``mscale(factor, mscale_all_dim) ** 2`` (1 without it)."""
        return _yarn_mscale(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0


@dataclasses.dataclass(frozen=True)
class Llama3Rope:
    """Llama 3 RoPE scaling (``rope_type: "llama3"``; Llama 4 Scout as released), computed as transformers'
    ``_compute_llama3_parameters``: frequencies whose wavelength exceeds ``original / low_freq_factor`` are
    divided by ``factor``, those under ``original / high_freq_factor`` kept, the ones between interpolated.
    cos/sin are not rescaled. (Same interface as :class:`Yarn` for :func:`rope`.)"""

    factor: float
    original_max_position_embeddings: int
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self):
        if not (self.factor > 0 and self.original_max_position_embeddings > 0 and self.low_freq_factor > 0
                and self.high_freq_factor > 0):
            raise ValueError(f"llama3 rope scaling needs positive factor, original_max_position_embeddings, "
                             f"low_freq_factor and high_freq_factor, got {self}")

    def inv_freq(self, dim: int, theta: float) -> np.ndarray:
        """Inverse frequencies ``[dim / 2]`` (float32, the arithmetic of transformers)."""
        inv = (1.0 / np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
        old = self.original_max_position_embeddings
        low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
        wavelen = (2 * math.pi / inv).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv / np.float32(self.factor), inv).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):  # equal factors: no medium band, smooth unused
            smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / np.float32(self.factor) + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)

    def attention_scale(self) -> float:
        return 1.0

    def mla_softmax_factor(self) -> float:
        return 1.0


@dataclasses.dataclass(frozen=True)
class LongRope:
    """LongRoPE (``rope_type: "longrope"``; Phi-3.5-MoE as released), as transformers computes it.

    Inverse frequencies are the default ones divided per dimension by ``short_factor`` or
    ``long_factor`` (``[rotary_dim / 2]`` each), and cos/sin are multiplied by ``short_scale`` or
    ``long_scale``. Which set applies is decided per call, as transformers' ``dynamic_rope_update``
    does: the long one when the call's largest position + 1 exceeds
    ``original_max_position_embeddings``, for every position of the call. So a prefill of ``P``
    tokens uses the short set when ``P <= original``, and a cached decode step at position ``p``
    the long set once ``p + 1 > original``, while one forward over the whole sequence rotates every
    position with the set its length picks. Keys already in a KV cache keep the rotation they were
    cached with, so generation prefills the whole sequence again once when it first passes
    ``original``, as transformers' PhiMoE ``generate`` does (``generation._reprefill_position``).
    Same interface as :class:`Yarn` for :func:`rope`, plus :meth:`select` (the traced choice)."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    short_scale: float = 1.0  # the cos/sin multiplier with the short factors
    long_scale: float = 1.0  # ... with the long factors

    def __post_init__(self):
        if not (self.short_factor and len(self.short_factor) == len(self.long_factor)
                and all(f > 0 for f in self.short_factor + self.long_factor)
                and self.original_max_position_embeddings > 0 and self.short_scale > 0 and self.long_scale > 0):
            raise ValueError(f"longrope needs equally long, non-empty positive short_factor and long_factor, a "
                             f"positive original_max_position_embeddings and positive scales, got {self}")

    def _check_dim(self, dim: int) -> None:
        if len(self.short_factor) != dim // 2:
            raise ValueError(f"longrope has {len(self.short_factor)} factors per set; a rotary dimension of {dim} "
                             f"needs {dim // 2}")

    def inv_freq(self, dim: int, theta: float, long: bool = False) -> np.ndarray:
        """Inverse frequencies ``[dim / 2]`` of the short (or long) set (float32, the arithmetic of transformers:
        ``1 / (factor * theta ** (arange(0, dim, 2) / dim))``)."""
        self._check_dim(dim)
        factors = np.asarray(self.long_factor if long else self.short_factor, np.float32)
        exps = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
        return (1.0 / (factors * np.float32(theta) ** exps)).astype(np.float32)

    def select(self, dim: int, theta: float, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(inv_freq [dim / 2], cos/sin multiplier)`` for a call at ``positions``: the long set iff
        ``max(positions) + 1 > original_max_position_embeddings`` (traced; transformers' rule)."""
        long = jnp.max(positions) + 1 > self.original_max_position_embeddings
        inv = jnp.where(long, jnp.asarray(self.inv_freq(dim, theta, long=True)),
                        jnp.asarray(self.inv_freq(dim, theta)))
        return inv, jnp.where(long, jnp.float32(self.long_scale), jnp.float32(self.short_scale))

    def attention_scale(self) -> float:
        """The short set's cos/sin multiplier (the long one: :meth:`select`)."""
        return self.short_scale

    def mla_softmax_factor(self) -> float:
        return 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 0.1 * mscale * math.log(scale) + 1.0 if scale > 1 else 1.0


def rope(x: jax.Array, positions: jax.Array, theta: float, interleaved: bool = False,
         scaling: Yarn | Llama3Rope | LongRope | None = None, rotary_dim: int | None = None) -> jax.Array:
    """Rotary embedding on ``x [B, S, H, hd]``, optionally scaled (:class:`Yarn`, :class:`Llama3Rope`,
    :class:`LongRope`).

    ``interleaved=False``: half-split pairs ``(x_i, x_{i+hd/2})`` (Hugging Face Llama/Mixtral).
    ``interleaved=True``: adjacent pairs ``(x_{2i}, x_{2i+1})`` (DeepSeek), written back as
    ``[rotated evens, rotated odds]`` like transformers' ``apply_rotary_pos_emb_interleave``.
    DeepSeek-V2's complex-number form writes the pairs back interleaved instead; the two
    layouts differ by one fixed permutation applied to queries and keys alike, so
    attention scores are identical.

    ``rotary_dim`` (partial rotary, GLM-4.5 and MiniMax-M2): only the first ``rotary_dim``
    dimensions of each head rotate, as a RoPE of that width (its frequencies and half-split
    pairs over ``rotary_dim``); the rest pass through unchanged.
    """
    if rotary_dim is not None and rotary_dim < x.shape[-1]:
        rotated = rope(x[..., :rotary_dim], positions, theta, interleaved, scaling)
        return jnp.concatenate([rotated, x[..., rotary_dim:]], -1)
    hd = x.shape[-1]
    if scaling is None:
        inv, mult = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)), 1.0
    elif isinstance(scaling, LongRope):  # short or long set, chosen from this call's positions
        inv, mult = scaling.select(hd, theta, positions)
    else:  # trace-time constants
        inv, mult = jnp.asarray(scaling.inv_freq(hd, theta)), scaling.attention_scale()
    ang = positions[..., None].astype(jnp.float32) * inv  # [B, S, hd/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    if not (isinstance(mult, float) and mult == 1.0):
        cos, sin = cos * mult, sin * mult
    xf = x.astype(jnp.float32)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        x1, x2 = xf[..., : hd // 2], xf[..., hd // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def l2_norm(x: jax.Array, eps: float) -> jax.Array:
    """RMS norm without weight over the last axis, in float32 (Llama 4's ``L2Norm`` of q and k heads)."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query attention with RoPE and an optional KV cache.

    ``qk_norm`` adds RMS norms on queries and keys: over the whole projections (OLMoE,
    MiniMax-M2) or, with ``qk_norm_per_head``, over each head's ``head_dim`` with one weight
    shared by all heads (Qwen3-MoE, GLM-4.5), before RoPE either way unless ``qk_norm_after_rope``
    (Hunyuan: per-head norms on the rotated q and k). ``clip_qkv`` clamps
    q, k, v to ``[-c, c]`` (DBRX, OLMoE). ``rope_scaling``: YaRN-scaled rotary frequencies.
    ``rotary_dim``: partial rotary, RoPE on the first ``rotary_dim`` dimensions of each head.
    ``o_bias``: a bias on the output projection (PhiMoE's ``attention_bias``).
    Llama 4: ``use_rope=False`` (a NoPE layer), ``rope_interleave`` (RoPE on adjacent pairs, its
    complex form), ``qk_l2_norm`` (weightless RMS norm of each rotated q and k head),
    ``temperature=(floor_scale, attn_scale)`` (queries scaled by
    ``1 + attn_scale * log1p(floor((pos + 1) / floor_scale))``), ``chunk_size`` (a query sees
    only keys of its own ``chunk_size``-token chunk). ``softmax_scale`` overrides
    ``head_dim ** -0.5`` (Granite's ``attention_multiplier``).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, rope_theta: float,
                 rngs: nnx.Rngs, qkv_bias: bool = False, qk_norm: bool = False, qk_norm_per_head: bool = False,
                 norm_eps: float = 1e-5, clip_qkv: float | None = None, rope_scaling: Yarn | None = None,
                 rotary_dim: int | None = None, o_bias: bool = False, qk_norm_after_rope: bool = False,
                 use_rope: bool = True, rope_interleave: bool = False, qk_l2_norm: bool = False,
                 temperature: tuple[float, float] | None = None, chunk_size: int | None = None,
                 softmax_scale: float | None = None, sliding_window: int | None = None, sinks: bool = False,
                 dtype=jnp.float32):
        self.n_heads, self.n_kv_heads, self.head_dim, self.rope_theta = n_heads, n_kv_heads, head_dim, rope_theta
        # gpt-oss: a query sees only the last sliding_window keys; a learned logit per head joins each softmax
        self.sliding_window = sliding_window
        self.sinks = nnx.Param(jnp.zeros((n_heads,), dtype)) if sinks else None
        self.use_rope, self.rope_interleave, self.qk_l2_norm = use_rope, rope_interleave, qk_l2_norm
        self.norm_eps = norm_eps
        self.temperature, self.chunk_size, self.softmax_scale = temperature, chunk_size, softmax_scale
        self.qk_norm_after_rope = qk_norm_after_rope
        self.clip_qkv, self.rope_scaling, self.qk_norm_per_head = clip_qkv, rope_scaling, qk_norm_per_head
        self.rotary_dim = rotary_dim
        self.q_proj = Linear(d_model, n_heads * head_dim, rngs=rngs, bias=qkv_bias, dtype=dtype)
        self.k_proj = Linear(d_model, n_kv_heads * head_dim, rngs=rngs, bias=qkv_bias, dtype=dtype)
        self.v_proj = Linear(d_model, n_kv_heads * head_dim, rngs=rngs, bias=qkv_bias, dtype=dtype)
        self.o_proj = Linear(n_heads * head_dim, d_model, rngs=rngs, bias=o_bias, dtype=dtype)
        q_dim, k_dim = (head_dim, head_dim) if qk_norm_per_head else (n_heads * head_dim, n_kv_heads * head_dim)
        self.q_norm = RMSNorm(q_dim, norm_eps, dtype) if qk_norm else None
        self.k_norm = RMSNorm(k_dim, norm_eps, dtype) if qk_norm else None

    def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None,
                 cache_index: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        b, s, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None and not self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (jnp.clip(t, -self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.reshape(b, s, self.n_heads, self.head_dim)
        k = k.reshape(b, s, self.n_kv_heads, self.head_dim)
        per_head = self.q_norm is not None and self.qk_norm_per_head
        if per_head and not self.qk_norm_after_rope:  # norms act on the last axis: head_dim
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            q = rope(q, positions, self.rope_theta, self.rope_interleave, self.rope_scaling, self.rotary_dim)
            k = rope(k, positions, self.rope_theta, self.rope_interleave, self.rope_scaling, self.rotary_dim)
        if per_head and self.qk_norm_after_rope:  # the norm weights do not commute with the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        if self.qk_l2_norm:
            q, k = l2_norm(q, self.norm_eps), l2_norm(k, self.norm_eps)
        if self.temperature is not None:  # by absolute position, so a decode step scales as the prefill did
            floor_scale, attn_scale = self.temperature
            pos = positions.astype(jnp.float32)
            scales = jnp.log1p(jnp.floor((pos + 1.0) / floor_scale)) * attn_scale + 1.0
            q = (q * scales[:, :, None, None]).astype(q.dtype)
        v = v.reshape(b, s, self.n_kv_heads, self.head_dim)
        out, cache = attend(q, k, v, positions, cache, cache_index, scale=self.softmax_scale, chunk=self.chunk_size,
                            window=self.sliding_window, sinks=None if self.sinks is None else self.sinks[...])
        return self.o_proj(out.reshape(b, s, -1)), cache

    @staticmethod
    def cache_shapes(n_kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
        """Per-token shapes of this attention's cache entries."""
        return {"k": (n_kv_heads, head_dim), "v": (n_kv_heads, head_dim)}


class MLAttention(nnx.Module):
    """DeepSeek-V2/V3 multi-head latent attention (MLA), as in transformers.

    Queries come from ``q_proj`` or the low-rank ``q_a_proj -> q_a_layernorm -> q_b_proj``.
    Keys and values come from a compressed latent ``c = norm(kv_a(x))[:kv_lora_rank]`` and a
    single shared rotary key ``k_rope``; the KV cache stores only ``latent [B, L, r]`` and
    ``k_rope [B, L, d_rope]`` (MLA's memory saving), and re-expands them with ``kv_b_proj``
    at every step (the "naive" form, not the weight-absorbed one).

    With YaRN ``rope_scaling`` the rotary part is YaRN-scaled and, as in DeepSeek's code,
    the softmax scale is multiplied by ``mscale(factor, mscale_all_dim) ** 2`` (unless
    ``softmax_scale`` is given explicitly).
    """

    def __init__(self, d_model: int, n_heads: int, *, q_lora_rank: int | None, kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, rope_theta: float,
                 rope_interleave: bool, rngs: nnx.Rngs, softmax_scale: float | None = None,
                 rope_scaling: Yarn | None = None, dtype=jnp.float32):
        self.n_heads, self.rope_theta, self.rope_interleave = n_heads, rope_theta, rope_interleave
        self.rope_scaling = rope_scaling
        self.kv_lora_rank, self.d_nope, self.d_rope, self.d_v = kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        mscale = rope_scaling.mla_softmax_factor() if rope_scaling is not None else 1.0
        self.softmax_scale = softmax_scale or qk_head_dim ** -0.5 * mscale
        if q_lora_rank:
            self.q_proj = None
            self.q_a_proj = Linear(d_model, q_lora_rank, rngs=rngs, dtype=dtype)
            self.q_a_layernorm = RMSNorm(q_lora_rank, 1e-6, dtype)  # transformers uses eps=1e-6 here
            self.q_b_proj = Linear(q_lora_rank, n_heads * qk_head_dim, rngs=rngs, dtype=dtype)
        else:
            self.q_proj = Linear(d_model, n_heads * qk_head_dim, rngs=rngs, dtype=dtype)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        self.kv_a_proj_with_mqa = Linear(d_model, kv_lora_rank + qk_rope_head_dim, rngs=rngs, dtype=dtype)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, 1e-6, dtype)
        self.kv_b_proj = Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), rngs=rngs, dtype=dtype)
        self.o_proj = Linear(n_heads * v_head_dim, d_model, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None,
                 cache_index: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        b, s, _ = x.shape
        h = self.n_heads
        q = self.q_proj(x) if self.q_proj is not None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(b, s, h, self.d_nope + self.d_rope)
        q_nope, q_rot = q[..., : self.d_nope], q[..., self.d_nope:]
        q_rot = rope(q_rot, positions, self.rope_theta, self.rope_interleave, self.rope_scaling)
        ckv = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(ckv[..., : self.kv_lora_rank])
        k_rot = rope(ckv[..., self.kv_lora_rank:][:, :, None, :], positions, self.rope_theta, self.rope_interleave,
                     self.rope_scaling)[:, :, 0]
        if cache is not None:
            latent = write_cache(cache["latent"], latent, cache_index)
            k_rot = write_cache(cache["k_rope"], k_rot, cache_index)
            cache = {"latent": latent, "k_rope": k_rot}
            key_pos = jnp.arange(latent.shape[1])[None, :]
            latent, k_rot = latent.astype(x.dtype), k_rot.astype(x.dtype)
        else:
            key_pos = positions[0][None, :]
        kv = self.kv_b_proj(latent).reshape(b, latent.shape[1], h, self.d_nope + self.d_v)
        k_nope, v = kv[..., : self.d_nope], kv[..., self.d_nope:]
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rot[:, :, None, :], (*k_nope.shape[:3], self.d_rope))], -1)
        qf = jnp.concatenate([q_nope, q_rot], -1)
        out = causal_attention(qf, k, v, positions, key_pos, self.softmax_scale)
        return self.o_proj(out.reshape(b, s, -1)), cache

    @staticmethod
    def cache_shapes(kv_lora_rank: int, qk_rope_head_dim: int) -> dict[str, tuple[int, ...]]:
        """Per-token shapes of this attention's cache entries."""
        return {"latent": (kv_lora_rank,), "k_rope": (qk_rope_head_dim,)}


class MoAttention(nnx.Module):
    """JetMoE's mixture of attention heads (MoA): routed per-expert query and output projections.

    Each token picks ``k`` of ``E`` attention experts. Expert ``e`` maps the token to
    ``n_kv_heads`` query heads (``w_in[e] [d, n_kv*hd]``); keys and values are shared
    (``kv_proj``), so the token attends with ``k * n_kv_heads`` query heads over
    ``n_kv_heads`` KV heads. Each slot's attention output goes back through its
    expert's ``w_out[e] [n_kv*hd, d]`` and the slots are summed with the router weights.

    Design: routing and the token shuffles are the dialect's ``moe_route``,
    ``moe_dispatch`` and ``moe_combine`` (so they print, profile and shard like any MoE
    layer). The two per-expert projections are single linear maps, which
    ``moe_expert_ffn`` cannot express (its experts are ``act(x W1) W2``), so they are
    ``jax.lax.ragged_dot`` on the dispatched rows; the attention between them runs on
    token order. A ``linear`` expert kind in the dialect would make them passable
    to expert passes (quantisation, kernels) too.
    """

    def __init__(self, d_model: int, n_experts: int, n_kv_heads: int, head_dim: int, routing: dialect.Routing, *,
                 rope_theta: float, rngs: nnx.Rngs, rope_scaling: Yarn | None = None, name: str = "",
                 dtype=jnp.float32):
        self.routing, self.name, self.n_experts = routing, name, n_experts
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.rope_theta, self.rope_scaling = rope_theta, rope_scaling
        hq = n_kv_heads * head_dim
        self.router = Linear(d_model, n_experts, rngs=rngs, dtype=dtype)
        self.w_in = _init(rngs, (n_experts, d_model, hq), d_model, dtype)
        self.w_out = _init(rngs, (n_experts, hq, d_model), hq, dtype)
        self.bias = nnx.Param(jnp.zeros((d_model,), dtype))
        self.kv_proj = Linear(d_model, 2 * hq, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None,
                 cache_index: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        b, s, d = x.shape
        k, nkv, hd = self.routing.k, self.n_kv_heads, self.head_dim
        x2 = x.reshape(b * s, d)
        w, ids = dialect.moe_route(x2, self.router.kernel[...], routing=self.routing, name=self.name)
        grouped, sizes, order = dialect.moe_dispatch(x2, ids, num_experts=self.n_experts, name=self.name)
        q_rows = jax.lax.ragged_dot(grouped, self.w_in[...].astype(x.dtype), sizes)
        q = jnp.zeros_like(q_rows).at[order].set(q_rows)  # slot order: row t*k + j
        # Head (slot j, kv head h) uses KV head h; order heads as (h, j) so GQA's repeat matches.
        q = q.reshape(b, s, k, nkv, hd).swapaxes(2, 3).reshape(b, s, nkv * k, hd)
        kv = self.kv_proj(x)
        kk, vv = kv[..., : nkv * hd], kv[..., nkv * hd:]
        q = rope(q, positions, self.rope_theta, scaling=self.rope_scaling)
        kk = rope(kk.reshape(b, s, nkv, hd), positions, self.rope_theta, scaling=self.rope_scaling)
        out, cache = attend(q, kk, vv.reshape(b, s, nkv, hd), positions, cache, cache_index)
        out = out.reshape(b, s, nkv, k, hd).swapaxes(2, 3).reshape(b * s * k, nkv * hd)
        y_rows = jax.lax.ragged_dot(jnp.take(out, order, axis=0), self.w_out[...].astype(x.dtype), sizes)
        y = dialect.moe_combine(y_rows.astype(x.dtype), order, w, name=self.name)
        return y.reshape(b, s, d) + self.bias[...].astype(x.dtype), cache


def write_cache(buf: jax.Array, new: jax.Array, cache_index) -> jax.Array:
    """Write ``new [B, S, ...]`` into ``buf [B, L, ...]`` at sequence offset ``cache_index``."""
    zero = jnp.zeros((), jnp.int32)
    start = (zero, jnp.asarray(cache_index, jnp.int32)) + (zero,) * (buf.ndim - 2)
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), start)


def causal_attention(q, k, v, positions, key_pos, scale: float, chunk: int | None = None,
                     window: int | None = None, sinks: jax.Array | None = None):
    """Softmax attention of ``q [B,S,H,dk]`` on ``k [B,L,Hkv,dk]``, ``v [B,L,Hkv,dv]``.

    Key ``j`` is visible to query ``i`` when ``key_pos[j] <= positions[i]`` (causal, and it
    hides cache slots not written yet) and, with ``chunk``, both lie in the same
    ``chunk``-token chunk (Llama 4's chunked attention), and, with ``window``, it is one of
    the last ``window`` positions (``key_pos[j] > positions[i] - window``; gpt-oss's sliding
    layers). ``sinks [H]`` (gpt-oss): a per-head logit joins each softmax as an extra
    column that is then dropped, so a query may give less than all its weight to keys.
    """
    rep = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, rep, axis=2)
    v = jnp.repeat(v, rep, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    mask = key_pos[None, None, :, :] <= positions[:, None, :, None]
    if chunk is not None:
        mask = mask & (key_pos[None, None, :, :] // chunk == positions[:, None, :, None] // chunk)
    if window is not None:
        mask = mask & (key_pos[None, None, :, :] > positions[:, None, :, None] - window)
    scores = jnp.where(mask, scores, -1e30)
    if sinks is not None:
        sink = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, None, None], (*scores.shape[:3], 1))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], -1), axis=-1)[..., :-1].astype(v.dtype)
    else:
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def attend(q, k, v, positions, cache: KVCache | None, cache_index, scale: float | None = None,
           chunk: int | None = None, window: int | None = None, sinks: jax.Array | None = None):
    """Causal softmax attention; with a cache, new keys are written at ``cache_index``."""
    if cache is not None:
        k_all, v_all = write_cache(cache["k"], k, cache_index), write_cache(cache["v"], v, cache_index)
        cache = {"k": k_all, "v": v_all}
        key_pos = jnp.arange(k_all.shape[1])[None, :]
        k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
    else:
        key_pos = positions[0][None, :]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return causal_attention(q, k, v, positions, key_pos, scale, chunk, window, sinks), cache


class DenseFFN(nnx.Module):
    """A gated (SwiGLU) or plain feed-forward block; also used for shared experts."""

    def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, activation: str = "swiglu", dtype=jnp.float32):
        self.activation = activation
        gated = dialect.is_gated(activation)
        self.gate_proj = Linear(d_model, d_ff, rngs=rngs, dtype=dtype) if gated else None
        self.up_proj = Linear(d_model, d_ff, rngs=rngs, dtype=dtype)
        self.down_proj = Linear(d_ff, d_model, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = dialect.activation_fn(self.activation)
        h = act(self.gate_proj(x), self.up_proj(x)) if self.gate_proj is not None else act(self.up_proj(x))
        return self.down_proj(h)


class Experts(nnx.Module):
    """Stacked expert weights ``w_gate/w_up [E,d,f]`` and ``w_down [E,f,d]``.

    ``bias`` (gpt-oss) adds ``b_gate/b_up [E,f]`` and ``b_down [E,d]``, which
    :meth:`weights` returns after the matrices (the dialect's convention).
    """

    def __init__(self, n_experts: int, d_model: int, d_ff: int, *, rngs: nnx.Rngs, activation: str = "swiglu",
                 bias: bool = False, dtype=jnp.float32):
        gated = dialect.is_gated(activation)
        self.w_gate = _init(rngs, (n_experts, d_model, d_ff), d_model, dtype) if gated else None
        self.w_up = _init(rngs, (n_experts, d_model, d_ff), d_model, dtype)
        self.w_down = _init(rngs, (n_experts, d_ff, d_model), d_ff, dtype)
        zeros = lambda n: nnx.Param(jnp.zeros((n_experts, n), dtype)) if bias else None  # noqa: E731
        self.b_gate = zeros(d_ff) if gated else None
        self.b_up, self.b_down = zeros(d_ff), zeros(d_model)

    def weights(self) -> tuple[Any, ...]:
        mats = (self.w_gate, self.w_up, self.w_down) if self.w_gate is not None else (self.w_up, self.w_down)
        if self.b_down is not None:
            mats += tuple(b for b in (self.b_gate, self.b_up, self.b_down) if b is not None)
        return tuple(m.get_value() for m in mats)  # (a structured weight, e.g. FP8 blocks, cannot be indexed)


class SparseMoE(nnx.Module):
    """Router plus routed experts (plus optional shared experts), via the dialect.

    ``shared_gate`` adds Qwen-MoE's sigmoid gate on the shared expert output.
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, routing: dialect.Routing, *, rngs: nnx.Rngs,
                 activation: str = "swiglu", n_shared: int = 0, d_ff_shared: int | None = None,
                 shared_gate: bool = False, selection_bias: bool = False, out_bias: bool = False, name: str = "",
                 router_bias: bool = False, expert_bias: bool = False, dtype=jnp.float32):
        self.routing, self.activation, self.name = routing, activation, name
        self.bias = nnx.Param(jnp.zeros((d_model,), dtype)) if out_bias else None  # JetMoE
        # gpt-oss: a router bias on the logits (the route op's bias operand, routing.bias_on_logits)
        self.gate = Linear(d_model, n_experts, rngs=rngs, bias=router_bias, dtype=dtype)
        self.experts = Experts(n_experts, d_model, d_ff, rngs=rngs, activation=activation, bias=expert_bias,
                               dtype=dtype)
        self.selection_bias = nnx.Param(jnp.zeros((n_experts,), jnp.float32)) if selection_bias else None
        self.shared = (DenseFFN(d_model, (d_ff_shared or d_ff) * max(n_shared, 1), rngs=rngs,
                                activation=activation, dtype=dtype) if n_shared else None)
        self.shared_gate = Linear(d_model, 1, rngs=rngs, dtype=dtype) if (n_shared and shared_gate) else None

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = self.selection_bias[...] if self.selection_bias is not None else None
        if self.gate.bias is not None:
            bias = self.gate.bias[...]
        y = dialect.sparse_moe(x, self.gate.kernel[...], self.experts.weights(), routing=self.routing,
                               activation=self.activation, selection_bias=bias, name=self.name)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                s = jax.nn.sigmoid(self.shared_gate(x)) * s
            y = y + s
        return y

    def router_logits(self, x: jax.Array) -> jax.Array:
        """Router logits [T, E] (for load-balancing losses during training)."""
        logits = jnp.dot(x.reshape(-1, x.shape[-1]).astype(jnp.float32), self.gate.kernel[...].astype(jnp.float32))
        return logits if self.gate.bias is None else logits + self.gate.bias[...].astype(jnp.float32)


def init_cache(batch: int, max_len: int, n_layers: int, n_kv_heads: int, head_dim: int, dtype=jnp.float32,
               stacked: bool = False):
    """An empty KV cache: a list per layer, or one stacked [L, ...] dict for scanned models."""
    shape = (batch, max_len, n_kv_heads, head_dim)
    if stacked:
        return {"k": jnp.zeros((n_layers, *shape), dtype), "v": jnp.zeros((n_layers, *shape), dtype)}
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(n_layers)]


def init_cache_from_shapes(batch: int, max_len: int, n_layers: int, shapes: dict[str, tuple[int, ...]],
                           dtype=jnp.float32, stacked: bool = False):
    """An empty cache with entries ``name -> [B, L, *shape]`` per layer (stacked: ``[n_layers, B, L, ...]``)."""
    items = tuple((n, tuple(s)) for n, s in shapes.items())
    return _zeros_cache(batch, max_len, n_layers, items, jnp.dtype(dtype), stacked)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _zeros_cache(batch, max_len, n_layers, items, dtype, stacked):
    # One compiled call instead of one dispatch per buffer (it is on the prefill path).
    if stacked:
        return {n: jnp.zeros((n_layers, batch, max_len, *s), dtype) for n, s in items}
    return [{n: jnp.zeros((batch, max_len, *s), dtype) for n, s in items} for _ in range(n_layers)]
