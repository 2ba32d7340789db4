"""Exactness of the ``blocked`` expert-FFN implementation (moejax/blocked_ffn.py).

Both strategies (``loop`` and ``capacity``), the shape-based default and the
loop over weights stored one buffer per expert (``per-expert``, what
``select-impl`` sets up on CPU, float and quantized) are checked against ``ffn_reference`` (the op's meaning) and ``jax.lax.ragged_dot``
on the edge cases routing produces: empty experts, every row on one expert,
k = E, a single token, sizes that are no multiple of any chunk, dropped slots
(padding rows), f32 and bf16, gated and non-gated activations, jit and vmap.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import dialect, weight_formats
from moejax.blocked_ffn import (capacity_ladder, choose_strategy, ffn_blocked, ffn_capacity,
                                ffn_expert_loop)
from moejax.dialect import dispatch_reference, ffn_ragged, ffn_reference
from moejax.expert_layout import split_experts, stack_experts

D, F = 16, 24
STRATEGIES = ("loop", "capacity", None, "per-expert")  # None: the shape-based default
_reference = jax.jit(ffn_reference, static_argnames="activation")  # compiled once per shape
_ragged = jax.jit(ffn_ragged, static_argnames="activation")


def _weights(num_experts, activation, dtype=jnp.float32, seed=0):
    n_in = 2 if activation in dialect.GATED_ACTIVATIONS else 1
    keys = jax.random.split(jax.random.PRNGKey(seed), n_in + 1)
    ins = [jax.random.normal(k, (num_experts, D, F)) * 0.3 for k in keys[:n_in]]
    down = jax.random.normal(keys[-1], (num_experts, F, D)) * 0.3
    return tuple(m.astype(dtype) for m in (*ins, down))


def _rows(n, dtype=jnp.float32, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, D)).astype(dtype)


def _tol(dtype):
    return dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)


def _assert_close(got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **_tol(dtype))


def _layout(strategy, weights):
    """(strategy for ffn_blocked, weights): ``per-expert`` splits the weights (the loop runs on them)."""
    if strategy == "per-expert":
        return None, tuple(split_experts(w) for w in weights)
    return strategy, weights


def _run(strategy, x, sizes, weights, activation, **kw):
    strategy, weights = _layout(strategy, weights)
    fn = functools.partial(ffn_blocked, activation=activation, strategy=strategy, **kw)
    return jax.jit(fn)(x, sizes, weights)


# Group-size patterns over E = 4 experts and N = 40 rows (the rest is padding).
# Group sizes are run-time values, so one compiled function serves them all.
SIZE_PATTERNS = {
    "uneven_with_empty_and_padding": [10, 0, 20, 3],
    "all_on_one_expert": [0, 0, 40, 0],
    "all_on_first_expert": [40, 0, 0, 0],
    "all_on_last_expert_with_padding": [0, 0, 0, 37],
    "one_token_top2": [0, 1, 0, 1],
    "single_row": [0, 0, 1, 0],
    "all_padding": [0, 0, 0, 0],
    "primes": [7, 13, 1, 19],
}


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("strategy", ["loop", "capacity", "per-expert"])
def test_matches_reference_and_ragged_dot(activation, strategy):
    x = _rows(40)
    w = _weights(4, activation)
    strategy, stored = _layout(strategy, w)
    blocked = jax.jit(functools.partial(ffn_blocked, activation=activation, strategy=strategy))
    for name, pattern in SIZE_PATTERNS.items():
        sizes = jnp.asarray(pattern, jnp.int32)
        got = blocked(x, sizes, stored)
        _assert_close(got, _reference(x, sizes, w, activation=activation), jnp.float32)
        _assert_close(got, _ragged(x, sizes, w, activation=activation), jnp.float32)
        # Padding rows are exactly zero, not just small.
        assert not np.any(np.asarray(got)[int(sizes.sum()):]), name


@pytest.mark.parametrize("strategy", ["loop", "capacity", "per-expert"])
def test_single_token_shapes(strategy):
    """N = k rows (one token decoded) and many experts with prime-sized groups."""
    for n, pattern in ((2, [0, 1, 0, 1]), (71, [7, 0, 13, 1, 0, 29, 11, 5])):
        sizes = jnp.asarray(pattern, jnp.int32)
        x = _rows(n)
        w = _weights(sizes.shape[0], "swiglu")
        got = _run(strategy, x, sizes, w, "swiglu")
        _assert_close(got, _reference(x, sizes, w, activation="swiglu"), jnp.float32)
        assert not np.any(np.asarray(got)[int(sizes.sum()):])


@pytest.mark.parametrize("strategy", ["loop", "capacity", "per-expert"])
def test_bf16(strategy):
    sizes = jnp.asarray([5, 0, 17, 9], jnp.int32)
    x = _rows(33, jnp.bfloat16)
    for activation in ("swiglu",):
        w = _weights(4, activation, jnp.bfloat16)
        got = _run(strategy, x, sizes, w, activation)
        assert got.dtype == jnp.bfloat16
        _assert_close(got, _reference(x, sizes, w, activation=activation), jnp.bfloat16)


@pytest.mark.parametrize("layout", ["stacked", "per-expert"])
def test_loop_full_chunks_and_tail_pieces(layout):
    """Groups of several full 16-row chunks, exact multiples, and tails of every quantum count."""
    sizes = jnp.asarray([21, 8, 0, 3, 17, 1, 32, 16, 31], jnp.int32)  # 129 rows + 3 padding
    x = _rows(132)
    w = _weights(9, "swiglu")
    stored = w if layout == "stacked" else tuple(split_experts(m) for m in w)
    for quantum in (2, 16):
        got = jax.jit(functools.partial(ffn_expert_loop, activation="swiglu", chunk=16, quantum=quantum))(
            x, sizes, list(stored))
        _assert_close(got, _reference(x, sizes, w, activation="swiglu"), jnp.float32)


def test_per_expert_quantized_weights():
    """Experts stored one quantized buffer each are dequantized per expert (only those with rows)."""
    sizes = jnp.asarray([4, 0, 6, 5], jnp.int32)
    x = _rows(16)
    wq = tuple(_quantize(m) for m in _weights(4, "swiglu"))
    split = tuple(split_experts(m) for m in wq)
    assert split[0].shape == (4, D, F) and split[0].format == "int8"
    assert dialect.weight_format_of(split) == "int8/per-expert"
    got = jax.jit(lambda x, s, w: dialect.moe_expert_ffn(x, s, w, activation="swiglu", impl="blocked"))(
        x, sizes, split)
    _assert_close(got, _reference(x, sizes, wq, activation="swiglu"), jnp.float32)


def test_split_and_stack_round_trip():
    w = _weights(3, "swiglu")[0]
    split = split_experts(w)
    assert len(split.experts) == 3 and split.nbytes == w.nbytes
    np.testing.assert_array_equal(np.asarray(stack_experts(split)), np.asarray(w))
    wq = _quantize(w)
    back = stack_experts(split_experts(wq))
    np.testing.assert_array_equal(np.asarray(back.q), np.asarray(wq.q))
    with pytest.raises(ValueError, match=r"expected a stacked expert weight \[E, k, n\]"):
        split_experts(w[0])


def test_capacity_every_ladder_rung():
    """Largest group at each rung of the ladder (the switch picks each branch)."""
    n, e = 48, 4
    ladder = capacity_ladder(n, e)
    assert ladder[-1] == n and list(ladder) == sorted(set(ladder)) and len(ladder) >= 3
    assert capacity_ladder(2, 8) == (1, 2)
    w = _weights(e, "gelu")
    x = _rows(n)
    fn = jax.jit(functools.partial(ffn_capacity, activation="gelu"))
    for cap in ladder:
        other = min(cap, (n - cap) // 3)  # the largest group is exactly `cap`
        sizes = jnp.asarray([other, cap, other, other], jnp.int32)
        got = fn(x, sizes, list(w))
        _assert_close(got, _reference(x, sizes, w, activation="gelu"), jnp.float32)

@pytest.mark.parametrize("strategy", ["loop", "capacity", "per-expert"])
def test_k_equals_num_experts_and_dropped_slots(strategy):
    """Dispatch with k = E (every token on every expert) and with dropped slots (id -1)."""
    t, e = 5, 4
    x_tok = _rows(t, seed=3)
    w = _weights(e, "swiglu", seed=4)
    ids_all = jnp.tile(jnp.arange(e, dtype=jnp.int32), (t, 1))
    # Same N = T*k as k = E so one compiled function serves both.
    ids_dropped = jnp.asarray([[0, -1, -1, -1], [2, 0, -1, -1], [-1, -1, -1, -1], [3, -1, 1, -1],
                               [2, -1, -1, 1]], jnp.int32)
    for ids, n_experts in ((ids_all, e), (ids_dropped, e)):
        grouped, sizes, _ = dispatch_reference(x_tok, ids, num_experts=n_experts)
        got = _run(strategy, grouped, sizes, w, "swiglu")
        _assert_close(got, _reference(grouped, sizes, w, activation="swiglu"), jnp.float32)
        n_real = int(sizes.sum())
        assert n_real == int((ids >= 0).sum())
        assert not np.any(np.asarray(got)[n_real:])


@pytest.mark.parametrize("strategy", ["loop", "capacity", "per-expert"])
def test_vmap(strategy):
    sizes = jnp.asarray([[3, 0, 9, 2], [0, 14, 0, 0], [1, 1, 1, 1]], jnp.int32)
    x = jnp.stack([_rows(14, seed=s) for s in range(3)])
    w = _weights(4, "swiglu")
    strategy, stored = _layout(strategy, w)
    fn = functools.partial(ffn_blocked, activation="swiglu", strategy=strategy)
    got = jax.jit(jax.vmap(fn, in_axes=(0, 0, None)))(x, sizes, stored)
    want = jnp.stack([_reference(x[i], sizes[i], w, activation="swiglu") for i in range(3)])
    _assert_close(got, want, jnp.float32)


@weight_formats.register_format
@dataclasses.dataclass(frozen=True)
class _Int8Weight(weight_formats.ExpertWeight):
    """A minimal format defined outside the core: int8 values and a per-column scale."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        return tuple(self.q.shape)

    @property
    def format(self):
        return "int8"

    def dequantize(self, dtype=jnp.float32):
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)


def _quantize(w):
    scale = jnp.max(jnp.abs(w), axis=-2, keepdims=True) / 127.0
    return _Int8Weight(jnp.round(w / scale).astype(jnp.int8), scale)


def test_quantized_weights_through_dialect_op():
    """Quantized pytrees are dequantized first; the dialect op dispatches impl='blocked'."""
    sizes = jnp.asarray([4, 0, 6, 5], jnp.int32)
    x = _rows(16)
    wq = tuple(_quantize(m) for m in _weights(4, "swiglu"))
    want = _reference(x, sizes, wq, activation="swiglu")
    assert "blocked" in dialect.ffn_impls()
    via_op = jax.jit(lambda x, s, w: dialect.moe_expert_ffn(x, s, w, activation="swiglu", impl="blocked"))(
        x, sizes, wq)
    _assert_close(via_op, want, jnp.float32)


def test_sparse_moe_with_blocked_matches_dense_einsum():
    """The four dialect ops with impl='blocked' give the dialect-free dense MoE."""
    e, t = 4, 9
    routing = dialect.Routing(k=2)
    x = _rows(t, seed=5)
    w_router = jax.random.normal(jax.random.PRNGKey(6), (D, e))
    w = _weights(e, "swiglu", seed=7)

    @jax.jit
    def layer(x):
        cw, ids = dialect.moe_route(x, w_router, routing=routing)
        grouped, sizes, order = dialect.moe_dispatch(x, ids, num_experts=e)
        out = dialect.moe_expert_ffn(grouped, sizes, w, activation="swiglu", impl="blocked")
        return dialect.moe_combine(out, order, cw)

    want = dialect.einsum_moe_reference(x, w_router, w, routing=routing, activation="swiglu")
    _assert_close(layer(x), want, jnp.float32)


def test_choose_strategy_by_shape():
    assert choose_strategy(1024, 8) == "loop"      # Mixtral prefill
    assert choose_strategy(2, 8) == "capacity"     # Mixtral decode, one token
    assert choose_strategy(16, 8) == "capacity"    # Mixtral decode, eight tokens
    assert choose_strategy(6, 64) == "loop"        # DeepSeek decode
    assert choose_strategy(3072, 64) == "loop"     # DeepSeek prefill


def test_bad_inputs_raise_clear_errors():
    x = _rows(8)
    sizes = jnp.asarray([4, 4], jnp.int32)
    w = _weights(2, "swiglu")
    with pytest.raises(ValueError, match=r"needs 3 weight matrices"):
        ffn_blocked(x, sizes, w[1:], activation="swiglu")
    with pytest.raises(ValueError, match=r"expected \[E=2, d=16, f\]"):
        ffn_blocked(x, sizes, (w[0][:, :8], w[1], w[2]), activation="swiglu")
    with pytest.raises(ValueError, match=r"unknown strategy 'fast'"):
        ffn_blocked(x, sizes, w, activation="swiglu", strategy="fast")
    with pytest.raises(ValueError, match=r"activation 'tanh'"):
        ffn_blocked(x, sizes, w, activation="tanh")
    with pytest.raises(ValueError, match=r"must be \[N,d\]"):
        ffn_blocked(x[None], sizes, w, activation="swiglu")
    with pytest.raises(ValueError, match=r"quantum=3 must divide chunk=8"):
        ffn_expert_loop(x, sizes, list(w), activation="swiglu", chunk=8, quantum=3)
    with pytest.raises(ValueError, match=r"all or none of the expert weights"):
        ffn_blocked(x, sizes, (split_experts(w[0]), w[1], w[2]), activation="swiglu")
    with pytest.raises(ValueError, match=r"end at N=8"):
        ffn_capacity(x, sizes, list(w), activation="swiglu", ladder=(2, 4))
