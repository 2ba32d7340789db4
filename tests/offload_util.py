"""Shared by the offload tests: tiny models, optimizing three signatures, teacher-forced decoding."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import moejax
from moejax import models

PROMPT, STEPS = 8, 6


def _model(scan_layers: bool = False, **overrides):
    cfg = models.tiny_mixtral(scan_layers=scan_layers, n_layers=3, n_experts=8, **overrides)
    return models.MoEDecoder(cfg, rngs=nnx.Rngs(0))


def _tokens(n: int, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (1, n), 0, 64, jnp.int32)


def _optimize(model, spec: str, **kw):
    """Optimize forward, prefill and decode signatures (``check_exact``: the pass manager checks each)."""
    tokens = _tokens(PROMPT)
    cache = model.init_cache(1, PROMPT + STEPS)
    return moejax.optimize(model, (tokens,), spec, decode_example=((tokens[:, :1],), {
        "cache": cache, "cache_index": jnp.int32(PROMPT)}), extra_examples=[((tokens,), {
            "cache": cache, "cache_index": jnp.int32(0)})], **kw)


def _decode(opt, model, steps: int = STEPS, seed: int = 1) -> np.ndarray:
    """Logits of a prefill then ``steps`` teacher-forced decode steps, stacked."""
    stream = _tokens(PROMPT + steps, seed)
    logits, cache = opt(stream[:, :PROMPT], cache=model.init_cache(1, PROMPT + STEPS), cache_index=jnp.int32(0))
    out = [np.asarray(logits)]
    for i in range(steps):
        logits, cache = opt(stream[:, PROMPT + i:PROMPT + i + 1], cache=cache, cache_index=jnp.int32(PROMPT + i))
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1)


