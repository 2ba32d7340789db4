"""Grouped-matmul kernel benchmark: moejax Pallas gmm vs jax.lax.ragged_dot vs dense.

On a GPU/TPU it reports, per expert shape and token count, the TFLOP/s of

* ``pallas``: :func:`moejax.pallas_kernels.gmm` (Triton on GPU, Mosaic on TPU),
* ``ragged_dot``: ``jax.lax.ragged_dot`` on the same grouped problem,
* ``dense``: one ``[m, k] x [k, n]`` matmul with the same FLOPs (the ceiling),

and for the int4 decode path (few tokens, only the touched experts' weights
are read) the GB/s of weight traffic, next to a measured device copy bandwidth.

On CPU it runs the kernels in the Pallas interpreter on small shapes for
correctness only (max abs error against ragged_dot) and prints no speed.

    python benchmarks/kernels.py --out results/kernels.json [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax import weight_formats
from moejax.pallas_kernels import gmm, quantize

# (name, experts, k, n, top_k): published expert matmul shapes (k = contraction).
SHAPES = [
    ("mixtral-8x7b w1 (4096->14336)", 8, 4096, 14336, 2),
    ("mixtral-8x7b w2 (14336->4096)", 8, 14336, 4096, 2),
    ("deepseek-moe-16b 64 experts (2048->1408)", 64, 2048, 1408, 6),
]
TOKENS = [128, 512, 2048, 8192]
DECODE_TOKENS = [1, 8, 32]


def _time(fn, *args, reps: int = 10) -> float:
    """Median seconds per call after a warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _group_sizes(rows: int, experts: int, seed: int) -> np.ndarray:
    """Rows per expert for random top-k routing (multinomial with uneven expert popularity)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(experts, 4.0))
    return rng.multinomial(rows, p).astype(np.int32)


def _copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Measured device bandwidth in GB/s of a read+write copy (the practical ceiling)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    return 2 * nbytes / _time(f, x) / 1e9


def _safe(fn):
    try:
        return fn(), None
    except Exception as e:  # report a failing kernel row instead of stopping the sweep
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"


def run_device(quick: bool) -> dict[str, Any]:
    dtype = jnp.bfloat16
    rows_out, decode_out = [], []
    tokens = TOKENS[:2] if quick else TOKENS
    for name, e, kdim, ndim, k in SHAPES:
        key = jax.random.key(0)
        rhs = (jax.random.normal(key, (e, kdim, ndim), jnp.float32) * 0.02).astype(dtype)
        for t in tokens:
            m = t * k
            lhs = jax.random.normal(jax.random.key(1), (m, kdim), dtype)
            gs = jnp.asarray(_group_sizes(m, e, t))
            flops = 2 * m * kdim * ndim
            row = dict(shape=name, tokens=t, rows=m, k=kdim, n=ndim, experts=e, gflop=flops / 1e9)
            f_pallas = jax.jit(lambda a, b, g: gmm(a, b, g, preferred_element_type=dtype))
            f_ragged = jax.jit(lambda a, b, g: jax.lax.ragged_dot(a, b, g))
            dense_w = rhs[0]
            f_dense = jax.jit(lambda a, b: a @ b)
            for label, fn, args in [("pallas", f_pallas, (lhs, rhs, gs)), ("ragged_dot", f_ragged, (lhs, rhs, gs)),
                                    ("dense", f_dense, (lhs, dense_w))]:
                sec, err = _safe(lambda: _time(fn, *args))
                row[f"{label}_ms"] = None if sec is None else sec * 1e3
                row[f"{label}_tflops"] = None if sec is None else flops / sec / 1e12
                if err:
                    row[f"{label}_error"] = err
            if row.get("pallas_tflops") and row.get("dense_tflops"):
                row["pallas_vs_dense"] = row["pallas_tflops"] / row["dense_tflops"]
            rows_out.append(row)
            print(_fmt_row(row), flush=True)
    bw = _copy_bandwidth()
    print(f"measured copy bandwidth: {bw:.0f} GB/s", flush=True)
    # int4 decode: weight bytes of the touched experts dominate.
    for name, e, d, f, k in SHAPES[:1] + SHAPES[2:]:
        w = jax.random.normal(jax.random.key(2), (e, d, f), jnp.float32) * 0.02
        q4 = quantize(w, 4, 128)
        wb = w.astype(dtype)
        for t in DECODE_TOKENS:
            m = t * k
            lhs = jax.random.normal(jax.random.key(3), (m, d), dtype)
            gs_np = _group_sizes(m, e, 100 + t)
            touched = int((gs_np > 0).sum())
            gs = jnp.asarray(gs_np)
            bytes4 = touched * (d * f // 2 + (d // 128) * f * 4)
            bytes16 = touched * d * f * 2
            row = dict(shape=name, tokens=t, experts_touched=touched, int4_weight_mb=bytes4 / 1e6)
            f4 = jax.jit(lambda a, b, g: gmm(a, b, g, preferred_element_type=dtype))
            for label, arg, nbytes in [("int4", q4, bytes4), ("bf16", wb, bytes16)]:
                sec, err = _safe(lambda: _time(f4, lhs, arg, gs))
                row[f"{label}_us"] = None if sec is None else sec * 1e6
                row[f"{label}_gbps"] = None if sec is None else nbytes / sec / 1e9
                if err:
                    row[f"{label}_error"] = err
            if row.get("int4_gbps"):
                row["int4_vs_copy_bw"] = row["int4_gbps"] / bw
            decode_out.append(row)
            print("decode " + json.dumps({kk: (round(v, 3) if isinstance(v, float) else v) for kk, v in row.items()}),
                  flush=True)
    return dict(gmm=rows_out, int4_decode=decode_out, copy_bandwidth_gbps=bw)


def _fmt_row(r: dict) -> str:
    def f(x):
        return "  fail" if x is None else f"{x:6.1f}"
    return (f"{r['shape'][:42]:42s} T={r['tokens']:5d} m={r['rows']:6d}  TFLOP/s pallas {f(r.get('pallas_tflops'))}"
            f"  ragged_dot {f(r.get('ragged_dot_tflops'))}  dense {f(r.get('dense_tflops'))}")


def run_cpu() -> dict[str, Any]:
    """Interpreter on small shapes: correctness only, no speed figures."""
    print("CPU backend: Pallas interpret mode on small shapes -- correctness only, no speed figures.")
    rng = np.random.default_rng(0)
    out = []
    for name, e, k, n, sizes in [("tiny float, empty expert", 4, 40, 24, [10, 0, 17, 6]),
                                 ("tiny int8", 4, 64, 32, [5, 9, 0, 14]),
                                 ("tiny int4-g16", 4, 64, 32, [0, 20, 3, 5])]:
        m = sum(sizes) + 3
        lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((e, k, n)), jnp.float32)
        rhs = quantize(w, 8) if "int8" in name else quantize(w, 4, 16) if "int4" in name else w
        dense = weight_formats.dequantize(rhs, jnp.float32)
        gs = jnp.asarray(sizes, jnp.int32)
        got = gmm(lhs, rhs, gs, backend="interpret")
        ref = jax.lax.ragged_dot(lhs, dense, gs)
        err = float(jnp.max(jnp.abs(got - ref)))
        out.append(dict(case=name, m=m, k=k, n=n, max_abs_err_vs_ragged_dot=err))
        print(f"{name:28s} m={m:3d} k={k} n={n}  max |pallas - ragged_dot| = {err:.2e}")
    return dict(cpu_correctness=out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write results as JSON to this path")
    ap.add_argument("--quick", action="store_true", help="fewer token counts")
    args = ap.parse_args(argv)
    platform = jax.default_backend()
    device = str(jax.devices()[0].device_kind)
    print(f"backend={platform} device={device} jax={jax.__version__}")
    try:
        results = run_cpu() if platform == "cpu" else run_device(args.quick)
    except Exception:
        traceback.print_exc()
        return 1
    results.update(backend=platform, device=device, jax=jax.__version__)
    if args.out:
        import os
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
