"""Checkpoint loading and export: round trips, sharding, scan layers, and the error messages."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from moejax import models
from moejax.models import MoEDecoder, tiny_mixtral
from moejax.models.hf import CheckpointError
from moejax.models.safetensors_io import Checkpoint, SafetensorsFile, save_file


def _params(model) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture
def exported(tmp_path):
    model = MoEDecoder(tiny_mixtral(), rngs=nnx.Rngs(3))
    models.save_pretrained_hf(model, str(tmp_path))
    return model, tmp_path


def _rewrite(folder, edit):
    f = SafetensorsFile(os.path.join(folder, "model.safetensors"))
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    edit(tensors)
    save_file(tensors, os.path.join(folder, "model.safetensors"))


def test_export_then_load_round_trips_every_parameter(exported):
    model, path = exported
    cfg = json.load(open(path / "config.json"))
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["num_local_experts"] == 4
    names = Checkpoint(str(path)).keys()
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
    loaded = models.from_pretrained(str(path))
    a, b = _params(model), _params(loaded)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_scan_layers_loading_stacks_layers(exported):
    model, path = exported
    scanned = models.from_pretrained(str(path), scan_layers=True)
    assert scanned.config.scan_layers
    w = _params(scanned)["layers/mlp/experts/w_gate"]
    assert w.shape == (2, 4, 32, 48)
    np.testing.assert_array_equal(w[1], _params(model)["layers/1/mlp/experts/w_gate"])
    # and exporting the scanned model writes the same checkpoint back
    models.save_pretrained_hf(scanned, str(path / "again"))
    again = Checkpoint(str(path / "again"))
    orig = Checkpoint(str(path))
    assert sorted(again) == sorted(orig)
    np.testing.assert_array_equal(again["model.layers.1.self_attn.q_proj.weight"],
                                  orig["model.layers.1.self_attn.q_proj.weight"])


def test_sharded_checkpoint_with_index(exported):
    model, path = exported
    ckpt = Checkpoint(str(path))
    names = sorted(ckpt)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    sharded = path / "sharded"
    sharded.mkdir()
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: np.array(ckpt[k]) for k in keys}, str(sharded / fname))
        weight_map.update({k: fname for k in keys})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (sharded / "config.json").write_text((path / "config.json").read_text())
    loaded = models.from_pretrained(str(sharded))
    np.testing.assert_array_equal(_params(loaded)["layers/0/mlp/experts/w_down"],
                                  _params(model)["layers/0/mlp/experts/w_down"])


def test_bfloat16_export_loads_as_bfloat16(tmp_path):
    model = MoEDecoder(tiny_mixtral(), rngs=nnx.Rngs(0))
    models.save_pretrained_hf(model, str(tmp_path), dtype=ml_dtypes.bfloat16)
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    loaded = models.from_pretrained(str(tmp_path))  # dtype from config.json
    w = loaded.layers[0].mlp.experts.w_up[...]
    assert w.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(w), np.asarray(model.layers[0].mlp.experts.w_up[...]
                                                            ).astype(ml_dtypes.bfloat16))


def test_missing_tensor_is_named(exported):
    _, path = exported
    gone = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    _rewrite(path, lambda t: t.pop(gone))
    with pytest.raises(CheckpointError, match=f"missing tensor '{gone}'"):
        models.from_pretrained(str(path))


def test_unexpected_tensor_is_named_unless_not_strict(exported):
    _, path = exported
    _rewrite(path, lambda t: t.__setitem__("model.layers.0.mystery.weight", np.zeros((2,), np.float32)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.mystery.weight'"):
        models.from_pretrained(str(path))
    assert models.from_pretrained(str(path), strict=False).config.n_experts == 4


def test_shape_mismatch_names_tensor_expected_and_got(exported):
    _, path = exported
    cfg = json.load(open(path / "config.json"))
    cfg["intermediate_size"] = 40
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.block_sparse_moe.experts.0.w1.weight' has shape "
                                              r"\(48, 32\), expected \(40, 32\)"):
        models.from_pretrained(str(path))


def test_unknown_architecture_lists_supported(exported):
    _, path = exported
    cfg = json.load(open(path / "config.json"))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match="GPT2LMHeadModel.*supported: .*MixtralForCausalLM.*DbrxForCausalLM"):
        models.from_pretrained(str(path))


def test_pickle_checkpoints_are_refused(exported):
    _, path = exported
    os.remove(path / "model.safetensors")
    (path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints are not loaded"):
        models.from_pretrained(str(path))


def test_incomplete_config_names_the_field(exported):
    _, path = exported
    cfg = json.load(open(path / "config.json"))
    del cfg["num_local_experts"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lacks field 'num_local_experts'"):
        models.from_pretrained(str(path))


def test_export_refuses_non_mixtral_models(tmp_path):
    from moejax.models.presets import tiny
    with pytest.raises(ValueError, match="not a Mixtral: .*routing"):
        models.save_pretrained_hf(MoEDecoder(tiny("deepseek_v3"), rngs=nnx.Rngs(0)), str(tmp_path))


def test_transformers_loads_the_export(exported):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    model, path = exported
    hf = transformers.MixtralForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, 64, (2, 6))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))
    assert np.abs(ours - ref).max() <= 1e-4


def test_deepseekmoe_v1_layout_round_trip(tmp_path):
    """DeepSeekMoE-16B's ``DeepseekForCausalLM`` (remote code upstream, so no transformers parity)."""
    from moejax.models.hf import export_tensors
    from moejax.models.presets import deepseek_moe_16b
    cfg = deepseek_moe_16b(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=4, d_ff_expert=8,
                           n_experts=8, d_ff_shared=8, d_ff_dense=40, dense_layers=(1, 3))
    model = MoEDecoder(cfg, rngs=nnx.Rngs(0))
    save_file(export_tensors(model, "DeepseekForCausalLM"), str(tmp_path / "model.safetensors"))
    hf = {"architectures": ["DeepseekForCausalLM"], "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 4,
          "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 40, "moe_intermediate_size": 8,
          "n_routed_experts": 8, "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
          "moe_layer_freq": 1, "norm_topk_prob": False, "scoring_func": "softmax", "rms_norm_eps": 1e-6,
          "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.mlp.gate.weight'"):
        models.from_pretrained(str(tmp_path))  # this config makes layers 1-3 MoE; the weights hold dense 1 and 3
    hf["moe_layer_freq"] = 2  # layer 0 dense (first_k_dense_replace), then only even layers are MoE
    (tmp_path / "config.json").write_text(json.dumps(hf))
    loaded = models.from_pretrained(str(tmp_path))
    assert loaded.config.dense_layers == (1, 3) and loaded.config.first_dense_layers == 1
    assert loaded.config.routing.k == 6 and loaded.config.n_shared_experts == 2
    a, b = _params(model), _params(loaded)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# The config.json fields of released checkpoints (as published on the Hugging Face Hub; quantization_config and
# fields no parser reads left out): each translates to exactly its full-size preset.
_DEEPSEEK_V3_RELEASED = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1,
    "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 129280}
_KIMI_K2_RELEASED = {
    **_DEEPSEEK_V3_RELEASED, "model_type": "kimi_k2", "first_k_dense_replace": 1, "max_position_embeddings": 131072,
    "n_group": 1, "n_routed_experts": 384, "num_attention_heads": 64, "num_key_value_heads": 64,
    "num_nextn_predict_layers": 0, "rope_theta": 50000.0, "routed_scaling_factor": 2.827, "topk_group": 1,
    "vocab_size": 163840,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"}}
_QWEN3_30B_RELEASED = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
    "decoder_sparse_step": 1, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "mlp_only_layers": [], "moe_intermediate_size": 768, "norm_topk_prob": True,
    "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "vocab_size": 151936}
_QWEN3_235B_RELEASED = {
    **_QWEN3_30B_RELEASED, "hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 1536,
    "num_attention_heads": 64, "num_hidden_layers": 94}

# GLM-4.5 and GLM-4.5-Air (zai-org): values as released, from memory of the published config.json files (Air's
# routed_scaling_factor and use_qk_norm not re-checked against the Hub).
_GLM_4_5_RELEASED = {
    "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "attention_bias": True, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 5120, "partial_rotary_factor": 0.5, "intermediate_size": 12288,
    "max_position_embeddings": 131072, "moe_intermediate_size": 1536, "norm_topk_prob": True,
    "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 160, "n_shared_experts": 1,
    "routed_scaling_factor": 2.5, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "num_hidden_layers": 92,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_qk_norm": True,
    "vocab_size": 151552}
_GLM_4_5_AIR_RELEASED = {
    **_GLM_4_5_RELEASED, "hidden_size": 4096, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "n_routed_experts": 128, "routed_scaling_factor": 1.0, "first_k_dense_replace": 1, "num_hidden_layers": 46,
    "use_qk_norm": False}
# MiniMax-M2 (MiniMaxAI/MiniMax-M2): the fields the parser reads, as released (transformers' defaults agree).
_MINIMAX_M2_RELEASED = {
    "architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2", "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 3072, "intermediate_size": 1536, "max_position_embeddings": 196608, "num_attention_heads": 48,
    "num_experts_per_tok": 8, "num_hidden_layers": 62, "num_key_value_heads": 8, "num_local_experts": 256,
    "rms_norm_eps": 1e-06, "rope_theta": 5000000, "rotary_dim": 64, "scoring_func": "sigmoid",
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_qk_norm": True, "vocab_size": 200064}


@pytest.mark.parametrize("hf, name", [(_DEEPSEEK_V3_RELEASED, "deepseek-v3"), (_KIMI_K2_RELEASED, "kimi-k2"),
                                      (_QWEN3_30B_RELEASED, "qwen3-30b-a3b"),
                                      (_QWEN3_235B_RELEASED, "qwen3-235b-a22b"), (_GLM_4_5_RELEASED, "glm-4.5"),
                                      (_GLM_4_5_AIR_RELEASED, "glm-4.5-air"), (_MINIMAX_M2_RELEASED, "minimax-m2")],
                         ids=["deepseek-v3", "kimi-k2", "qwen3-30b", "qwen3-235b", "glm-4.5", "glm-4.5-air",
                              "minimax-m2"])
def test_released_configs_translate_to_their_presets(hf, name):
    from moejax.models.presets import preset
    assert models.config_from_hf(hf) == preset(name)


def test_yarn_in_rope_parameters_equals_released_rope_scaling():
    """transformers 5 writes rope_parameters (rope_type, rope_theta inside); released configs rope_scaling (type)."""
    hf = {k: v for k, v in _DEEPSEEK_V3_RELEASED.items() if k not in ("rope_scaling", "rope_theta")}
    params = {**_DEEPSEEK_V3_RELEASED["rope_scaling"], "rope_theta": 10000.0, "rope_type": "yarn"}
    del params["type"]
    assert models.config_from_hf({**hf, "rope_parameters": params}) == models.config_from_hf(_DEEPSEEK_V3_RELEASED)
    del params["factor"]  # as transformers: max_position_embeddings / original_max_position_embeddings
    assert models.config_from_hf({**hf, "rope_parameters": params}).rope_scaling.factor == 40.0


@pytest.mark.parametrize("scaling, error, match", [
    ({"type": "linear", "factor": 2.0}, NotImplementedError, "rope_type 'linear' is not implemented"),
    ({"type": "yarn", "factor": "40"}, CheckpointError, "field 'rope_scaling.factor' must be a positive number"),
    ({"type": "yarn", "factor": 40, "beta_fast": -1}, CheckpointError, "field 'rope_scaling.beta_fast' must be"),
    ({"type": "yarn", "factor": 40, "original_max_position_embeddings": 0.5}, CheckpointError,
     "field 'rope_scaling.original_max_position_embeddings' must be a positive integer"),
], ids=["linear", "factor-string", "negative-beta", "fractional-context"])
def test_bad_rope_scaling_is_one_clear_line(scaling, error, match):
    with pytest.raises(error, match=match) as err:
        models.config_from_hf({**_DEEPSEEK_V3_RELEASED, "rope_scaling": scaling})
    assert "\n" not in str(err.value)


def test_qwen3_moe_attention_bias_is_refused():
    with pytest.raises(NotImplementedError, match="Qwen3MoE: attention_bias=True is not supported"):
        models.config_from_hf({**_QWEN3_30B_RELEASED, "attention_bias": True})


def test_moejax_format_round_trips_qwen3_moe_with_yarn(tmp_path):
    """The nested rope_scaling object survives the bundled model's own checkpoint format."""
    from moejax.models.default_model import save_checkpoint
    from moejax.models.layers import Yarn
    from moejax.models.presets import tiny
    cfg = tiny("qwen3_moe", rope_scaling=Yarn(factor=4.0, original_max_position_embeddings=16, mscale=0.9))
    model = MoEDecoder(cfg, rngs=nnx.Rngs(0))
    save_checkpoint(model, tmp_path)
    loaded = models.from_pretrained(str(tmp_path))
    assert loaded.config == cfg
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(model(tokens)))


@pytest.mark.parametrize("hf, error, match", [
    ({**_GLM_4_5_RELEASED, "partial_rotary_factor": 1.5}, CheckpointError,
     "field 'partial_rotary_factor' must be a number in \\(0, 1\\]"),
    ({**_GLM_4_5_RELEASED, "rope_parameters": {"rope_theta": 1e6, "partial_rotary_factor": "half"}}, CheckpointError,
     "field 'rope_parameters.partial_rotary_factor' must be"),
    ({**_GLM_4_5_RELEASED, "use_qk_norm": "yes"}, CheckpointError, "field 'use_qk_norm' must be true or false"),
    ({**_GLM_4_5_RELEASED, "n_shared_experts": 0}, NotImplementedError, "n_shared_experts=0 is not supported"),
    ({**_MINIMAX_M2_RELEASED, "rotary_dim": 63}, CheckpointError, "partial rotary gives 63 rotary dimensions"),
    ({**_MINIMAX_M2_RELEASED, "rotary_dim": 256}, CheckpointError,
     "partial rotary gives 256 rotary dimensions of head_dim=128"),
], ids=["factor-range", "factor-string", "qk-norm-string", "glm-no-shared", "odd-rotary-dim", "rotary-dim-too-big"])
def test_bad_glm_and_minimax_fields_are_one_clear_line(hf, error, match):
    with pytest.raises(error, match=match) as err:
        models.config_from_hf(hf)
    assert "\n" not in str(err.value)
