"""``export_hf`` after prune and after merge, for every family transformers loads (issue #14 item 4).

moejax loads a tiny random transformers checkpoint (float32, ``save_pretrained``), optimizes it with
``profile,prune(num_experts=N)`` or ``profile,merge(num_experts=N)``, exports it, and transformers loads the export
with ``AutoModelForCausalLM``: its logits equal the optimized model's within 1e-4. The tiny models come from the
family test files (4 experts pruned or merged to 3; the 8-expert models of ``test_export_hf`` to 6). Cases the
other export tests already cover (Mixtral and DeepSeek-V3 after both, the other ``test_export_hf`` families after
prune, Llama 4 after merge) are not repeated. JetMoE, which profile refuses, is exported as loaded. Also: gpt-oss
MXFP4 experts written back in the released layout, and moejax-quantized gpt-oss experts written as floats.
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import moejax  # noqa: E402
from moejax import weight_formats as wf  # noqa: E402
from moejax.models import from_pretrained  # noqa: E402
from moejax.models import hf as mhf  # noqa: E402
from moejax.models.export_hf import export_hf  # noqa: E402
from moejax.pipeline import PassError  # noqa: E402

from test_export_hf import _MLA, FAMILIES, TOKENS, _transformers_logits  # noqa: E402
from test_gpt_oss import _gpt_oss, _mxfp4_pair  # noqa: E402
from test_models_llama4_granite import _GRANITE, _llama4  # noqa: E402
from test_models_parity import COMMON  # noqa: E402
from test_models_phimoe_ernie_hunyuan import _ERNIE, _HUNYUAN, _randomize  # noqa: E402

TOL = 1e-4


def _seeded(build):
    def make():
        torch.manual_seed(0)
        return build()
    return make


def _phimoe():
    hf = transformers.PhimoeForCausalLM(transformers.PhimoeConfig(
        intermediate_size=48, num_local_experts=4, attention_bias=True, lm_head_bias=True, router_jitter_noise=0.1,
        **COMMON))
    _randomize(hf, ".bias")
    return hf


def _ernie():
    hf = transformers.Ernie4_5_MoeForCausalLM(transformers.Ernie4_5_MoeConfig(
        moe_num_shared_experts=2, **{**_ERNIE, "moe_num_experts": 4}))
    _randomize(hf, "e_score_correction_bias", scale=0.5)
    return hf


def _hunyuan():
    hf = transformers.HunYuanMoEV1ForCausalLM(transformers.HunYuanMoEV1Config(
        moe_topk=2, attention_bias=True, **{**_HUNYUAN, "num_experts": 4}))
    _randomize(hf, "proj.bias")
    return hf


def _jetmoe():
    hf = transformers.JetMoeForCausalLM(transformers.JetMoeConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8, intermediate_size=48,
        num_local_experts=4, num_experts_per_tok=2, initializer_range=0.2))
    _randomize(hf, ".bias")
    return hf


# family -> (tiny transformers model, routed experts)
BUILDERS = {
    "phimoe": (_phimoe, 4),
    "ernie4_5_moe": (_ernie, 4),
    "hunyuan_v1_moe": (_hunyuan, 4),
    "granitemoe": (lambda: transformers.GraniteMoeForCausalLM(transformers.GraniteMoeConfig(
        **{**_GRANITE, "num_local_experts": 4})), 4),
    "granitemoeshared": (lambda: transformers.GraniteMoeSharedForCausalLM(transformers.GraniteMoeSharedConfig(
        shared_intermediate_size=24, **{**_GRANITE, "num_local_experts": 4})), 4),
    "gpt_oss": (_gpt_oss, 4),
    "llama4": (_llama4, 4),
    "deepseek_v2": (lambda: transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(
        q_lora_rank=8, n_shared_experts=2, routed_scaling_factor=1.5, n_group=1, topk_group=1, **_MLA)), 8),
    "jetmoe": (_jetmoe, 4),
    "dbrx": (lambda: transformers.DbrxForCausalLM(transformers.DbrxConfig(
        d_model=32, n_heads=4, n_layers=2, vocab_size=64, max_seq_len=128, initializer_range=0.2,
        attn_config=dict(kv_n_heads=2, clip_qkv=4.0, rope_theta=10000.0),
        ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2))), 4),
    **{f: (FAMILIES[f], 8) for f in ("qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe", "minimax_m2")},
}
CASES = [(f, p) for f in BUILDERS for p in ("prune", "merge")
         if not (f == "llama4" and p == "merge")  # test_models_llama4_granite
         and not (f in FAMILIES and p == "prune")] + [("jetmoe", "")]  # test_export_hf; JetMoE as loaded
# Passes that refuse a family, and their one line. JetMoE's attention experts (MoA) route with moe_route but run no
# moe_expert_ffn, so profile (and with it prune and merge) refuses the model.
REFUSED = {("jetmoe", "prune"): "profile: layer 'layers/0/self_attn' has no moe_expert_ffn op",
           ("jetmoe", "merge"): "profile: layer 'layers/0/self_attn' has no moe_expert_ffn op"}


def _saved(tmp_path, family: str) -> str:
    folder = str(tmp_path / "source")
    _seeded(BUILDERS[family][0])().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family, step", CASES, ids=[f"{f}-{p}" for f, p in CASES])
def test_round_trip_after_prune_and_merge(tmp_path, family, step):
    e = BUILDERS[family][1]
    n = e * 3 // 4
    model = from_pretrained(_saved(tmp_path, family), dtype=jnp.float32)
    tokens = jnp.asarray(TOKENS, jnp.int32)
    pipeline = f"profile,{step}(num_experts={n})" if step else ""
    if (family, step) in REFUSED:
        with pytest.raises(PassError, match=REFUSED[family, step]) as info:
            moejax.optimize(model, (tokens,), pipeline)
        assert "\n" not in str(info.value)
        return
    # check_exact=False: the optimized model itself is what the export is compared with, below
    opt = moejax.optimize(model, (tokens,), pipeline, check_exact=False) if pipeline else model
    out = str(tmp_path / "export")
    export_hf(opt, out)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert mhf.config_from_hf(config).n_experts == (n if step == "prune" else e)  # merge: one copy per column
    theirs = _transformers_logits(out)
    ours = np.asarray(opt(tokens))
    diff = float(np.abs(ours - theirs).max())
    print(f"{family} {pipeline or '(as loaded)'}: max |logit diff| vs transformers {diff:.2e}")
    assert np.abs(theirs).max() > 0.1 and diff <= TOL, f"{family} after {step}: max |logit diff| {diff:.2e}"


# ---- gpt-oss MXFP4 experts: written back in the released layout -----------------------------------------------
@pytest.mark.parametrize("pipeline", ["", "profile,prune(num_experts=3)"], ids=["as-loaded", "prune"])
def test_mxfp4_experts_are_written_back_as_released(tmp_path, pipeline):
    """The export holds the source's ``*_blocks`` / ``*_scales`` bytes of the kept experts (and their biases) and its
    ``quantization_config``; moejax reloads it to the same bytes (logits within 1e-5); transformers loads it (on CPU it
    needs ``Mxfp4Config(dequantize=True)``: its MXFP4 path wants accelerate and GPU/triton kernels) to the same
    logits within 1e-4."""
    quant, _, _ = _mxfp4_pair(tmp_path)
    model = from_pretrained(str(quant), dtype=jnp.float32)
    tokens = jnp.asarray(TOKENS, jnp.int32)
    opt = moejax.optimize(model, (tokens,), pipeline) if pipeline else model
    out = tmp_path / "export"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing is dequantized
        export_hf(opt, str(out))
    src, got = load_file(str(quant / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(got) == sorted(src)
    n = 3 if pipeline else 4
    for i in range(2):
        x = f"model.layers.{i}.mlp.experts."
        # which source expert each written one is (their random bytes tell them apart)
        blocks = got[x + "down_proj_blocks"], src[x + "down_proj_blocks"]
        kept = [next(j for j in range(4) if np.array_equal(blocks[0][e], blocks[1][j])) for e in range(n)]
        assert len(set(kept)) == n and (pipeline or kept == [0, 1, 2, 3])
        for name in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales",
                     "gate_up_proj_bias", "down_proj_bias"):
            assert got[x + name].dtype == src[x + name].dtype, name
            np.testing.assert_array_equal(got[x + name], src[x + name][kept], err_msg=name)
    config, source = (json.loads((folder / "config.json").read_text()) for folder in (out, quant))
    assert config["quantization_config"] == source["quantization_config"] and config["num_local_experts"] == n
    # moejax reloads the same bytes and computes the same logits
    again = from_pretrained(str(out), dtype=jnp.float32)
    before = opt.program.weights if pipeline else mhf.parameter_values(model)
    for path, leaf in mhf.parameter_values(again).items():
        if isinstance(leaf, wf.Mxfp4Tensor):
            np.testing.assert_array_equal(np.asarray(leaf.blocks), np.asarray(before[path].blocks), err_msg=path)
            np.testing.assert_array_equal(np.asarray(leaf.scales), np.asarray(before[path].scales), err_msg=path)
        else:
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(before[path]), err_msg=path)
    ours = np.asarray(opt(tokens))
    reload_diff = float(np.abs(np.asarray(again(tokens)) - ours).max())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    with torch.no_grad():
        diff = float(np.abs(theirs(torch.tensor(TOKENS)).logits.numpy() - ours).max())
    print(f"gpt-oss MXFP4 {pipeline or 'as loaded'}: moejax reload {reload_diff:.2e}, transformers {diff:.2e}")
    assert reload_diff <= 1e-5 and diff <= TOL  # same bytes; the pruned program and the reload compile apart


def test_moejax_quantized_gpt_oss_experts_are_written_as_floats(tmp_path):
    """int8 experts (moejax's own format) have no gpt-oss layout: written dequantized, with the warning."""
    model = from_pretrained(_saved(tmp_path, "gpt_oss"), dtype=jnp.float32)
    tokens = jnp.asarray(TOKENS, jnp.int32)
    opt = moejax.optimize(model, (tokens,), "quantize(bits=8)")
    with pytest.warns(UserWarning, match="no standard layout for int8"):
        export_hf(opt, str(tmp_path / "export"))
    assert "quantization_config" not in json.loads((tmp_path / "export" / "config.json").read_text())
    diff = float(np.abs(np.asarray(opt(tokens)) - _transformers_logits(str(tmp_path / "export"))).max())
    print(f"gpt-oss int8 experts written as floats: max |logit diff| vs transformers {diff:.2e}")
    assert diff <= TOL
