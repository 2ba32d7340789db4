"""Prefill plus KV-cache decoding for any model with moejax's call forms.

A model works here when ``model(tokens, cache=cache, cache_index=i)`` returns
``(logits [B, S, V], new_cache)`` and ``model.init_cache(batch, max_len)`` returns an
empty cache: :class:`MoEDecoder`, and any wrapper with the same call forms (an
optimized program, a Linen adapter...). A Flax NNX module is split into its graph
and state so its weights enter the jitted loop as arguments rather than constants.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.models.layers import LongRope
from moejax.numerics import NonFiniteError

__all__ = ["generate", "stream", "sample_next"]


def sample_next(logits: jax.Array, key: jax.Array | None, temperature: float, top_p: float) -> jax.Array:
    """Next token ids ``[B]`` from last-position logits ``[B, V]``.

    ``temperature == 0`` is greedy (argmax). Otherwise logits are divided by the
    temperature and, for ``top_p < 1``, restricted to the smallest set of tokens whose
    probability mass reaches ``top_p`` (the most likely token is always kept).
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _run(call, params, prompt, cache, key, *, max_new_tokens: int, temperature: float, top_p: float):
    """Prefill the prompt, then ``max_new_tokens - 1`` single-token decode steps under ``lax.scan``."""
    s = prompt.shape[1]
    logits, cache = call(params, prompt, cache, jnp.zeros((), jnp.int32))
    keys = jax.random.split(key, max_new_tokens)
    first = sample_next(logits[:, -1], keys[0], temperature, top_p)

    def step(carry, k):
        tok, cache, pos = carry
        logits, cache = call(params, tok[:, None], cache, pos)
        nxt = sample_next(logits[:, -1], k, temperature, top_p)
        return (nxt, cache, pos + 1), (nxt, logits[:, -1])

    (_, _, _), (toks, step_logits) = jax.lax.scan(step, (first, cache, jnp.asarray(s, jnp.int32)), keys[1:])
    new_tokens = jnp.concatenate([first[:, None], toks.T], axis=1)
    # logits[:, i] predicted tokens[:, i + 1]: the prefill's rows, then one row per decode step.
    all_logits = jnp.concatenate([logits, jnp.swapaxes(step_logits, 0, 1)], axis=1)
    # NaN logits make argmax/categorical return token 0 (NUL bytes): report the first bad position instead.
    finite = jnp.all(jnp.isfinite(all_logits), axis=(0, 2))
    first_bad = jnp.where(jnp.all(finite), -1, jnp.argmin(finite))
    return jnp.concatenate([prompt, new_tokens], axis=1), all_logits, first_bad


@functools.lru_cache(maxsize=32)
def _jitted(call, max_new_tokens: int, temperature: float, top_p: float):
    return jax.jit(functools.partial(_run, call, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_p=top_p))


@functools.lru_cache(maxsize=32)
def _nnx_call(graphdef):
    def call(state, tokens, cache, index):
        return nnx.merge(graphdef, state)(tokens, cache=cache, cache_index=index)
    return call


def generate(model: Any, prompt_ids: jax.Array, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, key: jax.Array | None = None, max_len: int | None = None,
             cache_dtype: Any = None, return_logits: bool = False):
    """Autoregressive generation with one prefill and ``max_new_tokens - 1`` KV-cache decode steps.

    Args:
      model: an NNX module or any object with ``model(tokens, cache=, cache_index=)``
        and ``model.init_cache(batch, max_len)``.
      prompt_ids: ``[B, S]`` int token ids (all rows the same length; no padding mask).
      max_new_tokens: number of tokens to generate (>= 1).
      temperature: 0 for greedy decoding, > 0 to sample.
      top_p: nucleus-sampling mass in (0, 1] (sampling only).
      key: ``jax.random`` key, required when ``temperature > 0``.
      max_len: cache length (default ``S + max_new_tokens``).
      cache_dtype: dtype of the KV cache (default the cache's own default).
      return_logits: also return the float32 logits ``[B, S + max_new_tokens - 1, V]`` where row
        ``i`` predicted token ``i + 1`` (prefill rows, then one row per decode step). Row ``i``
        equals the forward over its own prefix, ``model(tokens[:, :i + 1])[:, i]``, up to float
        error, and so ``model(tokens)[:, :-1]`` for every RoPE but a LongRoPE whose original context
        the sequence passes (there the rows before it keep the short set; see
        :func:`_reprefill_position`).

    Returns:
      ``[B, S + max_new_tokens]`` int32 ids (prompt then new tokens), and the logits when asked.

    Raises:
      moejax.numerics.NonFiniteError: the model produced NaN/Inf logits (the tokens would be garbage).
    """
    prompt_ids = jnp.asarray(prompt_ids)
    max_len = _check_args(prompt_ids, max_new_tokens, temperature, top_p, key, model, max_len)
    b, s = prompt_ids.shape

    def new_cache():
        return model.init_cache(b, max_len) if cache_dtype is None else model.init_cache(b, max_len, cache_dtype)

    key = jax.random.key(0) if key is None else key
    call, params = _model_call(model)
    switch = _reprefill_position(model, s, max_new_tokens)
    if switch is None:
        tokens, logits, first_bad = _jitted(call, max_new_tokens, float(temperature), float(top_p))(
            params, prompt_ids.astype(jnp.int32), new_cache(), key)
    else:  # decode up to the token at position `switch`, then prefill everything so far again and go on
        n1 = switch - s + 1
        key1, key2 = jax.random.split(key)
        tokens, logits1, bad1 = _jitted(call, n1, float(temperature), float(top_p))(
            params, prompt_ids.astype(jnp.int32), new_cache(), key1)
        tokens, logits2, bad2 = _jitted(call, max_new_tokens - n1, float(temperature), float(top_p))(
            params, tokens, new_cache(), key2)
        # rows before `switch` as the first pass computed them (each from its own prefix), then the second pass's
        logits = jnp.concatenate([logits1, logits2[:, switch:]], axis=1)
        first_bad = bad1 if int(bad1) >= 0 else bad2
    first_bad = int(first_bad)
    if first_bad >= 0:
        step = "the prompt (prefill)" if first_bad < s else f"decode step {first_bad - s + 1}"
        raise NonFiniteError(f"generate: the model produced NaN/Inf logits at position {first_bad} ({step}); its "
                             f"weights are likely corrupt (moejax.trace names NaN/Inf weights) or its activations "
                             f"overflow their dtype; no tokens are returned")
    return (tokens, logits) if return_logits else tokens


def _reprefill_position(model: Any, s: int, max_new_tokens: int) -> int | None:
    """The decode position at which generation recomputes the whole sequence, or ``None``.

    LongRoPE (PhiMoE) switches its rotary set once a call's length exceeds
    ``original_max_position_embeddings`` (``L``); keys cached earlier were rotated with the short set.
    transformers' PhiMoE ``prepare_inputs_for_generation`` then drops the cache and runs the whole
    sequence again, once, at the step whose total length first exceeds ``L`` (position ``L``), and so
    does moejax: every logit then equals a full forward over its own prefix. Only when a prompt of at
    most ``L`` tokens is extended past ``L`` (decode steps run at positions ``s .. s + n - 2``)."""
    scaling = getattr(getattr(model, "config", None), "rope_scaling", None)
    if not isinstance(scaling, LongRope):
        return None
    limit = scaling.original_max_position_embeddings
    return limit if s <= limit <= s + max_new_tokens - 2 else None


def _check_args(prompt_ids: jax.Array, max_new_tokens: int, temperature: float, top_p: float,
                key: jax.Array | None, model: Any, max_len: int | None) -> int:
    """Refuse bad arguments of :func:`generate` / :func:`stream`; returns the cache length."""
    if prompt_ids.ndim != 2 or not jnp.issubdtype(prompt_ids.dtype, jnp.integer):
        raise ValueError(f"prompt_ids must be an int array [batch, seq], got {prompt_ids.dtype}{prompt_ids.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs key=jax.random.key(seed)")
    if not hasattr(model, "init_cache"):
        raise TypeError(f"{type(model).__name__} has no init_cache(batch, max_len); generate needs a KV-cache model")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and prompt_ids.size and int(jnp.max(prompt_ids)) >= vocab:
        # an out-of-range id embeds as NaN (jnp.take fills): say so rather than blame the weights later
        raise ValueError(f"prompt_ids hold id {int(jnp.max(prompt_ids))}, but the model's vocabulary has {vocab} "
                         f"tokens; tokenize the prompt for this model")
    total = prompt_ids.shape[1] + max_new_tokens
    max_len = max_len or total
    if max_len < total:
        raise ValueError(f"max_len={max_len} is shorter than prompt ({prompt_ids.shape[1]}) + max_new_tokens "
                         f"({max_new_tokens})")
    return max_len


def _model_call(model: Any) -> tuple[Any, Any]:
    """``(call, params)``: ``call(params, tokens, cache, index)`` runs one step of ``model``.

    An NNX module is split so its weights enter jitted code as arguments, not constants.
    """
    if isinstance(model, nnx.Module):
        graphdef, params = nnx.split(model)
        return _nnx_call(graphdef), params
    return _plain_call(model), None


def stream(model: Any, prompt_ids: jax.Array, max_new_tokens: int, *, temperature: float = 0.0,
           top_p: float = 1.0, key: jax.Array | None = None, max_len: int | None = None) -> Iterator[jax.Array]:
    """Like :func:`generate`, but yields each new token ``[B]`` as soon as it is decoded.

    One jitted prefill, then one jitted decode step per token (for a command line that
    shows text as it comes, or stops early); the tokens equal :func:`generate`'s for
    greedy decoding. ``max_len`` defaults to ``S + max_new_tokens``.

    Raises:
      moejax.numerics.NonFiniteError: a step produced NaN/Inf logits (no further tokens are yielded).
    """
    prompt_ids = jnp.asarray(prompt_ids)
    max_len = _check_args(prompt_ids, max_new_tokens, temperature, top_p, key, model, max_len)
    b, s = prompt_ids.shape
    call, params = _model_call(model)
    step = _jitted_step(call, float(temperature), float(top_p))
    keys = jax.random.split(jax.random.key(0) if key is None else key, max_new_tokens)
    tokens, cache = prompt_ids.astype(jnp.int32), model.init_cache(b, max_len)
    switch = _reprefill_position(model, s, max_new_tokens)  # LongRoPE: as generate, one full prefill again there
    history = tokens
    for i in range(max_new_tokens):
        position = 0 if i == 0 else s + i - 1
        if position == switch:
            tokens, cache, position = history, model.init_cache(b, max_len), 0
        nxt, cache, finite = step(params, tokens, cache, jnp.asarray(position, jnp.int32), keys[i])
        if not bool(finite):
            raise NonFiniteError(f"generate: the model produced NaN/Inf logits at "
                                 f"{'the prompt (prefill)' if i == 0 else f'decode step {i}'}; its weights are likely "
                                 f"corrupt or its activations overflow their dtype")
        yield nxt
        tokens = nxt[:, None]
        if switch is not None:
            history = jnp.concatenate([history, tokens], axis=1)


@functools.lru_cache(maxsize=32)
def _jitted_step(call, temperature: float, top_p: float):
    """One call (prefill or decode step) plus sampling of the next token, jitted."""
    @jax.jit
    def step(params, tokens, cache, index, key):
        logits, cache = call(params, tokens, cache, index)
        last = logits[:, -1]
        return sample_next(last, key, temperature, top_p), cache, jnp.all(jnp.isfinite(last))

    return step


@functools.lru_cache(maxsize=32)
def _plain_call_cached(model):
    def call(_, tokens, cache, index):
        return model(tokens, cache=cache, cache_index=index)
    return call


def _plain_call(model):
    try:
        return _plain_call_cached(model)
    except TypeError:  # unhashable model objects: no reuse across calls
        def call(_, tokens, cache, index):
            return model(tokens, cache=cache, cache_index=index)
        return call
