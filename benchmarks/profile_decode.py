"""Where one decode step (T=1) of a MoE layer spends its time, with warm and with cold caches.

    python benchmarks/profile_decode.py [--shape mixtral] [--iters 100]

For float and int4-g128 experts, the one-layer model of ``benchmarks/moe_layer.py``
through ``moejax.optimize`` (``select-impl``; ``quantize(bits=4,group_size=128),select-impl``)
is timed as a whole and in pieces: the native kernel's gate+up call and its down
call on the same two experts, and the layer without its expert FFN (route,
dispatch, combine and the call itself). "cold" touches a 64 MB buffer (more than
this machine's L3) before every call, as the other contenders of an interleaved
benchmark do; "warm" repeats the call back to back. Prints medians in ms; no JSON
(a diagnostic, not a benchmark: ``moe_layer.py`` holds the committed figures).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_layer  # noqa: E402

import moejax  # noqa: E402
from moejax import dialect, weight_formats as wf  # noqa: E402
from moejax.native_ffn import grouped_matmul  # noqa: E402

EVICT_BYTES = 64 << 20


def median_ms(fn: Callable[[], Any], cold: bool, iters: int, evict: np.ndarray) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        if cold:
            np.add(evict, 1, out=evict)
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="mixtral", choices=sorted(moe_layer.SHAPES))
    ap.add_argument("--iters", type=int, default=100, help="timed calls per measurement (>= 1)")
    args = ap.parse_args(argv)
    if args.iters < 1:
        ap.error("--iters must be >= 1")
    shape = moe_layer.SHAPES[args.shape]
    params = {k: jnp.asarray(v) for k, v in moe_layer.make_params(shape).items()}
    routing = dialect.Routing(k=shape.k, norm_topk=shape.norm_topk)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, shape.d)).astype(np.float32))
    model = functools.partial(moe_layer.layer, routing=routing)
    evict = np.ones(EVICT_BYTES, np.uint8)
    sizes = jnp.asarray(np.array([1] * shape.k + [0] * (shape.experts - shape.k), np.int32))
    rows, hidden = jnp.ones((shape.k, shape.d), jnp.float32), jnp.ones((shape.k, shape.f), jnp.float32)

    def both(fn: Callable[[], Any]) -> str:
        return f"warm {median_ms(fn, False, args.iters, evict):.3f}, cold {median_ms(fn, True, args.iters, evict):.3f}"

    for name, pipeline in (("float", "select-impl"), ("int4-g128", "quantize(bits=4,group_size=128),select-impl")):
        opt = moejax.optimize(model, (x,), pipeline, params=params, check_exact=False)
        mats = [params[n] for n in moe_layer.MATS]
        if name != "float":
            mats = [wf.quantize(m, 4, 128) for m in mats]
        gate_up = jax.jit(lambda r: grouped_matmul(r, sizes, mats[0], mats[1]))
        down = jax.jit(lambda h: grouped_matmul(h, sizes, mats[2])[0])
        touched = sum(wf.nbytes_of(wf.expert_slice(m, e)) for m in mats for e in range(shape.k))
        print(f"{name}: {touched / 1e6:.1f} MB of experts touched")
        print(f"  layer through optimize: {both(lambda: opt(x))}")
        print(f"  native gate+up call:    {both(lambda: gate_up(rows))}")
        print(f"  native down call:       {both(lambda: down(hidden))}")

    def without_ffn(p: dict[str, Any], x: jax.Array) -> jax.Array:
        w, ids = dialect.moe_route(x, p["router"], routing=routing)
        grouped, _, order = dialect.moe_dispatch(x, ids, num_experts=shape.experts)
        return dialect.moe_combine(grouped * 2.0, order, w)

    opt0 = moejax.optimize(without_ffn, (x,), "", params=params, check_exact=False)
    print(f"layer without its expert FFN: {both(lambda: opt0(x))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
