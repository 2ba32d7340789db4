"""``moejax.optimize``: trace a model, run a pass pipeline, hand back a jitted model."""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from moejax import lowering
from moejax.analysis import AnalysisStore
from moejax.pipeline import Pass, PassContext, PassManager, Stage
from moejax.program import InputSignatureError, Program, trace

__all__ = ["optimize", "OptimizedModel"]


class OptimizedModel:
    """The result of :func:`optimize`: callable like the model, plus every stage.

    One pipeline may optimise several traced signatures of the same model (the
    forward pass, a prefill into a KV cache, a one-token decode step); a call is
    routed to the program whose signature matches its inputs. ``stages`` are the
    main program's, ``decode_stages`` those of ``decode_example``; ``signatures``
    names every traced signature (``forward``, ``decode``, ``extra_examples`` names)
    for :meth:`stages_of` and :meth:`delivered`. The delivered programs are plain
    jitted JAX (no dialect ops left).
    """

    def __init__(self, model: Any, entries: list[list[Stage]], passes: list[Pass],
                 signatures: Sequence[str] = ("forward",)):
        self.model = model
        self.entries = entries
        self.passes = passes
        self.signatures = list(signatures)  # one name per entry: "forward", "decode", "prefill", ...

    @functools.cached_property
    def _final(self) -> list[Program]:
        # Inlined on first use: an abstract (shapes-only) model is never run, so never pays for it.
        return [lowering.inline_dialect(stages[-1].program) for stages in self.entries]

    @property
    def stages(self) -> list[Stage]:
        return self.entries[0]

    @property
    def decode_stages(self) -> list[Stage]:
        return self.stages_of("decode") if "decode" in self.signatures else []

    def stages_of(self, signature: str) -> list[Stage]:
        """The stages of one traced signature (``forward``, ``decode``, or an ``extra_examples`` name)."""
        if signature not in self.signatures:
            raise KeyError(f"no signature {signature!r}; traced: {', '.join(self.signatures)}")
        return self.entries[self.signatures.index(signature)]

    def delivered(self, signature: str) -> Program:
        """The delivered (inlined) program of one signature."""
        self.stages_of(signature)  # the error for an unknown name
        return self._final[self.signatures.index(signature)]

    def at_stage(self, index: int) -> "OptimizedModel":
        """The model as it was after stage ``index`` (0 = as traced), for every signature."""
        if not -len(self.stages) <= index < len(self.stages):
            raise IndexError(f"stage {index} out of range; this pipeline has {len(self.stages)} stages")
        index %= len(self.stages)
        return OptimizedModel(self.model, [stages[: index + 1] for stages in self.entries], self.passes[:index],
                              self.signatures)

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
        return self.program.export(directory, platforms=platforms)  # export inlines a portable form

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
             extra_examples: Sequence[tuple[Sequence[Any], dict[str, Any]]]
             | Mapping[str, tuple[Sequence[Any], dict[str, Any]]] = (),
             calibration: Sequence[Any] | None = None, dump_dir: str | None = None, overwrite_dump: bool = False,
             check_exact: bool = True, verbose: Callable[[str], None] | None = None,
             progress: Callable[[str, int, int], None] | None = None,
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
        prefill into a KV cache), as a list or as a dict by name (``{"prefill": ...}``);
        calls are routed by input signature.
      calibration: token batches analysis passes (routing profile) run on.
      dump_dir: write every stage of every signature there (see :mod:`moejax.dump`); the
        folder must be empty or new unless ``overwrite_dump`` replaces an earlier dump.
      check_exact: run every stage, as it is delivered (dialect ops inlined), on the
        example inputs and on a batch derived from them: exact passes must be bit-exact
        (or within their declared ``tolerance``) and NaN/Inf outputs stop the pipeline
        at the pass that introduced them. False skips these runs; weights are still
        checked for NaN/Inf. A model whose parameters are ``jax.ShapeDtypeStruct`` (an
        abstract model, e.g. ``moejax.models.abstract_model("deepseek-v3")``) is never
        run: its stages are recorded with bytes and FLOPs but no checks, whatever
        ``check_exact`` says, and passes that need weight values are refused
        (see :mod:`moejax.abstract`).
      verbose: called with a line per traced signature and per pass.
      progress: called as ``progress(description, done, total)`` before each step
        (tracing a signature, running a pass on it); ``total`` counts all of them.

    Raises:
      PassError: a pass cannot apply, breaks its contract or changes the result of an exact pass.
      moejax.numerics.NonFiniteError: a weight or a stage's output holds NaN/Inf.
      moejax.dump.DumpError: ``dump_dir`` is a file, or not empty (see ``overwrite_dump``).
    """
    example_kwargs = dict(example_kwargs or {})
    manager = PassManager(passes, dump_dir=dump_dir, overwrite_dump=overwrite_dump, check_exact=check_exact)
    examples = {"forward": (tuple(example_args), example_kwargs)}
    if decode_example is not None:
        examples["decode"] = (tuple(decode_example[0]), dict(decode_example[1]))
    named = extra_examples.items() if isinstance(extra_examples, Mapping) else (
        (f"sig{len(examples) + i}", example) for i, example in enumerate(extra_examples))
    for name, (args, kwargs) in named:
        if name in examples:
            raise ValueError(f"extra_examples: signature name {name!r} is taken; use another name")
        examples[name] = (tuple(args), dict(kwargs))
    analysis = AnalysisStore()  # shared: a profile measured on the first program serves the others
    steps, total = 0, len(examples) * (len(manager.passes) + 1)

    def step(description: str) -> None:
        nonlocal steps
        if progress is not None:
            progress(description, steps, total)
        steps += 1

    def pass_started(line: str) -> None:
        step(line)
        if verbose:
            verbose(line)

    def note(line: str) -> None:  # what the current step is doing: no new step
        if progress is not None:
            progress(line, steps - 1, total)

    manager.verbose, manager.note = pass_started, note
    entries = []
    for name, (args, kwargs) in examples.items():
        step(f"{name}: tracing and checking the input program")
        if verbose:
            verbose(f"{name}: tracing")
        ctx = PassContext(example_args=args, example_kwargs=kwargs, calibration=calibration, analysis=analysis,
                          platform=platform or jax.default_backend())
        program = trace(model, *args, params=params, **kwargs)
        entries.append(manager.run(program, ctx, label="" if name == "forward" else name, finish_dump=False))
    if progress is not None:
        progress("pipeline done", total, total)
    if manager.dump is not None:
        manager.dump.finish(pipeline=[str(p) for p in manager.passes])
    return OptimizedModel(model, entries, manager.passes, list(examples))
