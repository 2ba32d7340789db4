"""``moejax.optimize``: trace a model, run a pass pipeline, hand back a jitted model."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from moejax import lowering
from moejax.analysis import AnalysisStore
from moejax.pipeline import Pass, PassContext, PassManager, Stage, Tolerance, check_programs_match
from moejax.program import InputSignatureError, Program, trace

__all__ = ["optimize", "OptimizedModel", "INLINE_TOLERANCE"]

# How far the delivered (inlined) program may differ from the last stage. None: bit-exact —
# inlining substitutes each dialect op by the very implementation it runs, so XLA sees the same ops.
INLINE_TOLERANCE: Tolerance | None = None


class OptimizedModel:
    """The result of :func:`optimize`: callable like the model, plus every stage.

    One pipeline may optimise several traced signatures of the same model (the
    forward pass, a prefill into a KV cache, a one-token decode step); a call is
    routed to the program whose signature matches its inputs. ``stages`` are the
    main program's, ``decode_stages`` those of ``decode_example``. The delivered
    programs are plain jitted JAX (no dialect ops left).
    """

    def __init__(self, model: Any, entries: list[list[Stage]], passes: list[Pass], decode_index: int | None = None):
        self.model = model
        self.entries = entries
        self.passes = passes
        self._decode_index = decode_index
        self._final = [lowering.inline_dialect(stages[-1].program) for stages in entries]

    @property
    def stages(self) -> list[Stage]:
        return self.entries[0]

    @property
    def decode_stages(self) -> list[Stage]:
        return self.entries[self._decode_index] if self._decode_index is not None else []

    def at_stage(self, index: int) -> "OptimizedModel":
        """The model as it was after stage ``index`` (0 = as traced), for every signature."""
        if not -len(self.stages) <= index < len(self.stages):
            raise IndexError(f"stage {index} out of range; this pipeline has {len(self.stages)} stages")
        index %= len(self.stages)
        return OptimizedModel(self.model, [stages[: index + 1] for stages in self.entries], self.passes[:index],
                              self._decode_index)

    @property
    def program(self) -> Program:
        """The main program after the last pass (dialect ops still visible)."""
        return self.stages[-1].program

    @property
    def decode_program(self) -> Program | None:
        return self.decode_stages[-1].program if self.decode_stages else None

    @property
    def lowered(self) -> Program:
        """The delivered main program: plain JAX, every dialect op inlined."""
        return self._final[0]

    @property
    def weight_bytes(self) -> int:
        return int(self.stages[-1].stats["total_bytes"])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        errors = []
        for program in self._final:
            try:
                program.check_inputs(args, kwargs)
            except InputSignatureError:
                errors.append(program.signature())
                continue
            return program(*args, **kwargs)
        raise InputSignatureError(
            "no optimised program takes these inputs; traced signatures: " + "; ".join(errors) +
            ". Pass matching example inputs to moejax.optimize (example_args, decode_example, extra_examples)")

    def export(self, directory: str, platforms: Sequence[str] = ("cpu",)) -> str:
        """Export the delivered main program for serving without moejax; see :meth:`Program.export`.

        Other signatures (e.g. the decode step) export with ``opt.decode_program.export(...)``.
        """
        return self.lowered.export(directory, platforms=platforms)

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
             extra_examples: Sequence[tuple[Sequence[Any], dict[str, Any]]] = (),
             calibration: Sequence[Any] | None = None, dump_dir: str | None = None,
             check_exact: bool = True, verbose: Callable[[str], None] | None = None,
             platform: str | None = None) -> OptimizedModel:
    """Trace ``model`` on ``example_args`` and run ``passes`` over it.

    Args:
      model: a Flax NNX module (or Linen module / pure function with ``params``).
      example_args: example inputs; the result accepts inputs of these shapes.
      passes: pass objects and/or pipeline strings (``"quantize(bits=4),select-impl"``).
      decode_example: ``(args, kwargs)`` of a KV-cache decode step, e.g.
        ``((tokens_b1,), {"cache": cache, "cache_index": 0})``; the same pipeline
        is applied to that program too (analysis results are shared).
      extra_examples: more ``(args, kwargs)`` signatures to optimise (e.g. a
        prefill into a KV cache); calls are routed by input signature.
      calibration: token batches analysis passes (routing profile) run on.
      dump_dir: write every stage's text, graph and stats there.
      check_exact: run every stage on the example inputs and on a batch derived from them:
        exact passes must be bit-exact (or within their declared ``tolerance``), NaN/Inf
        outputs stop the pipeline at the pass that introduced them, and the delivered
        (inlined) programs must match the last stage. False skips these runs; weights
        are still checked for NaN/Inf.

    Raises:
      PassError: a pass cannot apply, breaks its contract or changes the result of an exact pass.
      moejax.numerics.NonFiniteError: a weight or a stage's output holds NaN/Inf.
    """
    example_kwargs = dict(example_kwargs or {})
    manager = PassManager(passes, dump_dir=dump_dir, check_exact=check_exact, verbose=verbose)
    examples = [(tuple(example_args), example_kwargs)]
    decode_index = None
    if decode_example is not None:
        decode_index = len(examples)
        examples.append((tuple(decode_example[0]), dict(decode_example[1])))
    examples.extend((tuple(a), dict(k)) for a, k in extra_examples)
    analysis = AnalysisStore()  # shared: a profile measured on the first program serves the others
    entries, contexts, labels = [], [], []
    for i, (args, kwargs) in enumerate(examples):
        ctx = PassContext(example_args=args, example_kwargs=kwargs, calibration=calibration, analysis=analysis,
                          platform=platform or jax.default_backend())
        program = trace(model, *args, params=params, **kwargs)
        label = "" if i == 0 else ("decode" if i == decode_index else f"sig{i}")
        entries.append(manager.run(program, ctx, label=label))
        contexts.append(ctx)
        labels.append(label)
    result = OptimizedModel(model, entries, manager.passes, decode_index)
    if check_exact:
        # What is delivered is the inlined program, not the last stage: check it on the same batches.
        for stages, final, ctx, label in zip(entries, result._final, contexts, labels):
            stages[-1].extra["inline_deviation"] = check_programs_match(
                stages[-1].program, final, ctx, f"the delivered (inlined) program{' (' + label + ')' if label else ''} "
                f"differs from the last stage {stages[-1].name!r}", INLINE_TOLERANCE)
    return result
