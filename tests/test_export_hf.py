"""``export_hf``: moejax loads a tiny checkpoint, optimizes it (prune, merge), writes it back, and
transformers loads the export: its logits equal the optimized model's within 1e-4."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

import moejax  # noqa: E402
from moejax import weight_formats as wf  # noqa: E402
from moejax.models import from_pretrained, save_pretrained_hf  # noqa: E402
from moejax.models.export_hf import ExportError, export_hf  # noqa: E402
from moejax.models.safetensors_io import Checkpoint  # noqa: E402

TOL = 1e-4
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              initializer_range=0.2)
_MLA = dict(kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, intermediate_size=64,
            moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
            **{**COMMON, "num_key_value_heads": 4})
FAMILIES = {
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, **COMMON)),
    "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, **COMMON)),
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        intermediate_size=64, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        head_dim=16, **COMMON)),
    "olmoe": lambda: transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        intermediate_size=16, num_experts=8, num_experts_per_tok=2, pad_token_id=None, eos_token_id=None, **COMMON)),
    "deepseek_v3": lambda: transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        q_lora_rank=8, n_shared_experts=1, routed_scaling_factor=2.5, n_group=1, topk_group=1, **_MLA)),
    "glm4_moe": lambda: transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(
        intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, head_dim=16,
        use_qk_norm=True, attention_bias=True, routed_scaling_factor=2.5, first_k_dense_replace=1, **COMMON)),
    "minimax_m2": lambda: transformers.MiniMaxM2ForCausalLM(transformers.MiniMaxM2Config(
        intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=16, rotary_dim=8,
        bos_token_id=None, eos_token_id=None, **COMMON)),
}
# every family after prune (which exercises loading and writing everything); as loaded and after merge for two
CASES = [(f, "profile,prune(num_experts=6)") for f in FAMILIES] + [
    (f, p) for f in ("mixtral", "deepseek_v3") for p in ("", "profile,merge(num_experts=6)")]
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 8))


def _saved(tmp_path, family: str) -> str:
    torch.manual_seed(0)
    folder = str(tmp_path / "source")
    FAMILIES[family]().save_pretrained(folder)
    return folder


def _transformers_logits(folder: str) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


@pytest.mark.parametrize("family, pipeline", CASES, ids=[f"{f}-{p.split(',')[-1] or 'plain'}" for f, p in CASES])
def test_round_trip_through_transformers(tmp_path, family, pipeline):
    model = from_pretrained(_saved(tmp_path, family), dtype=jnp.float32)
    opt = moejax.optimize(model, (jnp.asarray(TOKENS, jnp.int32),), pipeline)
    out = str(tmp_path / "export")
    export_hf(opt, out)
    ours = np.asarray(opt(jnp.asarray(TOKENS, jnp.int32)))
    theirs = _transformers_logits(out)
    diff = float(np.abs(ours - theirs).max())
    assert diff <= TOL, f"{family} {pipeline!r}: max |logit diff| {diff:.2e}"
    config = json.load(open(os.path.join(out, "config.json")))
    count = next(config[f] for f in ("num_local_experts", "num_experts", "n_routed_experts") if f in config)
    assert count == (6 if "prune" in pipeline else 8)  # merged experts are written once per router column
    print(f"{family} {pipeline or '(as loaded)'}: max |logit diff| vs transformers {diff:.2e}")


def test_fp8_experts_are_written_as_released(tmp_path):
    """DeepSeek-V3 FP8: prune, export; the export keeps the 6 FP8 experts with block scales and reloads identically."""
    from fp8_util import write_fp8_pair

    fp8, _ = write_fp8_pair(str(tmp_path / "pair"))
    model = from_pretrained(fp8, dtype=jnp.float32)
    tokens = jnp.asarray(TOKENS, jnp.int32)
    # prune slices the FP8 experts; select-impl stores them one buffer per expert: both stay FP8
    opt = moejax.optimize(model, (tokens,), "profile,prune(num_experts=6),select-impl(impl=blocked)",
                          check_exact=False)  # (compared below, after the round trip)
    out = str(tmp_path / "export")
    export_hf(opt, out)
    ckpt = Checkpoint(out)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    assert str(ckpt.dtype(name)) == "float8_e4m3fn" and ckpt.shape(name + "_scale_inv") == (2, 4)
    assert "model.layers.1.mlp.experts.5.up_proj.weight" in ckpt and "model.layers.1.mlp.experts.6.up_proj.weight" \
        not in ckpt
    assert json.load(open(os.path.join(out, "config.json")))["n_routed_experts"] == 6
    assert json.load(open(os.path.join(out, "config.json")))["quantization_config"]["weight_block_size"] == [8, 8]
    again = from_pretrained(out, dtype=jnp.float32)
    assert isinstance(again.layers[1].mlp.experts.w_up.get_value(), wf.Fp8BlockTensor)
    assert float(jnp.abs(moejax.optimize(again, (tokens,), "")(tokens) - opt(tokens)).max()) <= 1e-6


def test_quantized_experts_are_written_dequantized_with_a_warning(tmp_path):
    model = from_pretrained(_saved(tmp_path, "mixtral"), dtype=jnp.float32)
    opt = moejax.optimize(model, (jnp.asarray(TOKENS, jnp.int32),), "quantize(bits=4,group_size=16)")
    with pytest.warns(UserWarning, match="no standard layout for int4-g16 experts"):
        export_hf(opt, str(tmp_path / "export"))
    diff = np.abs(np.asarray(opt(jnp.asarray(TOKENS, jnp.int32))) - _transformers_logits(str(tmp_path / "export")))
    assert float(diff.max()) <= TOL


def test_models_built_in_code_and_bad_exports_are_refused(tmp_path):
    from flax import nnx

    from moejax.models import MoEDecoder
    from moejax.models.presets import tiny

    with pytest.raises(ExportError, match="not loaded from a Hugging Face checkpoint"):
        export_hf(MoEDecoder(tiny("qwen2_moe"), rngs=nnx.Rngs(0)), str(tmp_path / "a"))
    model = from_pretrained(_saved(tmp_path, "deepseek_v3"), dtype=jnp.float32)
    opt = moejax.optimize(model, (jnp.asarray(TOKENS, jnp.int32),), "ep(num_devices=1)")
    with pytest.raises(ExportError, match=r"has no moe_dispatch op .*export_hf\(opt.at_stage\(i\)"):
        export_hf(opt, str(tmp_path / "b"))  # the expert-parallel region hides the layer's ops
    save_pretrained_hf(model, str(tmp_path / "c"), dtype=jnp.bfloat16)  # a loaded model: written in its own layout
    config = json.load(open(tmp_path / "c" / "config.json"))
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["dtype"] == "bfloat16"
    assert str(Checkpoint(str(tmp_path / "c")).dtype("model.layers.1.mlp.experts.0.up_proj.weight")) == "bfloat16"


def test_merge_with_distinct_routing_is_refused_with_the_fix(tmp_path):
    """transformers' top-k picks router columns; a ``merge(distinct=true)`` model would not export exactly."""
    model = from_pretrained(_saved(tmp_path, "mixtral"), dtype=jnp.float32)
    opt = moejax.optimize(model, (jnp.asarray(TOKENS, jnp.int32),), "profile,merge(num_experts=6,distinct=true)")
    with pytest.raises(ExportError, match="merged with distinct=true.*Merge without distinct=true to export"):
        export_hf(opt, str(tmp_path / "export"))


def test_adaptive_gating_is_refused_with_the_fix(tmp_path):
    """Gating changes routing, not weights: an export would silently route a fixed top-k again."""
    model = from_pretrained(_saved(tmp_path, "mixtral"), dtype=jnp.float32)
    opt = moejax.optimize(model, (jnp.asarray(TOKENS, jnp.int32),), "gating(skip_ratio=0.5)")
    with pytest.raises(ExportError, match="adaptive gating \\('skip'\\).*Export the stage before 'gating'"):
        export_hf(opt, str(tmp_path / "export"))
    export_hf(opt.at_stage(0), str(tmp_path / "export"))  # the stage before it exports
