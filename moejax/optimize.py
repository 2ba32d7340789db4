"""``moejax.optimize``: trace a model, run a pass pipeline, hand back a jitted model."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from moejax import lowering
from moejax.pipeline import Pass, PassContext, PassManager, Stage
from moejax.program import Program, trace

__all__ = ["optimize", "OptimizedModel"]


class OptimizedModel:
    """The result of :func:`optimize`: callable like the model, plus every stage.

    ``opt(tokens)`` runs the optimised prefill/forward program; when a decode
    signature was given, ``opt(tokens, cache=..., cache_index=...)`` runs the
    optimised decode program. Both are plain jitted JAX (no dialect ops left).
    """

    def __init__(self, model: Any, stages: list[Stage], decode_stages: list[Stage] | None, passes: list[Pass]):
        self.model = model
        self.stages = stages
        self.decode_stages = decode_stages or []
        self.passes = passes
        self._final = lowering.inline_dialect(stages[-1].program)
        self._final_decode = lowering.inline_dialect(self.decode_stages[-1].program) if self.decode_stages else None

    def at_stage(self, index: int) -> "OptimizedModel":
        """The model as it was after stage ``index`` (0 = as traced)."""
        if not -len(self.stages) <= index < len(self.stages):
            raise IndexError(f"stage {index} out of range; this pipeline has {len(self.stages)} stages")
        index %= len(self.stages)
        decode = self.decode_stages[: index + 1] if self.decode_stages else None
        return OptimizedModel(self.model, self.stages[: index + 1], decode, self.passes[:index])

    @property
    def program(self) -> Program:
        """The forward program after the last pass (dialect ops still visible)."""
        return self.stages[-1].program

    @property
    def decode_program(self) -> Program | None:
        return self.decode_stages[-1].program if self.decode_stages else None

    @property
    def lowered(self) -> Program:
        """The delivered forward program: plain JAX, every dialect op inlined."""
        return self._final

    @property
    def weight_bytes(self) -> int:
        return int(self.stages[-1].stats["total_bytes"])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if "cache" in kwargs and self._final_decode is not None:
            return self._final_decode(*args, **kwargs)
        return self._final(*args, **kwargs)

    def init_cache(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's empty KV cache (for decode programs)."""
        if not hasattr(self.model, "init_cache"):
            raise AttributeError("the optimised model has no init_cache (the original model defines none)")
        return self.model.init_cache(*args, **kwargs)

    def report(self, print_it: bool = True) -> str:
        """A per-stage table: pass, weight bytes, active expert FLOPs/token, check, time."""
        rows = [("stage", "pass", "expert MB", "total MB", "GFLOP/tok", "ops", "exact dev", "pass s")]
        for i, s in enumerate(self.stages):
            st = s.stats
            ops = " ".join(f"{k[4:]}:{v}" for k, v in st["op_counts"].items())
            dev = "-" if s.max_deviation is None else f"{s.max_deviation:.1e}"
            rows.append((str(i), s.name, f"{st['expert_bytes'] / 1e6:.2f}", f"{st['total_bytes'] / 1e6:.2f}",
                         f"{st['active_expert_flops_per_token'] / 1e9:.4f}", ops, dev, f"{s.seconds:.2f}"))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows)
        if print_it:
            print(text)
        return text


def optimize(model: Any, example_args: Sequence[Any], passes: str | Sequence[Pass | str] = (), *,
             example_kwargs: dict[str, Any] | None = None, params: Any = None,
             decode_example: tuple[Sequence[Any], dict[str, Any]] | None = None,
             calibration: Sequence[Any] | None = None, dump_dir: str | None = None,
             check_exact: bool = True, verbose: Callable[[str], None] | None = None,
             platform: str | None = None) -> OptimizedModel:
    """Trace ``model`` on ``example_args`` and run ``passes`` over it.

    Args:
      model: a Flax NNX module (or Linen module / pure function with ``params``).
      example_args: example inputs; the result accepts inputs of these shapes.
      passes: pass objects and/or pipeline strings (``"select-impl,quantize(bits=4)"``).
      decode_example: ``(args, kwargs)`` of a KV-cache decode step, e.g.
        ``((tokens_b1,), {"cache": cache, "cache_index": 0})``; the same pipeline
        is applied to that program too (analysis results are shared).
      calibration: token batches analysis passes (routing profile) run on.
      dump_dir: write every stage's text, graph and stats there.
    """
    example_kwargs = dict(example_kwargs or {})
    manager = PassManager(passes, dump_dir=dump_dir, check_exact=check_exact, verbose=verbose)
    ctx = PassContext(example_args=tuple(example_args), example_kwargs=example_kwargs, calibration=calibration,
                      platform=platform or jax.default_backend())
    program = trace(model, *example_args, params=params, **example_kwargs)
    stages = manager.run(program, ctx, label="")
    decode_stages = None
    if decode_example is not None:
        d_args, d_kwargs = decode_example
        d_ctx = PassContext(example_args=tuple(d_args), example_kwargs=dict(d_kwargs), calibration=calibration,
                            analysis=ctx.analysis, platform=ctx.platform)
        d_program = trace(model, *d_args, params=params, **d_kwargs)
        decode_stages = manager.run(d_program, d_ctx, label="decode")
    return OptimizedModel(model, stages, decode_stages, manager.passes)
