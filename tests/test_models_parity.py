"""Parity with the transformers (PyTorch CPU) implementations, one test per family.

Each test builds a tiny random model with transformers, saves it with
``save_pretrained`` to a temporary folder (nothing is downloaded), loads it with
``moejax.models.from_pretrained`` and compares float32 logits (max abs diff <= 1e-4
on logits of order 1) and 16 greedy decoding steps token for token (transformers'
``generate`` against ``moejax.models.generate``). The compared logits are those of
moejax's prefill and of each KV-cache decode step, against transformers' full forward
over the generated sequence.
"""
from __future__ import annotations

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from moejax import models  # noqa: E402

TOL = 1e-4
NEW_TOKENS = 16
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              initializer_range=0.2)  # large init: logits of order 1, a meaningful 1e-4 tolerance


def _check(tmp_path, hf_model, *, bias_names: tuple[str, ...] = (), decode: bool = True, **load_kw):
    """Save ``hf_model``, load it with moejax, compare logits and greedy decoding; return max |diff|.

    ``decode=False`` (variants of a family already decoded elsewhere) skips the 16-step
    comparison to keep the suite fast.
    """
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight") or ".norm_" in name:
                p.add_(0.1 * torch.randn_like(p))  # non-trivial norm weights
        for name, buf in hf_model.named_buffers():
            if name.endswith(bias_names) and bias_names:
                buf.copy_(0.5 * torch.randn_like(buf))  # DeepSeek-V3 correction bias
    hf_model.eval()
    hf_model.save_pretrained(tmp_path)
    model = models.from_pretrained(str(tmp_path), dtype=jnp.float32, **load_kw)

    ids = np.random.default_rng(0).integers(0, 64, (2, 8))
    if decode:
        # One jitted prefill + KV-cache decode; its logits cover the prompt and every decode step.
        tokens, ours = models.generate(model, jnp.asarray(ids), NEW_TOKENS, return_logits=True)
        tokens, ours = np.asarray(tokens), np.asarray(ours)
        hf_model.generation_config.eos_token_id = None
        hf_model.generation_config.pad_token_id = 0
        with torch.no_grad():
            ref_tokens = hf_model.generate(torch.tensor(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                                           attention_mask=torch.ones_like(torch.tensor(ids))).numpy()
        np.testing.assert_array_equal(tokens, ref_tokens)
        with torch.no_grad():  # transformers' full forward over the whole generated sequence
            ref = hf_model(torch.tensor(tokens[:, :-1])).logits.numpy()
    else:
        ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))
        with torch.no_grad():
            ref = hf_model(torch.tensor(ids)).logits.numpy()
    assert ours.shape == ref.shape
    diff = float(np.abs(ours - ref).max())
    assert np.abs(ref).max() > 0.5, "logits should be of order 1 for a meaningful tolerance"
    assert diff <= TOL, f"max |logit diff| {diff:.2e} > {TOL}"
    print(f"{type(hf_model).__name__}: max |logit diff| = {diff:.3e} over {ref.shape[1]} positions")
    return diff


@pytest.mark.parametrize("top_k", [2, 1], ids=["mixtral-top2", "switch-top1"])
def test_mixtral_parity(tmp_path, top_k):
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=top_k, **COMMON)
    _check(tmp_path, transformers.MixtralForCausalLM(cfg), decode=top_k == 2)


@pytest.mark.parametrize("norm_topk", [False, True], ids=["qwen2moe-raw", "qwen2moe-renorm"])
def test_qwen2_moe_parity(tmp_path, norm_topk):
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                      norm_topk_prob=norm_topk, mlp_only_layers=[1] if norm_topk else [], **COMMON)
    hf = transformers.Qwen2MoeForCausalLM(cfg)
    with torch.no_grad():  # transformers zero-initialises the qkv biases
        for name, p in hf.named_parameters():
            if name.endswith("proj.bias"):
                p.copy_(0.2 * torch.randn_like(p))
    _check(tmp_path, hf, decode=not norm_topk)


def test_qwen3_moe_parity(tmp_path):
    """Qwen3-MoE: per-head q/k RMS norm before RoPE, renormalised softmax top-k, explicit head_dim."""
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_experts=8,
                                      num_experts_per_tok=2, norm_topk_prob=True, head_dim=16, **COMMON)
    _check(tmp_path, transformers.Qwen3MoeForCausalLM(cfg))


def test_qwen3_moe_dense_schedule_and_yarn_parity(tmp_path):
    """Other sizes and options: decoder_sparse_step=2 plus mlp_only_layers (dense layers use intermediate_size),
    head_dim 8 != hidden/heads, raw top-k weights, MHA, YaRN RoPE scaling with its attention factor."""
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        intermediate_size=40, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=3, norm_topk_prob=False,
        head_dim=8, decoder_sparse_step=2, mlp_only_layers=[3], rms_norm_eps=1e-5, max_position_embeddings=64,
        rope_parameters=dict(rope_type="yarn", rope_theta=1000.0, factor=4.0, original_max_position_embeddings=16),
        **{**COMMON, "num_hidden_layers": 4, "num_key_value_heads": 4})
    hf = transformers.Qwen3MoeForCausalLM(cfg)
    _check(tmp_path, hf)
    loaded = models.from_pretrained(str(tmp_path))
    assert loaded.config.dense_layers == (0, 2, 3) and loaded.config.d_ff_dense == 40
    assert loaded.config.rope_scaling.factor == 4.0 and loaded.config.rope_scaling.attention_scale() > 1


def test_olmoe_parity(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.OlmoeConfig(intermediate_size=16, num_experts=8, num_experts_per_tok=4, clip_qkv=4.0,
                                   pad_token_id=None, eos_token_id=None, **COMMON)
    _check(tmp_path, transformers.OlmoeForCausalLM(cfg))


_MLA = dict(kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, intermediate_size=64,
            moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
            first_k_dense_replace=1, **{**COMMON, "num_key_value_heads": 4})  # transformers' MLA needs kv heads = heads


def test_deepseek_v3_parity(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(q_lora_rank=None, n_shared_experts=1, routed_scaling_factor=2.5, **_MLA)
    _check(tmp_path, transformers.DeepseekV3ForCausalLM(cfg), bias_names=("e_score_correction_bias",))


def test_deepseek_v3_yarn_kimi_k2_style_parity(tmp_path):
    """DeepSeek-V3 / Kimi K2 as released: YaRN RoPE (inv_freq ramp between beta_fast and beta_slow; mscale over
    mscale_all_dim on cos/sin, mscale_all_dim squared on MLA's softmax scale), one expert group, q LoRA,
    routed_scaling_factor. Kimi K2's theta, factor and context; mscale != mscale_all_dim so that both the cos/sin
    factor and the softmax factor differ from 1; with 8 rotary dimensions the ramp spans dimensions 1 to 3."""
    torch.manual_seed(0)
    yarn = dict(rope_type="yarn", rope_theta=50000.0, factor=32.0, original_max_position_embeddings=4096,
                beta_fast=32.0, beta_slow=1.0, mscale=0.9, mscale_all_dim=0.7)
    mla = {**_MLA, "qk_rope_head_dim": 8, "n_group": 1, "topk_group": 1}
    cfg = transformers.DeepseekV3Config(q_lora_rank=8, n_shared_experts=1, routed_scaling_factor=2.827,
                                        max_position_embeddings=131072, rope_parameters=yarn, **mla)
    _check(tmp_path, transformers.DeepseekV3ForCausalLM(cfg), bias_names=("e_score_correction_bias",))
    scaling = models.from_pretrained(str(tmp_path)).config.rope_scaling
    assert scaling.attention_scale() != 1 and scaling.mla_softmax_factor() != 1


@pytest.mark.parametrize("yarn", [False, True], ids=["rope", "yarn"])
def test_deepseek_v2_parity(tmp_path, yarn):
    """With ``yarn``: DeepSeek-V2's released RoPE settings (mscale = mscale_all_dim, so only the softmax scale moves)."""
    torch.manual_seed(0)
    rope = dict(max_position_embeddings=163840, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
        beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707)) if yarn else {}
    cfg = transformers.DeepseekV2Config(q_lora_rank=8, n_shared_experts=2, topk_method="group_limited_greedy",
                                        routed_scaling_factor=1.5, **rope, **_MLA)
    _check(tmp_path, transformers.DeepseekV2ForCausalLM(cfg), decode=not yarn)


def test_dbrx_parity(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.DbrxConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=64, max_seq_len=128,
                                  initializer_range=0.2,
                                  attn_config=dict(kv_n_heads=2, clip_qkv=4.0, rope_theta=10000.0),
                                  ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2))
    _check(tmp_path, transformers.DbrxForCausalLM(cfg))


def test_jetmoe_parity(tmp_path):
    """JetMoE: mixture-of-attention-heads experts plus MoE FFN, both with output biases."""
    torch.manual_seed(0)
    cfg = transformers.JetMoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2,
                                    kv_channels=8, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                                    initializer_range=0.2)
    hf = transformers.JetMoeForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    _check(tmp_path, hf)


def _random_biases(hf_model) -> None:
    """transformers zero-initialises linear biases; make the q/k/v biases matter."""
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("proj.bias"):
                p.copy_(0.2 * torch.randn_like(p))


_GLM = dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, **COMMON)


def test_glm4_moe_parity(tmp_path):
    """GLM-4.5: per-head q/k norm, q/k/v bias, partial rotary (transformers' default half of each head: 8 of 16,
    half-split pairs within the rotated part), DeepSeek-V3 routing with 4 groups, scaling 2.5, a shared expert and a
    leading dense layer."""
    torch.manual_seed(0)
    cfg = transformers.Glm4MoeConfig(head_dim=16, use_qk_norm=True, attention_bias=True, n_group=4, topk_group=2,
                                     routed_scaling_factor=2.5, n_shared_experts=1, first_k_dense_replace=1, **_GLM)
    hf = transformers.Glm4MoeForCausalLM(cfg)
    _random_biases(hf)
    _check(tmp_path, hf, bias_names=("e_score_correction_bias",))
    loaded = models.from_pretrained(str(tmp_path)).config
    assert loaded.rotary_dim == 8 and loaded.qk_norm_per_head and loaded.qkv_bias


def test_glm4_moe_air_style_and_mtp_layers_parity(tmp_path):
    """GLM-4.5-Air-style options and other sizes: no q/k norm or bias, a quarter of each head rotated (4 of 16, set
    in rope_parameters), one group, raw top-k weights, two shared experts, two leading dense layers of 4; the
    released checkpoints' MTP layer (model.layers.{num_hidden_layers}.*) is ignored on load."""
    from moejax.models.safetensors_io import Checkpoint, save_file

    torch.manual_seed(0)
    cfg = transformers.Glm4MoeConfig(
        head_dim=16, use_qk_norm=False, attention_bias=False, norm_topk_prob=False, n_shared_experts=2,
        first_k_dense_replace=2, rope_parameters=dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=0.25),
        **{**_GLM, "num_hidden_layers": 4, "num_experts_per_tok": 3, "n_routed_experts": 6})
    hf = transformers.Glm4MoeForCausalLM(cfg)
    _check(tmp_path, hf, bias_names=("e_score_correction_bias",))
    model = models.from_pretrained(str(tmp_path))
    assert model.config.rotary_dim == 4 and model.config.first_dense_layers == 2 and not model.config.qk_norm
    ckpt = Checkpoint(str(tmp_path))
    tensors = {k: ckpt.read(k) for k in ckpt}
    mtp = {f"model.layers.4.{k[len('model.layers.3.'):]}": v for k, v in tensors.items()
           if k.startswith("model.layers.3.")}
    save_file({**tensors, **mtp, "model.layers.4.eh_proj.weight": np.zeros((32, 64), np.float32)},
              str(tmp_path / "model.safetensors"))
    tokens = jnp.asarray(np.arange(16).reshape(2, 8), jnp.int32)
    np.testing.assert_array_equal(np.asarray(models.from_pretrained(str(tmp_path))(tokens)), np.asarray(model(tokens)))


def test_minimax_m2_parity(tmp_path):
    """MiniMax-M2: RMS q/k norms over the flattened heads (weights [heads * head_dim]), partial rotary (rotary_dim 8
    of head_dim 16), sigmoid routing with the block's correction bias, renormalised; experts named w1/w3/w2."""
    torch.manual_seed(0)
    cfg = transformers.MiniMaxM2Config(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                                       rotary_dim=8, bos_token_id=None, eos_token_id=None, **COMMON)
    _check(tmp_path, transformers.MiniMaxM2ForCausalLM(cfg), bias_names=("e_score_correction_bias",))
    loaded = models.from_pretrained(str(tmp_path)).config
    assert loaded.rotary_dim == 8 and loaded.qk_norm and not loaded.qk_norm_per_head
