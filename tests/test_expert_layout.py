"""Expert weights stored one buffer per expert (moejax/expert_layout.py) through select-impl.

The layout change must be exact and reversible for every weight format, wherever
the MoE layer sits (inside jit or checkpoint too), and shared between the
programs of one optimize call.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import dialect, expert_layout, models
from moejax.passes.quantize import MixedExpertTensor

D, F = 16, 32


def _params(num_experts, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {"router": jax.random.normal(k[0], (D, num_experts)),
            "experts": {"w_gate": jax.random.normal(k[1], (num_experts, D, F)) * 0.1,
                        "w_up": jax.random.normal(k[2], (num_experts, D, F)) * 0.1,
                        "w_down": jax.random.normal(k[3], (num_experts, F, D)) * 0.1}}


def _model(k, wrap=None):
    def layer(p, x):
        ex = p["experts"]
        return dialect.sparse_moe(x, p["router"], (ex["w_gate"], ex["w_up"], ex["w_down"]),
                                  routing=dialect.Routing(k=k))

    if wrap == "jit":
        return lambda p, x: jax.jit(layer)(p, x)
    if wrap == "checkpoint":
        return lambda p, x: jax.checkpoint(layer)(p, x)
    return layer


X = jax.random.normal(jax.random.PRNGKey(1), (6, D))


@pytest.mark.parametrize("wrap", [None, "jit", "checkpoint"])
def test_split_and_stack_again_inside_wrapped_layers(wrap):
    model, params = _model(2, wrap), _params(4)
    # impl=blocked: bit-exact with the reference here (the native kernel sums in another order)
    opt = moejax.optimize(model, (X,), "quantize(bits=8),select-impl(impl=blocked),"
                          "select-impl(impl=blocked,layout=stacked)", params=params, platform="cpu")
    quantized, split, stacked = (s.program for s in opt.stages[1:])
    assert split.metadata["expert_layout"] == {f"experts/{n}": "per-expert" for n in ("w_down", "w_gate", "w_up")}
    assert stacked.metadata["expert_layout"] == {f"experts/{n}": "stacked" for n in ("w_down", "w_gate", "w_up")}
    for a, b in zip(jax.tree_util.tree_leaves(stacked.weights), jax.tree_util.tree_leaves(quantized.weights)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(split(X), quantized(X))
    np.testing.assert_array_equal(stacked(X), quantized(X))


def test_float_split_program_prints_its_layout():
    opt = moejax.optimize(_model(2), (X,), "select-impl", params=_params(4), platform="cpu")
    w = opt.program.weights["experts/w_gate"]
    assert expert_layout.is_split(w) and w.format == "float" and repr(w) == "PerExpertWeights(4 x float)"
    text = str(opt.program)
    assert "weight_format=float/per-expert" in text
    assert "experts/w_gate: 4 x float32[16,32]  (float, one buffer per expert)" in text


def test_one_expert():
    model, params = _model(1), _params(1)
    opt = moejax.optimize(model, (X,), "select-impl,select-impl(layout=stacked)", params=params, platform="cpu")
    for stage in opt.stages[1:]:
        np.testing.assert_allclose(stage.program(X), model(params, X), atol=1e-6)


def test_mixed_precision_experts_stack_back_to_a_mixed_tensor():
    model = models.MoEDecoder(models.tiny_mixtral(), rngs=nnx.Rngs(0))
    tok = (jnp.arange(14, dtype=jnp.int32).reshape(2, 7) * 5) % 64
    # 3.25 bits: layer 0 measured most sensitive, its experts get int4 and int3 (two parts to split and restack)
    opt = moejax.optimize(model, (tok,), "profile,quantize(bits=3.25,mixed=true,group_size=16),select-impl,"
                          "select-impl(impl=ragged)", calibration=[tok])
    mixed, split, restacked = (s.program for s in opt.stages[2:])
    path = "layers/0/mlp/experts/w_gate"
    assert expert_layout.is_split(split.weights[path]) and "+" in split.weights[path].format
    assert isinstance(restacked.weights[path], MixedExpertTensor)
    np.testing.assert_array_equal(restacked.weights[path].dequantize(), mixed.weights[path].dequantize())
    np.testing.assert_array_equal(split(tok), mixed(tok))
    np.testing.assert_array_equal(restacked(tok), split(tok))
    assert str(split).count("one buffer per expert") == 6  # 2 layers x 3 matrices, two kinds of buffers each


def test_programs_of_one_optimize_call_share_the_split_buffers():
    model = models.MoEDecoder(models.tiny_mixtral(), rngs=nnx.Rngs(0))
    tok = (jnp.arange(14, dtype=jnp.int32).reshape(2, 7) * 5) % 64
    cache = model.init_cache(2, 9)
    opt = moejax.optimize(model, (tok,), "quantize(bits=4,group_size=16),select-impl",
                          decode_example=((tok[:, :1],), {"cache": cache, "cache_index": jnp.int32(7)}))
    path = "layers/0/mlp/experts/w_up"
    forward, decode = opt.program, opt.decode_stages[-1].program
    assert expert_layout.is_split(forward.weights[path])
    assert forward.weights[path] is decode.weights[path]
