"""Quality and speed of a byte-level language model on held-out text.

Works for any model object with the call forms of :class:`moejax.models.MoEDecoder`:

* ``model(tokens [B,S]) -> logits [B,S,V]``
* ``model(tokens, cache=cache, cache_index=i) -> (logits, new_cache)``
* ``model.init_cache(batch, max_len)``

A Flax NNX module is jitted here (split into graph and state once); anything else
(e.g. the callable that ``moejax.optimize`` returns, already jitted) is called as is.

Public API: :func:`evaluate` (-> :class:`EvalResult`), :func:`bits_per_byte`,
:func:`ngram_bits_per_byte`, :func:`expert_load`, :func:`weight_bytes`.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import dialect

__all__ = [
    "EvalResult",
    "evaluate",
    "bits_per_byte",
    "token_quality",
    "ngram_bits_per_byte",
    "KneserNeyBytes",
    "expert_load",
    "weight_bytes",
    "jitted_calls",
    "prefill_and_decode_seconds",
]

VOCAB = 256
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` measured.

    ``bits_per_byte`` is the mean next-byte cross-entropy in bits over
    ``scored_bytes`` predictions; speeds are ``tokens / median seconds`` over
    ``repeats`` timed runs after one warm-up run.
    """

    bits_per_byte: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    weight_bytes: int
    scored_bytes: int
    seq_len: int
    batch: int
    decode_batch: int
    decode_tokens: int
    repeats: int
    prefill_seconds: float
    decode_seconds: float

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# Calling a model
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Calls:
    forward: Callable[[jax.Array], jax.Array]
    step: Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]
    init_cache: Callable[[int, int], Any]


def jitted_calls(model: Any) -> _Calls:
    """Jitted ``forward(tokens)``, ``step(tokens, cache, index)`` and ``init_cache`` of a model.

    NNX modules are split once and merged inside ``jax.jit``; other objects are
    assumed to be jitted already and are called directly.
    """
    for attr in ("init_cache",):
        if not callable(getattr(model, attr, None)):
            raise TypeError(f"{type(model).__name__} has no {attr}(batch, max_len); evaluation needs a model "
                            "with the MoEDecoder call forms (see moejax.evaluation's docstring)")
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)

        @jax.jit
        def fwd(st, tokens):
            return nnx.merge(graphdef, st)(tokens)

        @jax.jit
        def stp(st, tokens, cache, index):
            return nnx.merge(graphdef, st)(tokens, cache=cache, cache_index=index)

        return _Calls(lambda t: fwd(state, t), lambda t, c, i: stp(state, t, c, i), model.init_cache)
    return _Calls(lambda t: model(t), lambda t, c, i: model(t, cache=c, cache_index=i), model.init_cache)


def weight_bytes(model: Any) -> int:
    """Bytes of the model's weights: its ``weight_bytes`` attribute, else the sum over NNX state leaves."""
    wb = getattr(model, "weight_bytes", None)
    if wb is not None:
        return int(wb() if callable(wb) else wb)
    if isinstance(model, nnx.Module):
        state = nnx.state(model, nnx.Not(nnx.RngState))
        return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(state) if hasattr(x, "dtype")))
    raise TypeError(f"cannot count the weight bytes of a {type(model).__name__}: give it a `weight_bytes` "
                    "attribute or pass an NNX module")


# ---------------------------------------------------------------------------
# Quality
# ---------------------------------------------------------------------------
def _as_bytes(text: bytes | str) -> bytes:
    if isinstance(text, str):
        return text.encode("utf-8")
    if not isinstance(text, (bytes, bytearray, memoryview)):
        raise TypeError(f"text must be bytes or str, got {type(text).__name__}")
    return bytes(text)


def _windows(data: bytes | np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, targets and masks ``[W, seq_len]`` covering every byte (or token id) after the first once."""
    arr = (np.frombuffer(data, np.uint8) if isinstance(data, bytes) else np.asarray(data)).astype(np.int32)
    n_pred = len(arr) - 1
    n_win = -(-n_pred // seq_len)
    padded = np.zeros(n_win * seq_len + 1, np.int32)
    padded[: len(arr)] = arr
    idx = np.arange(n_win)[:, None] * seq_len + np.arange(seq_len)[None, :]
    mask = (idx < n_pred)
    return padded[idx], padded[idx + 1], mask


@jax.jit
def _nll_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, nll, 0.0), axis=-1)  # per window, summed in f64 by the caller


def _check_text(data: bytes, seq_len: int, batch: int) -> None:
    if seq_len < 1 or batch < 1:
        raise ValueError(f"seq_len and batch must be >= 1, got seq_len={seq_len}, batch={batch}")
    if len(data) < 2:
        raise ValueError(f"need at least 2 bytes of text to score, got {len(data)}")


def bits_per_byte(model: Any, text: bytes | str, *, eval_bytes: int | None = None, seq_len: int = 256,
                  batch: int = 8, calls: _Calls | None = None) -> float:
    """Mean next-byte cross-entropy in bits over the first ``eval_bytes`` bytes of ``text``.

    The text is cut into consecutive windows of ``seq_len`` predictions (each
    window starts without earlier context); every byte after the first is scored
    once. Windows are run ``batch`` at a time with padding, so only one shape compiles.
    """
    data = _as_bytes(text)[:eval_bytes]
    _check_text(data, seq_len, batch)
    total, scored = _nll_total(calls or jitted_calls(model), data, seq_len, batch, min_vocab=VOCAB)
    return total / LN2 / scored


def _nll_total(calls: _Calls, ids: bytes | np.ndarray, seq_len: int, batch: int, min_vocab: int
               ) -> tuple[float, int]:
    """``(summed next-token NLL in nats, predictions scored)`` over windows of ``ids``."""
    inputs, targets, mask = _windows(ids, seq_len)
    total = 0.0
    for i in range(0, len(inputs), batch):
        x, y, m = (np.zeros((batch, seq_len), a.dtype) for a in (inputs, targets, mask))
        n = min(batch, len(inputs) - i)
        x[:n], y[:n], m[:n] = inputs[i:i + n], targets[i:i + n], mask[i:i + n]
        logits = calls.forward(jnp.asarray(x))
        if logits.shape[-1] < min_vocab:
            raise ValueError(f"model vocabulary {logits.shape[-1]} is smaller than the {min_vocab} ids of the text")
        total += float(np.sum(np.asarray(_nll_sum(logits, jnp.asarray(y), jnp.asarray(m)), np.float64)))
    return total, int(mask.sum())


def token_quality(model: Any, tokenizer: Any, text: str, *, max_tokens: int | None = None, seq_len: int = 256,
                  batch: int = 8, calls: _Calls | None = None) -> dict[str, float]:
    """Quality on ``text`` for a model with a tokenizer: per-token cross-entropy and bits per byte.

    ``text`` is encoded with ``tokenizer`` (a :class:`moejax.models.tokenizer.TextTokenizer`),
    cut into windows of ``seq_len`` predictions as :func:`bits_per_byte` does, and
    every token after the first is scored once. ``bits_per_byte`` divides the summed
    cross-entropy (in bits) by the UTF-8 bytes those tokens cover (from the second
    token's start to the end), so it compares across tokenizers and with byte models.
    """
    ids, offsets = tokenizer.encode_with_offsets(text)
    ids, offsets = ids[:max_tokens], offsets[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens of text to score, got {len(ids)}")
    _check_text(b"..", seq_len, batch)
    total, scored = _nll_total(calls or jitted_calls(model), np.asarray(ids), seq_len, batch,
                               min_vocab=max(ids) + 1)
    covered = len(text[offsets[1][0]:offsets[-1][1]].encode("utf-8"))
    return {"tokens_scored": scored, "bytes_scored": covered, "cross_entropy_nats_per_token": total / scored,
            "bits_per_byte": total / LN2 / max(covered, 1)}


# ---------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------
def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def prefill_and_decode_seconds(calls: _Calls, prompt: np.ndarray, decode_tokens: int, decode_batch: int,
                               repeats: int, progress: Callable[[str], None] = lambda _: None) -> tuple[float, float]:
    """Median seconds of one prefill of ``prompt`` ``[B, S]`` and of ``decode_tokens`` greedy decode steps."""
    b, s = prompt.shape
    max_len = s + decode_tokens
    tokens = jnp.asarray(prompt)
    zero = jnp.asarray(0, jnp.int32)

    def prefill():
        return calls.step(tokens, calls.init_cache(b, max_len), zero)

    progress(f"timing prefill ({b} x {s} tokens, {repeats} repeats)")
    t_prefill = _median_time(prefill, repeats)
    # Decode starts from a prefilled cache (of decode_batch sequences) and feeds back argmax tokens.
    d_logits, d_cache = calls.step(tokens[:decode_batch], calls.init_cache(decode_batch, max_len), zero)
    jax.block_until_ready(d_cache)
    first = jnp.argmax(d_logits[:, -1:], axis=-1).astype(jnp.int32)
    indices = [jnp.asarray(s + i, jnp.int32) for i in range(decode_tokens)]

    def decode():
        tok, cache = first, d_cache
        for idx in indices:
            logits, cache = calls.step(tok, cache, idx)
            tok = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
        return tok

    progress(f"timing decode ({decode_batch} x {decode_tokens} tokens, {repeats} repeats)")
    t_decode = _median_time(decode, repeats)
    return t_prefill, t_decode


def evaluate(model: Any, text: bytes | str, *, eval_bytes: int | None = 65536, seq_len: int = 256,
             batch: int = 8, decode_tokens: int = 32, decode_batch: int = 1, repeats: int = 5,
             progress: Callable[[str], None] | None = None) -> EvalResult:
    """Bits per byte on ``text`` plus prefill/decode throughput and weight bytes.

    Args:
      model: an NNX :class:`~moejax.models.MoEDecoder` or any object with its call
        forms (e.g. an optimised model from ``moejax.optimize``).
      text: held-out text (bytes; ``str`` is UTF-8 encoded), e.g.
        :func:`moejax.data.heldout_bytes`.
      eval_bytes: score only the first ``eval_bytes`` bytes (``None``: all).
      seq_len, batch: window length and windows per call, for scoring and for the
        timed prefill (``batch`` sequences of ``seq_len`` tokens into an empty cache).
      decode_tokens, decode_batch: timed greedy decoding of ``decode_tokens`` steps
        for ``decode_batch`` sequences after a ``seq_len`` prompt.
      repeats: timed runs; the median is reported (after one warm-up run).
      progress: called with a short description as each part (scoring, prefill, decode) starts.
    """
    data = _as_bytes(text)[:eval_bytes]
    _check_text(data, seq_len, batch)
    if repeats < 1 or decode_tokens < 1 or not 1 <= decode_batch <= batch:
        raise ValueError(f"need repeats >= 1, decode_tokens >= 1 and 1 <= decode_batch <= batch; got "
                         f"repeats={repeats}, decode_tokens={decode_tokens}, decode_batch={decode_batch}")
    report = progress or (lambda _: None)
    calls = jitted_calls(model)
    report(f"scoring {len(data):,} held-out bytes")
    bpb = bits_per_byte(model, data, seq_len=seq_len, batch=batch, calls=calls)
    arr = np.frombuffer(data, np.uint8).astype(np.int32)
    reps = -(-(batch * seq_len) // len(arr))
    prompt = np.tile(arr, reps)[: batch * seq_len].reshape(batch, seq_len)
    t_prefill, t_decode = prefill_and_decode_seconds(calls, prompt, decode_tokens, decode_batch, repeats, report)
    return EvalResult(
        bits_per_byte=bpb,
        prefill_tokens_per_s=batch * seq_len / t_prefill,
        decode_tokens_per_s=decode_batch * decode_tokens / t_decode,
        weight_bytes=weight_bytes(model),
        scored_bytes=len(data) - 1,
        seq_len=seq_len,
        batch=batch,
        decode_batch=decode_batch,
        decode_tokens=decode_tokens,
        repeats=repeats,
        prefill_seconds=t_prefill,
        decode_seconds=t_decode,
    )


# ---------------------------------------------------------------------------
# Routing load
# ---------------------------------------------------------------------------
def _layers(model: Any) -> list[Any]:
    if model.config.scan_layers:
        graphdef, state = nnx.split(model.layers)
        return [nnx.merge(graphdef, jax.tree_util.tree_map(lambda a, i=i: a[i], state))
                for i in range(model.config.n_layers)]
    return list(model.layers)


def expert_load(model: Any, text: bytes | str, *, eval_bytes: int | None = None, seq_len: int = 256,
                batch: int = 8) -> np.ndarray:
    """Fraction of routing slots each expert receives, per MoE layer: ``float64 [L_moe, E]``.

    Recomputes every MoE layer's router input with the model's own submodules and
    routes it with :func:`moejax.dialect.route_reference` (the layer's own
    ``Routing``); dropped slots (id -1) are not counted. Rows sum to 1. Needs an
    NNX :class:`~moejax.models.MoEDecoder` (unrolled or scanned).
    """
    from moejax.models.layers import SparseMoE

    if not (isinstance(model, nnx.Module) and hasattr(model, "layers") and hasattr(model, "config")):
        raise TypeError(f"expert_load needs an NNX MoEDecoder, got {type(model).__name__}")
    data = _as_bytes(text)[:eval_bytes]
    _check_text(data, seq_len, batch)
    inputs, _, mask = _windows(data, seq_len)
    graphdef, state = nnx.split(model)

    @jax.jit
    def counts(st, tokens, valid):
        m = nnx.merge(graphdef, st)
        b, s = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        x = m.embed_tokens(tokens)
        out = []
        for layer in _layers(m):
            h, _ = layer.self_attn(layer.input_layernorm(x), positions)
            x = x + h
            hn = layer.post_attention_layernorm(x)
            mlp = layer.mlp
            if isinstance(mlp, SparseMoE):
                bias = () if mlp.selection_bias is None else (mlp.selection_bias[...],)
                _, ids = dialect.route_reference(hn.reshape(-1, hn.shape[-1]), mlp.gate.kernel[...], *bias,
                                                 routing=mlp.routing)
                n_exp = mlp.routing.num_selected_experts(mlp.gate.kernel.shape[1])
                ok = (ids >= 0) & valid.reshape(-1)[:, None]
                out.append(jnp.zeros((n_exp,), jnp.float32).at[jnp.where(ok, ids, n_exp)].add(1.0, mode="drop"))
            x = x + mlp(hn)
        return jnp.stack(out)

    total = None
    for i in range(0, len(inputs), batch):
        x, m = np.zeros((batch, seq_len), np.int32), np.zeros((batch, seq_len), bool)
        n = min(batch, len(inputs) - i)
        x[:n], m[:n] = inputs[i:i + n], mask[i:i + n]
        c = np.asarray(counts(state, jnp.asarray(x), jnp.asarray(m)), np.float64)
        total = c if total is None else total + c
    return total / total.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------
# Baseline: interpolated Kneser-Ney byte n-gram
# ---------------------------------------------------------------------------
class _Table:
    """Sorted gram codes with values, looked up by binary search."""

    def __init__(self, codes: np.ndarray, values: np.ndarray):
        self.codes, self.values = codes, values

    def get(self, query: np.ndarray) -> np.ndarray:
        if len(self.codes) == 0:
            return np.zeros(len(query), self.values.dtype)
        pos = np.clip(np.searchsorted(self.codes, query), 0, len(self.codes) - 1)
        return np.where(self.codes[pos] == query, self.values[pos], 0)


def _grams(arr: np.ndarray, length: int) -> np.ndarray:
    """Codes of all grams of ``length`` bytes, first byte most significant."""
    n = len(arr) - length + 1
    code = np.zeros(max(n, 0), np.int64)
    for j in range(length):
        code = code * VOCAB + arr[j: j + n]
    return code


def _discount(counts: np.ndarray) -> float:
    n1, n2 = np.sum(counts == 1), np.sum(counts == 2)
    return float(n1 / (n1 + 2 * n2)) if n1 > 0 else 0.5


class KneserNeyBytes:
    """Interpolated Kneser-Ney byte n-gram model with ``order`` context bytes.

    The highest order uses raw counts and lower orders continuation counts
    (Chen & Goodman's interpolated KN, one discount ``n1/(n1+2 n2)`` per order);
    the unigram level is interpolated with the uniform distribution over 256
    bytes, so unseen bytes keep non-zero probability.
    """

    def __init__(self, train: bytes | str, order: int = 2):
        if not 0 <= order <= 6:
            raise ValueError(f"order must be between 0 and 6 context bytes, got {order}")
        tr = np.frombuffer(_as_bytes(train), np.uint8).astype(np.int64)
        if len(tr) < order + 2:
            raise ValueError(f"need at least {order + 2} training bytes for order {order}, got {len(tr)}")
        self.order = order
        self.levels = []
        for ctx in range(order + 1):
            if ctx == order:
                codes, cnt = np.unique(_grams(tr, ctx + 1), return_counts=True)
            else:  # continuation count: number of distinct bytes seen before the gram
                longer = np.unique(_grams(tr, ctx + 2))
                codes, cnt = np.unique(longer % (VOCAB ** (ctx + 1)), return_counts=True)
            cnt = cnt.astype(np.float64)
            ctx_codes, inv = np.unique(codes // VOCAB, return_inverse=True)
            self.levels.append((_Table(codes, cnt), _Table(ctx_codes, np.bincount(inv, weights=cnt)),
                                _Table(ctx_codes, np.bincount(inv).astype(np.float64)), _discount(cnt)))

    def probs(self, text: bytes | str) -> np.ndarray:
        """Probability of each byte of ``text`` after the first, given up to ``order`` bytes before it."""
        ho = np.frombuffer(_as_bytes(text), np.uint8).astype(np.int64)
        pos = np.arange(1, len(ho))
        w = ho[pos]
        prob = np.full(len(pos), 1.0 / VOCAB)
        for ctx, (grams, totals, types, d) in enumerate(self.levels):
            has = pos >= ctx  # positions with too little history keep the lower-order estimate
            hcode = np.zeros(len(pos), np.int64)
            for j in range(ctx, 0, -1):
                hcode = hcode * VOCAB + np.where(has, ho[np.maximum(pos - j, 0)], 0)
            c_hw, c_h, n_h = grams.get(hcode * VOCAB + w), totals.get(hcode), types.get(hcode)
            seen = has & (c_h > 0)
            safe = np.where(seen, c_h, 1.0)
            prob = np.where(seen, np.maximum(c_hw - d, 0.0) / safe + d * n_h / safe * prob, prob)
        return prob


def ngram_bits_per_byte(train: bytes | str, heldout: bytes | str, order: int = 2) -> float:
    """Bits per byte on ``heldout`` of a :class:`KneserNeyBytes` model fitted on ``train``.

    ``order`` is the number of context bytes (``order=2`` predicts a byte from the
    two before it). Every held-out byte after the first is scored.
    """
    if len(_as_bytes(heldout)) < 2:
        raise ValueError("need at least 2 held-out bytes to score")
    return float(-np.mean(np.log2(KneserNeyBytes(train, order).probs(heldout))))
