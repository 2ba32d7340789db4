"""Loading checkpoints onto a mesh of 8 simulated CPU devices (run by tests/test_sharded_load.py).

Usage: ``python tests/sharded_load_worker.py TMP_DIR``; prints one JSON line ``RESULT {case: {...}}``.
The device count must be set before JAX starts, which is why this runs as its own process.
"""
from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import moejax  # noqa: E402
from moejax import sharding  # noqa: E402
from moejax.models import MoEDecoder, from_pretrained, save_pretrained_hf, tiny_mixtral  # noqa: E402
from moejax.models.safetensors_io import Checkpoint  # noqa: E402
from moejax.program import path_to_str  # noqa: E402
from worker_util import record_reads  # noqa: E402

TMP = sys.argv[1]
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
MESH = Mesh(np.array(jax.devices()).reshape(4, 2), ("expert", "model"))
forward = nnx.jit(lambda m, x: m(x))


def _dev(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _specs(model) -> dict[str, str]:
    return {path_to_str(p): str(v[...].sharding.spec) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def case_mixtral():
    folder = os.path.join(TMP, "mixtral")
    save_pretrained_hf(MoEDecoder(tiny_mixtral(n_experts=8), rngs=nnx.Rngs(0)), folder)
    ref = forward(from_pretrained(folder), TOKENS)
    ckpt = Checkpoint(folder)
    stored = sum(int(np.prod(ckpt.shape(k))) * ckpt.dtype(k).itemsize for k in ckpt)
    out = {}
    for scan in (False, True):
        reads, stop = record_reads()
        try:
            model = from_pretrained(folder, mesh=MESH, scan_layers=scan)
        finally:
            stop()
        out[f"scan={scan}"] = {"dev": _dev(forward(model, TOKENS), ref), "specs": _specs(model),
                               "bytes_read": sum(reads.values()), "stored_bytes": stored}
    mesh8 = sharding.expert_mesh(8)
    loaded = from_pretrained(folder, mesh=mesh8)
    opt = moejax.optimize(loaded, (TOKENS,), [sharding.ExpertParallel(mesh=mesh8, overlap_chunks=2)])
    out["ep_dev"] = _dev(opt(TOKENS), ref)
    try:
        from_pretrained(folder, mesh=MESH, rules=[(r"q_proj/kernel$", (None, "expert", "model"))])
    except ValueError as e:
        out["bad_rule"] = str(e)
    mesh3 = Mesh(np.array(jax.devices()[:3]), ("expert",))  # 3 does not divide 8 experts
    out["default_rules_on_3"] = _specs(from_pretrained(folder, mesh=mesh3))["layers/0/mlp/experts/w_up"]
    try:
        from_pretrained(folder, mesh=mesh3, rules=[(r"experts/w_up$", ("expert", None, None))])
    except ValueError as e:
        out["indivisible_rule"] = str(e)
    return out


def case_deepseek_v3():
    """MLA attention, a shared expert, a leading dense layer: every rule family on a real layout."""
    try:
        import torch
        import transformers
    except ImportError:
        return {"skipped": "torch/transformers not installed"}
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=8, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, intermediate_size=64,
        moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5, initializer_range=0.2)
    folder = os.path.join(TMP, "deepseek_v3")
    transformers.DeepseekV3ForCausalLM(cfg).save_pretrained(folder)
    ref = forward(from_pretrained(folder, dtype=jnp.float32), TOKENS)
    model = from_pretrained(folder, dtype=jnp.float32, mesh=MESH)
    return {"dev": _dev(forward(model, TOKENS), ref), "specs": _specs(model)}


def case_deepseek_v3_fp8():
    """The released FP8 layout: each process's experts stay FP8 and are split over 'expert'."""
    try:
        from fp8_util import write_fp8_pair
    except ImportError:
        return {"skipped": "torch/transformers not installed"}
    fp8, _ = write_fp8_pair(os.path.join(TMP, "fp8"))
    ref = forward(from_pretrained(fp8, dtype=jnp.float32), TOKENS)
    model = from_pretrained(fp8, dtype=jnp.float32, mesh=MESH)
    w = nnx.state(model, nnx.Param)["layers"][1]["mlp"]["experts"]["w_up"].get_value()
    return {"dev": _dev(forward(model, TOKENS), ref), "format": getattr(w, "format", type(w).__name__),
            "leaf_specs": [str(x.sharding.spec) for x in jax.tree_util.tree_leaves(w)],
            "leaf_dtypes": [str(x.dtype) for x in jax.tree_util.tree_leaves(w)]}


if __name__ == "__main__":
    results = {}
    for name in ("mixtral", "deepseek_v3", "deepseek_v3_fp8"):
        try:
            results[name] = globals()[f"case_{name}"]()
        except Exception as e:  # reported to the test, which fails with the message
            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
    print("RESULT " + json.dumps(results, default=str))
