"""Measured sensitivity: how far a program's next-token distributions move when some weights change.

A layer-local error proxy (how much one layer's output changes) does not say how
much that change matters downstream: on the fine-grained bundled model, the same
output error costs about 70 times more in the first MoE layer than in the last.
:func:`weight_change_kl` measures the end-to-end cost instead: the mean KL
divergence, per token, from the program's own next-token distributions to those
of the same program with some weights replaced, on a few calibration windows.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax.passes.distill import log_probs, masked_kl
from moejax.passes.profile import token_input_shape, windows
from moejax.pipeline import PassError
from moejax.program import Program

__all__ = ["weight_change_kl", "SENSITIVITY_BATCHES", "MAX_BATCHES"]

SENSITIVITY_BATCHES = 4  # batches per measurement by default: enough where the costs compared differ by 2x
MAX_BATCHES = 16  # the most a caller may ask for: closer calls (a few % apart) need more tokens
_CACHE_BYTES = 512 << 20  # keep the reference log-probabilities when they fit in this; else recompute


def weight_change_kl(program: Program, batches: Sequence[Any]) -> Callable[..., float] | None:
    """``kl(replaced, max_batches=SENSITIVITY_BATCHES)``: KL (nats per token) from ``program`` to
    ``program`` with the weights ``replaced``, on the first ``max_batches`` calibration batches.

    ``replaced`` maps weight names to arrays of the same shapes (cast to the
    weights' dtypes, so one compiled function serves every call). ``None`` when
    the program is not a token -> logits program (one int ``[B, S]`` input, first
    output ``[B, S, vocab]``): there is no next-token distribution to compare.
    """
    try:
        batch, seq_len = token_input_shape(program)
        wins = windows(batches, batch, seq_len)[:MAX_BATCHES]
    except PassError:  # not a token program, or calibration batches that are not tokens: nothing to measure on
        return None
    if not program.jaxpr.out_avals or program.jaxpr.out_avals[0].shape[:2] != (batch, seq_len):
        return None  # no per-token logits
    if not wins:
        return None
    run = jax.jit(program.as_function())
    names = list(program.weights)
    cache = int(np.prod(program.jaxpr.out_avals[0].shape)) * 4 * len(wins) <= _CACHE_BYTES
    reference: dict[int, jax.Array] = {}

    def ref(i: int) -> jax.Array:
        if i in reference:
            return reference[i]
        lp = log_probs(run(program.weight_leaves, jnp.asarray(wins[i][0])))
        if cache:
            reference[i] = lp
        return lp

    def kl(replaced: Mapping[str, Any], max_batches: int = SENSITIVITY_BATCHES) -> float:
        weights = dict(program.weights)
        for name, value in replaced.items():
            weights[name] = jnp.asarray(value, weights[name].dtype)
        leaves = jax.tree_util.tree_leaves([weights[n] for n in names])
        used = range(min(max_batches, len(wins)))
        total = 0.0
        for i in used:
            tokens, mask = wins[i]
            total += float(masked_kl(ref(i), log_probs(run(leaves, jnp.asarray(tokens))), jnp.asarray(mask)))
        return total / len(used)

    return kl
