"""Grouped-matmul kernel benchmark: moejax Pallas gmm vs jax.lax.ragged_dot vs dense (kernel level).

Run::

    python benchmarks/kernel_speed.py --out benchmarks/results/kernel_speed.json          # GPU/TPU: speed; CPU: correctness
    python benchmarks/kernel_speed.py --quick --repeats 5
    python benchmarks/kernel_speed.py --smoke                                         # tiny shapes, 1 repeat (tests)

These rows are *kernel level* (``level="kernel"``): the kernels are called directly on
a grouped problem, not through ``moejax.optimize`` (the layer and end-to-end
benchmarks time the optimised programs). On a GPU/TPU, per expert shape and token
count (``kind="gmm"``), median ms and TFLOP/s of

* ``pallas``: :func:`moejax.pallas_kernels.gmm` (Triton on GPU, Mosaic on TPU),
* ``ragged_dot``: ``jax.lax.ragged_dot`` on the same grouped problem,
* ``dense``: one ``[m, k] x [k, n]`` matmul with the same FLOPs (the ceiling),

and for the int4 decode path (``kind="int4_decode"``: few tokens, only the touched
experts' weights are read) the GB/s of weight traffic next to a measured device copy
bandwidth. Every timing keeps its repeats (``*_times_s``; ``--repeats``, at least 3 by default).

On CPU the Pallas kernels only run in the interpreter, so it checks correctness on
small shapes (``kind="cpu_correctness"``: max abs error against ``ragged_dot``) and
reports no speed.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DEFAULT_REPEATS, Timing, add_threads_argument, default_out, result_payload,  # noqa: E402
                    set_threads_or_exit, time_fn, write_json)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moejax import weight_formats  # noqa: E402
from moejax.pallas_kernels import gmm, quantize  # noqa: E402

# (name, experts, k, n, top_k): published expert matmul shapes (k = contraction).
SHAPES = [
    ("mixtral-8x7b w1 (4096->14336)", 8, 4096, 14336, 2),
    ("mixtral-8x7b w2 (14336->4096)", 8, 14336, 4096, 2),
    ("deepseek-moe-16b 64 experts (2048->1408)", 64, 2048, 1408, 6),
]
SMOKE_SHAPES = [("smoke (256->512)", 4, 256, 512, 2)]
TOKENS = [128, 512, 2048, 8192]
DECODE_TOKENS = [1, 8, 32]
CPU_CASES = [("tiny float, empty expert", 4, 40, 24, [10, 0, 17, 6]),
             ("tiny int8", 4, 64, 32, [5, 9, 0, 14]),
             ("tiny int4-g16", 4, 64, 32, [0, 20, 3, 5])]


def _group_sizes(rows: int, experts: int, seed: int) -> np.ndarray:
    """Rows per expert for random top-k routing (multinomial with uneven expert popularity)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(experts, 4.0))
    return rng.multinomial(rows, p).astype(np.int32)


def _copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Measured device bandwidth in GB/s of a read+write copy (the practical ceiling)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    return 2 * nbytes / time_fn(lambda: f(x), repeats=repeats).median / 1e9


def _safe(fn: Callable[[], Timing]) -> tuple[Timing | None, str | None]:
    try:
        return fn(), None
    except Exception as e:  # report a failing kernel row instead of stopping the sweep
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"


Shape = tuple[str, int, int, int, int]


def run_device(shapes: list[Shape], tokens: list[int], decode_shapes: list[Shape], decode_tokens: list[int],
               repeats: int, copy_bytes: int) -> list[dict[str, Any]]:
    """Speed rows on a GPU/TPU: gmm TFLOP/s per shape and token count, then int4 decode GB/s."""
    dtype = jnp.bfloat16
    rows: list[dict[str, Any]] = []
    for name, e, kdim, ndim, k in shapes:
        rhs = (jax.random.normal(jax.random.key(0), (e, kdim, ndim), jnp.float32) * 0.02).astype(dtype)
        for t in tokens:
            m = t * k
            lhs = jax.random.normal(jax.random.key(1), (m, kdim), dtype)
            gs = jnp.asarray(_group_sizes(m, e, t))
            flops = 2 * m * kdim * ndim
            row: dict[str, Any] = dict(kind="gmm", level="kernel", shape=name, tokens=t, rows=m, k=kdim, n=ndim,
                                       experts=e, gflop=flops / 1e9)
            f_pallas = jax.jit(lambda a, b, g: gmm(a, b, g, preferred_element_type=dtype))
            f_ragged = jax.jit(lambda a, b, g: jax.lax.ragged_dot(a, b, g))
            f_dense = jax.jit(lambda a, b: a @ b)
            for label, fn, args in [("pallas", f_pallas, (lhs, rhs, gs)), ("ragged_dot", f_ragged, (lhs, rhs, gs)),
                                    ("dense", f_dense, (lhs, rhs[0]))]:
                tm, err = _safe(lambda: time_fn(lambda: fn(*args), repeats=repeats))
                row[f"{label}_ms"] = None if tm is None else tm.median * 1e3
                row[f"{label}_tflops"] = None if tm is None else flops / tm.median / 1e12
                row[f"{label}_times_s"] = None if tm is None else list(tm.times)
                if err:
                    row[f"{label}_error"] = err
            if row.get("pallas_tflops") and row.get("dense_tflops"):
                row["pallas_vs_dense"] = row["pallas_tflops"] / row["dense_tflops"]
            rows.append(row)
            print(_fmt_row(row), flush=True)
    bw = _copy_bandwidth(copy_bytes, repeats)
    print(f"measured copy bandwidth: {bw:.0f} GB/s", flush=True)
    # int4 decode: weight bytes of the touched experts dominate.
    for name, e, d, f, k in decode_shapes:
        w = jax.random.normal(jax.random.key(2), (e, d, f), jnp.float32) * 0.02
        group = min(128, d)
        q4 = quantize(w, 4, group)
        wb = w.astype(dtype)
        for t in decode_tokens:
            m = t * k
            lhs = jax.random.normal(jax.random.key(3), (m, d), dtype)
            gs_np = _group_sizes(m, e, 100 + t)
            touched = int((gs_np > 0).sum())
            gs = jnp.asarray(gs_np)
            bytes4 = touched * (d * f // 2 + (d // group) * f * 4)
            bytes16 = touched * d * f * 2
            row = dict(kind="int4_decode", level="kernel", shape=name, tokens=t, experts_touched=touched,
                       int4_group=group, int4_weight_mb=bytes4 / 1e6, copy_bandwidth_gbps=bw)
            f4 = jax.jit(lambda a, b, g: gmm(a, b, g, preferred_element_type=dtype))
            for label, arg, nbytes in [("int4", q4, bytes4), ("bf16", wb, bytes16)]:
                tm, err = _safe(lambda: time_fn(lambda: f4(lhs, arg, gs), repeats=repeats))
                row[f"{label}_us"] = None if tm is None else tm.median * 1e6
                row[f"{label}_gbps"] = None if tm is None else nbytes / tm.median / 1e9
                row[f"{label}_times_s"] = None if tm is None else list(tm.times)
                if err:
                    row[f"{label}_error"] = err
            if row.get("int4_gbps"):
                row["int4_vs_copy_bw"] = row["int4_gbps"] / bw
            rows.append(row)
            print(f"decode {name} T={t}: int4 {row.get('int4_gbps') or 0:.0f} GB/s, "
                  f"bf16 {row.get('bf16_gbps') or 0:.0f} GB/s", flush=True)
    return rows


def _fmt_row(r: dict[str, Any]) -> str:
    def f(x):
        return "  fail" if x is None else f"{x:6.1f}"
    return (f"{r['shape'][:42]:42s} T={r['tokens']:5d} m={r['rows']:6d}  TFLOP/s pallas {f(r.get('pallas_tflops'))}"
            f"  ragged_dot {f(r.get('ragged_dot_tflops'))}  dense {f(r.get('dense_tflops'))}")


def run_cpu(cases: list[tuple[str, int, int, int, list[int]]]) -> list[dict[str, Any]]:
    """Interpreter on small shapes: correctness only, no speed figures."""
    print("CPU backend: Pallas interpret mode on small shapes -- correctness only, no speed figures.")
    rng = np.random.default_rng(0)
    out = []
    for name, e, k, n, sizes in cases:
        m = sum(sizes) + 3
        lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((e, k, n)), jnp.float32)
        rhs = quantize(w, 8) if "int8" in name else quantize(w, 4, 16) if "int4" in name else w
        dense = weight_formats.dequantize(rhs, jnp.float32)
        gs = jnp.asarray(sizes, jnp.int32)
        got = gmm(lhs, rhs, gs, backend="interpret")
        ref = jax.lax.ragged_dot(lhs, dense, gs)
        err = float(jnp.max(jnp.abs(got - ref)))
        out.append(dict(kind="cpu_correctness", level="kernel", case=name, m=m, k=k, n=n,
                        max_abs_err_vs_ragged_dot=err))
        print(f"{name:28s} m={m:3d} k={k} n={n}  max |pallas - ragged_dot| = {err:.2e}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/kernel_speed.json; --smoke: a temp file)")
    ap.add_argument("--quick", action="store_true", help="fewer token counts")
    ap.add_argument("--smoke", action="store_true", help="one tiny shape, 1 repeat (CPU: one correctness case)")
    ap.add_argument("--repeats", type=int, default=None,
                    help=f"timed calls per kernel after a warm-up (default 10; --smoke 1; >= {DEFAULT_REPEATS} "
                         "for results)")
    add_threads_argument(ap)
    args = ap.parse_args(argv)
    args.out = args.out or default_out("kernel_speed", args.smoke)
    repeats = args.repeats or (1 if args.smoke else 10)
    if repeats < 1:
        ap.error("--repeats must be >= 1")
    threads = set_threads_or_exit(ap, args.threads)  # before the first JAX computation: XLA sizes its pool then
    platform = jax.default_backend()
    device = str(jax.devices()[0].device_kind)
    print(f"backend={platform} device={device} jax={jax.__version__}")
    try:
        if platform == "cpu":
            rows = run_cpu(CPU_CASES[:1] if args.smoke else CPU_CASES)
        elif args.smoke:
            rows = run_device(SMOKE_SHAPES, [16], SMOKE_SHAPES, [1], repeats, 1 << 24)
        else:  # int4 decode on the Mixtral w1 and DeepSeek shapes
            rows = run_device(SHAPES, TOKENS[:2] if args.quick else TOKENS, [SHAPES[0], SHAPES[2]], DECODE_TOKENS,
                              repeats, 1 << 30)
    except Exception:
        traceback.print_exc()
        return 1
    path = write_json(args.out, result_payload("kernel_speed", args, threads, rows, level="kernel", backend=platform,
                                               device=device, repeats=repeats,
                                               speed_measured=platform != "cpu"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
