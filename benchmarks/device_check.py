"""Accelerator check in one command: Pallas kernel correctness, grouped-matmul speed, end to end.

    python benchmarks/device_check.py [--out benchmarks/results/device_check.json] [--budget-s 420]

On a GPU (Triton) or TPU (Mosaic) it runs, within ``--budget-s`` seconds of
measurement (default 420 s, so the whole run stays under 8 minutes):

(a) ``correctness``: every Pallas kernel moejax ships -- ``gmm`` (float32,
    bfloat16, ragged dims, fused epilogue, ``group_offset``, int8, int4
    symmetric and asymmetric, its custom VJP), ``gmm_gated`` (SwiGLU/GeGLU,
    float and int4), ``ffn_pallas`` (the ``"pallas"`` expert op, float and
    int8 weights) and ``fused_route`` (softmax top-k; sigmoid with selection
    bias and group-limited top-k) -- compiled, not interpreted. Each is
    compared with ``jax.lax.ragged_dot`` (``route_reference`` for the router)
    and with a NumPy float64 reference. Errors are ``max |got - ref|`` and
    ``max |got - ref| / max |ref|`` (``rel``); a case passes when both relative
    errors are within the threshold of its compute dtype (``THRESHOLDS``) and
    rows outside every group are exactly zero. With tokamax installed, the
    ``impl="tokamax"`` expert op (:mod:`moejax.tokamax_ffn`) is checked against
    ``ffn_reference`` the same way.
(b) ``gmm_speed``: the grouped matmul ``[T*k, d] x [E, d, f]`` (the up
    projection) for Mixtral-shaped (d=4096, f=14336, E=8, k=2) and
    DeepSeek-V3-shaped (d=7168, f=2048, E=256, k=8; and the same with E=64)
    layers at decode (T=1, 8, 64) and prefill (T=2048, 8192) token counts, with
    bf16, int8 and int4 weights. Contenders, timed interleaved in one run per
    row: ``pallas`` (moejax ``gmm``), ``ragged_dot`` (``jax.lax.ragged_dot``;
    for int8/int4 weights XLA dequantizes first, as ``impl=ragged`` does),
    ``tokamax`` (``tokamax.ragged_dot``; int8/int4 as qwix ``QArray``s of the
    same bits and group size), ``megablox`` (TPU only, bf16) and ``dense`` (one
    bf16 ``[T*k, d] x [d, f]`` matmul: the same FLOPs without the grouping).
    Rows run most important first (bf16 prefill, then decode, then the rest)
    so that a short budget still measures the goal rows.
(c) ``end_to_end``: a Mixtral-8x7B-shaped model (full width, ``--e2e-layers``
    layers, random bf16 weights) through ``moejax.optimize`` with
    ``select-impl(impl=ragged)`` (the XLA baseline), ``select-impl`` (auto:
    Pallas on GPU/TPU), ``quantize(bits=4,group_size=128),select-impl`` and,
    with tokamax, ``select-impl(impl=tokamax)``: prefill and greedy-decode
    timings, and each pipeline's logit deviation from the model as traced.

Every row names its contender, weight format / dtype, shape and T. Timings
are medians of at least 3 rounds; in a round every contender runs once (the
ratios ``x_dense``, ``x_ragged_dot``, ``x_tokamax`` -- baseline median over
the contender's, > 1 is faster -- come from the same rounds). Calls shorter
than a few milliseconds are repeated back to back within one sample
(``calls_per_sample``) so that dispatch overhead does not dominate.

On CPU (or with ``--smoke``) the kernels run in the Pallas interpreter on tiny
shapes: the same code paths end to end as a CI smoke test; its timings say
nothing about kernel speed and the goal is not evaluated.

The JSON (``--out``) holds ``machine`` (:func:`common.machine_info`), the jax
version, backend, device kind and count, the date, the mode (smoke, interpret,
Pallas driver), which optional contenders were available (with the reason when
not), and ``sections``: ``correctness``, ``gmm_speed`` (rows plus the ``goal``
check: Pallas bf16 at the largest prefill T >= 0.85x dense and >= 1.0x
tokamax), ``end_to_end``. Every section has a ``status`` (``ok``, ``failed``,
``partial`` (budget), ``skipped`` or ``error``) and, unless ``ok``, a
``reason``. The file is rewritten after each section, so a run cut short keeps
what it measured. Exit code 1 when a section failed (a correctness case
outside its threshold, an end-to-end pipeline that did not run) or raised; a
speed contender that fails on a shape is recorded in its row, not fatal.

Running it on an accelerator: install moejax next to the JAX build for the
device (JAX's CUDA or TPU wheels), optionally ``pip install tokamax`` for the
tokamax contender and ``impl=tokamax``, then run the command above from the
repository root; nothing else is needed (no flags, weights or data).
``--sections correctness`` runs the kernel check alone; ``--smoke`` runs the
CPU-sized check on any backend.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, time_interleaved, write_json  # noqa: E402

import moejax  # noqa: E402
from moejax import dialect, tokamax_ffn, weight_formats  # noqa: E402
from moejax.pallas_kernels import ffn_pallas, fused_route, gmm, gmm_gated, quantize  # noqa: E402
from moejax.pallas_kernels.tiling import resolve_backend  # noqa: E402

DEFAULT_OUT = "benchmarks/results/device_check.json"
DEFAULT_BUDGET_S = 420.0
SECTIONS = ("correctness", "speed", "e2e")

# Correctness thresholds on rel = max|got - ref| / max|ref|, by compute dtype. Compiled f32 matmuls may use
# reduced-precision passes (JAX's default precision: TF32 on NVIDIA GPUs, bf16 passes on TPU), hence 1e-2;
# the interpreter on CPU computes f32 in f32. bf16 rounds outputs (and hidden states) to 8 bits of mantissa.
THRESHOLDS = {("float32", True): 1e-5, ("float32", False): 1e-2, ("bfloat16", True): 2e-2,
              ("bfloat16", False): 2e-2}
# Router: expert choices whose float64 scores are closer than this are near-ties either answer may take.
TIE_MARGIN = {True: 1e-6, False: 1e-3}

GOAL_X_DENSE = 0.85
GOAL_X_TOKAMAX = 1.0


# --------------------------------------------------------------------------
# Run-wide facts: platform, mode, optional contenders, deadline.
# --------------------------------------------------------------------------
@dataclasses.dataclass
class Env:
    platform: str
    device_kind: str
    smoke: bool
    interpret: bool
    driver: str
    budget_s: float
    start: float
    tokamax: Any = None
    tokamax_reason: str | None = None
    tokamax_version: str | None = None
    megablox_gmm: Callable | None = None
    megablox_reason: str | None = None

    @property
    def mode(self) -> str:
        return "interpret" if self.interpret else "compiled"

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}".rstrip(": ")


def make_env(smoke: bool, budget_s: float) -> Env:
    platform = jax.default_backend()
    smoke = smoke or platform == "cpu"
    interpret = smoke  # --smoke: the interpreter everywhere (tiny shapes); otherwise compiled kernels
    driver, _ = resolve_backend(None, interpret)
    env = Env(platform=platform, device_kind=str(jax.devices()[0].device_kind), smoke=smoke, interpret=interpret,
              driver=driver, budget_s=budget_s, start=time.perf_counter())
    if tokamax_ffn.AVAILABLE:
        try:
            env.tokamax = tokamax_ffn.load_tokamax()  # also keeps tokamax from parsing this script's flags
            env.tokamax_version = str(getattr(env.tokamax, "__version__", "unknown"))
        except Exception as e:  # installed but broken: a contender we cannot run, not a crash
            env.tokamax_reason = f"tokamax does not import: {_one_line(e)}"
    else:
        env.tokamax_reason = "tokamax not installed"
    if platform != "tpu":
        env.megablox_reason = "megablox gmm needs TPU"
    else:
        try:
            from jax.experimental.pallas.ops.tpu.megablox import gmm as megablox_gmm
            env.megablox_gmm = megablox_gmm
        except Exception as e:
            env.megablox_reason = f"megablox does not import: {_one_line(e)}"
    return env


# --------------------------------------------------------------------------
# Float64 references (NumPy).
# --------------------------------------------------------------------------
_erf = np.vectorize(math.erf, otypes=[np.float64])


def _silu64(x: np.ndarray) -> np.ndarray:
    return x * 0.5 * (1.0 + np.tanh(0.5 * x))  # x * sigmoid(x) without overflow


def _gelu64(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


ACT64: dict[str, Callable[..., np.ndarray]] = {
    "none": lambda x: x, "silu": _silu64, "gelu": _gelu64, "relu": lambda x: np.maximum(x, 0.0),
    "swiglu": lambda g, u: _silu64(g) * u, "geglu": lambda g, u: _gelu64(g) * u,
}


def _f64(x: Any) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)  # bf16 -> f32 -> f64 is exact


def _offsets(sizes: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def gmm64(lhs: np.ndarray, rhs: Sequence[np.ndarray], sizes: Sequence[int], epilogue: str = "none",
          group_offset: int = 0) -> np.ndarray:
    """``epilogue(lhs_g @ rhs_1[g], ...)`` per local group in float64; other rows zero."""
    offs = _offsets(sizes)
    out = np.zeros((lhs.shape[0], rhs[0].shape[2]))
    for j in range(rhs[0].shape[0]):
        g = group_offset + j
        rows = slice(offs[g], offs[g + 1])
        out[rows] = ACT64[epilogue](*[lhs[rows] @ r[j] for r in rhs])
    return out


def ffn64(x: np.ndarray, mats: Sequence[np.ndarray], sizes: Sequence[int], activation: str) -> np.ndarray:
    gated = activation in dialect.GATED_ACTIVATIONS
    h = gmm64(x, mats[:2] if gated else mats[:1], sizes, activation)
    return gmm64(h, mats[-1:], sizes)


def route64(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, r: dialect.Routing
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weights [T,k], ids [T,k], margin [T]) of top-k routing in float64; margin: the closest decision."""
    logits = x @ w
    if r.score == "softmax":
        e = np.exp(logits - logits.max(-1, keepdims=True))
        probs = e / e.sum(-1, keepdims=True)
    else:
        probs = 1.0 / (1.0 + np.exp(-logits))
    sel = probs + bias if bias is not None else probs.copy()
    t, n_exp = sel.shape
    margin = np.full(t, np.inf)
    if r.n_group > 1:
        grouped = sel.reshape(t, r.n_group, n_exp // r.n_group)
        gscore = grouped.max(-1) if r.group_score == "max" else np.sort(grouped, -1)[..., -2:].sum(-1)
        gorder = np.argsort(-gscore, axis=1, kind="stable")
        gsorted = np.take_along_axis(gscore, gorder, 1)
        if r.topk_group < r.n_group:
            margin = np.minimum(margin, gsorted[:, r.topk_group - 1] - gsorted[:, r.topk_group])
        gmask = np.zeros((t, r.n_group), bool)
        np.put_along_axis(gmask, gorder[:, :r.topk_group], True, 1)
        sel = np.where(np.repeat(gmask, n_exp // r.n_group, axis=1), sel, -np.inf)
    order = np.argsort(-sel, axis=1, kind="stable")
    ssorted = np.take_along_axis(sel, order, 1)
    if r.k < n_exp:
        gap = ssorted[:, r.k - 1] - ssorted[:, r.k]
        margin = np.minimum(margin, np.where(np.isfinite(gap), gap, np.inf))
    ids = order[:, :r.k]
    wts = np.take_along_axis(probs, ids, 1)
    if r.norm_topk:
        wts = wts / wts.sum(-1, keepdims=True)
    return wts * r.scale, ids, margin


# --------------------------------------------------------------------------
# (a) Kernel correctness.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CorrectnessShapes:
    experts: int
    k: int
    n: int
    sizes: tuple[int, ...]  # rows per group (one empty group)
    pad: int  # rows past the groups
    ragged_k: int
    ragged_n: int
    int4_group: int
    route_tokens: int


SMOKE_CORRECTNESS = CorrectnessShapes(experts=4, k=64, n=32, sizes=(10, 0, 17, 6), pad=3, ragged_k=40, ragged_n=24,
                                      int4_group=16, route_tokens=24)
DEVICE_CORRECTNESS = CorrectnessShapes(experts=8, k=512, n=256, sizes=(61, 0, 37, 80, 5, 44, 29, 47), pad=13,
                                       ragged_k=200, ragged_n=136, int4_group=128, route_tokens=300)


def _rel(err: float, ref: np.ndarray) -> float:
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return err / scale if scale > 0 else err


def _compare(got: Any, ref_ragged: Any, ref64: np.ndarray, pad_rows: np.ndarray | None, threshold: float
             ) -> dict[str, Any]:
    g = _f64(got)
    r = _f64(ref_ragged)
    e_r = float(np.max(np.abs(g - r)))
    e_64 = float(np.max(np.abs(g - ref64)))
    row = {"max_abs_err_vs_ragged_dot": e_r, "max_rel_err_vs_ragged_dot": _rel(e_r, r),
           "max_abs_err_vs_float64": e_64, "max_rel_err_vs_float64": _rel(e_64, ref64),
           "finite": bool(np.all(np.isfinite(g)))}
    if pad_rows is not None:
        row["padding_rows_zero"] = bool(np.all(g[pad_rows] == 0))
    row["threshold_rel"] = threshold
    row["passed"] = (row["finite"] and row["max_rel_err_vs_ragged_dot"] <= threshold
                     and row["max_rel_err_vs_float64"] <= threshold and row.get("padding_rows_zero", True))
    return row


def _ragged(lhs: jax.Array, rhs: jax.Array, gs: jax.Array) -> jax.Array:
    return jax.lax.ragged_dot(lhs, rhs, gs, preferred_element_type=jnp.float32)


def _ragged_act(activation: str, lhs: jax.Array, rhs: Sequence[jax.Array], gs: jax.Array) -> jax.Array:
    if activation == "none":
        return _ragged(lhs, rhs[0], gs)
    return dialect.activation_fn(activation)(*[_ragged(lhs, r, gs) for r in rhs])


def correctness_cases(env: Env) -> list[tuple[str, str, str, str, Callable[[], dict[str, Any]]]]:
    """(kernel, case, format, compute dtype, run) for every check; ``run`` returns the measured row fields."""
    s = SMOKE_CORRECTNESS if env.smoke else DEVICE_CORRECTNESS
    rng = np.random.default_rng(0)
    kw = dict(interpret=env.interpret)
    sizes = list(s.sizes)
    m_real = sum(sizes)
    m = m_real + s.pad
    pad_rows = np.arange(m) >= m_real
    gs = jnp.asarray(sizes, jnp.int32)
    E, gsz = s.experts, s.int4_group

    def normal(shape, scale=1.0):
        return np.asarray(rng.standard_normal(shape) * scale, np.float32)

    def weights(e, k, n):
        return normal((e, k, n), 1.0 / math.sqrt(k))

    def thr(dtype):
        return THRESHOLDS[(jnp.dtype(dtype).name, env.interpret)]

    def gmm_case(dtype, fmt, epilogue="none", k=s.k, n=s.n, group_offset=None):
        def run():
            lhs = jnp.asarray(normal((m, k)), dtype)
            w = weights(E, k, n)
            if fmt == "int8":
                rhs = quantize(jnp.asarray(w), 8)
            elif fmt.startswith("int4"):
                rhs = quantize(jnp.asarray(w), 4, gsz, symmetric=fmt.endswith("sym"))
            else:
                rhs = jnp.asarray(w, dtype)
            dense = weight_formats.dequantize(rhs, jnp.float32)  # what the kernel multiplies by
            out_dtype = dtype
            if group_offset is None:
                got = jax.jit(lambda a, b, g: gmm(a, b, g, preferred_element_type=out_dtype, epilogue=epilogue,
                                                  **kw))(lhs, rhs, gs)
                ref = _ragged_act(epilogue, lhs, [dense.astype(dtype)], gs)
                ref64 = gmm64(_f64(lhs), [_f64(dense)], sizes, epilogue)
                rows = pad_rows
            else:
                nl = E // 2
                local = jax.tree_util.tree_map(lambda x: x[group_offset:group_offset + nl], rhs)
                got = jax.jit(lambda a, b, g, o: gmm(a, b, g, group_offset=o, preferred_element_type=out_dtype,
                                                     **kw))(lhs, local, gs, jnp.int32(group_offset))
                offs = _offsets(sizes)
                keep = (np.arange(m) >= offs[group_offset]) & (np.arange(m) < offs[group_offset + nl])
                ref = jnp.where(jnp.asarray(keep)[:, None], _ragged(lhs, dense.astype(dtype), gs), 0.0)
                ref64 = gmm64(_f64(lhs), [_f64(dense)[group_offset:group_offset + nl]], sizes,
                              group_offset=group_offset)
                rows = ~keep
            return _compare(got, ref, ref64, rows, thr(dtype))
        return run

    def gated_case(dtype, fmt, activation):
        def run():
            lhs = jnp.asarray(normal((m, s.k)), dtype)
            ws = [weights(E, s.k, s.n) for _ in range(2)]
            if fmt == "int4":
                rhs = [quantize(jnp.asarray(w), 4, gsz) for w in ws]
            elif fmt == "int8":
                rhs = [quantize(jnp.asarray(w), 8) for w in ws]
            else:
                rhs = [jnp.asarray(w, dtype) for w in ws]
            dense = [weight_formats.dequantize(r, jnp.float32) for r in rhs]
            got = jax.jit(lambda a, wg, wu, g: gmm_gated(a, wg, wu, g, activation=activation, **kw))(
                lhs, rhs[0], rhs[1], gs)
            ref = _ragged_act(activation, lhs, [d.astype(dtype) for d in dense], gs)
            ref64 = gmm64(_f64(lhs), [_f64(d) for d in dense], sizes, activation)
            return _compare(got, ref, ref64, pad_rows, thr(dtype))
        return run

    def vjp_case():
        def run():
            lhs = jnp.asarray(normal((m, s.k)))
            rhs = jnp.asarray(weights(E, s.k, s.n))
            cot = jnp.asarray(normal((m, s.n)))

            def loss_pallas(a, b):
                return jnp.sum(gmm(a, b, gs, **kw) * cot)

            def loss_ragged(a, b):
                return jnp.sum(_ragged(a, b, gs) * cot)

            da, db = jax.jit(jax.grad(loss_pallas, argnums=(0, 1)))(lhs, rhs)
            ra, rb = jax.jit(jax.grad(loss_ragged, argnums=(0, 1)))(lhs, rhs)
            x64, w64, c64 = _f64(lhs), _f64(rhs), _f64(cot)
            offs = _offsets(sizes)
            da64, db64 = np.zeros_like(x64), np.zeros_like(w64)
            for g in range(E):
                rows = slice(offs[g], offs[g + 1])
                da64[rows] = c64[rows] @ w64[g].T
                db64[g] = x64[rows].T @ c64[rows]
            a = _compare(da, ra, da64, pad_rows, thr(jnp.float32))
            b = _compare(db, rb, db64, None, thr(jnp.float32))
            row = {key: max(a[key], b[key]) for key in a if key.startswith("max_")}
            row.update(finite=a["finite"] and b["finite"], padding_rows_zero=a["padding_rows_zero"],
                       threshold_rel=a["threshold_rel"], passed=a["passed"] and b["passed"],
                       note="max over d lhs (the gmm kernel on transposed weights) and d rhs")
            return row
        return run

    def ffn_case(dtype, fmt, impl="pallas", activation="swiglu"):
        def run():
            d, f = s.k, s.n
            x = jnp.asarray(normal((m, d)), dtype)
            mats = [weights(E, d, f), weights(E, d, f), weights(E, f, d)]
            if fmt == "int8":
                ws = [quantize(jnp.asarray(w), 8) for w in mats]
            elif fmt == "int4":
                ws = [quantize(jnp.asarray(w), 4, gsz) for w in mats]
            else:
                ws = [jnp.asarray(w, dtype) for w in mats]
            if impl == "pallas":
                fn = jax.jit(lambda a, g, w: ffn_pallas(a, g, w, activation=activation, **kw))
            else:
                fn = jax.jit(lambda a, g, w: tokamax_ffn.ffn_tokamax(a, g, w, activation=activation))
            got = fn(x, gs, ws)
            ref = dialect.ffn_ragged(x, gs, ws, activation=activation)
            dense = [_f64(weight_formats.dequantize(w, dtype)) for w in ws]
            row = _compare(got, ref, ffn64(_f64(x), dense, sizes, activation), pad_rows, thr(dtype))
            if impl != "pallas":  # an impl's contract: compute what dialect.ffn_reference computes
                spec = _f64(dialect.ffn_reference(x, gs, ws, activation=activation))
                e = float(np.max(np.abs(_f64(got) - spec)))
                row.update(max_abs_err_vs_ffn_reference=e, max_rel_err_vs_ffn_reference=_rel(e, spec))
                row["passed"] = row["passed"] and row["max_rel_err_vs_ffn_reference"] <= row["threshold_rel"]
            return row
        return run

    def route_case(routing: dialect.Routing, n_exp: int, with_bias: bool):
        def run():
            t, d = s.route_tokens, s.k
            x = jnp.asarray(normal((t, d)))
            w = jnp.asarray(normal((d, n_exp), 1.0 / math.sqrt(d)))
            bias = jnp.asarray(normal((n_exp,), 0.1)) if with_bias else None
            args = (bias,) if with_bias else ()

            def call(a, b, *bb):
                return fused_route(a, b, bb[0] if bb else None, k=routing.k, score=routing.score,
                                   n_group=routing.n_group, topk_group=routing.topk_group,
                                   group_score=routing.group_score, norm_topk=routing.norm_topk,
                                   scale=routing.scale, **kw)

            wk, ik = jax.jit(call)(x, w, *args)
            wr, ir = dialect.route_reference(x, w, *args, routing=routing)
            w64, i64, margin = route64(_f64(x), _f64(w), None if bias is None else _f64(bias), routing)
            wk, ik, wr, ir = (np.asarray(a) for a in (wk, ik, wr, ir))
            clear = margin > TIE_MARGIN[env.interpret]  # rows without a near-tie in float64

            def by_id(ids, wts):
                o = np.argsort(ids, axis=1)
                return np.take_along_axis(ids, o, 1), np.take_along_axis(wts.astype(np.float64), o, 1)

            ik_s, wk_s = by_id(ik, wk)
            ir_s, wr_s = by_id(ir, wr)
            i64_s, w64_s = by_id(i64, w64)
            same_ref = np.all(ik_s == ir_s, axis=1)
            same_64 = np.all(ik_s == i64_s, axis=1)
            e_r = float(np.max(np.abs(wk_s - wr_s)[same_ref])) if same_ref.any() else 0.0
            e_64 = float(np.max(np.abs(wk_s - w64_s)[same_64 & clear])) if (same_64 & clear).any() else 0.0
            threshold = thr(jnp.float32)
            row = {"max_abs_err_vs_route_reference": e_r, "max_rel_err_vs_route_reference": _rel(e_r, wr_s),
                   "max_abs_err_vs_float64": e_64, "max_rel_err_vs_float64": _rel(e_64, w64_s),
                   "ids_equal_frac_vs_route_reference": float(same_ref.mean()),
                   "ids_equal_frac_vs_float64": float(same_64.mean()),
                   "ids_differ_without_near_tie": int(np.sum(~same_64 & clear)),
                   "near_tie_rows": int(np.sum(~clear)), "finite": bool(np.all(np.isfinite(wk))),
                   "threshold_rel": threshold,
                   "note": "weights compared on rows with the same expert set; ids must match float64 top-k "
                           f"except on near-ties (float64 margin <= {TIE_MARGIN[env.interpret]:g})"}
            row["passed"] = (row["finite"] and row["ids_differ_without_near_tie"] == 0
                             and row["max_rel_err_vs_route_reference"] <= threshold
                             and row["max_rel_err_vs_float64"] <= threshold)
            return row
        return run

    f32, bf16 = jnp.float32, jnp.bfloat16
    g4 = f"int4-g{gsz}"
    cases: list[tuple[str, str, str, str, Callable[[], dict[str, Any]]]] = [
        ("gmm", "float32", "float32", "float32", gmm_case(f32, "float32")),
        ("gmm", f"float32 ragged k={s.ragged_k} n={s.ragged_n}", "float32", "float32",
         gmm_case(f32, "float32", k=s.ragged_k, n=s.ragged_n)),
        ("gmm", "bfloat16", "bfloat16", "bfloat16", gmm_case(bf16, "bfloat16")),
        ("gmm", "bfloat16 epilogue=gelu", "bfloat16", "bfloat16", gmm_case(bf16, "bfloat16", epilogue="gelu")),
        ("gmm", f"bfloat16 group_offset=1 ({E // 2} local experts)", "bfloat16", "bfloat16",
         gmm_case(bf16, "bfloat16", group_offset=1)),
        ("gmm", "int8 per channel, bf16 lhs", "int8", "bfloat16", gmm_case(bf16, "int8")),
        ("gmm", f"{g4} symmetric, bf16 lhs", g4, "bfloat16", gmm_case(bf16, "int4-sym")),
        ("gmm", f"{g4} asymmetric, f32 lhs", f"{g4}-asym", "float32", gmm_case(f32, "int4-asym")),
        ("gmm (custom vjp)", "float32 grad lhs and rhs", "float32", "float32", vjp_case()),
        ("gmm_gated", "swiglu bfloat16", "bfloat16", "bfloat16", gated_case(bf16, "bfloat16", "swiglu")),
        ("gmm_gated", "geglu float32", "float32", "float32", gated_case(f32, "float32", "geglu")),
        ("gmm_gated", f"swiglu {g4}, bf16 lhs", g4, "bfloat16", gated_case(bf16, "int4", "swiglu")),
        ("ffn_pallas", "swiglu bfloat16", "bfloat16", "bfloat16", ffn_case(bf16, "bfloat16")),
        ("ffn_pallas", "swiglu int8, bf16 rows", "int8", "bfloat16", ffn_case(bf16, "int8")),
        ("fused_route", "softmax top-2 of 8 (Mixtral)", "float32", "float32",
         route_case(dialect.Routing(k=2), 8, False)),
        ("fused_route", "sigmoid + bias, group-limited top-4 of 16 (DeepSeek-V3)", "float32", "float32",
         route_case(dialect.Routing(k=4, score="sigmoid", scale=2.5, n_group=4, topk_group=2,
                                    group_score="top2_sum"), 16, True)),
    ]
    if env.tokamax is not None:
        cases.append(("ffn impl=tokamax", "swiglu bfloat16 (moejax.tokamax_ffn)", "bfloat16", "bfloat16",
                      ffn_case(bf16, "bfloat16", impl="tokamax")))
    return cases


def run_correctness(env: Env) -> dict[str, Any]:
    rows = []
    for kernel, case, fmt, dtype, run in correctness_cases(env):
        t0 = time.perf_counter()
        row: dict[str, Any] = {"kernel": kernel, "case": case, "format": fmt, "dtype": dtype, "mode": env.mode,
                               "driver": env.driver}
        try:
            row.update(run())
        except Exception as e:  # one broken kernel is a failed row, not a stopped check
            row.update(passed=False, error=_one_line(e))
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        err = row.get("max_rel_err_vs_float64")
        print(f"  [{'ok' if row['passed'] else 'FAIL'}] {kernel:18s} {case:52s} "
              f"rel err vs f64 {'-' if err is None else f'{err:.1e}'}  {row['seconds']:.1f}s"
              + (f"  {row['error']}" if "error" in row else ""), flush=True)
    failed = [f"{r['kernel']} {r['case']}" for r in rows if not r["passed"]]
    out: dict[str, Any] = {"status": "failed" if failed else "ok", "mode": env.mode, "driver": env.driver,
                           "thresholds_rel": {f"{d} {'interpret' if i else 'compiled'}": v
                                              for (d, i), v in THRESHOLDS.items()},
                           "passed": not failed, "rows": rows}
    if failed:
        out["reason"] = f"{len(failed)} case(s) failed: " + "; ".join(failed)
    out["tokamax_impl"] = ({"checked": True} if env.tokamax is not None
                           else {"checked": False, "reason": env.tokamax_reason})
    return out


# --------------------------------------------------------------------------
# (b) Grouped-matmul speed.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SpeedShape:
    name: str
    d: int
    f: int
    experts: int
    top_k: int


DEVICE_SHAPES = (SpeedShape("mixtral-8x7b", 4096, 14336, 8, 2), SpeedShape("deepseek-v3", 7168, 2048, 256, 8),
                 SpeedShape("deepseek-v3 (64 experts)", 7168, 2048, 64, 8))
SMOKE_SHAPES = (SpeedShape("mixtral-like (tiny)", 64, 128, 8, 2), SpeedShape("deepseek-like (tiny)", 64, 32, 16, 4))
DEVICE_DECODE, DEVICE_PREFILL = (1, 8, 64), (2048, 8192)
SMOKE_DECODE, SMOKE_PREFILL = (2,), (16,)
DEVICE_FORMATS = ("bf16", "int8", "int4")
SMOKE_FORMATS = ("float32", "bf16", "int8", "int4")
CONTENDERS = ("pallas", "ragged_dot", "tokamax", "megablox", "dense")
TOKAMAX_ORDER = ("mosaic", "triton", "xla")  # tokamax's own preference order; the first that accepts runs


def speed_tasks(formats: Sequence[str], decode: Sequence[int], prefill: Sequence[int], *, smoke: bool,
                shape_index: int = 0) -> list[tuple[str, int]]:
    """(format, T) of one shape, most important first: bf16 prefill (the goal), decode, then the rest.

    Each row costs a few compiles, so the smoke run times the other formats at one token count and on the
    first shape only.
    """
    main = "bf16" if "bf16" in formats else formats[0]
    first = [(main, t) for t in sorted(prefill, reverse=True)]
    order = sorted(decode, key=lambda t: (t not in (min(decode), max(decode)), t))  # 1 and 64 before 8
    dec = [(fmt, t) for t in order for fmt in formats if fmt != "float32" and (fmt == main or not smoke)]
    rest = [(fmt, t) for fmt in formats for t in (*prefill, *decode) if (fmt, t) not in first + dec]
    if smoke:
        rest = [(fmt, t) for fmt, t in rest if t == min(decode) and not (shape_index and fmt != main)]
    return first + dec + rest


def routed_group_sizes(tokens: int, experts: int, top_k: int, seed: int) -> np.ndarray:
    """Rows per expert of top-k routing (k distinct experts per token, uneven expert popularity)."""
    rng = np.random.default_rng(seed)
    logp = np.log(rng.dirichlet(np.full(experts, 4.0)))
    gumbel = rng.gumbel(size=(tokens, experts))
    ids = np.argsort(-(logp + gumbel), axis=1)[:, :top_k]  # Gumbel top-k: sampling without replacement
    return np.bincount(ids.ravel(), minlength=experts).astype(np.int32)


class _ShapeOperands:
    """The weights of one shape in every format, made on first use (they are large)."""

    def __init__(self, env: Env, shape: SpeedShape, int4_group: int):
        self.env, self.shape, self.g = env, shape, int4_group
        self._cache: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        if key not in self._cache:
            self._cache[key] = self._make(key)
        return self._cache[key]

    def _make(self, key: str) -> Any:
        s = self.shape
        if key in ("float32", "bf16"):  # jitted: no full-size temporaries besides the result (GBs here)
            dtype = jnp.float32 if key == "float32" else jnp.bfloat16
            return jax.jit(lambda k: (jax.random.normal(k, (s.experts, s.d, s.f), dtype)
                                      / math.sqrt(s.d)).astype(dtype))(jax.random.key(1))
        if key == "dense":
            return self.get("bf16")[0]
        if key == "int8":
            return jax.jit(lambda w: quantize(w, 8))(self.get("bf16"))
        if key == "int4":
            return jax.jit(lambda w: quantize(w, 4, self.g))(self.get("bf16"))
        if key in ("tokamax int8", "tokamax int4"):
            import qwix  # tokamax's quantized-array type; installed with tokamax
            qtype = jnp.int8 if key.endswith("int8") else jnp.int4
            tiles = {} if qtype == jnp.int8 else {1: self.g}
            return jax.jit(lambda w: qwix.quantize(w, qtype, channelwise_axes=(0, 2), tiled_axes=tiles))(
                self.get("bf16"))
        raise KeyError(key)


def _tokamax_call(env: Env, impl: str) -> Callable:
    tk = env.tokamax

    def call(a, b, g, out_dtype):
        return tk.ragged_dot(a, b, g, preferred_element_type=out_dtype, implementation=impl)
    return call


def _contender_fns(env: Env, ops: _ShapeOperands, fmt: str, lhs: jax.Array, gs: jax.Array
                   ) -> tuple[dict[str, tuple[str, Callable[[], Any]]], dict[str, str], dict[str, dict[str, Any]]]:
    """Contenders of one row: name -> (label, zero-argument call); name -> why not; name -> extra row fields."""
    out_dtype = jnp.float32 if fmt == "float32" else jnp.bfloat16
    w = ops.get(fmt)
    fns: dict[str, tuple[str, Callable[[], Any]]] = {}
    skipped: dict[str, str] = {}
    notes: dict[str, dict[str, Any]] = {}
    p = jax.jit(lambda a, b, g: gmm(a, b, g, preferred_element_type=out_dtype, interpret=env.interpret))
    fns["pallas"] = (f"moejax pallas gmm ({env.driver}{', interpret' if env.interpret else ''})",
                     lambda: p(lhs, w, gs))
    if fmt in ("int8", "int4"):
        r = jax.jit(lambda a, b, g: jax.lax.ragged_dot(a, weight_formats.dequantize(b, a.dtype), g,
                                                       preferred_element_type=out_dtype))
        fns["ragged_dot"] = ("jax.lax.ragged_dot (XLA dequantizes the weights first, as impl=ragged)",
                             lambda: r(lhs, w, gs))
    else:
        r = jax.jit(lambda a, b, g: jax.lax.ragged_dot(a, b, g, preferred_element_type=out_dtype))
        fns["ragged_dot"] = ("jax.lax.ragged_dot", lambda: r(lhs, w, gs))
    if env.tokamax is None:
        skipped["tokamax"] = env.tokamax_reason or "tokamax unavailable"
    else:
        try:
            key = f"tokamax {fmt}" if fmt in ("int8", "int4") else fmt
            impl, call, tried = _resolve_tokamax(env, ops.get(key), out_dtype, lhs, gs)
            fns["tokamax"] = (f"tokamax.ragged_dot implementation={impl}"
                              + (" (qwix QArray weights, same bits/group)" if fmt in ("int8", "int4") else ""), call)
            notes["tokamax"] = {"implementation": impl, "not_taken": tried}
        except Exception as e:
            skipped["tokamax"] = _one_line(e)
    if env.megablox_gmm is None:
        skipped["megablox"] = env.megablox_reason or "megablox unavailable"
    elif fmt != "bf16":
        skipped["megablox"] = "megablox gmm takes float weights; timed for bf16 only"
    else:
        m = lhs.shape[0]
        tm = 512 if m >= 512 else max(16, -(-m // 16) * 16)
        mp = -(-m // tm) * tm  # rows padded to the row tile; padding rows belong to no group
        lhs_p = jnp.pad(lhs, ((0, mp - m), (0, 0)))
        tiling = (tm, min(512, ops.shape.d), min(1024, ops.shape.f))
        mb = jax.jit(lambda a, b, g: env.megablox_gmm(a, b, g, preferred_element_type=out_dtype, tiling=tiling))
        fns["megablox"] = (f"megablox gmm tiling={tiling}", lambda: mb(lhs_p, w, gs))
    dense_w = ops.get("dense")
    dn = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))
    lhs16 = lhs.astype(jnp.bfloat16)
    fns["dense"] = ("dense bf16 matmul [T*k, d] x [d, f] (same FLOPs)", lambda: dn(lhs16, dense_w))
    return fns, skipped, notes


def _resolve_tokamax(env: Env, w: Any, out_dtype: Any, lhs: jax.Array, gs: jax.Array
                     ) -> tuple[str, Callable[[], Any], dict[str, str]]:
    """The first tokamax implementation (its own order) that takes this problem: (name, call, why not others).

    ``tokamax.ragged_dot`` with ``implementation=None`` does the same silently; asking one at a time records
    which kernel was timed (an XLA fallback is not a tokamax kernel).
    """
    tried: dict[str, str] = {}
    for impl in TOKAMAX_ORDER:
        f = jax.jit(lambda a, b, g, impl=impl: _tokamax_call(env, impl)(a, b, g, out_dtype))
        try:
            jax.block_until_ready(f(lhs, w, gs))
        except Exception as e:  # NotImplementedError for shapes/devices an implementation does not cover
            tried[impl] = _one_line(e)
            continue
        return impl, (lambda: f(lhs, w, gs)), tried
    raise RuntimeError("no tokamax implementation accepted the problem: "
                       + "; ".join(f"{k}: {v}" for k, v in tried.items()))


def _weight_bytes(fmt: str, shape: SpeedShape, experts: int, int4_group: int) -> int:
    per = shape.d * shape.f
    if fmt == "float32":
        return experts * per * 4
    if fmt == "int8":
        return experts * (per + shape.f * 4)
    if fmt == "int4":
        return experts * (per // 2 + (shape.d // int4_group) * shape.f * 4)
    return experts * per * 2


def _time_row(env: Env, calls: dict[str, Callable[[], Any]], repeats: int, row_cap_s: float
              ) -> tuple[dict[str, Any], dict[str, str], int, int]:
    """Compile and check each call alone (a failure drops that contender), then time the rest interleaved."""
    errors: dict[str, str] = {}
    single: dict[str, float] = {}
    for name, fn in calls.items():
        try:
            jax.block_until_ready(fn())  # compile
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            single[name] = time.perf_counter() - t0
        except Exception as e:
            errors[name] = _one_line(e)
    ok = {n: calls[n] for n in single}
    if not ok:
        return {}, errors, 0, 0
    # Short calls: several back to back per sample, so that dispatch does not dominate (accelerators only).
    inner = 1 if env.interpret else max(1, min(50, math.ceil(0.002 / max(min(single.values()), 1e-6))))

    def batched(fn):
        return lambda: [fn() for _ in range(inner)]

    round_s = sum(single.values()) * inner
    reps = max(3, min(repeats, int(row_cap_s // max(round_s, 1e-9))))
    timings = time_interleaved({n: batched(f) for n, f in ok.items()}, warmup=1, repeats=reps)
    return {n: t for n, t in timings.items()}, errors, inner, reps


def run_speed(env: Env, repeats: int, deadline: float) -> dict[str, Any]:
    shapes = SMOKE_SHAPES if env.smoke else DEVICE_SHAPES
    decode, prefill = (SMOKE_DECODE, SMOKE_PREFILL) if env.smoke else (DEVICE_DECODE, DEVICE_PREFILL)
    formats = SMOKE_FORMATS if env.smoke else DEVICE_FORMATS
    int4_group = 16 if env.smoke else 128
    contenders = {c: {"available": True} for c in CONTENDERS}
    if env.tokamax is None:
        contenders["tokamax"] = {"available": False, "reason": env.tokamax_reason}
    else:
        contenders["tokamax"]["version"] = env.tokamax_version
    if env.megablox_gmm is None:
        contenders["megablox"] = {"available": False, "reason": env.megablox_reason}
    rows: list[dict[str, Any]] = []
    skipped_rows: list[dict[str, Any]] = []
    group = 0
    for si, shape in enumerate(shapes):
        ops = _ShapeOperands(env, shape, int4_group)
        # Each shape gets a fair share of what is left, so a slow shape cannot starve the next ones.
        now = time.perf_counter()
        share_end = min(deadline, now + (deadline - now) / (len(shapes) - si))
        for fmt, t in speed_tasks(formats, decode, prefill, smoke=env.smoke, shape_index=si):
            if time.perf_counter() > share_end:
                skipped_rows.append({"shape": shape.name, "format": fmt, "T": t,
                                     "reason": "budget exhausted (--budget-s)"})
                continue
            group += 1
            base = _speed_row_base(shape, fmt, t, "decode" if t in decode else "prefill", int4_group, group)
            try:  # a helper, so that the row's operands and closures are freed when it returns
                rows += _speed_row(env, ops, base, fmt, seed=1000 * si + t, repeats=repeats,
                                   cap_s=max(1.0, share_end - time.perf_counter()) / 4)
            except Exception as e:  # e.g. out of memory for one shape: record it, go on
                rows.append(dict(base, contender="*", error=_one_line(e)))
                print(f"  {shape.name} {fmt} T={t}: {_one_line(e)}", flush=True)
        del ops  # free this shape's weights before the next one
    goal = _goal(env, rows, shapes, prefill)
    status = "partial" if skipped_rows else "ok"
    out: dict[str, Any] = {"status": status, "mode": env.mode, "contenders": contenders,
                           "ratios": "x_<baseline> = baseline median / contender median (> 1: contender faster), "
                                     "from the same interleaved rounds",
                           "matmul": "up projection: [T*top_k, d] x [E, d, f], rows grouped by routed expert",
                           "rows": rows, "skipped_rows": skipped_rows, "goal": goal}
    if env.interpret:
        out["note"] = "interpret mode on CPU: timings exercise the code path only, not kernel speed"
    if skipped_rows:
        out["reason"] = f"{len(skipped_rows)} row(s) not measured: budget exhausted (--budget-s)"
    return out


def _speed_row(env: Env, ops: _ShapeOperands, base: dict[str, Any], fmt: str, *, seed: int, repeats: int,
               cap_s: float) -> list[dict[str, Any]]:
    """One (shape, format, T): every contender timed in the same interleaved rounds; one row per contender."""
    shape, t, int4_group = ops.shape, base["T"], ops.g
    lhs_dtype = jnp.float32 if fmt == "float32" else jnp.bfloat16
    sizes = routed_group_sizes(t, shape.experts, shape.top_k, seed=seed)
    lhs = jax.random.normal(jax.random.key(seed), (t * shape.top_k, shape.d), lhs_dtype)
    gs = jnp.asarray(sizes)
    fns, skipped, extra = _contender_fns(env, ops, fmt, lhs, gs)
    timings, errors, inner, reps = _time_row(env, {n: fn for n, (_, fn) in fns.items()}, repeats, cap_s)
    touched = int((sizes > 0).sum())
    base = dict(base, touched_experts=touched, calls_per_sample=inner, repeats=reps)
    med = {n: tm.median / inner for n, tm in timings.items()}
    rows = []
    for name in CONTENDERS:
        row = dict(base, contender=name, label=fns[name][0] if name in fns else name)
        if name in med:
            sec = med[name]
            wbytes = shape.d * shape.f * 2 if name == "dense" else _weight_bytes(fmt, shape, touched, int4_group)
            row.update(median_s=sec, min_s=timings[name].min / inner,
                       times_s=[x / inner for x in timings[name].times],
                       tflops=base["gflop"] / sec / 1e3, weight_gbps=wbytes / sec / 1e9,
                       x_dense=_ratio(med, "dense", name), x_ragged_dot=_ratio(med, "ragged_dot", name),
                       x_tokamax=_ratio(med, "tokamax", name))
            row.update(extra.get(name, {}))
        elif name in errors:
            row["error"] = errors[name]
        else:
            row["skipped"] = skipped.get(name, "not applicable")
        rows.append(row)
    _print_speed(shape, fmt, t, med)
    return rows


def _speed_row_base(shape: SpeedShape, fmt: str, t: int, phase: str, int4_group: int, group: int
                    ) -> dict[str, Any]:
    m = t * shape.top_k
    return {"group": group, "shape": shape.name, "d": shape.d, "f": shape.f, "experts": shape.experts,
            "top_k": shape.top_k, "T": t, "rows": m, "phase": phase,
            "format": f"int4-g{int4_group}" if fmt == "int4" else fmt,
            "lhs_dtype": "float32" if fmt == "float32" else "bfloat16",
            "gflop": 2 * m * shape.d * shape.f / 1e9}


def _ratio(med: dict[str, float], base: str, name: str) -> float | None:
    return med[base] / med[name] if base in med and name in med else None


def _print_speed(shape: SpeedShape, fmt: str, t: int, med: dict[str, float]) -> None:
    cells = "  ".join(f"{n} {med[n] * 1e6:9.1f}us" for n in CONTENDERS if n in med)
    print(f"  {shape.name[:26]:26s} {fmt:7s} T={t:5d}  {cells}", flush=True)


def _goal(env: Env, rows: list[dict[str, Any]], shapes: Sequence[SpeedShape], prefill: Sequence[int]
          ) -> dict[str, Any]:
    goal: dict[str, Any] = {"criterion": f"pallas bf16 at the largest prefill T: x_dense >= {GOAL_X_DENSE} and "
                                         f"x_tokamax >= {GOAL_X_TOKAMAX}", "rows": []}
    if env.interpret:
        goal.update(evaluated=False, met=None, reason="interpret mode (CPU / --smoke): timings are not kernel speed")
        return goal
    t = max(prefill)
    checks = []
    for shape in shapes:
        r = next((r for r in rows if r["shape"] == shape.name and r["T"] == t and r["format"] == "bf16"
                  and r["contender"] == "pallas" and "median_s" in r), None)
        if r is None:
            goal["rows"].append({"shape": shape.name, "T": t, "measured": False})
            continue
        tk = next((q for q in rows if q["group"] == r["group"] and q["contender"] == "tokamax"), {})
        g = {"shape": shape.name, "T": t, "measured": True, "x_dense": r["x_dense"], "x_tokamax": r["x_tokamax"],
             "tokamax_implementation": tk.get("implementation"),
             "dense_ok": r["x_dense"] is not None and r["x_dense"] >= GOAL_X_DENSE,
             "tokamax_ok": None if r["x_tokamax"] is None else r["x_tokamax"] >= GOAL_X_TOKAMAX}
        goal["rows"].append(g)
        checks.append(g["dense_ok"])
        if g["tokamax_ok"] is not None:
            checks.append(g["tokamax_ok"])
    goal["evaluated"] = bool(checks)
    goal["met"] = all(checks) if checks else None
    if env.tokamax is None:
        goal["tokamax_reason"] = env.tokamax_reason
    if not checks:
        goal["reason"] = "no goal row was measured"
    return goal


# --------------------------------------------------------------------------
# (c) End to end.
# --------------------------------------------------------------------------
def run_e2e(env: Env, layers: int, repeats: int) -> dict[str, Any]:
    from flax import nnx

    from moejax.models import MoEDecoder
    from moejax.models.presets import preset, tiny

    if env.smoke:  # one layer: each pipeline compiles a prefill and a decode program
        cfg, dtype, batch, seq, steps, g = tiny("mixtral", n_layers=1), jnp.float32, 1, 8, 3, 16
        model_name = "tiny mixtral, 1 layer (smoke)"
    else:
        cfg, dtype, batch, seq, steps, g = preset("mixtral-8x7b", n_layers=layers), jnp.bfloat16, 1, 2048, 16, 128
        model_name = f"mixtral-8x7b shape, {layers} layer{'s' if layers > 1 else ''}, random weights"
    t0 = time.perf_counter()
    # Initialised in one compiled program: eager init compiles one small program per parameter shape.
    model = nnx.jit(lambda: MoEDecoder(cfg, rngs=nnx.Rngs(0), dtype=dtype))()
    tokens = jax.random.randint(jax.random.key(0), (batch, seq), 0, cfg.vocab_size, jnp.int32)
    cache = model.init_cache(batch, seq + steps, dtype)
    init_s = time.perf_counter() - t0
    if env.smoke:
        # On CPU "auto" picks a CPU implementation (and may build a C++ one first): not what this run checks,
        # so the smoke run keeps the XLA baseline and an int4 pipeline on it.
        pipelines = {"ragged": "select-impl(impl=ragged)",
                     "int4": f"quantize(bits=4,group_size={g}),select-impl(impl=ragged)"}
    else:
        pipelines = {"ragged": "select-impl(impl=ragged)", "auto": "select-impl",
                     "int4": f"quantize(bits=4,group_size={g}),select-impl"}
    skipped: dict[str, str] = {}
    if "tokamax" in dialect.ffn_impls():
        pipelines["tokamax"] = "select-impl(impl=tokamax)"
    else:
        skipped["select-impl(impl=tokamax)"] = env.tokamax_reason or "impl tokamax not registered"
    # optimize's exact-stage checks hold stages to CPU-measured tolerances against the reference op, which
    # compiled bf16 kernels legitimately exceed, and they cost more than the rest of this section: the
    # deviation from the model as traced is measured and recorded below instead.
    check_exact = False
    rows: list[dict[str, Any]] = []
    runners: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {}
    reference_logits = None
    zero, start = jnp.int32(0), jnp.int32(seq)
    for key, spec in pipelines.items():
        row: dict[str, Any] = {"pipeline": spec, "model": model_name, "dtype": jnp.dtype(dtype).name,
                               "batch": batch, "prefill_tokens": seq, "decode_steps": steps}
        try:
            t1 = time.perf_counter()
            opt = moejax.optimize(model, (tokens,), spec, example_kwargs={"cache": cache, "cache_index": zero},
                                  decode_example=((tokens[:, :1],), {"cache": cache, "cache_index": start}),
                                  check_exact=check_exact)
            row["optimize_s"] = time.perf_counter() - t1
            # What select-impl chose, as the programs record it (auto resolves per platform).
            row["ffn_impls"] = {"prefill": opt.stages[-1].stats["ffn_impls"],
                                "decode": opt.decode_stages[-1].stats["ffn_impls"]}
            row["weight_bytes"] = opt.weight_bytes
            if reference_logits is None:  # the model as traced: the reference expert op
                reference_logits = np.asarray(opt.at_stage(0)(tokens, cache=cache, cache_index=zero)[0],
                                              np.float32)
            logits, new_cache = opt(tokens, cache=cache, cache_index=zero)
            lg = np.asarray(logits, np.float32)
            dev = float(np.max(np.abs(lg - reference_logits)))
            row.update(max_abs_logit_dev_vs_traced=dev, rel_logit_dev_vs_traced=_rel(dev, reference_logits),
                       top1_agreement_vs_traced=float(np.mean(lg.argmax(-1) == reference_logits.argmax(-1))))
            runners[spec] = _e2e_runner(opt, tokens, cache, new_cache, logits, seq, steps)
        except Exception as e:
            row["error"] = _one_line(e)
        rows.append(row)
    if runners:
        pre = time_interleaved({k: v[0] for k, v in runners.items()}, warmup=1, repeats=repeats)
        dec = time_interleaved({k: v[1] for k, v in runners.items()}, warmup=1, repeats=repeats)
        base = pipelines["ragged"] if pipelines["ragged"] in runners else next(iter(runners))
        for row in rows:
            spec = row["pipeline"]
            if spec not in runners:
                continue
            p, d = pre[spec].median, dec[spec].median
            row.update(prefill_median_s=p, prefill_tokens_per_s=batch * seq / p, prefill_times_s=list(pre[spec].times),
                       decode_median_s_per_token=d / steps, decode_tokens_per_s=batch * steps / d,
                       decode_times_s=list(dec[spec].times),
                       prefill_x_ragged=pre[base].median / p, decode_x_ragged=dec[base].median / d)
    errors = [f"{r['pipeline']}: {r['error']}" for r in rows if "error" in r]
    out: dict[str, Any] = {"status": "failed" if errors else "ok", "model": model_name, "config": {
        "d_model": cfg.d_model, "d_ff_expert": cfg.d_ff_expert, "n_experts": cfg.n_experts, "top_k": cfg.routing.k,
        "n_layers": cfg.n_layers, "vocab_size": cfg.vocab_size}, "init_s": init_s, "check_exact": check_exact,
        "baseline": pipelines["ragged"], "rows": rows, "skipped": skipped}
    if errors:
        out["reason"] = "; ".join(errors)
    if env.smoke:
        out["note"] = "smoke run: XLA (ragged) pipelines on a tiny model; timings are not accelerator timings"
    return out


def _e2e_runner(opt: Any, tokens: jax.Array, cache: Any, prefilled: Any, logits: jax.Array, seq: int,
                steps: int) -> tuple[Callable[[], Any], Callable[[], Any]]:
    zero = jnp.int32(0)
    first = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
    indices = [jnp.int32(seq + i) for i in range(steps)]

    def prefill():
        return opt(tokens, cache=cache, cache_index=zero)

    def decode():
        tok, c = first, prefilled
        for idx in indices:
            lg, c = opt(tok, cache=c, cache_index=idx)
            tok = jnp.argmax(lg[:, -1:], axis=-1).astype(jnp.int32)
        return tok

    return prefill, decode


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------
class UsageError(Exception):
    """A bad flag: one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return value


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {low}")
        return value
    return parse


def _sections(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in SECTIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {','.join(bad) or '(none)'}; "
                                         f"choose from {','.join(SECTIONS)}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = _Parser(prog="device_check.py", description=__doc__.split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"JSON result path (default {DEFAULT_OUT})")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, Pallas interpreter (automatic when jax.default_backend() is cpu)")
    ap.add_argument("--budget-s", type=_positive, default=DEFAULT_BUDGET_S,
                    help=f"seconds for all sections; speed rows past it are skipped (default {DEFAULT_BUDGET_S:g})")
    ap.add_argument("--sections", type=_sections, default=SECTIONS,
                    help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    ap.add_argument("--repeats", type=_int_at_least(3), default=None,
                    help="timed rounds per row, at least 3 (default 10 on an accelerator, 3 with --smoke)")
    ap.add_argument("--e2e-layers", type=_int_at_least(1), default=2,
                    help="layers of the full-width Mixtral model in the end-to-end section (default 2)")
    return ap.parse_args(argv)


def _run_section(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    print(f"[{name}]", flush=True)
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # a crashed section is recorded; the other sections still run
        traceback.print_exc()
        out = {"status": "error", "reason": _one_line(e),
               "traceback": traceback.format_exc().splitlines()[-12:]}
    out["seconds"] = time.perf_counter() - t0
    print(f"[{name}] {out['status']}" + (f": {out['reason']}" if out.get("reason") else "")
          + f" ({out['seconds']:.1f}s)", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"device_check.py: error: {e}", file=sys.stderr)
        return 2
    env = make_env(args.smoke, args.budget_s)
    repeats = args.repeats or (3 if env.smoke else 10)
    info = machine_info()
    payload: dict[str, Any] = {
        "benchmark": "device_check", "date_utc": info["date_utc"], "machine": info, "jax": jax.__version__,
        "jaxlib": info.get("jaxlib"), "moejax": moejax.__version__, "backend": env.platform,
        "device_kind": env.device_kind, "device_count": jax.device_count(),
        "mode": {"smoke": env.smoke, "interpret": env.interpret, "pallas_driver": env.driver},
        "optional": {"tokamax": {"available": env.tokamax is not None, "version": env.tokamax_version,
                                 "reason": env.tokamax_reason},
                     "megablox": {"available": env.megablox_gmm is not None, "reason": env.megablox_reason}},
        "args": {"argv": list(sys.argv[1:] if argv is None else argv), "budget_s": args.budget_s,
                 "repeats": repeats, "e2e_layers": args.e2e_layers, "sections": list(args.sections)},
        "sections": {},
    }
    print(f"device_check: backend={env.platform} device={env.device_kind} jax={jax.__version__} "
          f"mode={env.mode} driver={env.driver} tokamax={env.tokamax_version or env.tokamax_reason}", flush=True)
    sections = payload["sections"]
    not_requested = {"status": "skipped", "reason": "not requested (--sections)"}
    # The end-to-end section gets the last 35% of the budget; the speed rows stop where it begins.
    speed_deadline = env.start + (0.65 if "e2e" in args.sections else 1.0) * env.budget_s
    plan = [("correctness", "correctness", lambda: run_correctness(env)),
            ("speed", "gmm_speed", lambda: run_speed(env, repeats, speed_deadline)),
            ("e2e", "end_to_end", lambda: run_e2e(env, args.e2e_layers, min(repeats, 5)))]
    for flag, key, fn in plan:
        if flag not in args.sections:
            sections[key] = dict(not_requested)
        elif env.left() <= 0:
            sections[key] = {"status": "skipped", "reason": "budget exhausted (--budget-s) before this section"}
        else:
            sections[key] = _run_section(key, fn)
        payload["wall_s"] = time.perf_counter() - env.start
        write_json(args.out, payload)  # after every section: a run cut short keeps what it measured
    print(f"wrote {args.out} ({payload['wall_s']:.0f}s)")
    bad = [k for k, v in sections.items() if v["status"] in ("failed", "error")]
    if bad:
        print(f"device_check: {', '.join(bad)} did not pass; see {args.out}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
