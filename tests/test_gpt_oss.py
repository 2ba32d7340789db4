"""gpt-oss: parity with transformers, MXFP4 checkpoints in the released layout, the dialect's expert biases and
clamped SwiGLU, presets.

The parity tests follow tests/test_models_parity.py (tiny random transformers model, ``save_pretrained``,
``models.from_pretrained``, float32 logits within 1e-4, 16 greedy decode steps token for token); the MXFP4
checkpoint is that model with its experts quantized and stored as ``*_blocks`` / ``*_scales`` with
``quantization_config.quant_method = "mxfp4"``, compared against its dequantize-then-float twin.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import moejax  # noqa: E402
from moejax import dialect, models  # noqa: E402
from moejax import weight_formats as wf  # noqa: E402
from moejax.models import hf as mhf  # noqa: E402
from moejax.models.export_hf import export_hf  # noqa: E402
from moejax.models import presets as P  # noqa: E402
from moejax.models.validation import CheckpointError  # noqa: E402
from moejax.pipeline import PassContext, PassError  # noqa: E402

from test_models_parity import _check  # noqa: E402

# hidden and intermediate sizes are whole MXFP4 blocks (32); sliding window 4 < the 8-token prompt
CFG = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           head_dim=8, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
           initializer_range=0.2, max_position_embeddings=64)


def _gpt_oss(**kw) -> "transformers.GptOssForCausalLM":
    """A tiny gpt-oss with random biases and sinks (transformers zero-initialises some of them)."""
    torch.manual_seed(0)
    hf = transformers.GptOssForCausalLM(transformers.GptOssConfig(**{**CFG, **kw}))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("bias", "sinks")):
                p.copy_(0.3 * torch.randn_like(p))
    return hf


def _clamped_fraction(hf, ids) -> float:
    """Share of gate/up pre-activations of layer 0's experts past the clamp (the test must exercise it)."""
    with torch.no_grad():
        x = hf.model.layers[0].post_attention_layernorm(hf.model.embed_tokens(torch.tensor(ids)))
        e = hf.model.layers[0].mlp.experts
        gu = torch.einsum("btd,edf->ebtf", x, e.gate_up_proj) + e.gate_up_proj_bias[:, None, None]
        return float((gu.abs() > e.limit).float().mean())


def test_gpt_oss_parity_with_decode(tmp_path):
    """Sinks, sliding window 4 on layer 0 (the 24-token sequence leaves it), attention biases, router bias,
    expert biases, clamped SwiGLU (limit 1: about a third of the pre-activations clamp), default YaRN."""
    hf = _gpt_oss(swiglu_limit=1.0)
    assert _clamped_fraction(hf, np.zeros((1, 8), int) + np.arange(8)) > 0.1
    _check(tmp_path, hf)
    cfg = models.from_pretrained(str(tmp_path)).config
    assert cfg.sliding_layers == (0,) and cfg.sliding_window == 4 and cfg.routing.bias_on_logits
    assert cfg.activation == dialect.clamped_swiglu(1.0, 1.702) and cfg.rope_scaling.truncate is False


def test_gpt_oss_variant_parity(tmp_path):
    """Other layer pattern (full, sliding, sliding), no attention bias, top-1, another alpha and limit."""
    hf = _gpt_oss(num_hidden_layers=3, layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                  attention_bias=False, num_experts_per_tok=1, swiglu_alpha=1.2, swiglu_limit=0.8, sliding_window=3)
    _check(tmp_path, hf, decode=False)
    assert models.from_pretrained(str(tmp_path)).config.sliding_layers == (1, 2)


# ---- MXFP4 checkpoints --------------------------------------------------------------------------------------
def _mxfp4_pair(tmp_path):
    """(MXFP4 folder, float twin folder, transformers twin): random experts stored as released (``*_blocks`` uint8
    ``[E, out, in / 32, 16]``, ``*_scales`` uint8 ``[E, out, in / 32]``); the twin holds transformers' own
    dequantization of the same bytes (``convert_moe_packed_tensors``)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf = _gpt_oss()
    rng = np.random.default_rng(3)
    packed = {}
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            for proj in ("gate_up_proj", "down_proj"):
                e, k, n = getattr(layer.mlp.experts, proj).shape  # [E, in, out]
                blocks = rng.integers(0, 256, (e, n, k // 32, 16), dtype=np.uint8)  # any byte: two e2m1 codes
                scales = rng.integers(121, 125, (e, n, k // 32), dtype=np.uint8)  # 2**-6 .. 2**-3
                packed[f"model.layers.{i}.mlp.experts.{proj}"] = (blocks, scales)
                deq = convert_moe_packed_tensors(torch.from_numpy(blocks.copy()), torch.from_numpy(scales.copy()),
                                                 dtype=torch.float32)
                getattr(layer.mlp.experts, proj).copy_(deq)
    twin, quant = tmp_path / "twin", tmp_path / "mxfp4"
    hf.eval()
    hf.save_pretrained(twin)
    tensors = load_file(str(twin / "model.safetensors"))
    for name, (blocks, scales) in packed.items():
        del tensors[name]
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
    quant.mkdir()
    save_file(tensors, str(quant / "model.safetensors"))
    config = json.loads((twin / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (quant / "config.json").write_text(json.dumps(config))
    return quant, twin, hf


def test_mxfp4_checkpoint_loads_packed_and_matches_its_float_twin(tmp_path):
    """The experts load as the stored bytes (``Mxfp4Tensor``), dequantize to exactly the twin's floats, give the
    twin's MoE-block output (<= 1e-6) and transformers' logits on the twin (<= 1e-4, as every parity test)."""
    quant, twin, hf = _mxfp4_pair(tmp_path)
    model = models.from_pretrained(str(quant), dtype=jnp.float32)
    float_model = models.from_pretrained(str(twin), dtype=jnp.float32)
    params, floats = mhf.parameter_values(model), mhf.parameter_values(float_model)
    for i in range(2):
        for w in ("w_gate", "w_up", "w_down"):
            leaf = params[f"layers/{i}/mlp/experts/{w}"]
            assert isinstance(leaf, wf.Mxfp4Tensor) and leaf.blocks.dtype == jnp.uint8, (i, w, type(leaf))
            np.testing.assert_array_equal(np.asarray(leaf.dequantize(jnp.float32)), floats[f"layers/{i}/mlp/experts/{w}"])
    assert not wf.is_structured(params["layers/0/mlp/experts/b_gate"])  # biases stay float
    experts = model.layers[0].mlp.experts.weights()
    assert dialect.weight_format_of(experts[:3]) == "mxfp4" and len(experts) == 6
    # the expert op on the packed experts against the twin's floats (one compilation for both)
    rows, sizes = jnp.asarray(np.random.default_rng(0).normal(size=(16, 32)), jnp.float32), jnp.full((4,), 4)
    act = model.config.activation
    both = jax.jit(lambda a, b: [dialect.moe_expert_ffn(rows, sizes, w, activation=act, impl="ragged") for w in (a, b)])
    packed, plain = both(experts, float_model.layers[0].mlp.experts.weights())
    block = float(np.abs(np.asarray(packed) - np.asarray(plain)).max())
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)))
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
    with torch.no_grad():
        ref = hf(torch.tensor(np.asarray(ids))).logits.numpy()
    diff = float(np.abs(ours - ref).max())
    print(f"MXFP4: MoE block vs float twin {block:.3e}; logits vs transformers on the twin {diff:.3e}")
    assert block <= 1e-6 and diff <= 1e-4 and np.abs(ref).max() > 0.5
    # exported, it is the MXFP4 checkpoint, bit for bit (after prune: tests/test_export_round_trip.py)
    export_hf(model, str(tmp_path / "export"))
    _assert_same_tensors(tmp_path / "export", quant)
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    assert written["quantization_config"] == json.loads((quant / "config.json").read_text())["quantization_config"]


@pytest.mark.filterwarnings("ignore:Mixtral. sliding_window")
def test_mxfp4_bad_inputs_are_one_line_errors(tmp_path):
    quant, _, _ = _mxfp4_pair(tmp_path)
    tensors = load_file(str(quant / "model.safetensors"))
    scales = "model.layers.1.mlp.experts.down_proj_scales"
    tensors[scales] = tensors[scales][:, :, :0]  # mis-shaped scales
    save_file(tensors, str(quant / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"tensor '{scales}' has shape"):
        models.from_pretrained(str(quant))
    tensors[scales] = np.full((4, 32, 1), 255, np.uint8)  # e8m0 NaN
    save_file(tensors, str(quant / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"'{scales}' holds 128 NaN exponents"):
        models.from_pretrained(str(quant))
    config = json.loads((quant / "config.json").read_text())
    for change, err, match in (
            (dict(intermediate_size=24), CheckpointError, "intermediate_size=24 is not a multiple of 32"),
            (dict(layer_types=["full_attention"]), CheckpointError, "layer_types has 1 entries"),
            (dict(layer_types=["sliding", "full"]), CheckpointError, "layer_types holds .full."),
            (dict(swiglu_limit="7"), CheckpointError, "swiglu_limit"),
            (dict(architectures=["MixtralForCausalLM"], model_type="mixtral"), NotImplementedError,
             "MXFP4 checkpoints .* GptOssForCausalLM only")):
        (quant / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(err, match=match) as info:
            models.from_pretrained(str(quant))
        assert "\n" not in str(info.value)


def _assert_same_tensors(a, b) -> None:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(ta) == sorted(tb)
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


def test_export_round_trip(tmp_path):
    """export_hf writes the loaded model in gpt-oss's layout (gate/up interleaved back, biases, sinks): the same
    tensors bit for bit, and transformers loads the export to the same logits."""
    hf = _gpt_oss()
    hf.eval()
    hf.save_pretrained(tmp_path / "src")
    models.save_pretrained_hf(models.from_pretrained(str(tmp_path / "src"), dtype=jnp.float32), str(tmp_path / "out"))
    _assert_same_tensors(tmp_path / "out", tmp_path / "src")
    back = transformers.GptOssForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor(np.random.default_rng(0).integers(0, 64, (2, 8)))
    with torch.no_grad():
        diff = float((back(ids).logits - hf(ids).logits).abs().max())
    print(f"gpt-oss export round trip: max |logit diff| = {diff:.3e}")
    assert diff <= 1e-4


# ---- the dialect: expert biases, clamped SwiGLU, router bias on the logits ---------------------------------
def _biased_experts(rng, e=4, d=8, f=6):
    mats = [rng.normal(size=s).astype(np.float32) for s in ((e, d, f), (e, d, f), (e, f, d))]
    biases = [rng.normal(size=s).astype(np.float32) for s in ((e, f), (e, f), (e, d))]
    return tuple(jnp.asarray(a) for a in mats + biases)


def test_expert_biases_and_clamped_swiglu_in_reference_and_ragged():
    rng = np.random.default_rng(0)
    weights = _biased_experts(rng)
    act = dialect.clamped_swiglu(limit=0.5, alpha=1.702)
    x = jnp.asarray(rng.normal(size=(10, 8)).astype(np.float32))
    sizes = jnp.asarray([3, 0, 4, 1], jnp.int32)  # 8 rows in groups, 2 padding rows

    @jax.jit  # one compilation for both impls and the gradient
    def run(weights):
        ref, rag = (dialect.moe_expert_ffn(x, sizes, weights, activation=act, impl=i) for i in ("reference", "ragged"))
        grad = jax.grad(lambda b: dialect.moe_expert_ffn(x, sizes, (*weights[:5], b), activation=act).sum())
        return ref, rag, grad(weights[5])

    ref, rag, grad = (np.asarray(a) for a in run(weights))
    # By hand: expert e on its rows, gpt-oss's formula.
    wg, wu, wd, bg, bu, bd = (np.asarray(w, np.float64) for w in weights)
    gid = np.repeat(np.arange(4), np.asarray(sizes))
    xs = np.asarray(x, np.float64)[:8]
    g = np.minimum(np.einsum("nd,ndf->nf", xs, wg[gid]) + bg[gid], 0.5)
    u = np.clip(np.einsum("nd,ndf->nf", xs, wu[gid]) + bu[gid], -0.5, 0.5)
    want = np.einsum("nf,nfd->nd", g / (1 + np.exp(-1.702 * g)) * (u + 1), wd[gid]) + bd[gid]
    np.testing.assert_allclose(ref[:8], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rag, ref, rtol=1e-6, atol=1e-6)
    assert not ref[8:].any() and not rag[8:].any()  # padding rows stay zero with biases
    # gradients flow through the op (the JVP follows ffn_blocks): d sum / d b_down[e] = rows of expert e
    np.testing.assert_allclose(grad, np.asarray(sizes)[:, None] * np.ones((1, 8)), rtol=1e-6)


def test_impls_that_cannot_compute_it_refuse_in_one_line():
    from moejax import blocked_ffn, native_ffn  # noqa: F401  (register their impls)

    rng = np.random.default_rng(1)
    weights = _biased_experts(rng)
    x, sizes = jnp.zeros((6, 8)), jnp.asarray([2, 2, 1, 1], jnp.int32)
    for impl in ("blocked", "native"):
        with pytest.raises(dialect.DialectTypeError, match=f"impl '{impl}' does not add expert biases; use one of "
                                                           r"\['ragged', 'reference'\]"):
            jax.eval_shape(lambda: dialect.moe_expert_ffn(x, sizes, weights, activation="swiglu", impl=impl))
        with pytest.raises(dialect.DialectTypeError, match=f"impl '{impl}' does not compute activation "
                                                           "'clamped_swiglu'"):
            jax.eval_shape(lambda: dialect.moe_expert_ffn(x, sizes, weights[:3], activation=dialect.clamped_swiglu(7.0),
                                                          impl=impl))
    with pytest.raises(dialect.DialectTypeError, match=r"bias of w_down has shape \[4,6\]; expected \[E=4,8\]"):
        jax.eval_shape(lambda: dialect.moe_expert_ffn(x, sizes, (*weights[:5], weights[4]), activation="swiglu"))
    with pytest.raises(ValueError, match="limit and alpha must be numbers"):
        dialect.parse_activation("clamped_swiglu(limit=x,alpha=1)")


def test_router_bias_moves_selection_and_weights():
    rng = np.random.default_rng(2)
    x, w = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32), jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    b = jnp.asarray([0.0, 5.0, -5.0, 1.0], jnp.float32)
    wts, ids = dialect.route_reference(x, w, b, routing=dialect.Routing(k=2, bias_on_logits=True))
    logits = np.asarray(x) @ np.asarray(w) + np.asarray(b)
    top = np.argsort(-logits, axis=1)[:, :2]
    sel = np.take_along_axis(logits, top, 1)
    np.testing.assert_array_equal(np.asarray(ids), top)
    np.testing.assert_allclose(np.asarray(wts), np.exp(sel) / np.exp(sel).sum(1, keepdims=True), rtol=1e-6)


def test_select_impl_and_quantize_on_gpt_oss():
    """select-impl never gives the biased clamped experts an impl that cannot run them; quantize packs the
    matrices and leaves the expert biases float."""
    from moejax.passes.quantize import QuantizeExperts
    from moejax.passes.select_impl import SelectImpl

    model = models.MoEDecoder(P.tiny("gpt_oss", n_layers=1), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
    program = moejax.trace(model, tokens)
    auto = SelectImpl().run(program, PassContext())
    assert "impl=ragged" in str(auto) and "impl=native" not in str(auto)
    with pytest.raises(PassError, match="impl 'blocked' does not"):
        SelectImpl(impl="blocked").run(program, PassContext())
    q = QuantizeExperts(bits=8).run(program, PassContext())
    assert isinstance(q.weights["layers/0/mlp/experts/w_gate"], wf.QuantizedTensor)
    assert not wf.is_structured(q.weights["layers/0/mlp/experts/b_gate"])  # expert biases are not matrices
    assert "weight_format=int8" in str(q)


# ---- presets -------------------------------------------------------------------------------------------------
# The released openai/gpt-oss-20b config.json fields the parser reads (quantization_config: MXFP4 experts).
_GPT_OSS_20B_RELEASED = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880,
    "intermediate_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8,
    "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4, "sliding_window": 128,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "rms_norm_eps": 1e-05, "rope_theta": 150000,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "swiglu_limit": 7.0, "attention_bias": True, "tie_word_embeddings": False, "hidden_act": "silu",
    "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
}


def test_presets_hold_to_published_totals_and_match_the_release():
    for name in ("gpt-oss-20b", "gpt-oss-120b"):
        rel = P.param_count(P.preset(name)) / (P.PUBLISHED_PARAMS[name] * 1e9) - 1
        assert abs(rel) <= 0.01, (name, rel)
    assert mhf.config_from_hf(_GPT_OSS_20B_RELEASED) == P.preset("gpt-oss-20b")
    big = {**_GPT_OSS_20B_RELEASED, "num_hidden_layers": 36, "num_local_experts": 128,
           "layer_types": ["sliding_attention", "full_attention"] * 18}
    assert mhf.config_from_hf(big) == P.preset("gpt-oss-120b")
