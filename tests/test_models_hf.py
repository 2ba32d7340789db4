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
