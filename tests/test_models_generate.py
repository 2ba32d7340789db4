"""Prefill plus KV-cache decoding: decode logits equal full-forward logits; sampling; generic models."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.models import MoEDecoder, generate, sample_next
from moejax.models.presets import tiny

PROMPT = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 5)), jnp.int32)
NEW = 6


# Unrolled GQA decoding is also checked token for token against transformers in test_models_parity.
@pytest.mark.parametrize("family,scan", [("mixtral", True), ("deepseek_v3", False), ("qwen3_moe", True)],
                         ids=["mixtral-scan", "deepseek_v3-mla", "qwen3_moe-scan"])
def test_decode_logits_equal_full_forward(family, scan):
    model = MoEDecoder(tiny(family, scan_layers=scan), rngs=nnx.Rngs(0))
    tokens, logits = generate(model, PROMPT, NEW, return_logits=True)
    assert tokens.shape == (2, 5 + NEW) and logits.shape == (2, 5 + NEW - 1, 64)
    np.testing.assert_array_equal(tokens[:, :5], PROMPT)
    full = nnx.jit(lambda m, t: m(t))(model, tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, :-1]), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(tokens[:, 5:]), np.asarray(jnp.argmax(full[:, 4:-1], -1)))


class _PlainModel:
    """Not an NNX module: only the call forms generate relies on."""

    def __init__(self, model):
        self.model = model

    def __call__(self, tokens, *, cache=None, cache_index=None):
        return self.model(tokens, cache=cache, cache_index=cache_index)

    def init_cache(self, batch, max_len, dtype=jnp.float32):
        return self.model.init_cache(batch, max_len, dtype)


def test_generic_model_and_nucleus_sampling():
    model = MoEDecoder(tiny("mixtral"), rngs=nnx.Rngs(1))
    plain = _PlainModel(model)
    # top_p tiny keeps only the most likely token: sampling then equals greedy decoding.
    nucleus, logits = generate(plain, PROMPT, NEW, temperature=1.0, top_p=1e-6, key=jax.random.key(7),
                               return_logits=True)
    np.testing.assert_array_equal(np.asarray(nucleus[:, 5:]), np.asarray(jnp.argmax(logits[:, 4:], -1)))
    again = generate(plain, PROMPT, NEW, temperature=1.0, top_p=1e-6, key=jax.random.key(8))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(nucleus))
    # with top_p=1 different keys give different samples from the same (cached) program
    a = generate(plain, PROMPT, 12, temperature=5.0, key=jax.random.key(1))
    b = generate(plain, PROMPT, 12, temperature=5.0, key=jax.random.key(2))
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_sample_next_distribution():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    logits = jnp.repeat(logits, 4000, axis=0)
    draws = np.asarray(sample_next(logits, jax.random.key(0), 1.0, 1.0))
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # top_p=0.7: the smallest set reaching 0.7 is {0, 1}; renormalised 0.625 / 0.375
    draws = np.asarray(sample_next(logits, jax.random.key(1), 1.0, 0.7))
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert freq[2] == 0 and freq[3] == 0
    np.testing.assert_allclose(freq[:2], [0.625, 0.375], atol=0.03)
    assert np.all(np.asarray(sample_next(logits[:2], None, 0.0, 1.0)) == 0)


def test_decode_step_program_shows_moe_ops():
    model = MoEDecoder(tiny("qwen2_moe"), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    cache = model.init_cache(1, 8)
    step = lambda s, t, c, i: nnx.merge(graphdef, s)(t, cache=c, cache_index=i)  # noqa: E731
    text = str(jax.make_jaxpr(step)(state, jnp.zeros((1, 1), jnp.int32), cache, jnp.int32(3)))
    for op in ("moe_route", "moe_dispatch", "moe_expert_ffn", "moe_combine"):
        assert op in text


def test_bad_arguments_are_explained():
    model = MoEDecoder(tiny("mixtral"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs key="):
        generate(model, PROMPT, 2, temperature=0.8)
    with pytest.raises(ValueError, match="int array"):
        generate(model, jnp.zeros((5,), jnp.int32), 2)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(model, PROMPT, 0)
    with pytest.raises(ValueError, match="shorter than prompt"):
        generate(model, PROMPT, 4, max_len=6)
    with pytest.raises(TypeError, match="no init_cache"):
        generate(lambda t: t, PROMPT, 2)
