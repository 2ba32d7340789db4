"""Llama 4 (text) and Granite MoE families: parity with transformers, input-weighted routing in the dialect,
malformed configs, presets, export round trips.

Parity as in ``test_models_parity``: a tiny random transformers model saved to a temporary folder, loaded with
``moejax.models.from_pretrained``; float32 logits within 1e-4 and (one test per family) 16 greedy decode steps
token for token.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from test_models_parity import COMMON, _check  # noqa: E402

from moejax import dialect  # noqa: E402
from moejax import models  # noqa: E402
from moejax.models.validation import CheckpointError  # noqa: E402

# Llama 4 with every mechanism on at a scale where it shows within 24 tokens: layer 0 dense (intermediate_size_mlp)
# with RoPE, L2 q/k norm and 4-token chunked attention; layer 1 MoE and NoPE, with temperature tuning that grows
# every 2 positions.
_LLAMA4 = dict(intermediate_size=16, intermediate_size_mlp=24, num_local_experts=4, head_dim=8,
               interleave_moe_layer_step=2, no_rope_layer_interval=2, attention_chunk_size=4, floor_scale=2,
               attn_scale=0.5, use_qk_norm=True, bos_token_id=None, eos_token_id=None, **COMMON)


def _llama4(**overrides) -> "transformers.Llama4ForCausalLM":
    torch.manual_seed(0)
    return transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**{**_LLAMA4, **overrides}))


def test_llama4_parity(tmp_path):
    """Top-1 sigmoid routing on the expert input, shared expert, interleaved dense layers, NoPE + temperature
    tuning, L2 q/k norm, chunked attention, adjacent-pair RoPE; prefill and 16 decode steps."""
    _check(tmp_path, _llama4())
    cfg = models.from_pretrained(str(tmp_path)).config
    assert cfg.routing.weight_on == "input" and cfg.routing.k == 1 and cfg.routing.score == "sigmoid"
    assert cfg.dense_layers == (0,) and cfg.d_ff_dense == 24 and cfg.n_shared_experts == 1
    assert cfg.nope_layers == (1,) and cfg.chunked_layers == (0,) and cfg.attention_chunk_size == 4
    assert cfg.attn_temperature == (2.0, 0.5) and cfg.qk_l2_norm


def test_llama4_top2_all_moe_no_qk_norm_parity(tmp_path):
    """Variant: top-2 input-weighted routing (two scaled copies of each token), every layer MoE, no q/k norm,
    the default NoPE interval (no NoPE layer among 2), no chunking, Llama 3 RoPE scaling (as Scout is released;
    theta 1e4 over 64 original positions, so that the 4 frequencies of head_dim 8 fall in all three bands: kept,
    interpolated, divided by the factor)."""
    llama3 = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=64)
    _check(tmp_path, _llama4(num_experts_per_tok=2, interleave_moe_layer_step=1, use_qk_norm=False,
                             no_rope_layer_interval=4, attention_chunk_size=None, rope_parameters=llama3),
           decode=False)
    cfg = models.from_pretrained(str(tmp_path)).config
    assert cfg.routing.k == 2 and cfg.dense_layers == () and cfg.nope_layers == () and not cfg.chunked_layers
    inv, plain = cfg.rope_scaling.inv_freq(8, 10000.0), 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    assert np.isclose(inv[0], plain[0]) and plain[1] / 8 < inv[1] < plain[1] and np.allclose(inv[2:], plain[2:] / 8)


def test_llama4_multimodal_checkpoint_loads_its_text_model(tmp_path):
    """Variant: a Llama4ForConditionalGeneration checkpoint (text tensors under language_model., a tiny vision tower
    and projector beside them, which are skipped) loads as its text model; logits against transformers' language
    model (its multimodal forward without images fails in transformers 5.24)."""
    torch.manual_seed(0)
    vision = dict(hidden_size=16, num_hidden_layers=1, intermediate_size=32, num_attention_heads=2, image_size=28,
                  patch_size=14, vision_output_dim=16, projector_input_dim=16, projector_output_dim=32)
    hf = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(vision_config=vision,
                                                                               text_config=_LLAMA4)).eval()
    hf.save_pretrained(tmp_path)
    model = models.from_pretrained(str(tmp_path), dtype=jnp.float32)
    ids = np.random.default_rng(0).integers(0, 64, (2, 8))
    with torch.no_grad():
        ref = hf.language_model(input_ids=torch.tensor(ids)).logits.numpy()
    diff = float(np.abs(np.asarray(model(jnp.asarray(ids))) - ref).max())
    assert diff <= 1e-4 and np.abs(ref).max() > 0.5, diff
    print(f"Llama4ForConditionalGeneration (text): max |logit diff| = {diff:.3e}")


_GRANITE = dict(intermediate_size=16, num_local_experts=6, num_experts_per_tok=2, embedding_multiplier=2.0,
                attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=2.0, bos_token_id=None,
                eos_token_id=None, **COMMON)


def test_granitemoe_parity(tmp_path):
    """muP multipliers (embedding, softmax scale, residual, logits), softmax over the top-k logits, fused
    input_linear / output_linear experts; prefill and 16 decode steps."""
    torch.manual_seed(0)
    _check(tmp_path, transformers.GraniteMoeForCausalLM(transformers.GraniteMoeConfig(**_GRANITE)))
    cfg = models.from_pretrained(str(tmp_path)).config
    assert (cfg.embedding_multiplier, cfg.softmax_scale, cfg.residual_multiplier, cfg.logits_scaling) == (
        2.0, 0.2, 0.5, 2.0)


def test_granitemoeshared_parity(tmp_path):
    """Variant: the shared MLP (fused input_linear, no gate) beside the routed experts."""
    torch.manual_seed(0)
    hf = transformers.GraniteMoeSharedForCausalLM(transformers.GraniteMoeSharedConfig(
        shared_intermediate_size=24, **_GRANITE))
    _check(tmp_path, hf, decode=False)
    cfg = models.from_pretrained(str(tmp_path)).config
    assert cfg.n_shared_experts == 1 and cfg.d_ff_shared == 24 and not cfg.shared_expert_gate


def _random_biases(hf_model, scale: float = 0.2):
    """transformers zero-initialises the attention biases: give them random values."""
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("proj.bias"):
                p.copy_(scale * torch.randn_like(p))
    return hf_model


def test_llama4_attention_bias_parity(tmp_path):
    """Logits only: attention_bias (q/k/v and o_proj biases) on the RoPE + L2-norm + chunked layer and the NoPE +
    temperature layer."""
    _check(tmp_path, _random_biases(_llama4(attention_bias=True)), decode=False)
    cfg = models.from_pretrained(str(tmp_path)).config
    assert cfg.qkv_bias and cfg.o_bias


def test_granitemoe_bias_variant_parity(tmp_path):
    """Variant, logits only: another size (hidden 48, 6 heads of 8 over 2 kv heads, 3 layers, 8 experts, top-1),
    other multipliers, tied embeddings (as granite-3.0-1b-a400m), q/k/v/o biases (attention_bias)."""
    torch.manual_seed(0)
    cfg = transformers.GraniteMoeConfig(**{
        **_GRANITE, "hidden_size": 48, "num_attention_heads": 6, "num_hidden_layers": 3, "intermediate_size": 24,
        "num_local_experts": 8, "num_experts_per_tok": 1, "embedding_multiplier": 6.0,
        "attention_multiplier": 0.1, "residual_multiplier": 0.3, "logits_scaling": 3.0, "attention_bias": True,
        "tie_word_embeddings": True})
    _check(tmp_path, _random_biases(transformers.GraniteMoeForCausalLM(cfg)), decode=False)
    loaded = models.from_pretrained(str(tmp_path)).config
    assert (loaded.n_layers, loaded.n_experts, loaded.routing.k, loaded.d_model) == (3, 8, 1, 48)
    assert loaded.tie_embeddings and loaded.qkv_bias and loaded.o_bias and loaded.logits_scaling == 3.0


def test_granitemoeshared_variant_parity(tmp_path):
    """Variant, logits only: another size (hidden 40, 5 heads of 8 without GQA, 3 layers, 5 experts, top-3), a
    wider shared MLP (40), other multipliers."""
    torch.manual_seed(0)
    cfg = transformers.GraniteMoeSharedConfig(**{
        **_GRANITE, "hidden_size": 40, "num_attention_heads": 5, "num_key_value_heads": 5, "num_hidden_layers": 3,
        "intermediate_size": 12, "num_local_experts": 5, "num_experts_per_tok": 3, "shared_intermediate_size": 40,
        "embedding_multiplier": 1.5, "attention_multiplier": 0.3, "residual_multiplier": 0.8,
        "logits_scaling": 0.5})
    _check(tmp_path, transformers.GraniteMoeSharedForCausalLM(cfg), decode=False)
    loaded = models.from_pretrained(str(tmp_path)).config
    assert (loaded.n_layers, loaded.n_experts, loaded.routing.k, loaded.d_ff_shared) == (3, 5, 3, 40)
    assert loaded.n_kv_heads == 5 and not loaded.qkv_bias


# --------------------------------------------------------------------------
# Input-weighted routing in the dialect
# --------------------------------------------------------------------------
def _with_ffn_impl(fn, impl: str):
    """``fn`` with every ``moe_expert_ffn`` of its trace switched to expert-op implementation ``impl``."""
    def run(*args):
        closed = jax.make_jaxpr(fn)(*args)
        eqns = [e.replace(params={**e.params, "impl": impl}) if e.primitive is dialect.expert_ffn_p else e
                for e in closed.jaxpr.eqns]
        return jax.core.eval_jaxpr(closed.jaxpr.replace(eqns=eqns), closed.consts, *jax.tree_util.tree_leaves(args))
    return run


def test_input_weighted_sparse_moe_matches_dense_reference():
    """sparse_moe with the ragged expert op equals every expert on every scaled token (``sum_j E_j(w_j x)``, row 0
    also by hand), for k=1 and k=2; output weighting differs on the same weights. (The reference expert op runs in
    the parity tests: k=1 in test_llama4_parity, k=2 in the top-2 variant.)"""
    rng = np.random.default_rng(0)
    t, d, f, e = 10, 8, 12, 4
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    w_router = jnp.asarray(rng.normal(size=(d, e)), jnp.float32)
    experts = tuple(jnp.asarray(rng.normal(size=s) / 3, jnp.float32) for s in ((e, d, f), (e, d, f), (e, f, d)))
    routings = [dialect.Routing(k=k, score="sigmoid", norm_topk=False, weight_on="input") for k in (1, 2)]

    def layers(x, w_router, experts):
        return [dialect.sparse_moe(x, w_router, experts, routing=r) for r in routings]

    def everything(x, w_router, experts):  # one compilation for every variant
        dense = [dialect.einsum_moe_reference(x, w_router, experts, routing=r) for r in routings]
        out_w = [dialect.einsum_moe_reference(x, w_router, experts, routing=dataclasses.replace(r, weight_on="output"))
                 for r in routings]
        return _with_ffn_impl(layers, "ragged")(x, w_router, experts), dense, out_w

    ragged, dense, output_weighted = jax.jit(everything)(x, w_router, experts)
    for r, a, want, other in zip(routings, ragged, dense, output_weighted):
        np.testing.assert_allclose(np.asarray(a), np.asarray(want), atol=1e-5, err_msg=str(r))
        assert float(jnp.abs(other - a).max()) > 1e-3
    w, ids = dialect.route_reference(x[:1], w_router, routing=routings[1])
    by_hand = sum(dialect.expert_ffn_math(x[:1] * w[0, j], [m[ids[0, j]] for m in experts], "swiglu")
                  for j in range(2))
    np.testing.assert_allclose(np.asarray(ragged[1][0]), np.asarray(by_hand[0]), atol=1e-5)
    text = str(jax.make_jaxpr(_with_ffn_impl(layers, "ragged"))(x, w_router, experts))
    assert "impl=ragged" in text
    for op in ("moe_route", "moe_dispatch", "moe_expert_ffn", "moe_combine"):
        assert op in text


def test_input_weighted_routing_refuses_what_it_cannot_express():
    base = dialect.Routing(k=2, score="sigmoid", norm_topk=False, weight_on="input")
    with pytest.raises(ValueError, match="cannot take an expert_map"):
        dialect.Routing(**{**base.__dict__, "expert_map": (0, 0, 1, 1)})
    with pytest.raises(ValueError, match="keeps k=2 slots"):
        dialect.Routing(**{**base.__dict__, "gating": "top_p", "top_p": 0.5, "max_k": 4})
    with pytest.raises(ValueError, match="weight_on must be one of"):
        dialect.Routing(k=1, weight_on="both")
    # one slot: merging is a relabelling (exact); skip-gating keeps the slot count
    dialect.Routing(k=1, score="sigmoid", weight_on="input", expert_map=(0, 0, 1, 1))
    dialect.Routing(**{**base.__dict__, "gating": "skip", "skip_ratio": 0.5})


# --------------------------------------------------------------------------
# Malformed and unsupported configs: one line naming the field
# --------------------------------------------------------------------------
def _llama4_config(**changes) -> dict:
    cfg = {"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "vocab_size": 64, "hidden_size": 32,
           "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
           "intermediate_size": 16, "intermediate_size_mlp": 24, "num_local_experts": 4, "num_experts_per_tok": 1,
           "interleave_moe_layer_step": 2}
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("changes, match", [
    (dict(no_rope_layers=[1, 2, 1, 1]), r"field 'no_rope_layers' must be a list of 0/1 flags"),
    (dict(no_rope_layers=[1, 0]), r"'no_rope_layers' has 2 flags for num_hidden_layers=4"),
    (dict(layer_types=["full_attention", "sliding_attention", "full_attention", "full_attention"]),
     r"'layer_types' holds 'sliding_attention'"),
    (dict(moe_layers=[1, 7]), r"'moe_layers' names layer 7, but num_hidden_layers=4"),
    (dict(attention_chunk_size=0), r"field 'attention_chunk_size' must be a positive integer"),
    (dict(attn_temperature_tuning="yes"), r"field 'attn_temperature_tuning' must be true, false or a number"),
    (dict(intermediate_size_mlp=None), r"field 'intermediate_size_mlp' must be a positive integer"),
    (dict(architectures=["Llama4ForConditionalGeneration"]), r"lacks field 'text_config'"),
])
def test_llama4_malformed_config_is_one_checkpoint_error(changes, match):
    with pytest.raises(CheckpointError, match=match) as info:
        models.hf.config_from_hf(_llama4_config(**changes))
    assert "\n" not in str(info.value) and "config.json" in str(info.value)


def test_llama4_multimodal_text_config_is_checked_and_translated():
    text = _llama4_config()
    hf = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": text}
    assert models.hf.config_from_hf(hf) == models.hf.config_from_hf(text)
    with pytest.raises(CheckpointError, match=r"config.json text_config: field 'floor_scale' must be a positive"):
        models.hf.config_from_hf({**hf, "text_config": {**text, "floor_scale": -1}})


@pytest.mark.parametrize("arch, field, value, match", [
    ("GraniteMoeForCausalLM", "residual_multiplier", "0.2", r"field 'residual_multiplier' must be a positive number"),
    ("GraniteMoeSharedForCausalLM", "shared_intermediate_size", -1,
     r"field 'shared_intermediate_size' must be a non-negative integer"),
    ("GraniteMoeForCausalLM", "logits_scaling", 0, r"field 'logits_scaling' must be a positive number"),
])
def test_granite_malformed_config_is_one_checkpoint_error(arch, field, value, match):
    hf = {"architectures": [arch], "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
          "num_attention_heads": 4, "intermediate_size": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
          field: value}
    with pytest.raises(CheckpointError, match=match):
        models.hf.config_from_hf(hf)


@pytest.mark.parametrize("arch", ["Llama4ForCausalLM", "GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM"])
def test_attention_bias_translates_to_qkv_and_o_bias(arch):
    """transformers' Llama 4 and Granite attentions put ``attention_bias`` on q/k/v and o_proj (parity: the
    ``*_bias_*`` tests)."""
    hf = _llama4_config(architectures=[arch], attention_bias=True)
    cfg = models.hf.config_from_hf(hf)
    assert cfg.qkv_bias and cfg.o_bias
    assert not models.hf.config_from_hf({**hf, "attention_bias": False}).qkv_bias




# --------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------
def test_llama4_presets_param_counts():
    """Text-model counts against Meta's model-card totals (109B Scout, 400B Maverick; 17B active each). The
    totals are of the multimodal checkpoints: Maverick's text model is within 1%; Scout's is 1.1% under, the
    vision encoder's share of its 109B."""
    from moejax.models import presets as P

    for name, tol in (("llama4-maverick", 0.01), ("llama4-scout", 0.015)):
        cfg = P.preset(name)
        rel = P.param_count(cfg) / (P.PUBLISHED_PARAMS[name] * 1e9) - 1
        assert abs(rel) <= tol, f"{name}: {rel:+.2%}"
        assert abs(P.active_param_count(cfg) / 17e9 - 1) < 0.011, name
    assert P.preset("llama4-maverick").dense_layers == tuple(range(0, 48, 2))


@pytest.mark.parametrize("name", ["llama4-scout", "llama4-maverick"])
def test_llama4_released_style_config_translates_to_the_preset(name):
    """A released-style multimodal config.json (text_config: moe_layers, no_rope_layers with every 4th layer NoPE,
    chunked attention, attn_temperature_tuning as an integer; Scout: 16 experts everywhere, q/k norm, llama3 RoPE
    scaling; Maverick: 128 experts every other layer, no q/k norm or scaling) gives exactly the preset."""
    from moejax.models import presets as P

    scout = name == "llama4-scout"
    step = 1 if scout else 2
    text = {"model_type": "llama4_text", "vocab_size": 202048, "hidden_size": 5120, "num_hidden_layers": 48,
            "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
            "intermediate_size": 8192, "intermediate_size_mlp": 16384, "num_local_experts": 16 if scout else 128,
            "num_experts_per_tok": 1, "interleave_moe_layer_step": step, "moe_layers": list(range(step - 1, 48, step)),
            "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(48)], "use_qk_norm": scout,
            "attention_chunk_size": 8192, "attn_temperature_tuning": 4, "floor_scale": 8192, "attn_scale": 0.1,
            "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False,
            "torch_dtype": "bfloat16",
            "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192} if scout else None}
    hf = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": text}
    assert models.hf.config_from_hf(hf) == P.preset(name)
    if scout:  # low == high frequency factor: no interpolated band, and no NaN from its 0/0
        inv = P.preset(name).rope_scaling.inv_freq(128, 500000.0)
        plain = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
        assert np.isfinite(inv).all() and np.allclose(inv, np.where(2 * np.pi / plain > 8192, plain / 16, plain),
                                                      rtol=1e-5)


# --------------------------------------------------------------------------
# Export back to Hugging Face
# --------------------------------------------------------------------------
@pytest.mark.parametrize("family, pipeline", [("llama4", "profile,merge(num_experts=2)"),
                                              ("granitemoeshared", "")])
def test_export_round_trip_through_transformers(tmp_path, family, pipeline):
    """moejax loads, optimizes, exports (fused gate_up_proj / input_linear tensors rebuilt from their parts);
    transformers loads the export and matches the optimized model. Llama 4 after merge: each router column gets its
    merged expert (exact for one input-weighted slot); Granite as loaded (experts and the shared MLP)."""
    import moejax
    from moejax.models.export_hf import export_hf

    torch.manual_seed(0)
    if family == "llama4":
        hf = _llama4()
    else:
        hf = transformers.GraniteMoeSharedForCausalLM(transformers.GraniteMoeSharedConfig(
            shared_intermediate_size=24, **_GRANITE))
    hf.save_pretrained(tmp_path / "source")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
    model = models.from_pretrained(str(tmp_path / "source"), dtype=jnp.float32)
    opt = moejax.optimize(model, (tokens,), pipeline) if pipeline else model
    export_hf(opt, str(tmp_path / "export"))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = again(torch.tensor(np.asarray(tokens))).logits.numpy()
    diff = float(np.abs(np.asarray(opt(tokens)) - theirs).max())
    assert diff <= 1e-4, f"{family} {pipeline}: {diff:.2e}"
    print(f"{family} {pipeline}: max |logit diff| vs transformers after export {diff:.2e}")
