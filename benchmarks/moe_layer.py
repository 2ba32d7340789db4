"""One MoE layer, every way a user could run it, timed side by side in one run.

Shapes (f32, SwiGLU experts, random weights and tokens, random router):

* ``mixtral``: Mixtral-8x7B scaled down: d=1024, expert hidden f=2816, 8 experts, top-2.
* ``deepseek``: DeepSeek-V2-Lite-like fine-grained experts scaled down: d=1024,
  f=352, 64 experts, top-6 (routed experts only; shared experts are a dense FFN
  and identical across implementations, so they are left out; top-k weights are
  renormalised as in Mixtral so every implementation computes the same function).

Token counts: prefill T=512 and 2048, decode T=1 and 8 (``--quick``: 512, 1, 8).

Implementations, each a full layer (router included) from tokens [T,d] to [T,d]:

* ``moejax``: the dialect ops moe_route, moe_dispatch, moe_expert_ffn(impl="blocked"),
  moe_combine (dropless), jitted, with the weight layout ``select-impl`` chooses
  on CPU: one buffer per expert for layers of at most 16 experts (Mixtral),
  stacked otherwise (DeepSeek). The label says which strategy ran;
  ``moejax_stacked`` is the same op on stacked weights where the two differ.
* ``ragged``: the same ops with impl="ragged" (sort + ``jax.lax.ragged_dot``).
* ``dense_all``: every expert on every token, then the weighted sum (E/k x the FLOPs).
* ``gshard``: GShard capacity einsum (capacity factor 1.25; overflow tokens dropped).
* ``torch``: transformers' ``MixtralSparseMoeBlock`` (its default eager experts
  loop; the DeepSeek shape uses the same block with 64 experts, top-6) with
  ``torch.set_num_threads(os.cpu_count())``; ``torch_grouped_mm`` when that
  experts implementation runs on this machine.
* ``dense_eq``: the compute reference: dense matmuls of the same active FLOPs
  (T*k rows through one expert-sized FFN).

For every row: median ms, GFLOP/s of *active* expert FLOPs (T*k*6*d*f), the speed-up
over the fastest torch variant, the fraction of ``dense_eq`` throughput, and for
decode the fraction of the memory bound (bytes of the experts the tokens touch
divided by the measured copy bandwidth, STREAM convention: bytes read + written).

Implementations of one case are timed in interleaved rounds (see
``benchmarks/common.py``); a case's rounds are capped by ``--budget-s``.

Run: ``python benchmarks/moe_layer.py [--quick] [--out benchmarks/results/moe_layer.json]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:  # `python -m benchmarks.moe_layer` and `python benchmarks/moe_layer.py` both work
    from benchmarks.common import copy_bandwidth, format_table, machine_info, time_interleaved, write_json
except ImportError:  # pragma: no cover - script run from inside benchmarks/
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import copy_bandwidth, format_table, machine_info, time_interleaved, write_json

import moejax.blocked_ffn  # noqa: F401  registers impl "blocked"
from moejax import dialect
from moejax.blocked_ffn import choose_strategy
from moejax.expert_layout import split_experts
from moejax.passes.select_impl import AUTO_SPLIT_MAX_EXPERTS


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """A routed-experts layer: model width, expert hidden width, experts, top-k."""

    name: str
    d: int
    f: int
    experts: int
    k: int
    norm_topk: bool

    def active_flops(self, tokens: int) -> float:
        """Expert FLOPs actually needed: gate, up and down matmuls of T*k rows."""
        return 6.0 * tokens * self.k * self.d * self.f

    def expert_bytes(self, dtype_bytes: int = 4) -> int:
        return 3 * self.d * self.f * dtype_bytes


SHAPES = {
    "mixtral": LayerShape("mixtral", d=1024, f=2816, experts=8, k=2, norm_topk=True),
    # norm_topk as in Mixtral so every implementation (and the torch block) computes the same function.
    "deepseek": LayerShape("deepseek", d=1024, f=352, experts=64, k=6, norm_topk=True),
    # a smoke-test shape (tests/test_benchmarks.py), not a benchmark
    "tiny": LayerShape("tiny", d=32, f=48, experts=8, k=2, norm_topk=True),
}
PREFILL, DECODE = (512, 2048), (1, 8)
CAPACITY_FACTOR = 1.25


def make_params(shape: LayerShape, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    e, d, f = shape.experts, shape.d, shape.f
    return {
        "router": (rng.standard_normal((d, e)) / math.sqrt(d)).astype(np.float32),
        "w_gate": (rng.standard_normal((e, d, f)) * 0.02).astype(np.float32),
        "w_up": (rng.standard_normal((e, d, f)) * 0.02).astype(np.float32),
        "w_down": (rng.standard_normal((e, f, d)) * 0.02).astype(np.float32),
    }


# --------------------------------------------------------------------------
# JAX implementations: fn(x, params) -> y, all jitted.
# --------------------------------------------------------------------------
def dialect_layer(x, p, *, routing, impl, split=False):
    w, ids = dialect.moe_route(x, p["router"], routing=routing)
    grouped, sizes, order = dialect.moe_dispatch(x, ids, num_experts=p["router"].shape[1])
    mats = tuple(p[f"{n}_split" if split else n] for n in ("w_gate", "w_up", "w_down"))
    out = dialect.moe_expert_ffn(grouped, sizes, mats, activation="swiglu", impl=impl)
    return dialect.moe_combine(out, order, w)


def dense_all_layer(x, p, *, routing):
    return dialect.einsum_moe_reference(x, p["router"], (p["w_gate"], p["w_up"], p["w_down"]),
                                        routing=routing, activation="swiglu")


def gshard_layer(x, p, *, routing, capacity):
    """GShard: one-hot dispatch/combine tensors [T,E,C]; slots past capacity drop."""
    t = x.shape[0]
    e = p["router"].shape[1]
    w, ids = dialect.route_reference(x, p["router"], routing=routing)
    flat = ids.reshape(-1)                                                   # slot t*k + j
    onehot = jax.nn.one_hot(flat, e, dtype=jnp.int32)
    pos = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - 1, flat[:, None], axis=1)[:, 0]
    pos = jnp.where(pos < capacity, pos, capacity)                           # out of range: dropped
    tok = jnp.arange(flat.shape[0]) // ids.shape[1]
    dispatch = jnp.zeros((t, e, capacity), x.dtype).at[tok, flat, pos].set(1.0, mode="drop")
    combine = jnp.zeros((t, e, capacity), x.dtype).at[tok, flat, pos].set(w.reshape(-1), mode="drop")
    xe = jnp.einsum("tec,td->ecd", dispatch, x)
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", xe, p["w_gate"])) * jnp.einsum("ecd,edf->ecf", xe, p["w_up"])
    ye = jnp.einsum("ecf,efd->ecd", h, p["w_down"])
    return jnp.einsum("tec,ecd->td", combine, ye)


def dense_eq_layer(x_rows, w_gate, w_up, w_down):
    """The compute reference: T*k rows through one expert-sized FFN."""
    return jnp.dot(jax.nn.silu(jnp.dot(x_rows, w_gate)) * jnp.dot(x_rows, w_up), w_down)


# --------------------------------------------------------------------------
# PyTorch (transformers) block.
# --------------------------------------------------------------------------
def torch_blocks(shape: LayerShape, params: dict[str, np.ndarray]) -> dict[str, Callable]:
    """name -> callable(x_torch) for transformers' Mixtral block; {} without torch."""
    try:
        import torch
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return {}
    torch.set_num_threads(os.cpu_count() or 1)
    blocks = {}
    for name, impl in (("torch", None), ("torch_grouped_mm", "grouped_mm")):
        cfg = MixtralConfig(hidden_size=shape.d, intermediate_size=shape.f, num_local_experts=shape.experts,
                            num_experts_per_tok=shape.k, hidden_act="silu")
        if impl is not None:
            cfg._experts_implementation = impl
        block = MixtralSparseMoeBlock(cfg).eval()
        with torch.no_grad():  # same weights as the JAX layers (torch Linear layout: [out, in])
            block.gate.weight.copy_(torch.from_numpy(params["router"].T.copy()))
            gate_up = np.concatenate([params["w_gate"], params["w_up"]], axis=2).transpose(0, 2, 1)
            block.experts.gate_up_proj.copy_(torch.from_numpy(np.ascontiguousarray(gate_up)))
            block.experts.down_proj.copy_(torch.from_numpy(np.ascontiguousarray(params["w_down"].transpose(0, 2, 1))))
        blocks[name] = block
    return blocks


def _torch_call(block, xt):
    import torch

    with torch.inference_mode():
        return block(xt)


# --------------------------------------------------------------------------
# One (shape, T) case.
# --------------------------------------------------------------------------
def run_case(shape: LayerShape, tokens: int, params_np: dict[str, np.ndarray], params: dict[str, jax.Array],
             tblocks: dict[str, Any], bandwidth_gbs: float, repeats: int, budget_s: float) -> list[dict[str, Any]]:
    routing = dialect.Routing(k=shape.k, norm_topk=shape.norm_topk)
    rng = np.random.default_rng(tokens)
    x_np = rng.standard_normal((tokens, shape.d)).astype(np.float32)
    x = jnp.asarray(x_np)
    capacity = max(1, math.ceil(CAPACITY_FACTOR * tokens * shape.k / shape.experts))
    rows = tokens * shape.k
    x_rows = jnp.asarray(np.resize(x_np, (rows, shape.d)))
    w0 = [params[n][0] for n in ("w_gate", "w_up", "w_down")]

    split = shape.experts <= AUTO_SPLIT_MAX_EXPERTS  # the layout select-impl picks on CPU
    if split:
        params = {**params, **{f"{n}_split": split_experts(params[n]) for n in ("w_gate", "w_up", "w_down")}}
    jfns = {
        "moejax": jax.jit(functools.partial(dialect_layer, routing=routing, impl="blocked", split=split)),
        "ragged": jax.jit(functools.partial(dialect_layer, routing=routing, impl="ragged")),
        **({"moejax_stacked": jax.jit(functools.partial(dialect_layer, routing=routing, impl="blocked"))}
           if split else {}),
        "dense_all": jax.jit(functools.partial(dense_all_layer, routing=routing)),
        "gshard": jax.jit(functools.partial(gshard_layer, routing=routing, capacity=capacity)),
    }
    fns: dict[str, Callable[[], Any]] = {n: functools.partial(f, x, params) for n, f in jfns.items()}
    fns["dense_eq"] = functools.partial(jax.jit(dense_eq_layer), x_rows, *w0)
    x_t = None
    if tblocks:
        import torch

        x_t = torch.from_numpy(x_np.copy()).reshape(1, tokens, shape.d)
        for name, block in tblocks.items():
            try:
                _torch_call(block, x_t)
            except Exception as err:  # an experts implementation that does not run on CPU
                print(f"  [{shape.name} T={tokens}] {name} skipped: {type(err).__name__}: {err}", flush=True)
                continue
            fns[name] = functools.partial(_torch_call, block, x_t)

    # Exactness check of the dropless implementations against dense-all (GShard drops by design).
    ref = np.asarray(fns["dense_all"]())
    errors = {n: float(np.max(np.abs(np.asarray(fns[n]()) - ref))) for n in ("moejax", "moejax_stacked", "ragged")
              if n in fns}
    for n in fns:
        if n.startswith("torch"):
            errors[n] = float(np.max(np.abs(fns[n]().reshape(tokens, shape.d).numpy() - ref)))

    timings = time_interleaved(fns, warmup=1, repeats=repeats, budget_s=budget_s)

    # Experts the tokens actually touch, for the memory bound.
    _, ids = dialect.route_reference(x, params["router"], routing=routing)
    touched = int(np.unique(np.asarray(ids)[np.asarray(ids) >= 0]).size)
    mem_bytes = touched * shape.expert_bytes() + params_np["router"].nbytes
    mem_bound_s = mem_bytes / (bandwidth_gbs * 1e9)
    torch_best = min((timings[n].median for n in timings if n.startswith("torch")), default=None)
    flops = shape.active_flops(tokens)
    strategy = "per-expert loop" if split else choose_strategy(rows, shape.experts)
    out = []
    for name, tm in timings.items():
        med = tm.median
        row = {
            "shape": shape.name, "T": tokens, "phase": "decode" if tokens in DECODE else "prefill",
            "impl": name + (f"[{strategy}]" if name == "moejax" else ""),
            "median_ms": med * 1e3, "min_ms": tm.min * 1e3, "repeats": len(tm.times),
            "gflops": flops / med / 1e9,
            "x_torch": (torch_best / med) if torch_best else None,
            "x_dense_eq": timings["dense_eq"].median / med,
            "x_mem_bound": (mem_bound_s / med) if tokens in DECODE else None,
            "max_abs_err_vs_dense_all": errors.get(name),
            "experts_touched": touched, "mem_bound_ms": mem_bound_s * 1e3, "capacity_gshard": capacity,
            "times_s": list(tm.times),
        }
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="T=512 prefill and T=1,8 decode, 3 repeats")
    ap.add_argument("--shapes", default="mixtral,deepseek", help="comma-separated: " + ",".join(SHAPES))
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 5, quick 3)")
    ap.add_argument("--budget-s", type=float, default=30.0, help="time budget for one case's timed rounds")
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers PyTorch block")
    ap.add_argument("--tokens", default=None,
                    help="comma-separated token counts instead of the default cases (1 and 8 count as decode)")
    ap.add_argument("--out", default="benchmarks/results/moe_layer.json")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in names if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shape(s) {unknown}; choose from {sorted(SHAPES)}")
    token_counts = ((512,) if args.quick else PREFILL) + DECODE
    if args.tokens:
        try:
            token_counts = tuple(int(t) for t in args.tokens.split(","))
        except ValueError:
            ap.error(f"--tokens must be comma-separated integers, got {args.tokens!r}")
        if min(token_counts) < 1:
            ap.error("--tokens must be positive")
    repeats = args.repeats or (3 if args.quick else 5)

    start = time.perf_counter()
    info = machine_info()
    biggest = max(SHAPES[s].experts * SHAPES[s].expert_bytes() for s in names)
    bw = copy_bandwidth(biggest)
    print(f"machine: {info['cpu']}, {info['cpu_count']} cores, load avg {info.get('load_avg_1_5_15')}")
    print(f"copy bandwidth ({bw['array_bytes'] / 1e6:.0f} MB array, read+write): numpy {bw['numpy_copy_gbs']:.1f} "
          f"GB/s, XLA {bw['xla_copy_gbs']:.1f} GB/s -> memory bound uses {bw['best_gbs']:.1f} GB/s", flush=True)

    rows: list[dict[str, Any]] = []

    def payload(done: bool) -> dict[str, Any]:
        return {"benchmark": "moe_layer", "complete": done, "quick": args.quick, "repeats": repeats,
                "machine": info, "copy_bandwidth": bw, "shapes": {s: dataclasses.asdict(SHAPES[s]) for s in names},
                "capacity_factor": CAPACITY_FACTOR, "elapsed_s": time.perf_counter() - start, "rows": rows}

    for sname in names:
        shape = SHAPES[sname]
        params_np = make_params(shape)
        params = {k: jnp.asarray(v) for k, v in params_np.items()}
        tblocks = {} if args.no_torch else torch_blocks(shape, params_np)
        for tokens in token_counts:
            case = run_case(shape, tokens, params_np, params, tblocks, bw["best_gbs"], repeats, args.budget_s)
            rows.extend(case)
            print(format_table(case, ["shape", "T", "impl", "median_ms", "gflops", "x_torch", "x_dense_eq",
                                      "x_mem_bound", "max_abs_err_vs_dense_all"]), "\n", flush=True)
            write_json(args.out, payload(False))  # partial results survive an interrupted run
        del tblocks, params

    info["load_avg_end"] = list(os.getloadavg())
    elapsed = time.perf_counter() - start
    print("All cases (x_torch: speed-up over the fastest transformers block; x_dense_eq: fraction of dense "
          "equal-FLOPs throughput; x_mem_bound: fraction of the decode memory bound):")
    print(format_table(rows, ["shape", "T", "impl", "median_ms", "gflops", "x_torch", "x_dense_eq", "x_mem_bound"]))
    path = write_json(args.out, payload(True))
    print(f"\nwrote {path} ({elapsed:.0f} s; load avg at end {info['load_avg_end']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
