"""One MoE layer, every way to run it, timed side by side in one run.

Run::

    python benchmarks/moe_layer.py                              # mixtral + deepseek, T=512,2048,1,8, 3 formats
    python benchmarks/moe_layer.py --shapes mixtral --tokens 1,2048 --formats float,int8,int4 --out FILE
    python benchmarks/moe_layer.py --quick --no-torch            # T=512,1,8, 3 repeats, no PyTorch rows

Shapes (f32 activations, SwiGLU experts, random weights, tokens and router):

* ``mixtral``: Mixtral-8x7B scaled down: d=1024, expert hidden f=2816, 8 experts, top-2.
* ``deepseek``: DeepSeek-V2-Lite-like fine-grained experts scaled down: d=1024,
  f=352, 64 experts, top-6 (routed experts only; top-k weights renormalised as
  in Mixtral so every contender computes the same function).
* ``tiny``: d=128, f=128, 8 experts, top-2: the smoke-test shape, not a benchmark.

Token counts: prefill T=512 and 2048, decode T=1 and 8 (``--quick``: 512, 1, 8);
``T <= 8`` counts as a decode step of T sequences, larger T as prefill.

Every moejax row is the one-layer model :func:`layer` (``moejax.dialect.sparse_moe``:
router, dispatch, expert FFN, combine) run through ``moejax.optimize`` with a
named pipeline, then called as the optimised model (``opt(x)``), exactly as a user would:

* ``contender="moejax"``: the pipeline's own choice, ``select-impl`` for float
  experts, ``quantize(bits=8),select-impl`` for ``int8`` and
  ``quantize(bits=4,group_size=128),select-impl`` for ``int4`` (``int4-g64`` etc.
  pick another group size). ``impl`` and ``layout`` record what select-impl chose.
* ``contender="moejax:impl=NAME"``: the same pipeline with ``select-impl(impl=NAME)``
  for every registered expert implementation except ``reference`` (the
  specification, E times the FLOPs) and ``pallas`` (interpret-only on CPU); and
  ``moejax:impl=NAME,layout=stacked`` where NAME's default layout is per-expert.

References (not moejax; float experts, hand-written JAX or PyTorch):

* ``torch`` / ``torch_grouped_mm``: transformers' ``MixtralSparseMoeBlock`` (its eager
  experts loop / the ``grouped_mm`` experts implementation where it runs on this machine).
* ``reference:dense_all``: every expert on every token, then the weighted sum (E/k x the FLOPs).
* ``reference:gshard``: GShard capacity einsum (capacity factor 1.25; tokens past
  capacity are dropped, so it is not the same function: ``exact=False``).
* ``reference:dense_eq``: dense matmuls of the same active FLOPs (T*k rows through one
  expert-sized FFN): a compute yardstick, not the layer (``exact=None``).

Exact and lossy rows are kept apart: ``exact`` is True for float experts and False for
quantized ones (a different function than float PyTorch computes). Columns of a row:

* ``median_ms``/``min_ms``/``times_s``: wall time of the repeats (all kept; at least 3 by default).
* ``x_torch`` (exact rows only): the faster PyTorch variant's median over this one.
* ``x_torch_float`` (lossy rows only): the same ratio, against *float* PyTorch.
* ``x_moejax_float`` (lossy rows): the float ``moejax`` row's median over this one.
* ``x_dense_eq``: ``reference:dense_eq``'s median over this one.
* ``x_mem_bound`` (decode): the memory bound over the median, where the bound is the
  bytes of the experts the tokens touch (for int8/int4 the quantized experts'
  bytes, scales included; ``moejax.weight_formats.nbytes_of``) plus the router, at
  the measured copy bandwidth (STREAM convention: bytes read + written).
* ``max_abs_err_vs_reference``: moejax rows against the same pipeline before
  ``select-impl`` (the ``reference`` expert op on the same, maybe quantized, weights);
  ``max_abs_err_vs_dense_all``: against the float ``reference:dense_all``.
* ``threads``: intra-op threads of PyTorch, XLA:CPU and the native kernel (``--threads``, the same for all).

The JSON's ``goals`` (and the last table printed) read issue #18's goal ratios for the
Mixtral layer off the ``moejax`` rows, when the run has them: int4 over float at T=1
(``x_moejax_float``), T=1 ``x_mem_bound`` per format, T=2048 float ``x_torch``.

All contenders of one (shape, T) case, every format included, are timed in
interleaved rounds (see ``benchmarks/common.py``), so ratios within a case come from
one run; ``--budget-s`` caps a case's rounds, never below 3 (or ``--repeats``).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (DEFAULT_REPEATS, add_threads_argument, copy_bandwidth, default_out,  # noqa: E402
                    format_table, result_payload, set_threads_or_exit, set_torch_threads, time_interleaved, write_json)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import moejax  # noqa: E402  (registers the expert implementations, blocked included)
import moejax.passes  # noqa: E402,F401  (registers quantize and select-impl)
from moejax import dialect  # noqa: E402
from moejax import weight_formats as wf  # noqa: E402


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


SHAPES = {
    "mixtral": LayerShape("mixtral", d=1024, f=2816, experts=8, k=2, norm_topk=True),
    # norm_topk as in Mixtral so every contender (and the torch block) computes the same function.
    "deepseek": LayerShape("deepseek", d=1024, f=352, experts=64, k=6, norm_topk=True),
    # the smoke-test shape (tests/test_benchmarks.py): d and f divisible by 128 for int4-g128
    "tiny": LayerShape("tiny", d=128, f=128, experts=8, k=2, norm_topk=True),
}
PREFILL, DECODE = (512, 2048), (1, 8)
DECODE_MAX_T = 8  # a decode step of T <= 8 sequences; more tokens count as prefill
CAPACITY_FACTOR = 1.25
DEFAULT_FORMATS = "float,int8,int4"
# Implementations not timed: the specification (E x the FLOPs) and Pallas (interpret-only on CPU).
SKIPPED_IMPLS = ("reference", "pallas")
MATS = ("w_gate", "w_up", "w_down")


# --------------------------------------------------------------------------
# Formats and pipelines.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Format:
    """An expert storage format and the ``quantize`` pass producing it (none for float)."""

    label: str
    quantize: str | None

    @property
    def exact(self) -> bool:
        return self.quantize is None

    def pipeline(self, select_impl: str = "select-impl") -> str:
        return select_impl if self.quantize is None else f"{self.quantize},{select_impl}"


_FORMAT_RE = re.compile(r"^int([2348])(?:-g(\d+))?$")


def parse_format(name: str) -> Format:
    """``float``, ``int8`` (per output channel), ``int4`` (= ``int4-g128``), ``int<b>-g<G>`` for b in 2, 3, 4, 8."""
    if name == "float":
        return Format("float", None)
    m = _FORMAT_RE.match(name)
    if not m:
        raise ValueError(f"unknown format {name!r}; use float, int8, int4 or int<bits>-g<group> (e.g. int4-g64)")
    bits, group = int(m.group(1)), m.group(2)
    if group is None and bits < 8:
        group = "128"  # quantize's default group for widths below 8, made explicit in the label and pipeline
    spec = f"quantize(bits={bits}" + (f",group_size={group}" if group else "") + ")"
    return Format(f"int{bits}" + (f"-g{group}" if group else ""), spec)


def fitted_format(fmt: Format, shape: LayerShape) -> Format:
    """``fmt`` with its group halved until it divides the shape's d and f (DeepSeek's f=352: int4-g128 -> int4-g32)."""
    m = re.match(r"^int(\d)-g(\d+)$", fmt.label)
    if not m:
        return fmt
    bits, group = int(m.group(1)), int(m.group(2))
    while group > 1 and (shape.d % group or shape.f % group):
        group //= 2
    return parse_format(f"int{bits}-g{group}")


def timed_impls() -> tuple[str, ...]:
    """Registered expert implementations that get a forced ``select-impl(impl=NAME)`` row."""
    return tuple(i for i in dialect.ffn_impls() if i not in SKIPPED_IMPLS)


# --------------------------------------------------------------------------
# The model moejax optimises, and the references.
# --------------------------------------------------------------------------
def make_params(shape: LayerShape, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    e, d, f = shape.experts, shape.d, shape.f
    return {
        "router": (rng.standard_normal((d, e)) / math.sqrt(d)).astype(np.float32),
        "w_gate": (rng.standard_normal((e, d, f)) * 0.02).astype(np.float32),
        "w_up": (rng.standard_normal((e, d, f)) * 0.02).astype(np.float32),
        "w_down": (rng.standard_normal((e, f, d)) * 0.02).astype(np.float32),
    }


def layer(params: dict[str, Any], x: jax.Array, *, routing: dialect.Routing) -> jax.Array:
    """The one-layer model: a routed-experts block on tokens ``x [T, d]`` in moejax's dialect."""
    return dialect.sparse_moe(x, params["router"], tuple(params[n] for n in MATS), routing=routing,
                              activation="swiglu")


def dense_all_layer(x, p, *, routing):
    return dialect.einsum_moe_reference(x, p["router"], tuple(p[n] for n in MATS), routing=routing,
                                        activation="swiglu")


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
    """The compute yardstick: T*k rows through one expert-sized FFN."""
    return jnp.dot(jax.nn.silu(jnp.dot(x_rows, w_gate)) * jnp.dot(x_rows, w_up), w_down)


# --------------------------------------------------------------------------
# moejax contenders: one optimize call per pipeline, every token count a signature.
# --------------------------------------------------------------------------
@dataclasses.dataclass
class Contender:
    """One optimised pipeline: its row label, the optimised model and the format it stores."""

    name: str
    fmt: Format
    pipeline: str
    opt: moejax.OptimizedModel


def _signature(tokens: int) -> str:
    return f"T{tokens}"


def optimize_layer(shape: LayerShape, params: dict[str, jax.Array], token_counts: Sequence[int],
                   pipeline: str) -> moejax.OptimizedModel:
    """``moejax.optimize`` of :func:`layer` on one signature per token count."""
    routing = dialect.Routing(k=shape.k, norm_topk=shape.norm_topk)
    model = functools.partial(layer, routing=routing)
    examples = {_signature(t): ((jnp.zeros((t, shape.d), jnp.float32),), {}) for t in token_counts}
    (first, _), rest = examples.pop(_signature(token_counts[0])), examples
    # check_exact=False: every row is checked below against the same pipeline's reference
    # stage on the benchmark's own tokens (the pass manager's checks would compile each stage twice more)
    return moejax.optimize(model, first, pipeline, params=params, extra_examples=rest, check_exact=False)


def _chosen(opt: moejax.OptimizedModel, tokens: int, first: int) -> tuple[str, str]:
    """(impl, layout) that select-impl chose for the signature of ``tokens``."""
    stage = opt.stages_of("forward" if tokens == first else _signature(tokens))[-1]
    impls = "+".join(sorted(stage.stats["ffn_impls"]))
    layouts = set(stage.program.metadata.get("expert_layout", {}).values())
    return impls, "+".join(sorted(layouts)) or "stacked"


def build_contenders(shape: LayerShape, params: dict[str, jax.Array], token_counts: Sequence[int],
                     formats: Sequence[Format], skipped: dict[str, str],
                     log: Callable[[str], None]) -> list[Contender]:
    """Every moejax pipeline of the run: per format the pipeline's choice and each forced impl.

    A forced implementation that cannot be optimised here (e.g. one needing a compiler
    this machine lacks) is left out and named in ``skipped``; the pipeline's choice must work.
    """
    out = []

    def add(name: str, fmt: Format, pipeline: str) -> Contender | None:
        t0 = time.perf_counter()
        try:
            opt = optimize_layer(shape, params, token_counts, pipeline)
        except Exception as err:  # noqa: BLE001 - a row that cannot run is reported, not fatal
            if name == "moejax":
                raise
            skipped[f"{shape.name} {pipeline}"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            log(f"  [{shape.name}] {pipeline} skipped: {skipped[f'{shape.name} {pipeline}']}")
            return None
        log(f"  [{shape.name}] optimized {pipeline} in {time.perf_counter() - t0:.1f}s")
        out.append(Contender(name, fmt, pipeline, opt))
        return out[-1]

    for fmt in formats:
        add("moejax", fmt, fmt.pipeline())
        for impl in timed_impls():
            forced = add(f"moejax:impl={impl}", fmt, fmt.pipeline(f"select-impl(impl={impl})"))
            if forced and _chosen(forced.opt, token_counts[0], token_counts[0])[1] == "per-expert":
                # the same op on stacked weights: what the per-expert layout buys
                add(f"moejax:impl={impl},layout=stacked", fmt,
                    fmt.pipeline(f"select-impl(impl={impl},layout=stacked)"))
    return out


def touched_expert_bytes(opt: moejax.OptimizedModel, expert_ids: np.ndarray, router_bytes: int) -> int:
    """Bytes a layer call must read: the touched experts in the pipeline's storage format, plus the router.

    Read from the stage before ``select-impl``, where expert weights are still stacked
    ``[E, k, n]`` (quantized: codes + scales, as :func:`moejax.weight_formats.nbytes_of` counts).
    """
    weights = opt.stages[-2].program.weights if len(opt.stages) > 1 else opt.stages[0].program.weights
    touched = np.unique(expert_ids[expert_ids >= 0])
    return router_bytes + sum(wf.nbytes_of(wf.expert_slice(weights[n], int(e))) for n in MATS for e in touched)


# --------------------------------------------------------------------------
# PyTorch (transformers) block.
# --------------------------------------------------------------------------
def torch_blocks(shape: LayerShape, params: dict[str, np.ndarray]) -> dict[str, Callable]:
    """name -> transformers' Mixtral block with these weights; {} without torch/transformers."""
    try:
        import torch
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return {}
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


def _torch_call(block: Any, xt: Any) -> Any:
    import torch

    with torch.inference_mode():
        return block(xt)


# --------------------------------------------------------------------------
# One (shape, T) case.
# --------------------------------------------------------------------------
def _ratio(num: float | None, den: float) -> float | None:
    return None if num is None else num / den


def _key(c: Contender) -> str:
    return c.name + "|" + c.fmt.label


def exactness_errors(contenders: Sequence[Contender], fns: dict[str, Callable[[], Any]],
                     x: jax.Array) -> dict[str, dict[str, float]]:
    """Max abs errors per row: moejax rows against their pipeline's reference stage (the same pipeline
    before ``select-impl``: the reference expert op on the same, maybe quantized, weights) and every
    row but the yardstick against float ``reference:dense_all``."""
    dense_all = np.asarray(fns["reference:dense_all|float"]())

    def err(y: Any, ref: np.ndarray) -> float:
        return float(np.max(np.abs(np.asarray(y).reshape(ref.shape) - ref)))

    pipeline_refs: dict[str, np.ndarray] = {}
    errors: dict[str, dict[str, float]] = {}
    for c in contenders:
        if c.fmt.label not in pipeline_refs:
            pipeline_refs[c.fmt.label] = np.asarray(c.opt.at_stage(-2)(x))
        y = fns[_key(c)]()
        errors[_key(c)] = {"max_abs_err_vs_reference": err(y, pipeline_refs[c.fmt.label]),
                           "max_abs_err_vs_dense_all": err(y, dense_all)}
    for key, fn in fns.items():
        if key.startswith("torch") or key.startswith("reference:gshard"):
            y = fn()
            errors[key] = {"max_abs_err_vs_dense_all": err(y.numpy() if hasattr(y, "numpy") else y, dense_all)}
    return errors


def run_case(shape: LayerShape, tokens: int, params: dict[str, jax.Array], contenders: Sequence[Contender],
             first_tokens: int, tblocks: dict[str, Any], bandwidth_gbs: float, repeats: int, budget_s: float,
             threads: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Time every contender on one token count, interleaved; one row each."""
    routing = dialect.Routing(k=shape.k, norm_topk=shape.norm_topk)
    rng = np.random.default_rng(tokens)
    x_np = rng.standard_normal((tokens, shape.d)).astype(np.float32)
    x = jnp.asarray(x_np)
    capacity = max(1, math.ceil(CAPACITY_FACTOR * tokens * shape.k / shape.experts))
    x_rows = jnp.asarray(np.resize(x_np, (tokens * shape.k, shape.d)))

    fns: dict[str, Callable[[], Any]] = {_key(c): functools.partial(c.opt, x) for c in contenders}
    refs = {
        "reference:dense_all": functools.partial(jax.jit(functools.partial(dense_all_layer, routing=routing)),
                                                 x, params),
        "reference:gshard": functools.partial(
            jax.jit(functools.partial(gshard_layer, routing=routing, capacity=capacity)), x, params),
        "reference:dense_eq": functools.partial(jax.jit(dense_eq_layer), x_rows, *(params[n][0] for n in MATS)),
    }
    fns.update({f"{n}|float": fn for n, fn in refs.items()})
    if tblocks:
        import torch

        x_t = torch.from_numpy(x_np.copy()).reshape(1, tokens, shape.d)
        for name, block in tblocks.items():
            try:
                _torch_call(block, x_t)
            except Exception as err:  # an experts implementation that does not run on this machine
                log(f"  [{shape.name} T={tokens}] {name} skipped: {type(err).__name__}: {str(err)[:200]}")
                continue
            fns[f"{name}|float"] = functools.partial(_torch_call, block, x_t)

    errors = exactness_errors(contenders, fns, x)  # correctness first
    timings = time_interleaved(fns, warmup=1, repeats=repeats, budget_s=budget_s,
                               min_repeats=min(repeats, DEFAULT_REPEATS))

    _, ids = dialect.route_reference(x, params["router"], routing=routing)
    ids = np.asarray(ids)
    router_bytes = int(params["router"].nbytes)
    float_bytes = router_bytes + int(np.unique(ids[ids >= 0]).size) * 3 * shape.d * shape.f * 4
    mem_bytes = {c.fmt.label: touched_expert_bytes(c.opt, ids, router_bytes) for c in contenders}
    phase = "decode" if tokens <= DECODE_MAX_T else "prefill"
    torch_best = min((t.median for k, t in timings.items() if k.startswith("torch")), default=None)
    float_moejax = timings.get("moejax|float")
    by_key = {_key(c): c for c in contenders}
    out = []
    for key, tm in timings.items():
        name, label = key.split("|")
        c = by_key.get(key)
        med = tm.median
        lossy = c is not None and not c.fmt.exact
        # gshard drops tokens past capacity; dense_eq is a yardstick, not the layer
        exact = (c.fmt.exact if c else
                 None if name == "reference:dense_eq" else name != "reference:gshard")
        nbytes = mem_bytes[label] if c else float_bytes
        impl, layout = _chosen(c.opt, tokens, first_tokens) if c else (None, None)
        flops = shape.active_flops(tokens)
        row = {
            "shape": shape.name, "T": tokens, "phase": phase, "format": label, "contender": name,
            "pipeline": c.pipeline if c else None, "impl": impl, "layout": layout, "exact": exact,
            "threads": threads, "median_ms": med * 1e3, "min_ms": tm.min * 1e3, "repeats": len(tm.times),
            "gflops": flops / med / 1e9,
            # lossy rows never get x_torch: float PyTorch computes another function
            "x_torch": None if lossy else _ratio(torch_best, med),
            "x_torch_float": _ratio(torch_best, med) if lossy else None,
            "x_moejax_float": _ratio(float_moejax.median, med) if lossy and float_moejax else None,
            "x_dense_eq": timings["reference:dense_eq|float"].median / med,
            "x_mem_bound": nbytes / (bandwidth_gbs * 1e9) / med if phase == "decode" else None,
            "mem_bound_ms": nbytes / (bandwidth_gbs * 1e9) * 1e3, "touched_bytes": nbytes,
            "experts_touched": int(np.unique(ids[ids >= 0]).size),
            **errors.get(key, {}),
            "capacity_gshard": capacity if name == "reference:gshard" else None,
            "times_s": list(tm.times),
        }
        out.append(row)
    return out


# --------------------------------------------------------------------------
# Tables and main.
# --------------------------------------------------------------------------
EXACT_COLUMNS = ["shape", "T", "contender", "impl", "median_ms", "gflops", "x_torch", "x_dense_eq", "x_mem_bound",
                 "max_abs_err_vs_dense_all"]
LOSSY_COLUMNS = ["shape", "T", "format", "contender", "impl", "median_ms", "x_moejax_float", "x_torch_float",
                 "x_mem_bound", "max_abs_err_vs_reference"]


def tables(rows: Sequence[dict[str, Any]]) -> str:
    """Exact rows (float experts, references, PyTorch) and lossy rows (quantized experts) in separate tables."""
    exact = [r for r in rows if r["format"] == "float"]
    lossy = [r for r in rows if r["format"] != "float"]
    text = ["exact (float experts; references and PyTorch; x_torch: faster PyTorch block / row):",
            format_table(exact, EXACT_COLUMNS)]
    if lossy:
        text += ["", "lossy (quantized experts: another function than float PyTorch; x_torch_float compares to "
                 "it anyway, x_moejax_float to moejax's float row):", format_table(lossy, LOSSY_COLUMNS)]
    return "\n".join(text)


# Issue #18's goals for the Mixtral layer: (name, format, T, column, target); read from the "moejax" rows.
GOALS = (
    ("decode T=1: int4 experts over float experts", "int4-g128", 1, "x_moejax_float", 2.5),
    ("decode T=1: float vs memory bound", "float", 1, "x_mem_bound", 0.7),
    ("decode T=1: int8 vs memory bound", "int8", 1, "x_mem_bound", 0.7),
    ("decode T=1: int4 vs memory bound", "int4-g128", 1, "x_mem_bound", 0.7),
    ("prefill T=2048: float vs PyTorch", "float", 2048, "x_torch", 1.0),
)


def goal_summary(rows: Sequence[dict[str, Any]], shape: str = "mixtral") -> list[dict[str, Any]]:
    """The goal ratios this run measured (rows missing from the run are left out)."""
    by = {(r["format"], r["T"]): r for r in rows if r["shape"] == shape and r["contender"] == "moejax"}
    out = []
    for name, fmt, tokens, column, target in GOALS:
        value = by.get((fmt, tokens), {}).get(column)
        if value is not None:
            out.append({"goal": name, "shape": shape, "format": fmt, "T": tokens, "column": column,
                        "value": value, "target": target, "met": value >= target})
    return out


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T=512 prefill and T=1,8 decode")
    ap.add_argument("--shapes", default="mixtral,deepseek", help="comma-separated: " + ",".join(SHAPES))
    ap.add_argument("--tokens", default=None,
                    help=f"comma-separated token counts instead of the default cases (T <= {DECODE_MAX_T}: decode)")
    ap.add_argument("--formats", default=DEFAULT_FORMATS,
                    help="comma-separated expert formats: float, int8, int4 (= int4-g128), int<bits>-g<group>")
    ap.add_argument("--repeats", type=int, default=None,
                    help=f"timed rounds per case (default 5, --quick {DEFAULT_REPEATS})")
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help=f"time budget for one case's timed rounds (never below {DEFAULT_REPEATS} rounds)")
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers PyTorch blocks")
    add_threads_argument(ap)
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/moe_layer.json; --shapes tiny: a temp file)")
    args = ap.parse_args(argv)

    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in names if s not in SHAPES]
    if unknown or not names:
        ap.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    args.out = args.out or default_out("moe_layer", smoke=names == ["tiny"])
    token_counts = ((512,) if args.quick else PREFILL) + DECODE
    if args.tokens:
        try:
            token_counts = _int_list(args.tokens)
        except ValueError:
            ap.error(f"--tokens must be comma-separated integers, got {args.tokens!r}")
        if not token_counts or min(token_counts) < 1 or len(set(token_counts)) != len(token_counts):
            ap.error(f"--tokens must be distinct positive integers, got {args.tokens!r}")
    try:
        formats = [parse_format(f.strip()) for f in args.formats.split(",") if f.strip()]
    except ValueError as err:
        ap.error(f"--formats: {err}")
    if not formats or len({f.label for f in formats}) != len(formats):
        ap.error(f"--formats must name distinct formats, got {args.formats!r}")
    repeats = args.repeats or (DEFAULT_REPEATS if args.quick else 5)
    if repeats < 1:
        ap.error("--repeats must be >= 1")
    threads = set_threads_or_exit(ap, args.threads)  # before the first JAX computation: XLA sizes its pool then
    for shape in (SHAPES[s] for s in names):
        for fmt in formats:
            if fmt.label != fitted_format(fmt, shape).label:
                log_note = f"{fmt.label} runs as {fitted_format(fmt, shape).label} on shape {shape.name}"
                print(f"note: {log_note} (its group must divide d={shape.d} and f={shape.f})", file=sys.stderr)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    start = time.perf_counter()
    biggest = max(SHAPES[s].experts * 3 * SHAPES[s].d * SHAPES[s].f * 4 for s in names)
    bw = copy_bandwidth(biggest)
    has_torch = not args.no_torch and set_torch_threads(threads)
    print(f"threads: {threads}")
    print(f"copy bandwidth ({bw['array_bytes'] / 1e6:.0f} MB array, read+write): numpy {bw['numpy_copy_gbs']:.1f} "
          f"GB/s, XLA {bw['xla_copy_gbs']:.1f} GB/s -> memory bound uses {bw['best_gbs']:.1f} GB/s", flush=True)

    rows: list[dict[str, Any]] = []
    pipelines: dict[str, str] = {}
    skipped: dict[str, str] = {}  # pipeline -> why it could not run here

    def payload(done: bool) -> dict[str, Any]:
        return result_payload("moe_layer", args, threads, rows, complete=done, repeats=repeats,
                              copy_bandwidth=bw, shapes={s: dataclasses.asdict(SHAPES[s]) for s in names},
                              formats=[f.label for f in formats], token_counts=list(token_counts),
                              timed_impls=list(timed_impls()), pipelines=pipelines, skipped=skipped,
                              capacity_factor=CAPACITY_FACTOR, goals=goal_summary(rows),
                              elapsed_s=time.perf_counter() - start)

    for sname in names:
        shape = SHAPES[sname]
        params_np = make_params(shape)
        params = {k: jnp.asarray(v) for k, v in params_np.items()}
        contenders = build_contenders(shape, params, token_counts, [fitted_format(f, shape) for f in formats],
                                      skipped, log)
        pipelines.update({f"{c.name} [{c.fmt.label}]": c.pipeline for c in contenders})
        tblocks = torch_blocks(shape, params_np) if has_torch else {}
        for tokens in token_counts:
            case = run_case(shape, tokens, params, contenders, token_counts[0], tblocks, bw["best_gbs"], repeats,
                            args.budget_s, threads["threads"], log)
            rows.extend(case)
            print(tables(case), "\n", flush=True)
            write_json(args.out, payload(False))  # partial results survive an interrupted run
        del tblocks, contenders, params

    print("All cases:")
    print(tables(rows))
    if goal_summary(rows):
        print("\nGoals (issue #18; the pipeline's own choice, ratios from this run):")
        print(format_table(goal_summary(rows), ["goal", "value", "target", "met"]))
    path = write_json(args.out, payload(True))
    print(f"\nwrote {path} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
