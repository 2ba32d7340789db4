"""Fused router kernel: logits, softmax/sigmoid scores, selection bias,
group-limited selection, top-k and renormalisation in one Pallas kernel.

Matches :func:`moejax.dialect.route_reference` for ``gating="topk"`` (ties go to
the lower expert index, as ``jax.lax.top_k``); other gating modes fall back to
the reference in :func:`route_pallas`. Selection uses only max/min reductions
and selects, which both Mosaic and Triton lower.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moejax.pallas_kernels.tile_math import sigmoid
from moejax.pallas_kernels.tiling import resolve_backend

__all__ = ["fused_route", "route_pallas"]

_NEG = -jnp.inf


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _select_topk(logits, bias, *, num_experts, k, score, n_group, topk_group, group_score, norm, scale, kp,
                 norm_min=1e-20):
    """Scores and top-k on an f32 ``[tt, Ep]`` logits tile; returns ([tt, kp] f32, [tt, kp] i32)."""
    tt, ep = logits.shape
    col = jax.lax.broadcasted_iota(jnp.int32, (tt, ep), 1)
    valid = col < num_experts
    if score == "softmax":
        masked = jnp.where(valid, logits, _NEG)
        e = jnp.exp(masked - jnp.max(masked, axis=-1, keepdims=True))
        probs = e / jnp.sum(e, axis=-1, keepdims=True)
    else:
        probs = jnp.where(valid, sigmoid(logits), 0.0)
    sel = probs + bias if bias is not None else probs
    sel = jnp.where(valid, sel, _NEG)
    if n_group > 1:
        gsize = num_experts // n_group
        gcol = jax.lax.div(col, jnp.int32(gsize))  # floor_divide lowers via sign, which Mosaic ties to a live TPU
        gscores = []
        for gi in range(n_group):
            in_g = gcol == gi
            vals = jnp.where(in_g, sel, _NEG)
            best = jnp.max(vals, axis=-1, keepdims=True)
            if group_score == "top2_sum":
                first = jnp.min(jnp.where(in_g & (vals == best), col, ep), axis=-1, keepdims=True)
                second = jnp.max(jnp.where(col == first, _NEG, vals), axis=-1, keepdims=True)
                best = best + second
            gscores.append(best)
        emask = jnp.zeros((tt, ep), jnp.bool_)
        for gi in range(n_group):
            # Rank of group gi (ties to the lower index, as lax.top_k).
            rank = jnp.zeros((tt, 1), jnp.int32)
            for gj in range(n_group):
                if gj == gi:
                    continue
                better = (gscores[gj] > gscores[gi]) if gj > gi else (gscores[gj] >= gscores[gi])
                rank = rank + better.astype(jnp.int32)
            emask = emask | ((gcol == gi) & (rank < topk_group))
        sel = jnp.where(emask, sel, _NEG)
    kcol = jax.lax.broadcasted_iota(jnp.int32, (tt, kp), 1)
    weights = jnp.zeros((tt, kp), jnp.float32)
    ids = jnp.zeros((tt, kp), jnp.int32)
    taken = ~valid
    for j in range(k):
        cand = jnp.where(taken, _NEG, sel)
        best = jnp.max(cand, axis=-1, keepdims=True)
        idx = jnp.min(jnp.where((~taken) & (cand == best), col, ep), axis=-1, keepdims=True)
        hit = col == idx
        w = jnp.sum(jnp.where(hit, probs, 0.0), axis=-1, keepdims=True)
        taken = taken | hit
        weights = jnp.where(kcol == j, w, weights)
        ids = jnp.where(kcol == j, idx, ids)
    if norm:
        weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), norm_min)
    return weights * scale, ids


def fused_route(x: jax.Array, w_router: jax.Array, bias: jax.Array | None = None, *, k: int,
                score: str = "softmax", n_group: int = 1, topk_group: int = 1, group_score: str = "max",
                norm_topk: bool = True, scale: float = 1.0, backend: str | None = None,
                interpret: bool | None = None, block_tokens: int | None = None,
                norm_min: float = 1e-20) -> tuple[jax.Array, jax.Array]:
    """Top-k routing of ``x [T, d]`` with ``w_router [d, E]``: (weights [T, k] f32, ids [T, k] i32).

    ``k`` must be at most ``E``. ``backend``/``interpret`` as for ``gmm``
    (``None`` for both: chosen per platform when lowering).
    """
    if x.ndim != 2 or w_router.ndim != 2 or x.shape[1] != w_router.shape[0]:
        raise ValueError(f"fused_route: x {x.shape} and w_router {w_router.shape} must be [T, d] and [d, E]")
    t, d = x.shape
    e = w_router.shape[1]
    if not 1 <= k <= e:
        raise ValueError(f"fused_route: k={k} must lie in [1, E={e}]")
    if n_group > 1 and (e % n_group or not 1 <= topk_group <= n_group):
        raise ValueError(f"fused_route: {e} experts do not split into n_group={n_group} groups "
                         f"with topk_group={topk_group}")
    if bias is not None and bias.shape != (e,):
        raise ValueError(f"fused_route: selection bias must be [E={e}], got {bias.shape}")
    if score not in ("softmax", "sigmoid"):  # sparsemixer has no fused kernel (route_pallas falls back)
        raise ValueError(f"fused_route: score {score!r} has no fused kernel; supported: softmax, sigmoid")
    cfg = dict(k=k, score=score, n_group=n_group, topk_group=topk_group, group_score=group_score,
               norm=norm_topk, scale=float(scale), norm_min=float(norm_min))

    def call(driver: str, interp: bool):
        return _route_call(x, w_router, bias, cfg, driver=driver, interpret=interp, block_tokens=block_tokens)

    if backend is None and interpret is None:
        return jax.lax.platform_dependent(
            tpu=lambda: call("mosaic", False), cuda=lambda: call("triton", False),
            rocm=lambda: call("triton", False), default=lambda: call("mosaic", True))
    return call(*resolve_backend(backend, interpret))


def _route_call(x, w_router, bias, cfg, *, driver, interpret, block_tokens):
    t, d = x.shape
    e = w_router.shape[1]
    k = cfg["k"]
    triton = driver == "triton"
    # Triton blocks are powers of two (>= 16 for dot operands); Mosaic takes full dims.
    ep = max(16, _next_pow2(e)) if triton else e
    kp = max(2, _next_pow2(k))
    tt = block_tokens or (min(32, max(16, _next_pow2(t))) if triton else min(256, -(-t // 8) * 8))
    td = min(128, max(16, _next_pow2(d))) if triton else d
    tp = -(-t // tt) * tt
    dp = -(-d // td) * td
    x = jnp.pad(x, ((0, tp - t), (0, dp - d)))
    w = jnp.pad(w_router, ((0, dp - d), (0, ep - e)))
    has_bias = bias is not None
    b = jnp.pad(bias.astype(jnp.float32), (0, ep - e)).reshape(1, ep) if has_bias else None
    chunks = dp // td

    def kernel(*refs):
        x_ref, w_ref = refs[0], refs[1]
        b_ref = refs[2] if has_bias else None
        wo_ref, io_ref = refs[-2], refs[-1]

        def chunk(c, acc):
            xs = x_ref[:, pl.ds(c * td, td)].astype(jnp.float32)
            ws = w_ref[pl.ds(c * td, td), :].astype(jnp.float32)
            return acc + jnp.dot(xs, ws, preferred_element_type=jnp.float32)

        logits = jnp.zeros((tt, ep), jnp.float32)
        if chunks == 1:
            logits = chunk(0, logits)
        else:
            logits = jax.lax.fori_loop(0, chunks, chunk, logits)
        weights, ids = _select_topk(logits, b_ref[...] if has_bias else None, num_experts=e, kp=kp, **cfg)
        wo_ref[...] = weights
        io_ref[...] = ids

    in_specs = [pl.BlockSpec((tt, dp), lambda i: (i, 0)), pl.BlockSpec((dp, ep), lambda i: (0, 0))]
    args = [x, w]
    if has_bias:
        in_specs.append(pl.BlockSpec((1, ep), lambda i: (0, 0)))
        args.append(b)
    if triton:
        from jax.experimental.pallas import triton as pltriton
        params = pltriton.CompilerParams(num_warps=4, num_stages=1)
    else:
        from jax.experimental.pallas import tpu as pltpu
        params = pltpu.CompilerParams(dimension_semantics=("parallel",))
    wts, ids = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((tp, kp), jnp.float32), jax.ShapeDtypeStruct((tp, kp), jnp.int32)),
        grid=(tp // tt,),
        in_specs=in_specs,
        out_specs=(pl.BlockSpec((tt, kp), lambda i: (i, 0)), pl.BlockSpec((tt, kp), lambda i: (i, 0))),
        compiler_params=params,
        interpret=interpret,
        name="moejax_fused_route",
    )(*args)
    return wts[:t, :k], ids[:t, :k]


def route_pallas(x: jax.Array, w_router: jax.Array, *bias: jax.Array, routing: Any) -> tuple[jax.Array, jax.Array]:
    """The ``"pallas"`` ``moe_route`` implementation (same contract as ``route_reference``).

    The fused kernel handles ``gating="topk"`` with softmax or sigmoid scores;
    other gating modes and scores (``"sparsemixer"``, PhiMoE), and a router bias
    on the logits (``bias_on_logits``, gpt-oss; the kernel adds its bias to the
    selection scores only), and selection over distinct merged experts
    (``distinct_merged``), use the reference.
    ``expert_map`` (merged experts) and ``k > E`` padding are applied to the
    kernel's output exactly as the reference does.
    """
    from moejax import dialect

    r = routing
    if r.gating != "topk" or r.score not in ("softmax", "sigmoid") or r.bias_on_logits or r.distinct_merged:
        return dialect.route_reference(x, w_router, *bias, routing=r)
    e = w_router.shape[1]
    kk = min(r.slots, e)
    w, ids = fused_route(x, w_router, bias[0] if bias else None, k=kk, score=r.score, n_group=r.n_group,
                         topk_group=r.topk_group, group_score=r.group_score, norm_topk=r.norm_topk, scale=r.scale,
                         norm_min=r.norm_min)
    if r.expert_map is not None:
        ids, w = dialect._apply_expert_map(ids, w, r.expert_map)
    if kk < r.slots:
        pad = r.slots - kk
        ids = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        w = jnp.pad(w, ((0, 0), (0, pad)))
    return w.astype(jnp.float32), ids.astype(jnp.int32)
