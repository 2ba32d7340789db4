"""PhiMoE, ERNIE 4.5 MoE and Hunyuan v1 MoE against transformers (tiny random models, nothing downloaded).

One 16-step greedy decode parity test per family (``_check`` of ``test_models_parity``); other
options are compared on prefill logits only. SparseMixer routing (PhiMoE) is also checked op by
op against transformers' ``sparsemixer``, and malformed or unsupported configs against their
one-line errors.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from moejax import dialect, models  # noqa: E402
from moejax.models import hf as hf_mod  # noqa: E402
from moejax.models.layers import LongRope  # noqa: E402
from moejax.models.safetensors_io import Checkpoint  # noqa: E402
from moejax.models.validation import CheckpointError  # noqa: E402
from test_models_parity import COMMON, NEW_TOKENS, TOL, _check  # noqa: E402


def _config(path) -> models.MoEConfig:
    """The MoEConfig a saved checkpoint translates to (no second load of its weights)."""
    with open(path / "config.json") as f:
        return hf_mod.config_from_hf(json.load(f))


def _randomize(hf_model, *suffixes: str, scale: float = 0.2) -> None:
    """transformers zero-initialises biases (and ERNIE's correction bias): give the named ones random values."""
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith(suffixes):
                p.copy_(scale * torch.randn_like(p))


# --------------------------------------------------------------------------
# PhiMoE: SparseMixer routing
# --------------------------------------------------------------------------
def test_sparsemixer_route_matches_transformers():
    """``Routing(score="sparsemixer")`` gives transformers' eval-mode weights and ids with and without a jitter
    threshold; the Pallas route impl falls back to the reference for it."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    from moejax.pallas_kernels.router import route_pallas

    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(64, 16)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)
    route = jax.jit(dialect.route_reference, static_argnames="routing")
    pallas = jax.jit(route_pallas, static_argnames="routing")
    for eps in (0.0, 0.1):
        routing = dialect.Routing(k=2, score="sparsemixer", norm_topk=False, jitter_eps=eps)
        ours_w, ours_ids = route(x, w, routing=routing)
        with torch.no_grad():
            ref_w, ref_ids = sparsemixer(torch.tensor(x @ w), jitter_eps=eps, training=False, top_k=2)
        np.testing.assert_array_equal(np.asarray(ours_ids), ref_ids.numpy())
        np.testing.assert_allclose(np.asarray(ours_w), ref_w.numpy(), rtol=1e-6, atol=1e-7)
    # at 0.1 the threshold matters: some weights are 1 (a lone expert within it), some are not
    assert 0 < (ref_w.numpy() == 1).mean() < 1
    p_w, p_ids = pallas(x, w, routing=routing)
    np.testing.assert_array_equal(np.asarray(p_ids), np.asarray(ours_ids))
    np.testing.assert_array_equal(np.asarray(p_w), np.asarray(ours_w))


def test_sparsemixer_routing_refuses_what_it_cannot_do():
    for bad in (dict(k=3), dict(k=2, gating="top_p", top_p=0.5), dict(k=2, gating="threshold", max_k=3),
                dict(k=2, n_group=2, topk_group=1)):
        with pytest.raises(ValueError, match="sparsemixer"):
            dialect.Routing(score="sparsemixer", **bad)
    r = dialect.Routing(k=2, score="sparsemixer")
    with pytest.raises(ValueError, match="sparsemixer"):
        dialect._scores(jnp.zeros((1, 4)), r.score)  # no per-expert distribution to hand out silently
    with pytest.raises(dialect.DialectTypeError, match="selection bias"):
        dialect.moe_route(jnp.zeros((3, 4)), jnp.zeros((4, 4)), jnp.zeros((4,)), routing=r)


def test_phimoe_parity(tmp_path):
    """SparseMixer with a jitter threshold that matters (0.1), LayerNorms with bias, q/k/v/o and lm_head biases."""
    torch.manual_seed(0)
    cfg = transformers.PhimoeConfig(intermediate_size=48, num_local_experts=4, attention_bias=True,
                                    lm_head_bias=True, router_jitter_noise=0.1, **COMMON)
    hf = transformers.PhimoeForCausalLM(cfg)
    _randomize(hf, ".bias")
    _check(tmp_path, hf)
    loaded = _config(tmp_path)
    assert loaded.routing.score == "sparsemixer" and loaded.routing.jitter_eps == 0.1
    assert loaded.norm == "layer_bias" and loaded.o_bias and loaded.lm_head_bias


def test_phimoe_variant_parity(tmp_path):
    """Logits only: another size (hidden 48, 6 heads of 8, 3 layers, 3 kv heads, 6 experts), no biases, jitter 0.3,
    untied lm_head without bias, rope_theta 500."""
    torch.manual_seed(0)
    cfg = transformers.PhimoeConfig(
        intermediate_size=24, num_local_experts=6, router_jitter_noise=0.3, rope_theta=500.0,
        **{**COMMON, "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 3, "num_hidden_layers": 3})
    _check(tmp_path, transformers.PhimoeForCausalLM(cfg), decode=False)
    loaded = _config(tmp_path)
    assert (loaded.n_layers, loaded.n_experts, loaded.d_model, loaded.routing.jitter_eps) == (3, 6, 48, 0.3)
    assert not (loaded.qkv_bias or loaded.o_bias or loaded.lm_head_bias) and loaded.rope_scaling is None


def _phimoe_longrope(original: int) -> transformers.PhimoeForCausalLM:
    """Released-style longrope (head_dim 8: 4 factors per set); long factors far from the short ones and unequal
    mscales, so using the wrong set or scale shows."""
    torch.manual_seed(0)
    rope = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0, 1.3, 2.5, 4.0],
                long_factor=[3.0, 9.0, 27.0, 60.0], short_mscale=1.15, long_mscale=1.4,
                original_max_position_embeddings=original)
    cfg = transformers.PhimoeConfig(intermediate_size=48, num_local_experts=4, attention_bias=True,
                                    max_position_embeddings=128, rope_parameters=rope, **COMMON)
    hf = transformers.PhimoeForCausalLM(cfg)
    _randomize(hf, ".bias")
    return hf


def test_phimoe_longrope_short_parity(tmp_path):
    """longrope below original_max_position_embeddings (64 > the 24 positions): short factors and short_mscale, 16
    greedy decode steps token for token."""
    _check(tmp_path, _phimoe_longrope(original=64))
    scaling = _config(tmp_path).rope_scaling
    assert isinstance(scaling, LongRope) and scaling.original_max_position_embeddings == 64
    assert (scaling.short_scale, scaling.long_scale, scaling.short_factor[1]) == (1.15, 1.4, 1.3)


def test_phimoe_longrope_crossing_parity(tmp_path):
    """longrope with original_max_position_embeddings 16 crossed while decoding (8-token prompt + 16 steps).

    transformers picks the set per forward call from ``max(position_ids) + 1`` (PhimoeRotaryEmbedding keeps the
    short factors in both regimes and switches short_mscale -> long_mscale), and its PhiMoE generate drops the cache
    and runs the whole sequence again at position 16, the first step past 16 tokens: so logits before position 16
    are short-regime ones and a full forward over the 23 tokens, long throughout, differs from them. moejax's
    generate (and stream) do the same: tokens and every row of logits match transformers' generate, and the full
    forward matches transformers' full forward."""
    hf = _phimoe_longrope(original=16).eval()
    hf.save_pretrained(tmp_path)
    model = models.from_pretrained(str(tmp_path), dtype=jnp.float32)
    ids = np.random.default_rng(0).integers(0, 64, (2, 8))
    tokens, ours = models.generate(model, jnp.asarray(ids), NEW_TOKENS, return_logits=True)
    tokens, ours = np.asarray(tokens), np.asarray(ours)
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, attention_mask=torch.ones_like(torch.tensor(ids)))
        prefill = hf(torch.tensor(ids)).logits.numpy()
        full = hf(torch.tensor(tokens[:, :-1])).logits.numpy()
    np.testing.assert_array_equal(tokens, out.sequences.numpy())
    streamed = np.stack([np.asarray(t) for t in models.generation.stream(model, jnp.asarray(ids), NEW_TOKENS)], 1)
    np.testing.assert_array_equal(streamed, tokens[:, 8:])
    steps = np.stack([t.numpy() for t in out.logits], 1)  # step 0: the prefill's last position
    ref = np.concatenate([prefill, steps[:, 1:]], 1)
    assert ours.shape == ref.shape == full.shape
    decode_diff = float(np.abs(ours - ref).max())
    full_diff = float(np.abs(np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(tokens[:, :-1]))) - full).max())
    print(f"longrope crossing: decode max |logit diff| {decode_diff:.3e}, full forward {full_diff:.3e}")
    assert decode_diff <= TOL and full_diff <= TOL
    assert np.abs(ref[:, :16] - full[:, :16]).max() > 0.05  # the regimes differ: the comparison sees which runs
    np.testing.assert_allclose(ref[:, 16:], full[:, 16:], atol=TOL)  # past 16: the same long states


def test_rope_scaling_variants_round_trip_moejax_config():
    """A moejax-format config.json holding LongRope (or Llama3Rope) reads back as that class, not as Yarn."""
    from moejax.models import default_model, presets
    from moejax.models.layers import Llama3Rope

    base = presets.preset("phi-3.5-moe")
    for scaling in (LongRope((1.0, 2.0), (3.0, 4.0), 16, 1.1, 1.3), Llama3Rope(8.0, 32, 1.0, 4.0)):
        cfg = dataclasses.replace(base, rope_scaling=scaling)
        back = default_model.config_from_dict(json.loads(json.dumps(default_model.config_to_dict(cfg))))
        assert back == cfg and type(back.rope_scaling) is type(scaling)


# --------------------------------------------------------------------------
# ERNIE 4.5 MoE
# --------------------------------------------------------------------------
_ERNIE = dict(intermediate_size=64, moe_intermediate_size=16, moe_num_experts=8, moe_k=2, **COMMON)


def test_ernie4_5_moe_parity(tmp_path):
    """Correction bias on selection only, renormalised top-k, 2 shared experts, leading dense layer, adjacent-pair
    RoPE, tied embeddings (transformers' default)."""
    torch.manual_seed(0)
    cfg = transformers.Ernie4_5_MoeConfig(moe_num_shared_experts=2, **_ERNIE)
    hf = transformers.Ernie4_5_MoeForCausalLM(cfg)
    _randomize(hf, "e_score_correction_bias", scale=0.5)
    _check(tmp_path, hf)
    loaded = _config(tmp_path)
    assert loaded.selection_bias and loaded.dense_layers == (0,) and loaded.tie_embeddings
    assert loaded.routing.norm_min == 1e-12 and loaded.n_shared_experts == 2


def test_ernie4_5_moe_schedule_and_norm_min_parity(tmp_path):
    """Logits only: MoE layers on the interval-2 grid up to moe_layer_end_index (1 of 4), no shared experts,
    moe_norm_min 0.9 (above most top-2 sums: the clamp acts), untied lm_head; export gives back the checkpoint."""
    torch.manual_seed(0)
    cfg = transformers.Ernie4_5_MoeConfig(
        moe_num_shared_experts=0, moe_layer_start_index=0, moe_layer_end_index=2, moe_layer_interval=2,
        moe_norm_min=0.9, tie_word_embeddings=False, **{**_ERNIE, "num_hidden_layers": 4})
    hf = transformers.Ernie4_5_MoeForCausalLM(cfg)
    _randomize(hf, "e_score_correction_bias", scale=0.5)
    _check(tmp_path, hf, decode=False)
    model = models.from_pretrained(str(tmp_path))
    loaded = model.config
    assert loaded.dense_layers == (0, 2, 3) and loaded.n_shared_experts == 0 and loaded.routing.norm_min == 0.9
    # export inverts every rule, the [1, E] correction bias included: the checkpoint's tensors come back
    ckpt = Checkpoint(str(tmp_path))
    exported = hf_mod.export_tensors(model, "Ernie4_5_MoeForCausalLM")
    assert sorted(exported) == sorted(ckpt)
    for name, value in exported.items():
        np.testing.assert_array_equal(value, ckpt.read(name), err_msg=name)


# --------------------------------------------------------------------------
# Hunyuan v1 MoE
# --------------------------------------------------------------------------
_HUNYUAN = dict(intermediate_size=16, num_experts=8, head_dim=8, **COMMON)


def test_hunyuan_v1_moe_parity(tmp_path):
    """Per-head q/k norms after RoPE, shared MLP, renormalised softmax top-2, q/k/v/o biases."""
    torch.manual_seed(0)
    cfg = transformers.HunYuanMoEV1Config(moe_topk=2, attention_bias=True, **_HUNYUAN)
    hf = transformers.HunYuanMoEV1ForCausalLM(cfg)
    _randomize(hf, "proj.bias")
    _check(tmp_path, hf)
    loaded = _config(tmp_path)
    assert loaded.qk_norm_after_rope and loaded.o_bias and loaded.n_shared_experts == 1


def test_hunyuan_v1_moe_ntk_alpha_parity(tmp_path):
    """Logits only: released-style RoPE (``dynamic`` with a fixed NTK ``alpha``: a larger base), per-layer moe_topk
    list with one value, top-3 of 8."""
    torch.manual_seed(0)
    rope = dict(rope_type="dynamic", alpha=1000.0, factor=1.0, rope_theta=10000.0)  # released: factor 1 + alpha
    cfg = transformers.HunYuanMoEV1Config(moe_topk=[3, 3], rope_parameters=rope, **_HUNYUAN)
    _check(tmp_path, transformers.HunYuanMoEV1ForCausalLM(cfg), decode=False)
    assert _config(tmp_path).rope_theta == pytest.approx(10000.0 * 1000.0 ** (8 / 6))


# --------------------------------------------------------------------------
# Refusals: one line naming the field
# --------------------------------------------------------------------------
_BASE_HF = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=16, hidden_act="silu", rms_norm_eps=1e-5)


@pytest.mark.parametrize("arch, fields, error, match", [
    ("PhimoeForCausalLM", dict(num_local_experts=4, num_experts_per_tok=1), CheckpointError, "num_experts_per_tok"),
    ("PhimoeForCausalLM", dict(num_local_experts=4, router_jitter_noise=-0.1), CheckpointError, "router_jitter_noise"),
    ("PhimoeForCausalLM", dict(num_local_experts=4, rope_scaling=dict(
        type="longrope", short_factor=[1.0] * 4, long_factor=[2.0] * 4, original_max_position_embeddings=4096)),
     CheckpointError, "short_mscale"),
    ("PhimoeForCausalLM", dict(num_local_experts=4, rope_scaling=dict(
        type="longrope", short_factor=[1.0] * 3, long_factor=[2.0] * 3, short_mscale=1.2, long_mscale=1.2)),
     CheckpointError, "short_factor has 3 entries"),
    ("PhimoeForCausalLM", dict(num_local_experts=4, rope_scaling=dict(
        type="longrope", short_factor=[1.0, -1.0, 1.0, 1.0], long_factor=[2.0] * 4, short_mscale=1.2,
        long_mscale=1.2)), CheckpointError, "short_factor"),
    ("PhimoeForCausalLM", dict(num_local_experts=4, rope_scaling=dict(type="linear", factor=2.0)),
     NotImplementedError, "linear"),
    ("Ernie4_5_MoeForCausalLM", dict(moe_intermediate_size=8, moe_num_experts=4, moe_k=2, moe_layer_end_index="1"),
     CheckpointError, "moe_layer_end_index"),
    ("Ernie4_5_MoeForCausalLM", dict(moe_intermediate_size=8, moe_num_experts=4, moe_k=2, moe_norm_min=0),
     CheckpointError, "moe_norm_min"),
    ("Ernie4_5_MoeForCausalLM", dict(moe_intermediate_size=8, moe_num_experts=4, moe_k=2, use_bias=True),
     NotImplementedError, "use_bias"),
    ("Ernie4_5_MoeForCausalLM", dict(moe_intermediate_size=8, moe_num_experts=4, moe_k=2, moe_layer_start_index=5),
     CheckpointError, "no MoE layer"),
    ("HunYuanMoEV1ForCausalLM", dict(num_experts=4, moe_topk=[2, 1]), NotImplementedError, "moe_topk"),
    ("HunYuanMoEV1ForCausalLM", dict(num_experts=4, moe_topk="2"), CheckpointError, "moe_topk"),
])
def test_config_errors(arch, fields, error, match):
    with pytest.raises(error, match=match) as info:
        hf_mod.config_from_hf({"architectures": [arch], **_BASE_HF, **fields})
    assert "\n" not in str(info.value)


def test_new_fields_default_to_old_behaviour():
    """Defaults of the new Routing and MoEConfig fields leave every existing model as it was."""
    r = dialect.Routing(k=2)
    assert (r.norm_min, r.jitter_eps) == (1e-20, 0.0)
    fields = {f.name: f.default for f in dataclasses.fields(models.MoEConfig)}
    assert not (fields["o_bias"] or fields["lm_head_bias"] or fields["qk_norm_after_rope"])


def test_phi_3_5_moe_preset():
    """The Phi-3.5-MoE preset holds to 1% of the published 41.9B total and 3% of the 6.6B active; a released-style
    config.json (default RoPE, the remote-code architecture name) translates to it, and with a longrope block to it
    plus that LongRope. (The tiny families' forward is traced by test_models_presets.)"""
    from moejax.models import presets as P

    cfg = P.preset("phi-3.5-moe")
    assert abs(P.param_count(cfg) / 41.9e9 - 1) < 0.01
    assert abs(P.active_param_count(cfg) / 6.6e9 - 1) < 0.03
    released = dict(architectures=["PhiMoEForCausalLM"], model_type="phimoe", vocab_size=32064, hidden_size=4096,
                    intermediate_size=6400, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    hidden_act="silu", num_local_experts=16, num_experts_per_tok=2, router_jitter_noise=0.01,
                    rms_norm_eps=1e-5, rope_theta=10000.0, attention_bias=True, lm_head_bias=True,
                    tie_word_embeddings=False, sliding_window=None)
    assert hf_mod.config_from_hf(released) == cfg
    # with its longrope block (64 factors per set for head_dim 128; not the released values), mscale 1.2432 for both
    short, long = [1.0 + i / 64 for i in range(64)], [2.0 + i for i in range(64)]
    longrope = dict(type="longrope", short_factor=short, long_factor=long, short_mscale=1.243163121016122,
                    long_mscale=1.243163121016122, original_max_position_embeddings=4096)
    got = hf_mod.config_from_hf({**released, "max_position_embeddings": 131072, "rope_scaling": longrope})
    assert got == dataclasses.replace(cfg, rope_scaling=LongRope(tuple(short), tuple(short), 4096, 1.243163121016122,
                                                                 1.243163121016122))
