"""``moejax plan``: the memory planner, its CLI, and its agreement with XLA's memory analysis."""
from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import pytest
from worker_util import run_worker

from moejax import cli
from moejax.models.presets import preset
from moejax.sharding import plan as planner

WORKER = Path(__file__).with_name("plan_worker.py")
# Shapes the 10% bound is asserted on (tests/plan_worker.py): weight-dominated, attention/logits-dominated,
# int4 experts, a bf16 model, and MLA with a KV cache over an expert x data mesh.
CHECKED = ("weights_n8", "activations_n4", "int4_n2", "bf16_n2", "mla_kv_n4_data2")


@pytest.fixture(scope="module")
def xla_report():
    return run_worker(WORKER, CHECKED, timeout=600)


@pytest.mark.parametrize("case", CHECKED)
def test_plan_total_within_10_percent_of_xla(xla_report, case):
    r = xla_report[case]
    assert "error" not in r, f"{case}: {r.get('error')}\n{r.get('trace', '')}"
    # weights + KV cache are the arguments, to within the tokens and the cache index
    assert abs(r["plan_arguments"] - r["xla"]["argument"]) <= 0.01 * r["xla"]["argument"], r
    assert 0.9 <= r["ratio"] <= 1.1, (case, r["ratio"], r["plan"], r["xla"])


def test_plan_counts_quantized_expert_bytes_from_the_pipeline():
    cfg = preset("deepseek-v3")
    p = planner.plan_memory("deepseek-v3", mesh="expert=64", device_name="h200", batch=1, context=4096,
                            pipeline="quantize(bits=4),ep")
    n_moe = cfg.n_layers - cfg.first_dense_layers
    expert_params = n_moe * cfg.n_experts * 3 * cfg.d_model * cfg.d_ff_expert
    assert p.weights_by_format["experts"] == {"int4-g128": expert_params * (0.5 + 4 / 128) / 64}
    per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert p.kv_cache_bytes_per_device == cfg.n_layers * 4096 * per_token * 2 // 64
    j = p.to_json()
    for key in ("weights_bytes_per_device", "kv_cache_bytes_per_device", "total_bytes_per_device", "fits",
                "smallest_fitting_mesh"):
        assert key in j
    assert j["fits"] and j["smallest_fitting_mesh"] == "expert=4"
    # bf16 experts need twice the devices of int4 ones... or more: the search says which
    bf16 = planner.plan_memory("deepseek-v3", mesh="expert=64", device_name="h200", pipeline="ep")
    assert bf16.weights_by_format["experts"] == {"bfloat16": expert_params * 2 // 64}
    assert int(bf16.smallest_fitting_mesh.split("=")[1]) > 4


def test_scanned_layers_count_the_same_bytes():
    """The planner traces identical layers stacked under a scan (fast): same bytes and shardings as unrolled."""
    from moejax.models.presets import tiny

    cfg = tiny("mixtral", n_layers=3, n_experts=8)
    args = ((("data", 1), ("expert", 4)), "quantize(bits=4,group_size=16),ep", "bfloat16", "cuda")
    unrolled = planner.weight_bytes_by_format(_optimized(cfg, *args))
    assert unrolled["experts"] and planner._weights(cfg, *args) == unrolled


def _optimized(cfg, mesh_items, pipeline, dtype, platform):
    import moejax
    from moejax.models.abstract import abstract_model, abstract_tokens

    passes = planner._with_mesh(moejax.parse_pipeline(pipeline), dict(mesh_items), [])
    return moejax.optimize(abstract_model(cfg, dtype=jnp.dtype(dtype)), (abstract_tokens(1, 16),), passes,
                           platform=platform).program


def test_offload_plans_the_resident_cache():
    """offload on an abstract model records its plan; the planner counts the resident share of the experts."""
    p = planner.plan_memory("mixtral-8x7b", device_count=1, device_name="h100", context=512,
                            pipeline="quantize(bits=4),offload(resident=0.25)")
    cfg = preset("mixtral-8x7b")
    experts = cfg.n_layers * cfg.n_experts * 3 * cfg.d_model * cfg.d_ff_expert * (0.5 + 4 / 128)
    assert p.weights_by_format["experts"] == {"int4-g128, resident cache 25%": int(experts / 4)}


def test_smallest_fitting_mesh_is_none_when_nothing_fits():
    p = planner.plan_memory("deepseek-v3", mesh="expert=256", device_name="tpu-v5e", context=512)
    assert not p.fits and p.smallest_fitting_mesh is None  # 34 GB of replicated weights > 16 GB


@pytest.mark.parametrize("text,want", [("expert=64", {"expert": 64, "data": 1}),
                                       ("expert=32, data=2", {"expert": 32, "data": 2})])
def test_parse_mesh(text, want):
    assert planner.parse_mesh(text) == want


@pytest.mark.parametrize("argv,message", [
    (["--model", "nope"], "unknown model 'nope'"),
    (["--model", "deepseek-v3", "--mesh", "expert=x"], "is not axis=size"),
    (["--model", "deepseek-v3", "--mesh", "data=2"], "has no expert axis"),
    (["--model", "deepseek-v3", "--mesh", "expert=48"], "does not divide deepseek-v3's 256 experts"),
    (["--model", "deepseek-v3", "--device", "m1"], "unknown device 'm1'"),
    (["--model", "deepseek-v3", "--pipeline", "profile"], "reads weight values, but the model is abstract"),
])
def test_cli_errors_are_one_line(capsys, argv, message):
    assert cli.main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_cli_plan_table_and_json(capsys, tmp_path):
    assert cli.main(["plan", "--model", "mixtral-8x7b", "--mesh", "expert=8", "--device", "h100",
                     "--pipeline", "quantize(bits=4),ep", "--batch", "2", "--context", "1024"]) == 0
    out = capsys.readouterr().out
    assert "int4-g128" in out and "fits: yes" in out and "replicated" in out
    config = preset("mixtral-8x7b")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "intermediate_size": config.d_ff_expert, "num_local_experts": 8, "num_experts_per_tok": 2,
        "rope_theta": 1e6}))
    assert cli.main(["plan", "--model", str(folder), "--device-count", "8", "--device", "h100", "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["mesh"] == {"expert": 8, "data": 1} and j["model"] == "ckpt"
    assert j["weights_bytes_per_device"] > 0 and j["total_bytes_per_device"] >= j["weights_bytes_per_device"]
    assert jnp.dtype(jnp.bfloat16).itemsize == 2
