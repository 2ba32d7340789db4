"""A fast dropless expert FFN for XLA:CPU: impl ``"blocked"`` of ``moe_expert_ffn``.

The rows arrive sorted by expert (``moe_dispatch``), ``group_sizes[e]`` rows per
expert, padding rows last. XLA:CPU runs a 2-D ``dot`` well (YNNPACK) but has
no cheap way to point a dot at one expert of a stacked ``[E,d,f]`` weight:
every static or dynamic slice of it is materialised (a copy of the expert's
weights), and ``jax.lax.ragged_dot`` expands to slow code. Hence:

Weight layout
    ``select-impl`` stores the experts of layers with at most 16 experts as
    :class:`~moejax.expert_layout.PerExpertWeights` (one buffer per expert).
    The loop below is then unrolled over experts and reads each buffer in
    place; quantized experts (any :mod:`moejax.weight_formats` format) are
    dequantized only when they have rows. With stacked weights it runs as a
    ``fori_loop`` that copies each used expert.

``loop`` (:func:`ffn_expert_loop`)
    Per expert: full chunks of ``chunk`` rows in a ``fori_loop``, then one
    piece for the rest (its size a multiple of ``quantum``, picked by
    ``lax.switch``). A piece costs one read of the expert's weights before any
    row is computed, so one well-sized piece beats many small ones. Work is
    ``N + E * quantum`` rows at most; an expert without rows costs no dot, only
    the loop's bookkeeping (a few small ops). Under ``vmap`` the switches and
    conds become selects: still exact, but every piece size is computed.

``capacity`` (:func:`ffn_capacity`)
    One batched matmul over all (stacked) experts, weights read in place, with
    a per-expert capacity ``C`` chosen at run time from a static ladder
    (``lax.switch`` on the largest group), so it is dropless and exact. Work
    is ``E * C`` rows. Used for decode-sized inputs on stacked weights of a
    few large experts.

Both compute exactly what :func:`moejax.dialect.ffn_reference` computes (all three
call :func:`moejax.dialect.expert_ffn_math`):
the same dots with f32 accumulation, the activation in f32, the hidden state
cast to the input dtype before the down projection, zeros on padding rows.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from moejax import dialect
from moejax.dialect import GATED_ACTIVATIONS, expert_ffn_math, materialize
from moejax.expert_layout import is_split
from moejax.weight_formats import is_structured

__all__ = ["ffn_blocked", "ffn_expert_loop", "ffn_capacity", "choose_strategy", "capacity_ladder",
           "STRATEGIES"]

STRATEGIES = ("loop", "capacity")


# --------------------------------------------------------------------------
# Shared pieces.
# --------------------------------------------------------------------------
def _check(grouped: jax.Array, group_sizes: jax.Array, mats: Sequence[Any], activation: str) -> None:
    """Shape checks with errors that say what to pass instead."""
    if grouped.ndim != 2:
        raise ValueError(f"ffn_blocked: grouped rows must be [N,d], got shape {grouped.shape}")
    if group_sizes.ndim != 1:
        raise ValueError(f"ffn_blocked: group_sizes must be [E], got shape {group_sizes.shape}")
    expected = 3 if activation in GATED_ACTIVATIONS else 2
    if len(mats) != expected:
        raise ValueError(f"ffn_blocked: activation {activation!r} needs {expected} weight matrices "
                         f"({'(w_gate, w_up, w_down)' if expected == 3 else '(w_up, w_down)'}), got {len(mats)}")
    e, d = group_sizes.shape[0], grouped.shape[1]
    for i, m in enumerate(mats[:-1]):
        if len(m.shape) != 3 or tuple(m.shape[:2]) != (e, d):
            raise ValueError(f"ffn_blocked: input weight {i} has shape {m.shape}, expected [E={e}, d={d}, f]")
    f = mats[0].shape[2]
    if tuple(mats[-1].shape) != (e, f, d):
        raise ValueError(f"ffn_blocked: down weight has shape {mats[-1].shape}, expected [E={e}, f={f}, d={d}]")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# --------------------------------------------------------------------------
# Strategy "loop": one expert at a time, full chunks and one tail piece.
# --------------------------------------------------------------------------
def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _default_chunk(num_rows: int, num_experts: int) -> int:
    """Rows per chunk: about twice the mean group (at most 512) keeps the dots efficient."""
    per_expert = max(1, num_rows // num_experts)
    return max(1, min(512, _pow2_at_least(2 * per_expert), _pow2_at_least(num_rows)))


def ffn_expert_loop(grouped: jax.Array, group_sizes: jax.Array, weights: Sequence[Any], *,
                    activation: str, chunk: int | None = None, quantum: int | None = None) -> jax.Array:
    """Expert FFN as a loop over experts: full chunks, then one tail piece.

    Each expert's ``n`` rows run as ``n // chunk - 1`` full chunks in a
    ``fori_loop``, then one piece holding the rest (under two chunks), its
    size the smallest multiple of ``quantum`` that fits (a ``lax.switch`` over
    ``2 * chunk / quantum`` sizes).
    Every expert weight is read once per piece, so few, large pieces beat a
    finer decomposition: at Mixtral sizes a piece costs about 0.6 ms of weight
    reads per matrix before any row is computed.

    Args:
      grouped: [N, d] rows sorted by expert, padding rows last.
      group_sizes: [E] int rows per expert.
      weights: ``(w_gate, w_up, w_down)`` or ``(w_up, w_down)``, each either all
        :class:`~moejax.expert_layout.PerExpertWeights` (read in place; the
        loop over experts is unrolled and quantized experts are dequantized
        only when they have rows) or all stacked (float or quantized; the
        weights are dequantized up front and each used expert is copied once).
      activation: one of :data:`moejax.dialect.ACTIVATIONS`.
      chunk: rows per full chunk (static); default from the shapes.
      quantum: granularity of the tail piece (default ``chunk / 8``, at least 1): it
        wastes under a quantum of rows per expert; must divide ``chunk``.

    Returns:
      [N, d] outputs, zero on rows past ``sum(group_sizes)``.
    """
    n_rows, d = grouped.shape
    num_experts = group_sizes.shape[0]
    chunk = chunk or _default_chunk(n_rows, num_experts)
    quantum = quantum or max(1, chunk // 8)
    if chunk % quantum:
        raise ValueError(f"ffn_expert_loop: quantum={quantum} must divide chunk={chunk}")
    dtype = grouped.dtype
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    # Padding rows let every piece stay in bounds (dynamic_slice would clamp).
    tail = 2 * chunk
    x_pad = jnp.pad(grouped, ((0, tail), (0, 0)))
    out = jnp.zeros((n_rows + tail, d), dtype)

    def ffn_rows(ws, row0, size):
        return expert_ffn_math(lax.dynamic_slice_in_dim(x_pad, row0, size), ws, activation).astype(dtype)

    def tail_piece(ws, row0, size):
        return jnp.pad(ffn_rows(ws, row0, size), ((0, tail - size), (0, 0)))

    def expert_rows(out, ws, n, start):
        full = jnp.maximum(n // chunk - 1, 0)  # the last chunk joins the tail: one piece of < 2 chunks
        out = lax.fori_loop(
            0, full, lambda c, o: lax.dynamic_update_slice_in_dim(o, ffn_rows(ws, start + c * chunk, chunk),
                                                                  start + c * chunk, 0), out)
        row0 = start + full * chunk
        rest = n - full * chunk
        # One piece, its size the smallest multiple of `quantum` holding the rest.
        # Its rows past the group belong to later experts (or are padding): they
        # are overwritten when those experts run (experts run in order), and the
        # padding rows are zeroed at the end, so no mask is needed here. The
        # switch returns only the piece, so `out` does not pass through its
        # branches (XLA would copy it).
        pieces = [lambda: jnp.zeros((tail, d), dtype)]
        pieces += [functools.partial(tail_piece, ws, row0, q) for q in range(quantum, tail + 1, quantum)]
        return lax.dynamic_update_slice_in_dim(out, lax.switch((rest + quantum - 1) // quantum, pieces), row0, 0)

    if all(is_split(w) for w in weights):
        quantized = any(is_structured(w.expert(e)) for w in weights for e in range(num_experts))
        for e in range(num_experts):  # unrolled: each expert's buffers are read in place
            def work(o, e=e):
                return expert_rows(o, [materialize(w.expert(e), dtype) for w in weights], sizes[e], starts[e])

            # Quantized experts are dequantized only when they have rows.
            out = lax.cond(sizes[e] > 0, work, lambda o: o, out) if quantized else work(out)
    else:
        mats = [materialize(w, dtype) for w in weights]

        def one_expert(e, out):
            def work(o):
                ws = [lax.dynamic_index_in_dim(m, e, keepdims=False) for m in mats]  # the one copy
                return expert_rows(o, ws, sizes[e], starts[e])

            return lax.cond(sizes[e] > 0, work, lambda o: o, out)

        out = lax.fori_loop(0, num_experts, one_expert, out)
    return jnp.where((jnp.arange(n_rows) < jnp.sum(sizes))[:, None], out[:n_rows], jnp.zeros((), dtype))


# --------------------------------------------------------------------------
# Strategy "capacity": batched matmul over all experts, capacity from a ladder.
# --------------------------------------------------------------------------
def capacity_ladder(num_rows: int, num_experts: int, growth: float = 1.25) -> tuple[int, ...]:
    """Static per-expert capacities, from the mean group size up to ``num_rows``.

    At run time the smallest one that holds the largest group is used, so the
    ladder trades compiled branches (its length) against padded work (``growth``).
    """
    if num_rows <= 0:
        return (0,)
    mean = -(-num_rows // num_experts)
    quantum = 8 if mean >= 8 else 1
    caps = []
    c = _round_up(mean, quantum)
    while c < num_rows:
        caps.append(c)
        c = max(c + quantum, _round_up(int(math.ceil(c * growth)), quantum))
    caps.append(num_rows)
    return tuple(caps)


def _capacity_branch(grouped, sizes, starts, mats, activation, capacity):
    n_rows, d = grouped.shape
    num_experts = sizes.shape[0]
    j = jnp.arange(capacity, dtype=jnp.int32)
    src = starts[:, None] + j[None, :]
    valid = j[None, :] < sizes[:, None]
    xe = jnp.take(grouped, jnp.minimum(src, n_rows - 1).reshape(-1), axis=0).reshape(num_experts, capacity, d)
    xe = jnp.where(valid[..., None], xe, jnp.zeros((), grouped.dtype))
    y = expert_ffn_math(xe, mats, activation).astype(grouped.dtype).reshape(num_experts * capacity, d)  # [E,C,d]
    # Gather each grouped row's result back (cheaper than a scatter on CPU).
    gid = dialect.row_groups(sizes, n_rows)
    local = jnp.arange(n_rows, dtype=jnp.int32) - jnp.take(starts, jnp.minimum(gid, num_experts - 1))
    flat = jnp.minimum(gid, num_experts - 1) * capacity + jnp.clip(local, 0, capacity - 1)
    out = jnp.take(y, flat, axis=0)
    return jnp.where((gid < num_experts)[:, None], out, jnp.zeros((), grouped.dtype))


def ffn_capacity(grouped: jax.Array, group_sizes: jax.Array, mats: Sequence[jax.Array], *,
                 activation: str, ladder: Sequence[int] | None = None) -> jax.Array:
    """Expert FFN as one batched matmul over all experts (float weights), dropless.

    The capacity is the smallest entry of ``ladder`` (default
    :func:`capacity_ladder`) that holds the largest group; the last entry must be
    ``N`` so every routing fits.
    """
    n_rows = grouped.shape[0]
    num_experts = group_sizes.shape[0]
    ladder = tuple(ladder) if ladder is not None else capacity_ladder(n_rows, num_experts)
    if not ladder or ladder[-1] < n_rows or list(ladder) != sorted(ladder):
        raise ValueError(f"ffn_capacity: ladder {ladder} must be increasing and end at N={n_rows} to stay dropless")
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    branches = [functools.partial(_capacity_branch, activation=activation, capacity=c) for c in ladder]
    if len(branches) == 1:
        return branches[0](grouped, sizes, starts, mats)
    idx = jnp.searchsorted(jnp.asarray(ladder, jnp.int32), jnp.max(sizes), side="left")
    idx = jnp.minimum(idx, len(ladder) - 1)
    return lax.switch(idx, branches, grouped, sizes, starts, mats)


# --------------------------------------------------------------------------
# The registered implementation.
# --------------------------------------------------------------------------
def choose_strategy(num_rows: int, num_experts: int) -> str:
    """``"loop"`` or ``"capacity"`` for stacked weights of a static shape (measured on XLA:CPU).

    Weights stored per expert always use the loop (it reads them in place).

    With many rows per expert the matmuls are compute-bound and the loop's
    per-expert weight copy is amortised; the capacity path pads every group to
    the largest and its batched dot runs slower than 2-D dots, so the loop wins
    (Mixtral- and DeepSeek-shaped layers, 512 tokens). With few rows per
    expert (decode) the work is memory-bound: for a few large experts (E <= 16,
    Mixtral-like) reading every expert in place beat copying the used ones
    even at one token; for many small experts (64, DeepSeek-like) the batched
    dot over all experts was 2-4x slower than copying only the used ones.
    """
    rows_per_expert = num_rows / max(num_experts, 1)
    if rows_per_expert < 16 and num_experts <= 16:
        return "capacity"
    return "loop"


def ffn_blocked(grouped: jax.Array, group_sizes: jax.Array, weights: Sequence[Any], *,
                activation: str, strategy: str | None = None) -> jax.Array:
    """Dropless expert FFN for XLA:CPU; computes :func:`moejax.dialect.ffn_reference`.

    Args:
      grouped: [N, d] rows sorted by expert (``moe_dispatch``), padding rows last.
      group_sizes: [E] int32 rows per expert; rows past their sum are padding.
      weights: ``(w_gate, w_up, w_down)`` for gated activations or
        ``(w_up, w_down)``; quantized tensors are dequantized to ``grouped.dtype``.
      activation: one of :data:`moejax.dialect.ACTIVATIONS`.
      strategy: force ``"loop"`` or ``"capacity"``; default :func:`choose_strategy`.

    Returns:
      [N, d] in ``grouped.dtype``; zero on padding rows.
    """
    if activation not in dialect.ACTIVATIONS:
        raise ValueError(f"ffn_blocked: activation {activation!r} not in {dialect.ACTIVATIONS}")
    weights = tuple(weights)
    _check(grouped, group_sizes, weights, activation)
    n_rows = grouped.shape[0]
    if n_rows == 0:
        return grouped
    split = any(is_split(w) for w in weights)
    if split and not all(is_split(w) for w in weights):
        raise ValueError("ffn_blocked: either all or none of the expert weights may be split per expert "
                         "(moejax.expert_layout.split_experts)")
    strategy = strategy or ("loop" if split else choose_strategy(n_rows, group_sizes.shape[0]))
    if strategy == "loop":
        return ffn_expert_loop(grouped, group_sizes, weights, activation=activation)
    if strategy == "capacity":
        mats = [materialize(w, grouped.dtype) for w in weights]  # per-expert buffers are stacked (a copy)
        return ffn_capacity(grouped, group_sizes, mats, activation=activation)
    raise ValueError(f"ffn_blocked: unknown strategy {strategy!r}; use one of {STRATEGIES}")


dialect.register_ffn_impl("blocked", ffn_blocked)
