"""Expert-parallel checks on 8 simulated CPU devices (run by tests/test_sharding_ep.py in a subprocess).

Usage: ``python tests/ep_worker.py CASE [CASE ...]``; prints one JSON line
``RESULT {case: {...}}``. The device count must be set before JAX starts, which is
why this runs as its own process.
"""
from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import moejax  # noqa: E402
from moejax import dialect  # noqa: E402
from moejax.models import MoEConfig, MoEDecoder, tiny_mixtral  # noqa: E402
from moejax import sharding  # noqa: E402


def mixtral(scan: bool, n_layers: int = 2, n_experts: int = 8):
    return MoEDecoder(tiny_mixtral(scan_layers=scan, n_layers=n_layers, n_experts=n_experts), rngs=nnx.Rngs(0))


def fine64(scan: bool, n_layers: int = 1):
    """DeepSeek-style: 64 fine-grained experts, top-8, sigmoid group-limited routing, a shared expert."""
    cfg = MoEConfig(vocab_size=64, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, d_ff_expert=8,
                    n_experts=64, n_shared_experts=1, d_ff_shared=16, selection_bias=True,
                    routing=dialect.Routing(k=8, score="sigmoid", n_group=8, topk_group=4, scale=2.0),
                    scan_layers=scan, family="deepseek")
    return MoEDecoder(cfg, rngs=nnx.Rngs(1))


TOKENS = np.asarray(jax.random.randint(jax.random.key(7), (2, 16), 0, 64), np.int32)


def deviation(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


_TRACED: dict = {}


def traced(model, impl: str | None = None):
    """The model's program and its single-device output (cached: one reference compile per model)."""
    if id(model) not in _TRACED:
        prog = moejax.trace(model, TOKENS)
        if impl is not None:  # e.g. ragged_dot: compiles faster than the 64-expert reference loop
            prog = prog.rewrite({dialect.expert_ffn_p.name: lambda c: c.bind(impl=impl)})
        _TRACED[id(model)] = (model, prog, prog(TOKENS))
    return _TRACED[id(model)][1:]


def ep_vs_single(model, n: int, chunks: int = 1, impl: str | None = "ragged", **kw):
    prog, ref = traced(model, impl)
    ep = sharding.expert_parallel_program(prog, sharding.expert_mesh(n), overlap_chunks=chunks, **kw)
    out = ep(TOKENS)
    text = str(ep)
    return {"dev": deviation(out, ref), "scale": float(np.max(np.abs(ref))), "shard_maps": text.count("shard_map["),
            "all_to_all": text.count("all_to_all["), "psum": text.count("psum["),
            "layers": {k: {"layout": v["layout"], "chunks": v["chunks"], "spd": v["slots_per_device"]}
                       for k, v in ep.metadata["expert_parallel"]["layers"].items()},
            "weight_shardings": sorted({str(w.sharding.spec) for w in ep.weight_leaves
                                        if len(w.sharding.device_set) > 1})}


def case_mixtral(_):
    unrolled = mixtral(False, n_layers=1)
    return {"unrolled_n2": ep_vs_single(unrolled, 2),
            "unrolled_n8_c2": ep_vs_single(unrolled, 8, chunks=2),
            # the ragged exchange's offsets, with ragged_all_to_all emulated by all_gather (XLA:CPU lacks it)
            "ragged_emulated_n4_c2": ep_vs_single(unrolled, 4, chunks=2, exchange="ragged_emulated"),
            "scanned_n4": ep_vs_single(mixtral(True), 4)}


def case_fine64(_):
    unrolled = fine64(False)
    return {"unrolled_n8": ep_vs_single(unrolled, 8),
            "unrolled_n4_c2": ep_vs_single(unrolled, 4, chunks=2),
            "scanned_n2": ep_vs_single(fine64(True, n_layers=2), 2)}


def case_optimize_decode(_):
    """Through moejax.optimize: prefill (sharded tokens) and decode (replicated batch), exactness-checked."""
    model = mixtral(False)
    cache = model.init_cache(2, 20)
    _, cache = model(TOKENS, cache=cache, cache_index=0)
    step = TOKENS[:, :1]
    opt = moejax.optimize(model, (TOKENS,), [sharding.ExpertParallel(mesh=sharding.expert_mesh(4))],
                          decode_example=((step,), {"cache": cache, "cache_index": 16}))
    layouts = {k: v["layout"] for k, v in opt.decode_program.metadata["expert_parallel"]["layers"].items()}
    return {"prefill_dev": opt.stages[-1].max_deviation, "decode_dev": opt.decode_stages[-1].max_deviation,
            "decode_layouts": sorted(set(layouts.values())),
            "prefill_layouts": sorted({v["layout"] for v in opt.program.metadata["expert_parallel"]["layers"].values()}),
            "decode_text_all_to_all": str(opt.decode_program).count("all_to_all["),
            "decode_text_psum": str(opt.decode_program).count("psum["),
            "devices_stat": opt.stages[-1].stats["devices"]}


def case_capacity(_):
    model = mixtral(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = moejax.optimize(model, (TOKENS,), ["ep(num_devices=4,capacity_factor=0.5)"])
    meta = opt.program.metadata["expert_parallel"]
    prog = opt.stages[0].program
    dropless = sharding.expert_parallel_program(prog, sharding.expert_mesh(4))
    return {"dropped": meta["dropped_slots"], "warned": any("dropped token slots" in str(w.message) for w in caught),
            "exact": opt.passes[0].exact, "dropless_count": sharding.count_dropped(prog, dropless, TOKENS),
            "capacity": {k: v["capacity"] for k, v in meta["layers"].items()},
            "dev": deviation(opt(TOKENS), prog(TOKENS))}


def case_replicate(_):
    """6 experts on 4 devices with 2 hot replicas, balanced by a (synthetic) profile; and a data axis."""
    model = mixtral(False, n_layers=1, n_experts=6)
    prog = moejax.trace(model, TOKENS)
    counts = np.array([[40.0, 2.0, 3.0, 1.0, 10.0, 8.0]])
    prog = prog.replace(metadata={"routing_profile": {"layers/0/mlp": {"counts": counts}}})
    ref = prog(TOKENS)
    ep = sharding.expert_parallel_program(prog, sharding.expert_mesh(4), replicate_hot=2, overlap_chunks=2)
    layer = ep.metadata["expert_parallel"]["layers"]["layers/0/mlp"]
    model8 = mixtral(False, n_layers=1)
    prog8 = moejax.trace(model8, TOKENS)
    mesh2d = sharding.expert_mesh(4, data=2)
    ep2 = sharding.expert_parallel_program(prog8, mesh2d, data_axis="data")
    return {"dev": deviation(ep(TOKENS), ref), "slot_expert": layer["slot_expert"], "load_before": layer["load_before"],
            "load_after": layer["load_after"], "data_axis_dev": deviation(ep2(TOKENS), prog8(TOKENS))}


def case_default(_):
    """The bundled default model (byte-level, 8 experts, 4 layers) on 8 devices, 2 overlap chunks."""
    from moejax.models.default_model import load_default_model

    model = load_default_model()
    tokens = np.frombuffer(b"def main(argv):\n    return 0  # ok", np.uint8)[:32].astype(np.int32).reshape(2, 16)
    prog = moejax.trace(model, tokens)
    ref = prog(tokens)
    ep = sharding.expert_parallel_program(prog, sharding.expert_mesh(8), overlap_chunks=2)
    return {"dev": deviation(ep(tokens), ref), "all_to_all": str(ep).count("all_to_all["),
            "shard_maps": str(ep).count("shard_map[")}


CASES = {k[5:]: v for k, v in globals().items() if k.startswith("case_")}

if __name__ == "__main__":
    results = {}
    for name in sys.argv[1:]:
        try:
            results[name] = CASES[name](None)
        except Exception as e:  # reported to the test, which fails with the message
            import traceback
            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
    print("RESULT " + json.dumps(results, default=str))
