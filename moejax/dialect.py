"""The MoE dialect: four JAX primitives that spell out a Mixture-of-Experts layer.

The survey's equations (1)-(4) become named operations, so that a traced model
shows its MoE structure and passes can read and rewrite every decision:

=================  ==========================================================
``moe_route``      x [T,d], router weight [d,E] (, selection bias [E])
                   -> combine weights [T,K] (f32), expert ids [T,K] (int32)
``moe_dispatch``   x [T,d], expert ids [T,K]
                   -> grouped rows [T*K,d], group sizes [E], order [T*K]
``moe_expert_ffn`` grouped rows [N,d], group sizes [E], *expert weights
                   (, *expert biases) -> grouped outputs [N,d]
``moe_combine``    grouped outputs [N,d], order [N], combine weights [T,K]
                   -> y [T,d]
=================  ==========================================================

Conventions that every implementation and pass relies on:

* An expert id of ``-1`` marks a dropped slot (dynamic gating, capacity). Its
  combine weight is 0, dispatch sorts it after every real row and leaves it out
  of the group sizes, so it consumes no expert compute.
* Rows of the grouped tensor past ``sum(group_sizes)`` are padding; the expert
  op returns zeros there.
* ``order[i]`` is the flat slot ``t*K + j`` whose token row ``i`` holds.

Each primitive keeps its reference implementation (its meaning), abstract
evaluation, batching rule, JVP and XLA lowering together, like JAX's own
``lax`` primitives. The expert op's ``impl`` param selects one of several
registered implementations (:func:`register_ffn_impl`); all compute the same
function. The ops survive ``jax.vmap`` (the batch folds into the token axis and
the same op is bound once) and ``jax.jvp``/``jax.grad`` (the op computes the
primal, plain JAX the tangent); abstract evaluation checks every operand and
raises :class:`DialectTypeError` naming the op and its layer.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore
from jax.interpreters import ad, batching, mlir

from moejax import numerics, weight_formats

__all__ = [
    "Routing",
    "moe_route",
    "moe_dispatch",
    "moe_expert_ffn",
    "moe_combine",
    "sparse_moe",
    "route_p",
    "dispatch_p",
    "expert_ffn_p",
    "combine_p",
    "DIALECT_PRIMITIVES",
    "DialectTypeError",
    "is_dialect_primitive",
    "register_ffn_impl",
    "ffn_impls",
    "ffn_reference",
    "activation_fn",
    "ACTIVATIONS",
    "clamped_swiglu",
    "parse_activation",
    "is_gated",
    "split_biases",
    "ffn_impl_refusal",
]

GATING_MODES = ("topk", "top_p", "threshold", "skip", "min_weight")
SCORE_FNS = ("softmax", "sigmoid", "sparsemixer")
# Gating modes defined on sparsemixer's two weights (top_p needs one distribution over all experts).
SPARSEMIXER_GATING = ("topk", "threshold", "skip", "min_weight")
# Where a slot's routing weight is applied: to the expert's output (default) or to its input (Llama 4).
WEIGHT_ON = ("output", "input")
ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu", "silu", "clamped_swiglu")
GATED_ACTIVATIONS = ("swiglu", "geglu", "clamped_swiglu")
# What an implementation registered without saying otherwise computes (no expert biases).
BASIC_ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu", "silu")


# --------------------------------------------------------------------------
# Routing configuration: one hashable value carries every routing decision.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Routing:
    """Every decision of ``moe_route``; hashable so it can be a primitive param.

    Attributes:
      k: experts selected per token (for ``top_p``/``threshold`` the cap is
        ``max_k``).
      score: ``"softmax"`` or ``"sigmoid"`` scoring of router logits, or
        ``"sparsemixer"`` (PhiMoE's SparseMixer as transformers runs it at
        inference): expert 1 is the argmax of the logits, weighted by a softmax
        over the logits within ``jitter_eps`` (relative) of the max; expert 2 is
        the argmax once expert 1 is masked, weighted by its own such softmax
        with expert 1 excluded. Needs ``k=2``; no selection bias or groups.
      norm_topk: renormalise the selected weights to sum to 1.
      scale: multiplier on the final weights (DeepSeek's routed scaling).
      n_group, topk_group: group-limited routing (DeepSeek-V2/V3): experts are
        split in ``n_group`` groups and only the best ``topk_group`` groups are
        eligible. ``n_group=1`` disables it.
      group_score: how a group is scored: ``"max"`` (V2) or ``"top2_sum"`` (V3).
      gating: ``"topk"`` (static), ``"top_p"`` (smallest set reaching mass
        ``top_p``), ``"threshold"`` (experts whose probability reaches
        ``threshold``), ``"skip"`` (top-k, then drop experts whose weight is
        below ``skip_ratio`` times the top weight) or ``"min_weight"`` (top-k,
        then drop experts whose share of the token's top-k weight, normalised
        over the picked experts when ``norm_topk``, is below ``min_weight``).
      max_k: the cap on experts per token for dynamic modes (defaults to k).
      expert_map: after selection, expert ``e`` is replaced by
        ``expert_map[e]`` (merging); slots landing on the same expert add up.
      distinct_merged: with an ``expert_map``, select ``k`` distinct merged
        experts: only each merged expert's best-scoring column competes in the
        top-k, so a token that picked two members of one cluster gets its next
        choice instead of one expert with their summed weight.
      renormalize_kept: with ``norm_topk`` and an adaptive ``gating`` mode, the
        weights are normalised over the experts gating keeps (True: the dropped
        experts' share goes to the kept ones) or over every expert picked
        before gating (False: each kept expert keeps the weight the full top-k
        gave it and the dropped share is left out, which moves the layer's
        output far less when the dropped experts are the weak ones).
      norm_min: with ``norm_topk``, the weights' sum is clamped to at least
        this before dividing (ERNIE 4.5's ``moe_norm_min``).
      jitter_eps: ``"sparsemixer"``'s threshold (PhiMoE's
        ``router_jitter_noise``): logits whose gap to the max, relative to
        ``max(|logit|, max)``, exceeds ``2 * jitter_eps`` are left out of the
        softmax that weights the chosen expert.
      weight_on: ``"output"`` (default): ``y = sum_j w_j E_j(x)``. ``"input"``
        (Llama 4): ``y = sum_j E_j(w_j x)``, the weight scales the token before
        its expert. The route op's outputs are the same either way;
        :func:`sparse_moe` applies the weights to the slot copies of the token
        before dispatch and combines with unit weights, so the expert op and the
        dispatch/combine pair see an ordinary (k=1) layer. Input weighting
        keeps the slot count fixed (``max_k`` must equal ``k``: the program's
        shapes follow it) and, with more than one slot, takes no ``expert_map``
        (two slots on one merged expert cannot add their weights:
        ``E(w1 x) + E(w2 x) != E((w1 + w2) x)``).
      bias_on_logits: the op's optional bias operand ``[E]`` is a router
        bias added to the logits before scoring, so it moves the weights too
        (gpt-oss), instead of a selection-only bias added to the scores
        (DeepSeek-V3). Kept in the routing (not in the operand's position)
        so every consumer of a route op reads the one bias the same way.
    """

    k: int
    score: str = "softmax"
    norm_topk: bool = True
    scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    gating: str = "topk"
    top_p: float = 1.0
    threshold: float = 0.0
    skip_ratio: float = 0.0
    min_weight: float = 0.0
    max_k: int | None = None
    expert_map: tuple[int, ...] | None = None
    distinct_merged: bool = False
    renormalize_kept: bool = True
    norm_min: float = 1e-20
    jitter_eps: float = 0.0
    weight_on: str = "output"
    bias_on_logits: bool = False

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"Routing.k must be >= 1, got {self.k}")
        if self.score not in SCORE_FNS:
            raise ValueError(f"Routing.score must be one of {SCORE_FNS}, got {self.score!r}")
        if self.gating not in GATING_MODES:
            raise ValueError(f"Routing.gating must be one of {GATING_MODES}, got {self.gating!r}")
        if self.group_score not in ("max", "top2_sum"):
            raise ValueError(f"Routing.group_score must be 'max' or 'top2_sum', got {self.group_score!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"Routing.top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_weight < 1.0:
            raise ValueError(f"Routing.min_weight must be in [0, 1), got {self.min_weight}")
        if self.max_k is not None and self.max_k < 1:
            raise ValueError(f"Routing.max_k must be >= 1, got {self.max_k}")
        if not self.norm_min > 0:
            raise ValueError(f"Routing.norm_min must be > 0, got {self.norm_min}")
        if self.jitter_eps < 0:
            raise ValueError(f"Routing.jitter_eps must be >= 0, got {self.jitter_eps}")
        if self.score == "sparsemixer" and (self.k != 2 or self.n_group != 1 or self.slots != 2
                                            or self.gating not in SPARSEMIXER_GATING):
            raise ValueError(f"Routing(score='sparsemixer') picks exactly 2 experts without groups: it needs k=2 "
                             f"(max_k None or 2), n_group=1 and gating in {SPARSEMIXER_GATING}; got k={self.k}, "
                             f"max_k={self.max_k}, n_group={self.n_group}, gating={self.gating!r}")
        if self.weight_on not in WEIGHT_ON:
            raise ValueError(f"Routing.weight_on must be one of {WEIGHT_ON}, got {self.weight_on!r}")
        if self.weight_on == "input" and self.slots != self.k:
            raise ValueError(f"Routing(weight_on='input') keeps k={self.k} slots per token (the layer's traced shapes "
                             f"follow them); got gating={self.gating!r} with max_k={self.max_k}: use max_k={self.k} "
                             "or gating 'topk'/'skip'")
        if self.distinct_merged and (self.expert_map is None or max(self.expert_map) + 1 < self.slots
                                     or self.score == "sparsemixer"):
            raise ValueError(f"Routing(distinct_merged=True) selects {self.slots} distinct merged experts: it needs an "
                             f"expert_map naming at least that many (got {self.expert_map}) and a score other than "
                             "sparsemixer")
        if self.weight_on == "input" and self.expert_map is not None and self.slots > 1:
            raise ValueError(f"Routing(weight_on='input') with k={self.k} slots cannot take an expert_map (merged "
                             "experts): two slots landing on one merged expert would need E(w1 x) + E(w2 x), not "
                             "the summed weight; merge only k=1 input-weighted layers")

    @property
    def slots(self) -> int:
        """Number of expert slots per token in the op's outputs (K)."""
        if self.gating in ("top_p", "threshold"):
            return self.max_k or self.k
        return self.k

    def num_selected_experts(self, num_router_experts: int) -> int:
        """Experts the routed ids can name (after ``expert_map``)."""
        if self.expert_map is None:
            return num_router_experts
        return max(self.expert_map) + 1


# --------------------------------------------------------------------------
# Reference implementations: the meaning of each op in plain jax.numpy.
# --------------------------------------------------------------------------
def _scores(logits: jax.Array, score: str) -> jax.Array:
    if score == "sparsemixer":  # its weights are two masked softmaxes, not one score per expert
        raise ValueError("Routing(score='sparsemixer') has no per-expert score distribution; use "
                         "route_reference for its weights (or softmax logits as an approximation, by choice)")
    return jax.nn.softmax(logits, axis=-1) if score == "softmax" else jax.nn.sigmoid(logits)


def _sparsemixer(logits: jax.Array, jitter_eps: float) -> tuple[jax.Array, jax.Array]:
    """PhiMoE's SparseMixer in eval mode (transformers' ``sparsemixer`` with ``training=False``).

    Returns weights ``[T, 2]`` and ids ``[T, 2]``. Each pick is the argmax of the
    logits still eligible; its weight is its softmax probability among the logits
    within the jitter threshold of that max. The threshold's denominator uses the
    unmasked logits in both picks, as transformers does.
    """
    rows = jnp.arange(logits.shape[0])

    def pick(masked: jax.Array) -> tuple[jax.Array, jax.Array]:
        top = masked.max(-1, keepdims=True)
        idx = jnp.argmax(masked, axis=-1)  # first index on ties, as torch.max
        factor = jnp.maximum(jnp.abs(logits), top)
        outside = (top - logits) / factor > 2 * jitter_eps
        gates = jax.nn.softmax(jnp.where(outside, -jnp.inf, masked), axis=-1)
        return gates[rows, idx], idx

    w1, i1 = pick(logits)
    w2, i2 = pick(logits.at[rows, i1].set(-jnp.inf))
    return jnp.stack([w1, w2], -1), jnp.stack([i1, i2], -1)


def _group_limit(sel_scores: jax.Array, r: Routing) -> jax.Array:
    """Mask experts outside the ``topk_group`` best groups with -inf."""
    t, e = sel_scores.shape
    if r.n_group <= 1:
        return sel_scores
    if e % r.n_group:
        raise ValueError(f"group-limited routing: {e} experts do not split into n_group={r.n_group} groups")
    grouped = sel_scores.reshape(t, r.n_group, e // r.n_group)
    if r.group_score == "max":
        gscore = grouped.max(-1)
    else:
        gscore = jax.lax.top_k(grouped, 2)[0].sum(-1)
    _, gidx = jax.lax.top_k(gscore, r.topk_group)
    gmask = jnp.zeros((t, r.n_group), bool).at[jnp.arange(t)[:, None], gidx].set(True)
    emask = jnp.repeat(gmask, e // r.n_group, axis=1)
    return jnp.where(emask, sel_scores, -jnp.inf)


def route_reference(x, w_router, *bias, routing: Routing, name: str = "", impl: str = "reference"):
    """Router scores, expert selection and combine weights for every token."""
    r = routing
    logits = jnp.dot(x.astype(jnp.float32), w_router.astype(jnp.float32))
    if bias and r.bias_on_logits:
        logits = logits + bias[0].astype(jnp.float32)
        bias = ()  # consumed: not a selection bias
    n_experts = logits.shape[-1]
    kk = min(r.slots, n_experts)
    if r.score == "sparsemixer":
        if bias:
            raise ValueError("Routing(score='sparsemixer') takes no selection bias")
        w, ids = _sparsemixer(logits, r.jitter_eps)  # top_p (the one user of probs) is refused for it
    else:
        probs = _scores(logits, r.score)
        sel = probs + bias[0].astype(jnp.float32) if bias else probs
        sel = _group_limit(sel, r)
        if r.distinct_merged:
            sel = _best_column_per_merged_expert(sel, r.expert_map)
        _, ids = jax.lax.top_k(sel, kk)
        w = jnp.take_along_axis(probs, ids, axis=-1)
    keep = jnp.ones_like(w, dtype=bool)
    picked_sum = w.sum(-1, keepdims=True)
    if r.gating == "top_p":
        # Smallest prefix (by descending weight) whose mass reaches top_p.
        total = probs.sum(-1, keepdims=True)
        mass_before = jnp.cumsum(w, axis=-1) - w
        keep = mass_before < r.top_p * total
    elif r.gating == "threshold":
        keep = w >= r.threshold
    elif r.gating == "skip":
        keep = w >= r.skip_ratio * w[:, :1]
    elif r.gating == "min_weight":
        share = w / jnp.maximum(picked_sum, r.norm_min) if r.norm_topk else w
        keep = share >= r.min_weight
    keep = keep.at[:, 0].set(True)  # every token keeps its best expert
    w = jnp.where(keep, w, 0.0)
    if r.norm_topk:
        w = w / jnp.maximum(w.sum(-1, keepdims=True) if r.renormalize_kept else picked_sum, r.norm_min)
    w = w * r.scale
    ids = jnp.where(keep, ids, -1).astype(jnp.int32)
    if r.expert_map is not None:
        ids, w = _apply_expert_map(ids, w, r.expert_map)
    if kk < r.slots:  # k = E with max_k > E: pad dropped slots
        pad = r.slots - kk
        ids = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        w = jnp.pad(w, ((0, 0), (0, pad)))
    return w.astype(jnp.float32), ids


def _best_column_per_merged_expert(sel, expert_map):
    """``sel [T, columns]`` with every column but each merged expert's best (the first on a tie) set to -inf."""
    table = jnp.asarray(expert_map, jnp.int32)
    n_merged = max(expert_map) + 1
    best = jax.ops.segment_max(sel.T, table, num_segments=n_merged).T  # [T, M]
    is_best = sel >= best[:, table]
    # On a tie keep the first column: a column is shadowed when an earlier column of its expert is also best.
    same = table[:, None] == table[None, :]  # [c, c']
    earlier = jnp.tril(jnp.ones_like(same), -1)  # c' < c
    shadowed = jnp.einsum("tb,cb->tc", is_best.astype(jnp.int32), (same & earlier).astype(jnp.int32)) > 0
    return jnp.where(is_best & ~shadowed, sel, -jnp.inf)


def _apply_expert_map(ids, w, expert_map):
    """Map selected experts to merged experts; slots that collide add up."""
    table = jnp.asarray(expert_map, jnp.int32)
    mapped = jnp.where(ids >= 0, table[jnp.maximum(ids, 0)], -1)
    k = ids.shape[1]
    same = (mapped[:, :, None] == mapped[:, None, :]) & (mapped[:, :, None] >= 0)
    earlier = jnp.tril(jnp.ones((k, k), bool), -1)  # [j, i]: i < j
    dup = (same & earlier[None]).any(-1)  # a previous slot holds the same expert
    first = ~dup
    # Weight of each first occurrence = sum of weights of its duplicates.
    summed = jnp.einsum("tij,tj->ti", same.astype(w.dtype), w)
    w = jnp.where(first, summed, 0.0)
    mapped = jnp.where(first, mapped, -1)
    return mapped, w


def dispatch_reference(x, ids, *, num_experts: int, name: str = ""):
    """Sort token slots by expert; dropped slots (id -1) go last."""
    t, k = ids.shape
    flat = ids.reshape(-1)
    key = jnp.where(flat < 0, num_experts, flat)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    grouped = jnp.take(x, order // k, axis=0)
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[key].add(1, mode="drop")
    return grouped, group_sizes, order


def combine_reference(out, order, weights, *, name: str = ""):
    """Weighted scatter-add of grouped expert outputs back to token rows."""
    t, k = weights.shape
    w_rows = jnp.take(weights.reshape(-1), order)
    contrib = out.astype(jnp.float32) * w_rows[:, None]
    y = jnp.zeros((t, out.shape[1]), jnp.float32).at[order // k].add(contrib)
    return y.astype(out.dtype)


_CLAMPED_RE = re.compile(r"clamped_swiglu\(limit=([^,()]+),alpha=([^,()]+)\)")


def clamped_swiglu(limit: float, alpha: float = 1.702) -> str:
    """The activation name of gpt-oss's clamped SwiGLU with its two constants.

    ``gate = min(gate, limit)``, ``up = clip(up, -limit, limit)``,
    ``gate * sigmoid(alpha * gate) * (up + 1)``. The constants live in the name
    because the op's ``activation`` param is a string that every pass copies.
    """
    if not (math.isfinite(limit) and limit > 0 and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"clamped_swiglu: limit and alpha must be positive and finite, got {limit}, {alpha}")
    return f"clamped_swiglu(limit={float(limit)!r},alpha={float(alpha)!r})"


def parse_activation(activation: str) -> tuple[str, dict[str, float]]:
    """``(base name, constants)`` of an activation name; ValueError for an unknown one."""
    if activation in BASIC_ACTIVATIONS:
        return activation, {}
    m = _CLAMPED_RE.fullmatch(activation) if isinstance(activation, str) else None
    if m is None:
        raise ValueError(f"unknown activation {activation!r}: one of {BASIC_ACTIVATIONS} or "
                         "clamped_swiglu(limit=L,alpha=A) (dialect.clamped_swiglu(limit, alpha))")
    try:
        return "clamped_swiglu", {"limit": float(m.group(1)), "alpha": float(m.group(2))}
    except ValueError:
        raise ValueError(f"activation {activation!r}: limit and alpha must be numbers") from None


def is_gated(activation: str) -> bool:
    """Whether ``activation`` takes (gate, up): its experts have three matrices."""
    return parse_activation(activation)[0] in GATED_ACTIVATIONS


def activation_fn(activation: str) -> Callable:
    """The pointwise part of an expert FFN (gated ones take (gate, up))."""
    base, c = parse_activation(activation)
    if base == "clamped_swiglu":
        def clamped(g, u, limit=c["limit"], alpha=c["alpha"]):
            g = jnp.minimum(g, limit)
            u = jnp.clip(u, -limit, limit)
            return g * jax.nn.sigmoid(alpha * g) * (u + 1)
        return clamped
    return {
        "swiglu": lambda g, u: jax.nn.silu(g) * u,
        "geglu": lambda g, u: jax.nn.gelu(g, approximate=False) * u,
        "gelu": lambda u: jax.nn.gelu(u, approximate=False),
        "relu": jax.nn.relu,
        "silu": jax.nn.silu,
    }[base]


def split_biases(weights: Sequence[Any], activation: str) -> tuple[tuple[Any, ...], tuple[Any, ...] | None]:
    """``(matrices, biases or None)`` of an expert op's weights.

    An expert op's weights are its ``m`` matrices (3 gated, 2 otherwise), each
    ``[E, in, out]``, optionally followed by one bias ``[E, out]`` per matrix
    (gpt-oss). Biases trail the matrices in the same tuple so that passes which
    cut or gather every weight along the expert axis (prune, expert
    parallelism) carry them along unchanged.
    """
    weights = tuple(weights)
    m = 3 if is_gated(activation) else 2
    if len(weights) == m:
        return weights, None
    if len(weights) == 2 * m:
        return weights[:m], weights[m:]
    raise ValueError(f"activation {activation!r} needs {m} weight matrices, optionally followed by {m} expert "
                     f"biases; got {len(weights)} weights")


def materialize(w: Any, dtype: Any) -> jax.Array:
    """A float array for a stored expert weight (structured weights are dequantized)."""
    return weight_formats.dequantize(w, dtype)


def row_groups(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """Group index of each grouped row (``len(group_sizes)`` for padding rows)."""
    ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(num_rows, dtype=ends.dtype), side="right")


def expert_matmul(a: jax.Array, w: jax.Array) -> jax.Array:
    """``a @ w`` accumulated in f32, for one expert or a stack of experts.

    ``w`` is one expert's matrix ``[k, n]`` (a 2-D dot), or experts stacked
    ``[..., E, k, n]`` with ``a`` either shared by every expert (``[..., m, k]``:
    the layer's tokens) or per expert (``[..., E, m, k]``: each expert's rows
    or hidden states); the result is ``[..., E, m, n]``.
    """
    if w.ndim == 2:
        return jnp.dot(a, w, preferred_element_type=jnp.float32)
    spec = "...mk,...ekn->...emn" if a.ndim == w.ndim - 1 else "...emk,...ekn->...emn"
    return jnp.einsum(spec, a, w, preferred_element_type=jnp.float32)


def _add_bias(y: jax.Array, b: jax.Array) -> jax.Array:
    """``y [..., m, n]`` plus a bias ``[n]`` (one expert) or ``[..., E, n]`` (stacked: ``y`` is ``[..., E, m, n]``)."""
    return y + (b if b.ndim == 1 else b[..., None, :]).astype(jnp.float32)


def expert_ffn_math(x: jax.Array, mats: Sequence[jax.Array], activation: str,
                    matmul: Callable[[jax.Array, jax.Array], jax.Array] = expert_matmul,
                    input_matmuls: Callable[[jax.Array, Sequence[Any]], Sequence[jax.Array]] | None = None,
                    add_bias: Callable[[jax.Array, jax.Array], jax.Array] = _add_bias) -> jax.Array:
    """The expert FFN, the one formulation every implementation and analysis uses.

    ``act(x @ w_gate, x @ w_up) @ w_down`` (gated) or ``act(x @ w_up) @ w_down``:
    matmuls accumulate in f32, the activation runs in f32, the hidden state is
    cast to ``x.dtype`` before the down projection. Returns the f32 result;
    callers cast. ``mats`` are float matrices; ``matmul`` decides how rows meet
    experts: :func:`expert_matmul` (one expert, or every expert at once) by
    default, ``ragged_dot`` over groups in :func:`ffn_ragged`. ``input_matmuls(x,
    mats[:-1])``, if given, computes the input projections together (the native
    kernel does gate and up in one call). Biases trailing ``mats`` (see
    :func:`split_biases`) are added in f32 after each matmul by ``add_bias``
    (``ffn_ragged`` gathers each row's expert bias).
    """
    act = activation_fn(activation)
    mats, biases = split_biases(mats, activation)
    if input_matmuls is None:
        pre = [matmul(x, m) for m in mats[:-1]]
    else:
        pre = list(input_matmuls(x, mats[:-1]))
    if biases is not None:
        pre = [add_bias(p, b) for p, b in zip(pre, biases[:-1])]
    y = matmul(act(*pre).astype(x.dtype), mats[-1])
    return y if biases is None else add_bias(y, biases[-1])


def ffn_reference(grouped, group_sizes, weights, *, activation: str):
    """Meaning of the expert op: every expert on every row, masked by group.

    Costs E times the needed FLOPs; it is the specification, not a fast path.
    """
    dtype = grouped.dtype
    num_experts = group_sizes.shape[0]
    gid = row_groups(group_sizes, grouped.shape[0])
    mats = [materialize(w, dtype) for w in weights]
    out = jnp.zeros(grouped.shape, jnp.float32)
    for e in range(num_experts):
        y = expert_ffn_math(grouped, [m[e] for m in mats], activation)
        out = out + jnp.where((gid == e)[:, None], y, 0.0)
    return out.astype(dtype)


def ffn_ragged(grouped, group_sizes, weights, *, activation: str, ragged_dot: Callable = jax.lax.ragged_dot):
    """Sorted rows against stacked experts with ``jax.lax.ragged_dot`` (or another with its signature)."""
    dtype = grouped.dtype
    mats = [materialize(w, dtype) for w in weights]
    gs = group_sizes.astype(jnp.int32)

    def mm(a, w):
        return ragged_dot(a, w, gs, preferred_element_type=jnp.float32)

    def add_bias(y, b):  # each row gets its expert's bias; padding rows (group E) get zeros
        gid = row_groups(gs, grouped.shape[0])
        b_rows = jnp.concatenate([b.astype(jnp.float32), jnp.zeros((1, b.shape[-1]), jnp.float32)])
        return y + jnp.take(b_rows, gid, axis=0)

    return expert_ffn_math(grouped, mats, activation, matmul=mm, add_bias=add_bias).astype(dtype)


def _block_rows(n_rows: int, num_experts: int) -> int:
    """About half the mean group (a power of two in [8, 128]): padding adds at most ~half the rows."""
    return max(8, min(128, 1 << max(0, (n_rows // (2 * num_experts)).bit_length() - 1)))


def _num_blocks(n_rows: int, num_experts: int, block: int) -> int:
    """Blocks the most uneven routing of ``n_rows`` rows over ``num_experts`` needs (static)."""
    return -(-(n_rows + num_experts * (block - 1)) // block)


def ffn_blocks(grouped, group_sizes, weights, *, activation: str, block: int | None = None):
    """Sorted rows in blocks of ``block`` rows, each block one expert's, every block's weights gathered.

    Each group is padded to whole blocks, so the work is at most ``N + E * (block - 1)``
    rows of batched dots, and everything is plain, transposable JAX (gathers and
    dots): what :func:`ffn_ragged` computes, without the cost of ``ragged_dot`` on
    XLA:CPU, which expands to code many times slower than the dots (measured on
    the fine-grained bundled model's layer shapes, 8192 rows x 32 experts: 394 ms
    forward against 14 ms for the blocked implementation). The tangent of every
    implementation (``jax.grad`` through the expert op: ``distill``,
    ``recalibrate-router(target=logits)``).
    """
    dtype = grouped.dtype
    n_rows, d = grouped.shape
    num_experts = group_sizes.shape[0]
    if n_rows == 0:
        return grouped
    block = block or _block_rows(n_rows, num_experts)
    mats = [materialize(w, dtype) for w in weights]
    sizes = jnp.asarray(group_sizes, jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    padded = -(-sizes // block) * block
    padded_ends = jnp.cumsum(padded)
    padded_starts = padded_ends - padded
    num_blocks = _num_blocks(n_rows, num_experts, block)
    expert = jnp.searchsorted(padded_ends, jnp.arange(num_blocks, dtype=jnp.int32) * block, side="right")
    e = jnp.minimum(expert, num_experts - 1)  # blocks past every group: masked below
    offset = jnp.arange(num_blocks, dtype=jnp.int32)[:, None] * block + jnp.arange(block, dtype=jnp.int32)[None, :] \
        - padded_starts[e][:, None]
    valid = (expert < num_experts)[:, None] & (offset < sizes[e][:, None])
    src = jnp.clip(starts[e][:, None] + offset, 0, n_rows - 1)
    xb = jnp.where(valid[..., None], jnp.take(grouped, src.reshape(-1), axis=0).reshape(num_blocks, block, d),
                   jnp.zeros((), dtype))
    y = expert_ffn_math(xb, [jnp.take(m, e, axis=0) for m in mats], activation).reshape(num_blocks * block, d)
    gid = row_groups(sizes, n_rows)
    g = jnp.minimum(gid, num_experts - 1)
    out = jnp.take(y, padded_starts[g] + jnp.arange(n_rows, dtype=jnp.int32) - starts[g], axis=0)
    return jnp.where((gid < num_experts)[:, None], out, 0.0).astype(dtype)


# name -> implementation
_FFN_IMPLS: dict[str, Callable] = {"reference": ffn_reference, "ragged": ffn_ragged}
# name -> (activation base names it computes, whether it adds expert biases)
_FFN_CAPS: dict[str, tuple[tuple[str, ...], bool]] = {"reference": (ACTIVATIONS, True),
                                                      "ragged": (ACTIVATIONS, True)}


def register_ffn_impl(name: str, fn: Callable, *, activations: Sequence[str] = BASIC_ACTIVATIONS,
                      biases: bool = False) -> None:
    """Register an expert-FFN implementation selectable by the ``impl`` param.

    ``fn(grouped, group_sizes, weights, *, activation) -> out`` must compute
    exactly what :func:`ffn_reference` computes (rows past the groups are 0)
    for the activation base names in ``activations``, and with expert biases
    (trailing ``weights``, see :func:`split_biases`) if ``biases``. The op
    refuses other activations or biases with this impl (one-line
    :class:`DialectTypeError`), and ``select-impl`` does not pick it for them.
    """
    _FFN_IMPLS[name] = fn
    _FFN_CAPS[name] = (tuple(activations), bool(biases))


def ffn_impl_refusal(impl: str, activation: str, has_biases: bool) -> str | None:
    """Why ``impl`` cannot compute experts with ``activation`` (and biases); ``None`` if it can."""
    acts, biases = _FFN_CAPS.get(impl, (BASIC_ACTIVATIONS, False))
    base = parse_activation(activation)[0]
    can = sorted(n for n, (a, b) in _FFN_CAPS.items() if base in a and (b or not has_biases))
    if base not in acts:
        return f"impl {impl!r} does not compute activation {base!r}; use one of {can} (select-impl picks one)"
    if has_biases and not biases:
        return f"impl {impl!r} does not add expert biases; use one of {can} (select-impl picks one)"
    return None


def ffn_op_has_biases(params: dict[str, Any]) -> bool:
    """Whether a ``moe_expert_ffn`` equation (its params) carries expert biases."""
    n = len(jax.tree_util.treedef_children(params["weights_tree"]))
    return n == 2 * (3 if is_gated(params["activation"]) else 2)


def ffn_impls() -> tuple[str, ...]:
    """Names of the registered expert-FFN implementations."""
    return tuple(_FFN_IMPLS)


def _ffn_impl(impl: str) -> Callable:
    try:
        return _FFN_IMPLS[impl]
    except KeyError:
        raise ValueError(
            f"moe_expert_ffn: unknown impl {impl!r}; registered: {sorted(_FFN_IMPLS)} "
            "(kernels register theirs when their module is imported, e.g. moejax.pallas_kernels)"
        ) from None


def expert_ffn_apply(grouped, group_sizes, *leaves, activation, weights_tree, impl="reference",
                     weight_format="float", name=""):
    """Run the expert op's selected implementation on flattened weight leaves."""
    weights = jax.tree_util.tree_unflatten(weights_tree, leaves)
    return _ffn_impl(impl)(grouped, group_sizes, weights, activation=activation)


# --------------------------------------------------------------------------
# Primitive machinery shared by the four ops.
#
# The ops stay ops under JAX's transformations: each batching rule folds the
# vmapped axis into the token (or row) axis and binds the same op once, with
# the same params; each JVP rule binds the op for the primal output and takes
# the tangent from plain-JAX code computing the same function (so ``grad``
# can transpose it). Passes therefore see every ``moe_*`` op in vmapped and
# differentiated programs too.
# --------------------------------------------------------------------------
class DialectTypeError(TypeError):
    """An operand of a ``moe_*`` op has the wrong shape or dtype; the message names the op and layer."""


def _make_primitive(name: str, fn: Callable, abstract: Callable, multiple_results: bool, *,
                    batch_rule: Callable, tangent_fn: Callable) -> jcore.Primitive:
    """A primitive lowered from ``fn`` whose batching and JVP rules keep the op.

    ``fn`` is the implementation the op's params select (what XLA runs);
    ``tangent_fn`` is plain, transposable JAX computing the same function,
    whose JVP gives the op's tangents.
    """
    prim = jcore.Primitive(name)
    prim.multiple_results = multiple_results
    prim.def_impl(functools.partial(_eager_impl, prim))
    prim.def_abstract_eval(abstract)
    mlir.register_lowering(prim, mlir.lower_fun(fn, multiple_results=multiple_results))
    ad.primitive_jvps[prim] = functools.partial(_jvp_rebinding, prim, tangent_fn)
    batching.primitive_batchers[prim] = batch_rule
    prim.implementation = fn  # type: ignore[attr-defined]  # used to inline the op
    return prim


def _eager_impl(prim: jcore.Primitive, *args: Any, **params: Any) -> Any:
    return jax.jit(functools.partial(prim.bind, **params))(*args)


def _jvp_rebinding(prim: jcore.Primitive, tangent_fn: Callable, primals: Sequence[Any], tangents: Sequence[Any],
                   **params: Any) -> tuple[Any, Any]:
    """Primal: the op itself (so jvp/grad traces keep it). Tangent: the JVP of ``tangent_fn``.

    Under ``grad`` the primal part of ``jax.jvp(tangent_fn)`` only feeds
    residuals to the tangent; what it does not need is dead code under jit.
    """
    out = prim.bind(*primals, **params)
    tangents = [ad.instantiate_zeros(t) for t in tangents]  # float0 zeros for integer operands
    _, out_t = jax.jvp(functools.partial(tangent_fn, **params), tuple(primals), tuple(tangents))
    if not prim.multiple_results:
        return out, out_t
    # Integer outputs (ids, group sizes, order) get symbolic zero tangents.
    out_t = [ad.Zero(jax.typeof(o).to_tangent_aval()) if t.dtype == jax.dtypes.float0 else t
             for o, t in zip(out, out_t)]
    return out, out_t


# --- batching helpers ---------------------------------------------------------
def _unmapped(dim: Any) -> bool:
    return dim is None or type(dim).__name__ == "NotMapped"


def _batch_size(args: Sequence[Any], dims: Sequence[Any]) -> int:
    return next(a.shape[d] for a, d in zip(args, dims) if not _unmapped(d))


def _to_front(x: jax.Array, dim: Any, size: int) -> jax.Array:
    """``x`` with its batch axis first; an unbatched operand is broadcast to the batch."""
    if _unmapped(dim):
        return jnp.broadcast_to(x, (size, *jnp.shape(x)))
    return jnp.moveaxis(x, dim, 0)


def _check_example(abstract: Callable, args: Sequence[Any], dims: Sequence[Any], params: dict[str, Any]) -> None:
    """Type-check one example's operands, so errors under vmap show per-example shapes."""
    avals = [_sd(a.shape if _unmapped(d) else a.shape[:d] + a.shape[d + 1:], a.dtype) for a, d in zip(args, dims)]
    abstract(*avals, **params)


def _batch_by_map(prim: jcore.Primitive, args: Sequence[Any], dims: Sequence[Any], params: dict[str, Any]):
    """Fallback for batches that do not fold (e.g. per-example weights): one op per example in ``lax.map``.

    Slower than folding, but the op stays in the program (inside the map's scan).
    """
    batched = [i for i, d in enumerate(dims) if not _unmapped(d)]

    def one(example):
        full = list(args)
        for i, v in zip(batched, example):
            full[i] = v
        return prim.bind(*full, **params)

    out = jax.lax.map(one, [jnp.moveaxis(args[i], dims[i], 0) for i in batched])
    return out, ([0] * len(out) if prim.multiple_results else 0)


def _offsets(b: int, step: int, dtype: Any) -> jax.Array:
    """``[0, step, 2*step, ...]`` of length ``b``: the start of each example in a folded axis."""
    return jnp.arange(b, dtype=dtype) * step


def _sd(shape: Sequence[int], dtype: Any) -> jax.core.ShapedArray:
    return jax.core.ShapedArray(tuple(shape), jnp.dtype(dtype))


# --- type-checking helpers ------------------------------------------------------
def _fmt_shape(shape: Sequence[Any]) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


def _fmt(aval: Any) -> str:
    return f"{jnp.dtype(aval.dtype).name}{_fmt_shape(aval.shape)}"


def _is_int(aval: Any) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.integer)


def _type_error(op: str, name: str, msg: str) -> DialectTypeError:
    return DialectTypeError(f"{op}[{name}]: {msg}")


# --- moe_route --------------------------------------------------------------
def _route_abstract(x, w_router, *bias, routing: Routing, name: str = "", impl: str = "reference"):
    def fail(msg):
        raise _type_error("moe_route", name, msg)

    if x.ndim != 2 or w_router.ndim != 2 or x.shape[1] != w_router.shape[0]:
        fail(f"x {_fmt(x)} and router weight {_fmt(w_router)} must be [T,d] and [d,E]")
    if not (numerics.is_float(x) and numerics.is_float(w_router)):
        fail(f"x {_fmt(x)} and router weight {_fmt(w_router)} must be floating point")
    if len(bias) > 1:
        fail(f"takes at most one selection bias, got {len(bias)}")
    if bias and (bias[0].shape != (w_router.shape[1],) or not numerics.is_float(bias[0])):
        fail(f"selection bias {_fmt(bias[0])} must be float [E={w_router.shape[1]}]")
    if routing.score == "sparsemixer" and ((bias and not routing.bias_on_logits) or w_router.shape[1] < 2):
        fail(f"sparsemixer routing picks 2 of E >= 2 experts and takes no selection bias; got router weight "
             f"{_fmt(w_router)} and {len(bias)} selection bias operand(s)")
    t = x.shape[0]
    return [_sd((t, routing.slots), jnp.float32), _sd((t, routing.slots), jnp.int32)]


def _route_batch(args, dims, **params):
    """Routing is per token: a batch of token matrices is one taller matrix."""
    _check_example(_route_abstract, args, dims, params)
    if not all(_unmapped(d) for d in dims[1:]):  # per-example router weights
        return _batch_by_map(route_p, args, dims, params)
    x = jnp.moveaxis(args[0], dims[0], 0)
    b, t, d = x.shape
    w, ids = route_p.bind(x.reshape(b * t, d), *args[1:], **params)
    return [w.reshape(b, t, -1), ids.reshape(b, t, -1)], [0, 0]


def _route_impl(x, w_router, *bias, routing, name="", impl="reference"):
    if impl != "reference":
        fn = _ROUTE_IMPLS.get(impl)
        if fn is None:
            raise ValueError(f"moe_route: unknown impl {impl!r}; registered: {sorted(_ROUTE_IMPLS) + ['reference']}")
        return fn(x, w_router, *bias, routing=routing)
    return route_reference(x, w_router, *bias, routing=routing)


_ROUTE_IMPLS: dict[str, Callable] = {}


def register_route_impl(name: str, fn: Callable) -> None:
    """Register a router implementation (e.g. a fused Pallas kernel)."""
    _ROUTE_IMPLS[name] = fn


# Tangents follow the reference whatever the impl (kernels select the same experts).
route_p = _make_primitive("moe_route", _route_impl, _route_abstract, True,
                          batch_rule=_route_batch, tangent_fn=route_reference)


# --- moe_dispatch -----------------------------------------------------------
def _dispatch_abstract(x, ids, *, num_experts: int, name: str = ""):
    if x.ndim != 2 or ids.ndim != 2 or x.shape[0] != ids.shape[0]:
        raise _type_error("moe_dispatch", name, f"x {_fmt(x)} and ids {_fmt(ids)} must be [T,d] and [T,K]")
    if not _is_int(ids):
        raise _type_error("moe_dispatch", name, f"expert ids {_fmt(ids)} must have an integer dtype "
                          "(expert index, -1 for a dropped slot)")
    n = ids.shape[0] * ids.shape[1]
    return [_sd((n, x.shape[1]), x.dtype), _sd((num_experts,), jnp.int32), _sd((n,), jnp.int32)]


def _dispatch_batch(args, dims, *, num_experts: int, name: str = ""):
    """One dispatch over all ``B*T`` tokens that yields each example's dispatch exactly.

    Example ``b``'s expert ``e`` becomes expert ``b*(E+1)+e`` and its dropped
    slots expert ``b*(E+1)+E``, so the stable sort lays the examples out one
    after another, each a block of ``T*K`` rows in per-example order with its
    dropped slots last; the extra expert per example is cut from the group
    sizes. (Ids outside ``[-1, E)`` are invalid; here they count as dropped.)
    """
    _check_example(_dispatch_abstract, args, dims, dict(num_experts=num_experts, name=name))
    b = _batch_size(args, dims)
    x, ids = (_to_front(a, d, b) for a, d in zip(args, dims))
    _, t, d = x.shape
    k, e = ids.shape[2], num_experts
    local = jnp.where((ids < 0) | (ids >= e), e, ids).astype(jnp.int32)
    folded = local + _offsets(b, e + 1, jnp.int32)[:, None, None]
    grouped, sizes, order = dispatch_p.bind(x.reshape(b * t, d), folded.reshape(b * t, k),
                                            num_experts=b * (e + 1), name=name)
    sizes = sizes.reshape(b, e + 1)[:, :e]
    order = order.reshape(b, t * k) - _offsets(b, t * k, order.dtype)[:, None]
    return [grouped.reshape(b, t * k, d), sizes, order], [0, 0, 0]


dispatch_p = _make_primitive("moe_dispatch", dispatch_reference, _dispatch_abstract, True,
                             batch_rule=_dispatch_batch, tangent_fn=dispatch_reference)


# --- moe_expert_ffn -----------------------------------------------------------
def _logical_shape(w: Any) -> tuple[int, ...] | None:
    """Logical shape of a weight rebuilt from avals (plain or structured), or None if unknown."""
    try:
        return tuple(int(s) for s in w.shape)
    except Exception:  # noqa: BLE001 - a format whose shape needs values: skip its check
        return None


def _check_expert_weights(grouped, group_sizes, leaves, activation: str, weights_tree: Any, name: str) -> None:
    """Each weight's logical shape against the rows ``[N,d]`` and the ``E`` group sizes."""
    try:
        weights = tuple(jax.tree_util.tree_unflatten(weights_tree, leaves))
    except Exception:  # noqa: BLE001 - a pytree that cannot hold avals: nothing to check
        return
    names = ("w_gate", "w_up", "w_down") if is_gated(activation) else ("w_up", "w_down")
    if len(weights) not in (len(names), 2 * len(names)):
        raise _type_error("moe_expert_ffn", name, f"activation {activation!r} takes {len(names)} weights "
                          f"({', '.join(names)}), optionally followed by as many biases, got {len(weights)}")
    weights, biases = weights[:len(names)], weights[len(names):]
    n, d = grouped.shape
    e = group_sizes.shape[0]
    shapes = dict(zip(names, map(_logical_shape, weights)))
    # The hidden width f comes from the first input projection whose shape is known.
    f = next((s[2] for nm, s in shapes.items() if nm != "w_down" and s is not None and len(s) == 3), None)
    f_txt = "f" if f is None else f"f={f}"
    layout = ", ".join(f"{nm} {'[E,f,d]' if nm == 'w_down' else '[E,d,f]'}" for nm in names)
    for nm, s in shapes.items():
        if s is None:
            continue
        if nm == "w_down":
            want, want_txt = (e, f, d), f"[E={e},{f_txt},d={d}]"
        else:
            want, want_txt = (e, d, f), f"[E={e},d={d},{f_txt}]"
        if len(s) != 3 or any(w is not None and w != got for w, got in zip(want, s)):
            raise _type_error(
                "moe_expert_ffn", name,
                f"{nm} has shape {_fmt_shape(s)} but the rows are [N={n},d={d}] and there are E={e} group sizes; "
                f"expected {nm} {want_txt} ({activation} experts take {layout})")
    for nm, b in zip(names, biases):  # each bias: [E, the width of its matrix's output]
        s, out = _logical_shape(b), {"w_down": d}.get(nm, f)
        if s is not None and (len(s) != 2 or s[0] != e or (out is not None and s[1] != out)):
            raise _type_error("moe_expert_ffn", name, f"bias of {nm} has shape {_fmt_shape(s)}; expected "
                              f"[E={e},{'f' if out is None else out}] (one bias per expert and output unit)")


def _ffn_abstract(grouped, group_sizes, *leaves, activation, weights_tree, impl="reference",
                  weight_format="float", name=""):
    def fail(msg):
        raise _type_error("moe_expert_ffn", name, msg)

    try:
        parse_activation(activation)
    except ValueError as e:
        fail(str(e))
    if grouped.ndim != 2 or group_sizes.ndim != 1:
        fail(f"grouped {_fmt(grouped)} must be [N,d], group sizes {_fmt(group_sizes)} [E]")
    if not numerics.is_float(grouped):
        fail(f"grouped rows {_fmt(grouped)} must be floating point")
    if not _is_int(group_sizes):
        fail(f"group sizes {_fmt(group_sizes)} must have an integer dtype")
    _check_expert_weights(grouped, group_sizes, leaves, activation, weights_tree, name)
    refusal = impl in _FFN_IMPLS and ffn_impl_refusal(
        impl, activation, ffn_op_has_biases(dict(weights_tree=weights_tree, activation=activation)))
    if refusal:
        fail(refusal)
    return _sd(grouped.shape, grouped.dtype)


def _ffn_batch(args, dims, **params):
    """Rows of all examples in one op call: sort them by expert, run, un-sort.

    A stable sort of the ``B*N`` rows by group (padding rows last) turns the
    batch into one grouped matrix whose group sizes are the per-expert totals;
    padding rows then fall past the groups, so they come out zero as per
    example. Per-example weights do not fold and take :func:`_batch_by_map`.
    """
    _check_example(_ffn_abstract, args, dims, params)
    if not all(_unmapped(d) for d in dims[2:]):
        return _batch_by_map(expert_ffn_p, args, dims, params)
    b = _batch_size(args[:2], dims[:2])
    rows, sizes = (_to_front(a, d, b) for a, d in zip(args[:2], dims[:2]))
    _, n, d = rows.shape
    e = sizes.shape[1]
    group = jax.vmap(row_groups, in_axes=(0, None))(sizes, n).reshape(b * n)  # e == E: padding
    perm = jnp.argsort(group, stable=True)
    # Counted from the rows (not summed sizes) so sizes overrunning N behave as per example.
    totals = jnp.zeros((e,), sizes.dtype).at[group].add(1, mode="drop")
    out = expert_ffn_p.bind(jnp.take(rows.reshape(b * n, d), perm, axis=0), totals, *args[2:], **params)
    out = jnp.zeros_like(out).at[perm].set(out)
    return out.reshape(b, n, d), 0


_MAX_GATHERED_BYTES = 1 << 30  # per expert op: above it the tangent takes ragged_dot (slow on CPU, no copies)


def _ffn_tangent(grouped, group_sizes, *leaves, activation, weights_tree, impl="reference",
                 weight_format="float", name=""):
    """Tangents of every impl: plain JAX like ``ffn_reference`` without its E-fold cost.

    ``ffn_blocks`` on CPU while its gathered weights stay small; ``ffn_ragged``
    elsewhere: GPUs and TPUs run ``ragged_dot`` as a grouped matmul, and the blocks'
    gathered copies (one expert's weights per block) grow with the experts' size.
    """
    weights = jax.tree_util.tree_unflatten(weights_tree, leaves)
    n_rows, num_experts = grouped.shape[0], group_sizes.shape[0]
    expert_bytes = sum(math.prod(w.shape[1:]) * 4 for w in weights)  # what one block gathers (f32 at most)
    gathered = _num_blocks(n_rows, num_experts, _block_rows(n_rows, num_experts)) * expert_bytes
    if jax.default_backend() == "cpu" and gathered <= _MAX_GATHERED_BYTES:
        return ffn_blocks(grouped, group_sizes, weights, activation=activation)
    return ffn_ragged(grouped, group_sizes, weights, activation=activation)


expert_ffn_p = _make_primitive("moe_expert_ffn", expert_ffn_apply, _ffn_abstract, False,
                               batch_rule=_ffn_batch, tangent_fn=_ffn_tangent)


# --- moe_combine --------------------------------------------------------------
def _combine_abstract(out, order, weights, *, name: str = ""):
    def fail(msg):
        raise _type_error("moe_combine", name, msg)

    if out.ndim != 2 or order.ndim != 1 or weights.ndim != 2:
        fail(f"out {_fmt(out)}, order {_fmt(order)} and weights {_fmt(weights)} must be [N,d], [N] and [T,K]")
    t, k = weights.shape
    if out.shape[0] != order.shape[0] or order.shape[0] != t * k:
        fail(f"out {_fmt(out)} and order {_fmt(order)} must have N = T*K = {t * k} rows "
             f"for combine weights {_fmt(weights)}")
    if not _is_int(order):
        fail(f"order {_fmt(order)} must have an integer dtype")
    if not (numerics.is_float(out) and numerics.is_float(weights)):
        fail(f"out {_fmt(out)} and combine weights {_fmt(weights)} must be floating point")
    return _sd((t, out.shape[1]), out.dtype)


def _combine_batch(args, dims, *, name: str = ""):
    """One combine over ``B*T`` tokens: example ``b``'s rows point at its slots, offset by ``b*T*K``."""
    _check_example(_combine_abstract, args, dims, dict(name=name))
    b = _batch_size(args, dims)
    out, order, weights = (_to_front(a, d, b) for a, d in zip(args, dims))
    _, n, d = out.shape  # n == T*K, checked above
    t, k = weights.shape[1:]
    order = order + _offsets(b, n, order.dtype)[:, None]
    y = combine_p.bind(out.reshape(b * n, d), order.reshape(b * n), weights.reshape(b * t, k), name=name)
    return y.reshape(b, t, d), 0


combine_p = _make_primitive("moe_combine", combine_reference, _combine_abstract, False,
                            batch_rule=_combine_batch, tangent_fn=combine_reference)

DIALECT_PRIMITIVES = (route_p, dispatch_p, expert_ffn_p, combine_p)
_DIALECT_NAMES = frozenset(p.name for p in DIALECT_PRIMITIVES)


def is_dialect_primitive(prim: Any) -> bool:
    """True for the ``moe_*`` primitives of this dialect."""
    return getattr(prim, "name", None) in _DIALECT_NAMES


# --------------------------------------------------------------------------
# Public, typed entry points used by model layers.
# --------------------------------------------------------------------------
def moe_route(x: jax.Array, w_router: jax.Array, selection_bias: jax.Array | None = None, *,
              routing: Routing, name: str = "") -> tuple[jax.Array, jax.Array]:
    """Select experts: returns (combine weights [T,K] f32, expert ids [T,K] int32)."""
    args = (x, w_router) if selection_bias is None else (x, w_router, selection_bias)
    w, ids = route_p.bind(*args, routing=routing, name=name, impl="reference")
    return w, ids


def moe_dispatch(x: jax.Array, ids: jax.Array, *, num_experts: int, name: str = ""):
    """Group token rows by expert: (grouped [T*K,d], group sizes [E], order [T*K])."""
    grouped, sizes, order = dispatch_p.bind(x, ids, num_experts=int(num_experts), name=name)
    return grouped, sizes, order


def weight_format_of(weights: Sequence[Any]) -> str:
    """Human-readable storage format of expert weights (``float``, ``int8``, ``int4-g64/per-expert`` ...)."""
    def one(w: Any) -> str:
        fmt = weight_formats.format_of(w)
        layout = w.layout if weight_formats.is_structured(w) else "stacked"
        return fmt if layout == "stacked" else f"{fmt}/{layout}"

    fmts = {one(w) for w in weights}
    return fmts.pop() if len(fmts) == 1 else "+".join(sorted(fmts))


def moe_expert_ffn(grouped: jax.Array, group_sizes: jax.Array, weights: Sequence[Any], *,
                   activation: str = "swiglu", impl: str = "reference", name: str = "") -> jax.Array:
    """Apply expert ``e`` to the rows of group ``e``.

    ``weights`` is ``(w_gate [E,d,f], w_up [E,d,f], w_down [E,f,d])`` for gated
    activations or ``(w_up, w_down)`` otherwise; any of them may be a quantized
    tensor (a pytree with ``dequantize(dtype)`` and ``format``). Expert biases,
    if any, follow as float ``(b_gate [E,f], b_up [E,f], b_down [E,d])``.
    """
    try:
        mats, _ = split_biases(weights, activation)
    except ValueError as e:
        raise ValueError(f"moe_expert_ffn[{name}]: {e}") from None
    leaves, tree = jax.tree_util.tree_flatten(tuple(weights))
    return expert_ffn_p.bind(grouped, group_sizes, *leaves, activation=activation, weights_tree=tree,
                             impl=impl, weight_format=weight_format_of(mats), name=name)


def moe_combine(out: jax.Array, order: jax.Array, weights: jax.Array, *, name: str = "") -> jax.Array:
    """Weighted sum of each token's expert outputs: y [T,d]."""
    return combine_p.bind(out, order, weights, name=name)


def sparse_moe(x: jax.Array, w_router: jax.Array, expert_weights: Sequence[Any], *, routing: Routing,
               activation: str = "swiglu", selection_bias: jax.Array | None = None,
               name: str = "") -> jax.Array:
    """A routed-experts block on tokens ``x [..., d]`` written with the four ops."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    num_experts = routing.num_selected_experts(w_router.shape[1])
    w, ids = moe_route(x2, w_router, selection_bias, routing=routing, name=name)
    if routing.weight_on == "input":
        y = _input_weighted_experts(x2, w, ids, expert_weights, num_experts=num_experts, activation=activation,
                                    name=name)
        return y.reshape(*lead, x.shape[-1])
    grouped, sizes, order = moe_dispatch(x2, ids, num_experts=num_experts, name=name)
    out = moe_expert_ffn(grouped, sizes, expert_weights, activation=activation, name=name)
    return moe_combine(out, order, w, name=name).reshape(*lead, x.shape[-1])


def _input_weighted_experts(x2: jax.Array, w: jax.Array, ids: jax.Array, expert_weights: Sequence[Any], *,
                            num_experts: int, activation: str, name: str) -> jax.Array:
    """``sum_j E_j(w_j x)`` (``Routing.weight_on="input"``, Llama 4) with the dialect's ops.

    Each slot's copy of a token, scaled by its weight, is one row of an ordinary
    one-slot layer: dispatch, the expert op and a combine with unit weights (0 for
    dropped slots). So expert-op implementations, quantisation and expert
    parallelism, which see only those ops, stay exact without knowing about it.
    With one slot (Llama 4 as released) the route's ids feed dispatch directly.
    """
    t, k = ids.shape
    scaled = x2.astype(jnp.float32)[:, None, :] * w[:, :, None]  # [T, K, d]
    rows = scaled.astype(x2.dtype).reshape(t * k, x2.shape[-1])
    slot_ids = ids if k == 1 else ids.reshape(t * k, 1)
    grouped, sizes, order = moe_dispatch(rows, slot_ids, num_experts=num_experts, name=name)
    out = moe_expert_ffn(grouped, sizes, expert_weights, activation=activation, name=name)
    y = moe_combine(out, order, (slot_ids >= 0).astype(jnp.float32), name=name)
    if k == 1:
        return y
    return y.astype(jnp.float32).reshape(t, k, -1).sum(1).astype(x2.dtype)


def einsum_moe_reference(x, w_router, expert_weights, *, routing: Routing, activation="swiglu",
                         selection_bias=None):
    """A dialect-free MoE (every expert on every token, dense combine) for tests."""
    x2 = x.reshape(-1, x.shape[-1])
    w, ids = route_reference(x2, w_router, *(() if selection_bias is None else (selection_bias,)),
                             routing=routing)
    n_exp = routing.num_selected_experts(w_router.shape[1])
    dense_w = jnp.zeros((x2.shape[0], n_exp), jnp.float32)
    dense_w = dense_w.at[jnp.arange(x2.shape[0])[:, None], jnp.maximum(ids, 0)].add(jnp.where(ids >= 0, w, 0.0))
    mats = [materialize(m, x.dtype) for m in expert_weights]
    if routing.weight_on == "input":  # expert e on each token scaled by its weight (0: not selected)
        xs = (dense_w.T[:, :, None] * x2.astype(jnp.float32)[None]).astype(x.dtype)  # [E, T, d]
        y = expert_ffn_math(xs, mats, activation)
        out = jnp.where((dense_w.T > 0)[:, :, None], y, 0.0).sum(0)
        return out.astype(x.dtype).reshape(x.shape)
    y = expert_ffn_math(x2, mats, activation)  # [E, T, d]: every expert on every token
    out = jnp.einsum("etd,te->td", y, dense_w)
    return out.astype(x.dtype).reshape(x.shape)
