"""``recalibrate-router``: after pruning or merging, retrain only the routers to match the original layers.

Pruning and merging change what each router column stands for, but leave the
router as it was trained for the full expert set. Router-only repair (as in the
REAP and MoE-pruning literature) recovers much of the loss. This pass does it
layer by layer, which makes it seconds on a CPU: for every MoE layer, on the
hidden states the routing profile sampled (the compressed model's own inputs to
that layer), the router's weights are trained with optax Adam so that the
layer's output matches what the same layer of the program the pipeline started
from (the source) gives on the same inputs. Only routers change; experts, shared
experts and the selection-only correction bias (it gets no gradient: it chooses,
it does not weight) stay as they are.

A quarter of the sampled tokens is held out: the pass keeps the router of the
step with the lowest held-out error (at worst the one it started with) and notes
the relative output error before and after on those tokens.

``target=logits`` trains every router at once, end to end, to match the source
program's next-token distributions instead (KL divergence on the calibration
windows, a quarter of them held out): router-only distillation as in the
pruning literature. It differentiates through the whole program, so it costs
seconds per step rather than per layer, and it sees what the layer fit cannot:
how an error in one layer changes what later layers receive. After REAP
pruning to 75% of the experts (global budget) it cut the default model's held-out
cost from +6.86% to +5.61% bits per byte, where the layer fit left it at +6.86%
(``benchmarks/results/compression_quality_logits.json``). It runs the loop of
``distill`` (:func:`moejax.passes.distill.distill_to_source`) on the routers alone;
``distill``, which trains the kept experts too, repairs much more (+2.33% there).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax import analysis, dialect
from moejax.analysis import RouterCalibration
from moejax.passes.distill import distill_to_source
from moejax.passes.gating import with_remeasured_profile
from moejax.passes.profile import calibration_batches
from moejax.passes.prune import MoELayer, _row, expert_outputs, find_moe_layers, layer_output, layer_profile
from moejax.pipeline import Pass, PassContext, PassError, register_pass, with_note
from moejax.program import Program

__all__ = ["RecalibrateRouter"]


@register_pass
@dataclasses.dataclass(frozen=True)
class RecalibrateRouter(Pass):
    """Retrain the routers of the compressed program to reproduce the source program's MoE layer outputs
    (``target=layer``) or its next-token distributions (``target=logits``).

    Options:
      target: ``layer`` (default) fits each layer's output on the profile's sampled
        hidden states; ``logits`` fits all routers at once to the source program's
        next-token distributions on the calibration windows (slower, better): the
        optimize call's calibration batches, else the first 64 KB of the training text.
      steps: Adam steps (per layer for ``layer``, full batch over the profile's
        sampled tokens; in all for ``logits``, one batch of windows per step).
      lr: Adam learning rate, relative to the router's RMS weight.

    ``target=layer`` needs a routing profile of the current program (``prune`` and
    ``merge`` leave a fresh one); both targets need the pipeline's source program
    (kept by the pass manager).
    Pipeline spelling: ``prune(keep=0.75,method=reap),recalibrate-router`` or
    ``...,recalibrate-router(target=logits,steps=200)`` (minutes on a CPU for the bundled models).
    """

    name: ClassVar[str] = "recalibrate-router"
    exact: ClassVar[bool] = False
    needs: ClassVar[tuple[str, ...]] = (analysis.RoutingProfile.key,)
    option_ranges: ClassVar[Mapping[str, str]] = {"target": "layer | logits", "steps": "integer >= 1",
                                                  "lr": "number > 0"}

    target: str = "layer"
    steps: int = 300
    lr: float = 0.01

    def __post_init__(self):
        if self.target not in ("layer", "logits"):
            raise ValueError(f"recalibrate-router: target must be layer or logits, got {self.target!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"recalibrate-router: steps must be an integer >= 1, got {self.steps!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"recalibrate-router: lr must be a number > 0, got {self.lr!r}")

    def check(self, program: Program, ctx: PassContext) -> None:
        layers = find_moe_layers(program, self.name)
        source = ctx.analysis.source_of(program)
        if source is None:
            raise PassError("recalibrate-router: no source program to match; run it inside a pipeline "
                            "(moejax.optimize or PassManager.run)")
        source_layers = find_moe_layers(source, self.name)
        for name, layer in layers.items():
            if name not in source_layers:
                raise PassError(f"recalibrate-router: layer {name!r} is not in the source program")
            if layer.routing.weight_on == "input" or layer.routing.score == "sparsemixer":
                raise PassError(f"recalibrate-router: layer {name!r} routes with "
                                f"{'input-weighted' if layer.routing.weight_on == 'input' else 'SparseMixer'} "
                                "routing, which this layer-output fit does not model; drop recalibrate-router here")
            if self.target == "layer":
                layer_profile(program, layer, self.name, ("inputs",))

    def required(self) -> tuple[str, ...]:
        """``target=logits`` trains on calibration windows end to end and reads no routing profile."""
        return self.needs if self.target == "layer" else ()

    def run(self, program: Program, ctx: PassContext) -> Program:
        layers = find_moe_layers(program, self.name)
        step = ctx.step(self)
        result = ctx.analysis.get(RouterCalibration, step)  # made by the first program of this optimize call
        if result is None:
            source = ctx.analysis.source_of(program)
            result = ctx.analysis.put(step, self._distill(program, source, layers, ctx) if self.target == "logits"
                                      else self._train(program, source, layers))
        new = program.rewrite(weights={l.router: result.weights[l.router] for l in layers.values()})
        note = (f"KL divergence to the source's next-token distribution on held-out calibration windows: "
                f"{result.error_before:.4g} -> {result.error_after:.4g} nats per token" if self.target == "logits" else
                f"relative MoE-layer output error vs the source on held-out sampled tokens: "
                f"{result.error_before:.4g} -> {result.error_after:.4g} (mean over layers)")
        return new.replace(metadata=with_note(with_remeasured_profile(new, ctx, step), str(self), note))

    def _train(self, program: Program, source: Program, layers: Mapping[str, MoELayer]) -> RouterCalibration:
        source_layers = find_moe_layers(source, self.name)
        routers, before, after = {}, [], []
        for name, layer in layers.items():
            x_all = layer_profile(program, layer, self.name, ("inputs",)).inputs
            rows = []
            for s in range(layer.stack_size(program)):
                x = np.asarray(x_all[s], np.float32)
                src = source_layers[name]
                target = layer_output(x, _row(source, src.router, src, s),
                                      _row(source, src.bias, src, s) if src.bias else None, src.routing,
                                      expert_outputs(source, src, s, x))
                w, b, a = self._fit(x, target, _row(program, layer.router, layer, s),
                                    _row(program, layer.bias, layer, s) if layer.bias else None, layer.routing,
                                    expert_outputs(program, layer, s, x))
                rows.append(w)
                before.append(b)
                after.append(a)
            dtype = np.asarray(program.weights[layer.router]).dtype
            routers[layer.router] = jnp.asarray(np.stack(rows) if layer.stacked else rows[0], dtype)
        return RouterCalibration(routers, float(np.mean(before)), float(np.mean(after)))

    def _fit(self, x: np.ndarray, target: np.ndarray, router: np.ndarray, bias: np.ndarray | None,
             routing: dialect.Routing, outputs: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Adam on one router; returns (best router, held-out relative error before, after)."""
        n_fit = max(1, (3 * x.shape[0]) // 4)
        xs, ts, outs = jnp.asarray(x), jnp.asarray(target), jnp.asarray(outputs)
        extra = () if bias is None else (jnp.asarray(bias),)

        def error(w, sl):
            weights, ids = dialect.route_reference(xs[sl], w, *extra, routing=routing)
            picked = outs[jnp.maximum(ids, 0), jnp.arange(ids.shape[0])[:, None] + sl.start]  # [n, k, d]
            y = jnp.einsum("nk,nkd->nd", jnp.where(ids >= 0, weights, 0.0), picked)
            return jnp.sum((y - ts[sl]) ** 2) / jnp.maximum(jnp.sum(ts[sl] ** 2), 1e-30)

        fit, held = slice(0, n_fit), slice(n_fit, x.shape[0])
        if held.start >= held.stop:
            held = fit
        w = jnp.asarray(router, jnp.float32)
        tx = optax.adam(self.lr * float(jnp.sqrt(jnp.mean(w ** 2))))
        state = tx.init(w)

        @jax.jit
        def update(w, state):
            grad = jax.grad(error)(w, fit)
            upd, state = tx.update(grad, state, w)
            return optax.apply_updates(w, upd), state

        held_error = jax.jit(lambda w: error(w, held))
        start = best = float(held_error(w))
        best_w = w
        for _ in range(self.steps):
            w, state = update(w, state)
            e = float(held_error(w))
            if not math.isfinite(e):
                break
            if e < best:
                best, best_w = e, w
        return np.asarray(best_w), start, best

    def _distill(self, program: Program, source: Program, layers: Mapping[str, MoELayer],
                 ctx: PassContext) -> RouterCalibration:
        """Adam on all routers at once against the source's next-token distributions (KL)."""
        def adam(routers: list[jax.Array]) -> optax.GradientTransformation:
            return optax.adam(self.lr * float(np.mean([jnp.sqrt(jnp.mean(r ** 2)) for r in routers])))

        result = distill_to_source(program, source, [l.router for l in layers.values()],
                                   calibration_batches(program, ctx, who=self.name)[0], steps=self.steps,
                                   optimizer=adam, who=f"{self.name}(target=logits)")
        return RouterCalibration(result.weights, result.error_before, result.error_after)
