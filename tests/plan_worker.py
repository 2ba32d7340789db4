"""``moejax plan`` against XLA on 8 simulated CPU devices (run by tests/test_plan.py in a subprocess).

Usage: ``python tests/plan_worker.py [CASE ...]``; prints one JSON line ``RESULT {case: {...}}``.
For each case a scaled-down model with real weights goes through ``ep`` on a real
mesh (plus the case's pipeline), its delivered prefill program (tokens ``[B, L]``
into a KV cache of ``L`` slots, the cache donated as a server would) is compiled
with the sharded weights, and ``compiled.memory_analysis()`` is set beside
:func:`moejax.sharding.plan.plan_memory` for the same config, mesh and shapes:

* XLA total = argument + output - alias + temp bytes (per device);
* plan weights + KV cache <-> arguments (the weights and the cache; the tokens are a few bytes);
* plan activations + all-to-all buffers <-> output - alias + temp (the logits output and every temporary).
"""
from __future__ import annotations

import os
import sys

# XLA:CPU's default scheduler trades memory for concurrency: on "kv_n8" (6 MoE layers with large
# exchange buffers) it keeps every layer's MoE buffers live at once (+8 MB per layer). The checked
# cases use the default; PLAN_WORKER_CPU_SCHEDULER=memory compiles with the memory-minimizing schedule
# (closer to accelerators, which schedule under a memory limit) for the comparison in sharding/README.md.
_SCHEDULER = (" --xla_cpu_enable_concurrency_optimized_scheduler=false"
              if os.environ.get("PLAN_WORKER_CPU_SCHEDULER") == "memory" else "")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           + _SCHEDULER)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import moejax  # noqa: E402
from moejax import dialect, sharding  # noqa: E402
from moejax.models import MoEConfig, MoEDecoder  # noqa: E402
from moejax.sharding.plan import plan_memory  # noqa: E402

_MIXTRAL = dict(vocab_size=2048, d_model=256, n_heads=8, n_kv_heads=2, d_ff_expert=512, routing=dialect.Routing(k=2))
_DEEPSEEK = dict(vocab_size=2048, d_model=256, n_heads=8, n_kv_heads=8, d_ff_expert=128, n_experts=4,
                 routing=dialect.Routing(k=2, score="sigmoid", n_group=2, topk_group=1), n_shared_experts=1,
                 d_ff_shared=128, selection_bias=True, first_dense_layers=1, d_ff_dense=512, attention="mla",
                 kv_lora_rank=64, q_lora_rank=96, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                 family="deepseek_v3")

# name -> (config, mesh, batch, context, pipeline, dtype); chosen so that weights, the KV cache and
# activations each dominate somewhere. One expert per device: with several, XLA:CPU copies each expert
# out of the stacked array before its dot (temporaries the planner does not model: GPU/TPU kernels read
# the experts in place); "multi_expert_n8" measures that gap and is reported, not asserted.
CASES = {
    "weights_n8": (MoEConfig(n_layers=4, n_experts=8, **{**_MIXTRAL, "d_ff_expert": 1024}), {"expert": 8}, 1, 64,
                   "", "float32"),
    "activations_n4": (MoEConfig(n_layers=2, n_experts=4, **_MIXTRAL), {"expert": 4}, 4, 512, "", "float32"),
    "int4_n2": (MoEConfig(n_layers=2, n_experts=2, **_MIXTRAL), {"expert": 2}, 2, 256, "quantize(bits=4)",
                "float32"),
    # XLA:CPU computes bf16 models in float32 (upcast weights and activations): reported, not asserted.
    "bf16_n2": (MoEConfig(n_layers=2, n_experts=2, **_MIXTRAL), {"expert": 2}, 2, 256, "", "bfloat16"),
    "multi_expert_n8": (MoEConfig(n_layers=2, n_experts=16, **_MIXTRAL), {"expert": 8}, 1, 64, "", "float32"),
    "kv_n8": (MoEConfig(n_layers=6, n_experts=8, **{**_MIXTRAL, "vocab_size": 256, "n_kv_heads": 8,
                                                    "d_ff_expert": 128}), {"expert": 8}, 32, 128, "", "float32"),
    "mla_kv_n4_data2": (MoEConfig(n_layers=3, **_DEEPSEEK), {"expert": 4, "data": 2}, 8, 256, "", "float32"),
}


def measure(cfg: MoEConfig, mesh: dict, batch: int, context: int, pipeline: str, dtype_name: str) -> dict:
    dtype = jnp.dtype(dtype_name)
    t0 = time.perf_counter()
    plan = plan_memory(cfg, mesh=mesh, device_name="h200", batch=batch, context=context, pipeline=pipeline,
                       dtype=dtype, platform="cpu")
    model = MoEDecoder(cfg, rngs=nnx.Rngs(0), dtype=dtype)
    tokens = jnp.zeros((batch, context), jnp.int32)
    cache = model.init_cache(batch, context, dtype)
    data = mesh.get("data", 1)
    ep = sharding.ExpertParallel(mesh=sharding.expert_mesh(mesh["expert"], data=data),
                                 data_axis="data" if data > 1 else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = moejax.optimize(model, (tokens,), [ep] + ([pipeline] if pipeline else []), check_exact=False,
                              example_kwargs={"cache": cache, "cache_index": 0})
    program = opt.delivered("forward")
    run = program.as_function()
    cache_leaves = jax.tree_util.tree_leaves(cache)

    def prefill(weights, tokens, cache_leaves, index):
        return run(weights, tokens, *cache_leaves, index)

    compiled = jax.jit(prefill, donate_argnums=(2,)).lower(program.weight_leaves, tokens, cache_leaves,
                                                           jnp.int32(0)).compile()
    m = compiled.memory_analysis()
    xla = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes,
           "temp": m.temp_size_in_bytes}
    xla["total"] = xla["argument"] + xla["output"] - xla["alias"] + xla["temp"]
    p = plan.to_json()
    return {
        "plan": {k: p[k] for k in ("weights_bytes_per_device", "kv_cache_bytes_per_device",
                                   "activation_bytes_per_device", "all_to_all_bytes_per_device",
                                   "total_bytes_per_device", "activations")},
        "xla": xla,
        "plan_arguments": p["weights_bytes_per_device"] + p["kv_cache_bytes_per_device"],
        "plan_temporaries": p["total_bytes_per_device"] - p["weights_bytes_per_device"]
        - p["kv_cache_bytes_per_device"],
        "xla_temporaries": xla["output"] - xla["alias"] + xla["temp"],
        "ratio": p["total_bytes_per_device"] / xla["total"],
        "seconds": time.perf_counter() - t0,
    }


def main(names: list[str]) -> None:
    out = {}
    for name in names or list(CASES):
        try:
            out[name] = measure(*CASES[name])
        except Exception as e:  # report, do not hide: the test prints it
            out[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
