"""``distill``: after pruning or merging, fine-tune the routers and the kept experts to the source model.

Router-only repair (``recalibrate-router``) chooses better among the experts that
are left, but cannot bring back what the removed experts computed. Knowledge
distillation of the kept experts can: their weights are trained, end to end,
so that the compressed program's next-token distributions match those of the
program the pipeline started from (the source), KL divergence on calibration
windows of the training text. The teacher is the source program, never the
text's own next bytes, so the pass repairs the compression and cannot pass
off further training of the model as a compression result. ``train=all``
trains every float weight (attention, norms, shared experts, embeddings too):
the rest of the model can then make up for the removed experts as well.

:func:`distill_to_source` is the loop both this pass and
``recalibrate-router(target=logits)`` run: Adam on the named weights, a
quarter of the windows (at most :data:`HELD_BATCHES` batches) held out, the
weights of the check with the lowest held-out KL kept (at worst the ones it
started with).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax import numerics
from moejax.analysis import DistilledWeights
from moejax.passes.gating import with_remeasured_profile
from moejax.passes.profile import calibration_batches, token_input_shape, windows
from moejax.passes.prune import find_moe_layers
from moejax.pipeline import Pass, PassContext, PassError, register_pass, with_note
from moejax.program import Program

__all__ = ["Distill", "distill_to_source", "log_probs", "masked_kl", "HELD_BATCHES"]

log = logging.getLogger(__name__)

HELD_BATCHES = 8  # held-out batches checked: enough to pick a step, few enough to check often


def log_probs(outputs) -> jax.Array:
    """Float32 log-probabilities of a forward program's first output (its logits)."""
    return jax.nn.log_softmax(jnp.asarray(outputs[0], jnp.float32), axis=-1)


def masked_kl(target: jax.Array, log_p: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean KL (nats per token) from log-probabilities ``target`` to ``log_p`` over the tokens in ``mask``."""
    per_token = jnp.sum(jnp.exp(target) * (target - log_p), axis=-1)
    return jnp.sum(jnp.where(mask, per_token, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def distill_to_source(program: Program, source: Program, names: Sequence[str], batches: Sequence[Any], *,
                      steps: int, optimizer: Callable[[list[jax.Array]], optax.GradientTransformation],
                      who: str) -> DistilledWeights:
    """Train the weights ``names`` of ``program`` so its next-token distributions match ``source``'s.

    ``batches``: calibration token batches (any shape, cut to the program's
    windows); ``optimizer(initial float32 leaves)`` builds the optax transform.
    Returns the weights of the best held-out check, in their dtypes, with the
    held-out KL (nats per token) before and after.
    """
    batch, seq_len = token_input_shape(program)
    if program.jaxpr.out_avals[0].shape[:2] != (batch, seq_len):
        raise PassError(f"{who}: the program's first output is not per-token logits [{batch}, {seq_len}, vocab]")
    wins = [(jnp.asarray(t), jnp.asarray(m)) for t, m in windows(batches, batch, seq_len)]
    n_fit = max(1, (3 * len(wins)) // 4)
    fit, held = wins[:n_fit], (wins[n_fit:] or wins[:n_fit])[:HELD_BATCHES]
    run, leaves = program.as_function(), list(program.weight_leaves)
    teacher, teacher_leaves = source.as_function(), list(source.weight_leaves)
    counts = {n: len(jax.tree_util.tree_leaves(w)) for n, w in program.weights.items()}  # leaves per weight
    first = dict(zip(counts, (int(i) for i in np.cumsum([0, *counts.values()]))))  # its first leaf's index
    trained = [first[n] + i for n in names for i in range(counts[n])]

    def teacher_log_probs(t_leaves, tok):
        return jax.lax.stop_gradient(log_probs(teacher(t_leaves, tok)))

    def kl(params, leaves, tok, mask, target):  # the weights are arguments: not baked into the HLO
        all_leaves = list(leaves)
        for j, p in zip(trained, params):
            all_leaves[j] = p.astype(leaves[j].dtype)
        return masked_kl(target, log_probs(run(all_leaves, tok)), mask)

    params = [jnp.asarray(leaves[j], jnp.float32) for j in trained]
    tx = optimizer(params)
    state = tx.init(params)

    @jax.jit
    def update(params, state, leaves, t_leaves, tok, mask):
        # the teacher's targets are computed per step: a store of them would grow with the calibration text
        grad = jax.grad(kl)(params, leaves, tok, mask, teacher_log_probs(t_leaves, tok))
        upd, state = tx.update(grad, state, params)
        return optax.apply_updates(params, upd), state

    kl_jit, teacher_jit = jax.jit(kl), jax.jit(teacher_log_probs)
    held = [(t, m, teacher_jit(teacher_leaves, t)) for t, m in held]

    def held_kl(ps):
        return float(np.mean([kl_jit(ps, leaves, *w) for w in held]))

    start = best = held_kl(params)
    best_params = params
    check_every = max(1, min(25, steps // 4))
    for s in range(steps):
        params, state = update(params, state, leaves, teacher_leaves, *fit[s % n_fit])
        if (s + 1) % check_every == 0 or s + 1 == steps:
            e = held_kl(params)
            if not math.isfinite(e):
                break
            if e < best:
                best, best_params = e, params
    for j, p in zip(trained, best_params):
        leaves[j] = p.astype(leaves[j].dtype)
    out = {n: jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(program.weights[n]),
                                           leaves[first[n]:first[n] + counts[n]]) for n in names}
    return DistilledWeights(out, start, best)


def relative_adam(lr: float, steps: int) -> Callable[[list[jax.Array]], optax.GradientTransformation]:
    """Adam whose step on each weight is ``lr`` times that weight's RMS, decayed (cosine) to a tenth."""
    def build(params: list[jax.Array]) -> optax.GradientTransformation:
        scales = [-lr * float(jnp.sqrt(jnp.mean(p ** 2))) for p in params]
        return optax.chain(optax.scale_by_adam(),
                           optax.scale_by_schedule(optax.cosine_decay_schedule(1.0, steps, alpha=0.1)),
                           optax.stateless(lambda updates, _: [s * u for s, u in zip(scales, updates)]))
    return build


@register_pass
@dataclasses.dataclass(frozen=True)
class Distill(Pass):
    """Fine-tune the routers and routed experts of the compressed program to the source program's
    next-token distributions (knowledge distillation, KL divergence).

    Options:
      steps: Adam steps, one batch of calibration windows each.
      lr: Adam step size relative to each weight's RMS (decayed to a tenth by a cosine schedule).
      calibration_bytes: distil on this many bytes of the training text (byte-level models);
        0 takes the optimize call's calibration batches, else the first 262144 bytes.
      train: ``experts`` trains the routers and routed experts; shared experts,
        attention, norms and embeddings stay as they are. ``all`` trains every float
        weight of the program, so that the rest of the model can make up for what the
        compression removed too.

    Expert weights must be float (run ``distill`` before ``quantize``). Pipeline spelling:
    ``prune(keep=0.75,method=reap,budget=global),distill`` (minutes on a CPU for
    the bundled models).
    """

    name: ClassVar[str] = "distill"
    exact: ClassVar[bool] = False
    option_ranges: ClassVar[Mapping[str, str]] = {"steps": "integer >= 1", "lr": "number > 0",
                                                  "calibration_bytes": "integer >= 0", "train": "experts | all"}

    steps: int = 200
    lr: float = 0.003
    calibration_bytes: int = 0
    train: str = "experts"

    def __post_init__(self):
        for key, minimum in (("steps", 1), ("calibration_bytes", 0)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"distill: {key} must be an integer >= {minimum}, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"distill: lr must be a number > 0, got {self.lr!r}")
        if self.train not in ("experts", "all"):
            raise ValueError(f"distill: train must be experts or all, got {self.train!r}")

    def check(self, program: Program, ctx: PassContext) -> None:
        if ctx.analysis.source_of(program) is None:
            raise PassError("distill: no source program to match; run it inside a pipeline "
                            "(moejax.optimize or PassManager.run)")
        for name in self._moe_weights(program):
            for leaf in jax.tree_util.tree_leaves(program.weights[name]):
                if not numerics.is_float(leaf):
                    raise PassError(f"distill: weight {name!r} is {np.asarray(leaf).dtype}, not float; "
                                    "run distill before quantize")

    def run(self, program: Program, ctx: PassContext) -> Program:
        step = ctx.step(self)
        result = ctx.analysis.get(DistilledWeights, step)  # made by the first program of this optimize call
        if result is None:
            batches, text = self._batches(program, ctx)
            result = ctx.analysis.put(step, dataclasses.replace(distill_to_source(
                program, ctx.analysis.source_of(program), self._trained(program), batches,
                steps=self.steps, optimizer=relative_adam(self.lr, self.steps), who=self.name), calibration=text))
        new = program.rewrite(weights=result.weights)
        meta = with_remeasured_profile(new, ctx, step)  # the routers were trained: routing is measured again
        return new.replace(metadata=with_note(
            meta, str(self), f"KL divergence to the source's next-token distribution on held-out "
            f"calibration windows of {result.calibration}: {result.error_before:.4g} -> {result.error_after:.4g} nats per token"))

    def _moe_weights(self, program: Program) -> list[str]:
        """The routers and routed experts: what ``train=experts`` trains (and what must be float)."""
        layers = find_moe_layers(program, self.name).values()
        return [l.router for l in layers] + [e for l in layers for e in l.experts]

    def _trained(self, program: Program) -> list[str]:
        if self.train == "experts":
            return self._moe_weights(program)
        return [n for n, w in program.weights.items()
                if all(numerics.is_float(leaf) for leaf in jax.tree_util.tree_leaves(w))]

    def _batches(self, program: Program, ctx: PassContext) -> tuple[list[Any], str]:
        """The token batches to distil on, and what they are (for the pass's note)."""
        if not self.calibration_bytes:
            return calibration_batches(program, ctx, 262144, who=self.name)
        vocab = int(program.jaxpr.out_avals[0].shape[-1])
        if vocab < 256:
            raise PassError(f"distill: calibration_bytes needs a byte-level model (vocabulary {vocab} < 256); "
                            "pass calibration=[token batches] to optimize instead")
        if ctx.calibration is not None:  # an explicit option wins, but never silently over the user's text
            log.warning("distill: calibration_bytes=%d distils on the bundled training text, not on the "
                        "calibration batches given to optimize; drop calibration_bytes to use those",
                        self.calibration_bytes)
        from moejax import data
        tokens = data.calibration_tokens(self.calibration_bytes, token_input_shape(program)[1])
        return [tokens], f"train_bytes[:{tokens.size}]"
