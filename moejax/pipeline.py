"""Passes, the pass registry, pipeline strings and the pass manager.

A pass is a small frozen dataclass: its fields are its options, ``name`` is its
pipeline spelling, ``exact`` says whether outputs must stay unchanged (checked
bit for bit after it runs, on the example inputs and a second batch derived
from them, unless the pass declares a :class:`Tolerance`), ``needs`` lists
metadata keys an earlier pass must provide and ``provides`` those it adds
(checked after it runs). A pass keeps the program's input and output
signature unless it declares ``changes_signature``; ``check`` runs before it
and ``ensures`` after it, and anything they raise becomes a :class:`PassError`
naming the pass and the passes before it. Every stage's weights and outputs
must be finite: the first stage with NaN/Inf stops the pipeline::

    @register_pass
    @dataclasses.dataclass(frozen=True)
    class SelectImpl(Pass):
        name: ClassVar[str] = "select-impl"
        impl: str = "auto"

        def run(self, program, ctx):
            ...
            return program.rewrite({...})

``parse_pipeline("select-impl(impl=ragged),quantize(bits=4)")`` builds pass objects;
``str(pass_)`` gives the spelling back.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import inspect
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from moejax import abstract, expert_layout, lowering, numerics, stats
from moejax.analysis import AnalysisStore
from moejax.dump import StageDump
from moejax.numerics import NonFiniteError
from moejax.program import Program, path_to_str

__all__ = ["Pass", "PassError", "NonFiniteStageError", "Tolerance", "PassContext", "Stage", "PassManager",
           "register_pass", "registered_passes", "parse_pipeline", "pipeline_to_str", "check_outputs_close",
           "check_programs_match", "check_batches", "is_exact", "exactness_label", "with_note"]


class PassError(ValueError):
    """A pass cannot run: unmet needs, options that do not fit the program, bad order."""


class NonFiniteStageError(PassError, NonFiniteError):
    """A stage of a pipeline holds NaN/Inf weights or produces NaN/Inf outputs."""


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How far an exact pass may move outputs, and why: ``|a - b| <= atol + rtol * max|a|`` per output.

    ``rtol`` is relative to the output's largest magnitude (not elementwise):
    a different summation order moves every element by a few ulps of the
    values it sums, which for near-zero elements is far beyond their own ulp.

    Exact passes are checked bit for bit unless they declare one, e.g. a kernel
    that sums in another order: ``tolerance = Tolerance(1e-6, 1e-6, "tiled sum order")``.
    """

    rtol: float
    atol: float
    reason: str

    def __post_init__(self):
        if not (self.rtol >= 0 and self.atol >= 0):
            raise ValueError(f"Tolerance: rtol and atol must be >= 0, got rtol={self.rtol}, atol={self.atol}")
        if not self.reason.strip():
            raise ValueError("Tolerance needs a reason: say why the pass cannot be bit-exact")

    def __str__(self) -> str:
        return f"rtol={self.rtol:g}, atol={self.atol:g}"


_REGISTRY: dict[str, type["Pass"]] = {}


def register_pass(cls: type["Pass"]) -> type["Pass"]:
    """Class decorator: make a pass available to pipeline strings by ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute `name` to be registered")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type["Pass"]]:
    """Pipeline name -> pass class, for every registered pass (imports moejax.passes)."""
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


# The packages whose passes register themselves on import.
BUILTIN_PASS_MODULES: tuple[str, ...] = ("moejax.passes", "moejax.sharding", "moejax.pallas_kernels")


def _load_builtin_passes() -> None:
    # The core must not import the pass packages at import time (they import the core);
    # they register themselves when imported here, on first use. An ImportError is not
    # swallowed: a broken module must show its real error, not "unknown pass".
    for mod in BUILTIN_PASS_MODULES:
        importlib.import_module(mod)


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What passes may use besides the program itself.

    ``example_args``/``example_kwargs`` are the inputs exactness is checked on;
    ``calibration`` is a list of token batches analysis passes run on;
    ``analysis`` (a :class:`moejax.analysis.AnalysisStore`) is shared between
    the programs one pipeline optimizes (prefill and decode): typed results by
    pipeline step (:meth:`step`), so a profile or plan made once serves both,
    and the weights derived from shared weights (:meth:`derived_weight`).
    """

    example_args: tuple[Any, ...] = ()
    example_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    calibration: Sequence[Any] | None = None
    analysis: AnalysisStore | None = None  # None makes a new one
    platform: str = dataclasses.field(default_factory=lambda: jax.default_backend())
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # per context (one per program): how often each pass spelling asked for its step
    _steps: dict[str, int] = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.analysis is None:
            object.__setattr__(self, "analysis", AnalysisStore())
        elif not isinstance(self.analysis, AnalysisStore):
            raise TypeError(f"PassContext.analysis must be a moejax.analysis.AnalysisStore, got "
                            f"{type(self.analysis).__name__}")

    def step(self, pass_: Any) -> str:
        """This run's step key for ``pass_``: ``str(pass_)#n``, n = earlier runs of an equal pass on this context.

        Call it once per ``run``. The programs of one optimize call run the same
        pipeline on their own contexts, so the i-th ``prune(num_experts=6)`` gets
        the same key in each and finds what the first program stored.
        """
        spelling = str(pass_)
        n = self._steps.get(spelling, 0)
        self._steps[spelling] = n + 1
        return f"{spelling}#{n}"

    def derived_weight(self, kind: str, source: Any, make: Callable[[], Any]) -> Any:
        """``make()`` once per ``(kind, source)`` for all programs sharing ``analysis``.

        The programs one pipeline optimizes (prefill, decode ...) share their
        weight arrays; a pass that derives a new weight from one (quantized,
        re-laid-out) uses this so the derived buffers are shared too, instead
        of one copy per program. ``kind`` must name everything ``make`` depends on.
        """
        return self.analysis.derived_weights.get(kind, source, make)


@dataclasses.dataclass(frozen=True)
class Pass:
    """Base class of passes (subclasses are frozen dataclasses; fields are options).

    Class-level declarations (the pass manager checks each one):
      exact: outputs stay the same, bit for bit on the same backend (or within ``tolerance``).
      tolerance: for an exact pass that cannot be bit-exact, how far and why.
      lossy_options: options that make an exact pass lossy when set away from their default.
      needs / provides: metadata keys read from earlier passes / added by this one
        (a pass whose needs depend on its options overrides :meth:`required`).
      changes_signature: the pass may change the program's inputs or outputs.
      needs_weight_values: the pass reads weight values (calibration, pruning ...); it is
        refused on an abstract program (shapes only, :mod:`moejax.abstract`). Passes that
        only read shapes declare False and transform weights with
        :func:`moejax.abstract.eval_or_shape`.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    tolerance: ClassVar[Tolerance | None] = None
    lossy_options: ClassVar[tuple[str, ...]] = ()
    changes_signature: ClassVar[bool] = False
    needs: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    # Passes that read or reshape expert weights as stacked [E, k, n] arrays set this.
    needs_stacked_experts: ClassVar[bool] = False
    # True (the safe default) refuses the pass on abstract programs; shape-only passes set False.
    needs_weight_values: ClassVar[bool] = True
    # For `moejax passes` (moejax.pass_options): each option's allowed values, the options that
    # must be given, and descriptions where the docstring's "Options:" entry does not serve.
    option_ranges: ClassVar[Mapping[str, str]] = {}
    required_options: ClassVar[tuple[str, ...]] = ()
    option_descriptions: ClassVar[Mapping[str, str]] = {}

    def run(self, program: Program, ctx: PassContext) -> Program:  # pragma: no cover - abstract
        raise NotImplementedError

    def required(self) -> tuple[str, ...]:
        """Metadata keys this pass, with its options, reads from earlier passes (default: ``needs``)."""
        return self.needs

    def check(self, program: Program, ctx: PassContext) -> None:
        """Raise :class:`PassError` if this pass cannot apply to ``program`` (default: no check)."""

    def ensures(self, before: Program, after: Program, ctx: PassContext) -> None:
        """Raise :class:`PassError` if ``after`` (this pass's result) breaks a promise of the pass.

        Runs after the declared contract (``provides``, signature) is verified;
        the default checks nothing more.
        """

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}

    def __str__(self) -> str:
        changed = []
        for f in dataclasses.fields(self):
            if not f.repr:
                continue
            v = getattr(self, f.name)
            if v != _field_default(f):
                changed.append(f"{f.name}={_fmt_value(v)}")
        return self.name + (f"({','.join(changed)})" if changed else "")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return object()  # a required option: never equal to a value


def with_note(metadata: Mapping[str, Any], key: str, note: str) -> dict[str, Any]:
    """A copy of program ``metadata`` with ``note`` under ``key`` in its ``notes`` (what a lossy stage did)."""
    return {**metadata, "notes": {**metadata.get("notes", {}), key: note}}


def is_exact(p: Pass) -> bool:
    """Whether this pass object, with its options, promises unchanged outputs."""
    if not bool(p.exact):  # a ClassVar, or a property computed from the options
        return False
    fields = {f.name: f for f in dataclasses.fields(p)}
    return all(getattr(p, o) == _field_default(fields[o]) for o in type(p).lossy_options if o in fields)


def exactness_label(cls: type[Pass]) -> str:
    """``exact`` or ``lossy``, plus ``; lossy with OPT`` when options make an exact pass lossy.

    Reads the class-level declarations (``cls.exact`` may be a property computed
    from the options: then the default options decide).
    """
    declared = inspect.getattr_static(cls, "exact", True)
    computed = isinstance(declared, property)
    if computed:
        try:
            default_exact = is_exact(cls())
        except Exception:  # required options: the property cannot be evaluated without them
            default_exact = True
    else:
        default_exact = bool(declared)
    if not default_exact:
        return "lossy"
    label = "exact"  # a declared tolerance is shown beside it (``moejax passes``)
    if cls.lossy_options:
        label += f"; lossy with {', '.join(cls.lossy_options)}"
    elif computed:
        label += "; lossy with some options"
    return label


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    return str(v)


# --------------------------------------------------------------------------
# Pipeline strings.
# --------------------------------------------------------------------------
def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise PassError(f"pipeline {text!r}: unbalanced ')'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise PassError(f"pipeline {text!r}: unbalanced '('")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def parse_pipeline(text: str) -> list["Pass"]:
    """``"name(opt=value,...),name2"`` -> pass objects, with errors listing valid choices."""
    registry = registered_passes()
    passes = []
    for item in _split_top(text):
        name, _, rest = item.partition("(")
        name = name.strip()
        if name not in registry:
            close = difflib.get_close_matches(name, registry, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PassError(f"unknown pass {name!r}{hint}; registered passes: {', '.join(registry)}")
        cls = registry[name]
        kwargs = {}
        if rest:
            if not rest.endswith(")"):
                raise PassError(f"pass {item!r}: options must be written name(key=value,...)")
            for opt in _split_top(rest[:-1]):
                key, eq, val = opt.partition("=")
                if not eq:
                    raise PassError(f"pass {name}: option {opt!r} must be key=value")
                kwargs[key.strip()] = _parse_value(val)
        passes.append(make_pass(cls, **kwargs))
    return passes


def make_pass(cls: type["Pass"], **kwargs: Any) -> "Pass":
    """Instantiate ``cls`` with a clear error for unknown or ill-typed options."""
    valid = {f.name: f for f in dataclasses.fields(cls)}
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PassError(f"pass {cls.name}: unknown option {key!r}{hint}; valid options: "
                            f"{', '.join(valid) or '(none)'}")
    for key, val in kwargs.items():
        default = valid[key].default
        accepts_text = "str" in str(valid[key].type)  # e.g. ``float | str``: a number or a spelled size
        if default is not dataclasses.MISSING and default is not None and val is not None and not accepts_text:
            if isinstance(default, bool) and not isinstance(val, bool):
                raise PassError(f"pass {cls.name}: option {key} must be true or false, got {val!r}")
            if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                    isinstance(val, bool) or not isinstance(val, (int, float))):
                raise PassError(f"pass {cls.name}: option {key} must be a number, got {val!r}")
            if isinstance(default, float) and isinstance(val, int):
                kwargs[key] = float(val)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        message = str(e)
        for prefix in (f"{cls.name}: ", f"{cls.name} "):  # passes that already name themselves: say it once
            message = message.removeprefix(prefix)
        raise PassError(f"pass {cls.name}: {message}") from None


def pipeline_to_str(passes: Sequence["Pass"]) -> str:
    return ",".join(str(p) for p in passes)


# --------------------------------------------------------------------------
# The pass manager.
# --------------------------------------------------------------------------
@dataclasses.dataclass
class Stage:
    """The program after one pass, with its statistics.

    ``exact`` is whether the pass promised unchanged outputs; ``max_deviation``
    the largest output difference the exactness check measured (0.0 when
    bit-exact; None when not checked); ``checked_batches`` how many input
    batches the stage was run on (exactness and NaN/Inf checks).
    """

    name: str
    program: Program
    stats: dict[str, Any]
    seconds: float
    exact: bool | None = None
    max_deviation: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    checked_batches: int = 0

    def __str__(self) -> str:
        return f"== stage {self.name} ==\n{self.program}"


# --------------------------------------------------------------------------
# Check batches and output comparison.
# --------------------------------------------------------------------------
Batch = tuple[tuple[Any, ...], dict[str, Any]]
Leaves = list[tuple[str, np.ndarray]]

# Inputs whose names contain one of these keep their example values in the derived batch:
# a KV cache, a write index or positions must stay consistent with each other.
_FIXED_INPUT_WORDS = ("cache", "index", "position", "pos")


def _vary_leaf(x: Any, name: str, rng: np.random.Generator) -> Any:
    """A deterministic variation of one example input leaf (or ``x`` itself if it must stay)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype") or any(w in name.lower() for w in _FIXED_INPUT_WORDS):
        return x
    a = np.asarray(x)
    if a.ndim == 0 or a.size == 0:
        return x
    if np.issubdtype(a.dtype, np.integer):
        # token ids: reshuffle the example's own values, so every id stays in the vocabulary
        flat = a.ravel()
        new = flat[rng.permutation(flat.size)]
        if np.array_equal(new, flat):  # e.g. one distinct value per row order: shift to the next distinct value
            values = np.unique(flat)
            if values.size >= 2:
                new = values[(np.searchsorted(values, flat) + 1) % values.size]
            elif values[0] > 0:  # one distinct id v: v - 1 is in the vocabulary too
                new = flat - 1
            else:
                return x
        return jnp.asarray(new.reshape(a.shape), dtype=a.dtype)
    if numerics.is_float(a):
        scale = float(np.std(a.astype(np.float32))) or 1.0
        noise = rng.standard_normal(a.shape).astype(np.float32) * (1e-2 * scale)
        return jnp.asarray(a.astype(np.float32) + noise, dtype=a.dtype)
    return x


def check_batches(program: Program, ctx: PassContext) -> list[tuple[str, Batch]]:
    """The input batches stages are checked on: ``ctx``'s example and one derived from it.

    The derived batch permutes the example's integer token ids (keeping them in
    the vocabulary) and adds small noise to float inputs; KV caches, indices and
    positions (inputs named so) keep their values. Empty when ``ctx`` has no
    example inputs but the program takes some.
    """
    args, kwargs = tuple(ctx.example_args), dict(ctx.example_kwargs)
    if not args and not kwargs and program.in_avals:
        return []
    batches = [("the example inputs", (args, kwargs))]
    leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
    if len(leaves) != len(program.in_avals):
        return batches  # the example does not fit the program; calling it raises a clear error
    names = program.input_names or tuple(f"in{i}" for i in range(len(leaves)))
    rng = np.random.default_rng(0)
    varied = [_vary_leaf(x, n, rng) for x, n in zip(leaves, names)]
    if any(v is not x for v, x in zip(varied, leaves)):
        batches.append(("a batch derived from the example (tokens permuted, float inputs perturbed)",
                        jax.tree_util.tree_unflatten(tree, varied)))
    return batches


def _output_leaves(out: Any) -> Leaves:
    """An output pytree as ``(path, numpy array)`` pairs, the form :func:`_compare` takes."""
    return [(path_to_str(path), np.asarray(leaf)) for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]]


def _outputs(program: Program, batch: Batch, delivered: bool = True) -> Leaves:
    """``program``'s outputs on ``batch``; ``delivered``: run as delivered (every dialect op inlined).

    The pass manager checks stages in their delivered form: the check covers what users get,
    and the compiled executable is the one every later call of that stage (evaluation,
    serving) reuses. ``delivered=False`` runs the program as given (dialect ops and all).
    """
    run = lowering.inline_dialect(program) if delivered else program
    return _output_leaves(run(*batch[0], **batch[1]))


def _output_name(name: str) -> str:
    return f"output {name!r}" if name else "the output"


def _compare(before: Leaves, after: Leaves, tolerance: Tolerance | None) -> tuple[float, str | None]:
    """(largest absolute deviation, description of the first violation or None)."""
    worst = 0.0
    if len(before) != len(after):
        return worst, f"the number of outputs changed from {len(before)} to {len(after)}"
    for (name, a), (_, b) in zip(before, after):
        if a.shape != b.shape or a.dtype != b.dtype:
            return worst, f"{_output_name(name)} changed type from {a.dtype}{list(a.shape)} to {b.dtype}{list(b.shape)}"
        if not numerics.is_float(a):
            if not np.array_equal(a, b):
                return worst, f"integer {_output_name(name)} changed"
            continue
        if a.size == 0:
            continue
        bit_equal = np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()  # -0.0 != 0.0 too
        # bfloat16/float16 widen to float32 exactly; float64 stays
        wide = np.float64 if a.dtype == np.float64 else np.float32
        a, b = a.astype(wide), b.astype(wide)
        dev = float(np.max(np.abs(a - b)))
        worst = max(worst, dev)
        if tolerance is None:
            if not bit_equal:
                return worst, f"{_output_name(name)} is not bit-equal (required unless a tolerance is declared)"
        elif not dev <= tolerance.atol + tolerance.rtol * float(np.max(np.abs(a))):  # NaN deviation fails too
            return worst, f"{_output_name(name)} exceeds the declared tolerance {tolerance} ({tolerance.reason})"
    return worst, None


def check_outputs_close(before: Any, after: Any, what: str, tolerance: Tolerance | None = None) -> float:
    """Largest deviation between two output pytrees; raises PassError unless bit-equal (or within ``tolerance``)."""
    dev, problem = _compare(_output_leaves(before), _output_leaves(after), tolerance)
    if problem:
        raise PassError(f"{what}: outputs differ by up to {dev:.3g}: {problem}")
    return dev


def check_programs_match(reference: Program, candidate: Program, ctx: PassContext, what: str,
                         tolerance: Tolerance | None = None) -> float | None:
    """Run both programs on :func:`check_batches` and require equal outputs (or within ``tolerance``).

    Returns the largest deviation, or None when ``ctx`` has no example inputs.
    """
    worst = None
    for label, batch in check_batches(reference, ctx):
        dev, problem = _compare(_outputs(reference, batch, delivered=False),
                                _outputs(candidate, batch, delivered=False), tolerance)
        if problem:
            raise PassError(f"{what}: outputs differ by up to {dev:.3g} on {label}: {problem}")
        worst = max(worst or 0.0, dev)
    return worst


# --------------------------------------------------------------------------
# The pass manager.
# --------------------------------------------------------------------------
def _in_context(e: PassError, where: str) -> PassError:
    """``e`` prefixed with the pass and the passes before it (same type when it can be rebuilt)."""
    try:
        return type(e)(f"{where}: {e}")
    except Exception:  # a subclass with another constructor
        return PassError(f"{where}: {e}")


def _signature(program: Program) -> tuple[Any, ...]:
    """What a pass must keep: input structure and types, output structure and types."""
    def avals(seq: Sequence[Any]) -> tuple[tuple[tuple[int, ...], str], ...]:
        return tuple((tuple(a.shape), jnp.dtype(a.dtype).name) for a in seq)

    return program.in_tree, avals(program.in_avals), program.out_tree, avals(program.jaxpr.out_avals)


def _out_signature(program: Program) -> str:
    return ", ".join(f"{jnp.dtype(a.dtype).name}[{','.join(map(str, a.shape))}]" for a in program.jaxpr.out_avals)


class PassManager:
    """Runs passes in order, checking and recording a :class:`Stage` after each.

    After each pass: it returned a well-typed Program with the same signature
    (unless it declares ``changes_signature``) and the metadata it ``provides``;
    its ``ensures`` hook holds; its new weights and its outputs on
    :func:`check_batches` are finite; and, for an exact pass, its outputs equal
    the previous stage's bit for bit (or within its declared ``tolerance``).
    ``check_exact=False`` skips running the stages (exactness and output
    NaN/Inf checks); weights are still checked for NaN/Inf. An abstract program
    (weights or example inputs are shapes only, :mod:`moejax.abstract`) is never
    run: its stages are not checked (``checked_batches=0``) whatever
    ``check_exact`` says, and passes that declare ``needs_weight_values`` are refused.
    """

    def __init__(self, passes: str | Sequence[Pass | str], *, dump_dir: str | Path | None = None,
                 overwrite_dump: bool = False, check_exact: bool = True,
                 verbose: Callable[[str], None] | None = None):
        items: list[Pass] = []
        for p in [passes] if isinstance(passes, str) else passes:
            items.extend(parse_pipeline(p) if isinstance(p, str) else [p])
        for p in items:
            if not isinstance(p, Pass):
                raise PassError(f"pipeline item {p!r} is not a Pass (or a pipeline string)")
        self.passes = items
        self.dump = StageDump(dump_dir, overwrite=overwrite_dump) if dump_dir is not None else None
        self.check_exact = check_exact
        self.verbose = verbose
        self.note: Callable[[str], None] | None = None  # what a step is doing now (a progress display)

    def _where(self, index: int) -> str:
        """``pass X (#i, after a, b)``: the pass and the passes that ran before it."""
        before = ", ".join(str(q) for q in self.passes[: index - 1])
        return f"pass {self.passes[index - 1]} (#{index}, {'after ' + before if before else 'the first pass'})"

    def _hook(self, index: int, hook: str, fn: Callable[..., None], *args: Any) -> None:
        """Call ``check``/``ensures``; whatever it raises becomes a PassError naming the pass and its predecessors."""
        try:
            fn(*args)
        except PassError as e:
            raise _in_context(e, self._where(index)) from e
        except Exception as e:
            raise PassError(f"{self._where(index)}: {hook}() raised {type(e).__name__}: {e}; this is a bug in the "
                            f"pass's {hook}(): it should raise PassError with what to change") from e

    def run(self, program: Program, ctx: PassContext, *, label: str = "", finish_dump: bool = True) -> list[Stage]:
        """Run the pipeline on ``program``; ``label`` names the signature (e.g. ``decode``) in messages and dumps.

        ``finish_dump=False`` leaves the dump's manifest to the caller (several signatures, one dump).
        """
        suffix = f" ({label} program)" if label else ""
        # Shapes only: nothing to run, so exactness and output checks are skipped, not failed.
        shapes_only = program.is_abstract or abstract.is_abstract((ctx.example_args, ctx.example_kwargs))
        batches = check_batches(program, ctx) if self.check_exact and not shapes_only else []
        if (self.check_exact and not shapes_only and len(batches) < 2 and program.in_avals
                and any(is_exact(p) for p in self.passes)):
            warnings.warn(
                f"PassManager: exactness and NaN/Inf output checks skipped{suffix}: the PassContext has no example "
                "inputs; give it example_args/example_kwargs" if not batches else
                f"PassManager: exactness checked on the example inputs only{suffix}: no input could be varied "
                f"(token ids all 0, or only caches/indices)", stacklevel=2)
        self._check_weights(program, None, 0, suffix)
        ctx.analysis.keep_source(program)
        outputs = [_outputs(program, b) for _, b in batches]
        self._check_outputs(outputs, batches, 0, suffix)
        stages = [Stage("input", program, stats.program_stats(program), 0.0, checked_batches=len(batches))]
        self._dump(stages[-1], 0, label)
        for i, p in enumerate(self.passes, start=1):
            if p.needs_weight_values and program.is_abstract:
                raise PassError(f"{self._where(i)} reads weight values, but {abstract.LOAD_HINT}; or drop "
                                f"{p.name} from the pipeline (shape-only passes: "
                                f"{', '.join(n for n, c in registered_passes().items() if not c.needs_weight_values)})")
            self._check_needs(p, program, i)
            self._hook(i, "check", p.check, program, ctx)
            if self.verbose:
                self.verbose(f"{label or 'forward'}: pass {i}/{len(self.passes)} {p}")
            t0 = time.perf_counter()
            try:
                new = p.run(program, ctx)
            except PassError as e:
                raise _in_context(e, self._where(i)) from e
            except Exception as e:
                raise PassError(f"pass {p} failed: {type(e).__name__}: {e} ({self._where(i)})") from e
            seconds = time.perf_counter() - t0
            if not isinstance(new, Program):
                raise PassError(f"{self._where(i)} returned {type(new).__name__}, not a Program")
            try:
                jcore.check_jaxpr(new.jaxpr.jaxpr)
            except Exception as e:
                raise PassError(f"{self._where(i)} produced an ill-typed program: {e}") from e
            self._check_contract(p, i, program, new)
            self._hook(i, "ensures", p.ensures, program, new, ctx)
            self._check_weights(new, program, i, suffix)
            exact = is_exact(p)
            deviation = None
            if batches and _signature(new) != _signature(program):  # declared: the old inputs no longer fit
                warnings.warn(f"{self._where(i)} changed the program's signature; later stages are not checked "
                              f"for exactness or NaN/Inf outputs{suffix}", stacklevel=2)
                batches, outputs = [], []
            if batches:
                self._say(f"{label or 'forward'}: pass {i}/{len(self.passes)} {p}: running the new stage on "
                          f"{len(batches)} check batches (compiling it)")
                new_outputs = [_outputs(new, b) for _, b in batches]
                self._check_outputs(new_outputs, batches, i, suffix)  # NaN first: not "the pass changed the result"
                if exact:
                    deviation = self._check_exact(p, i, outputs, new_outputs, batches, suffix)
                outputs = new_outputs
            stage = Stage(str(p), new, stats.program_stats(new), seconds, exact=exact, max_deviation=deviation,
                          checked_batches=len(batches))
            stages.append(stage)
            self._dump(stage, i, label)
            program = new
        if batches:
            self._say(f"{label or 'forward'}: checking the delivered program against the last stage")
            self._check_inlining(program, outputs, batches, f"the last stage {stages[-1].name!r}", suffix)
        if self.dump is not None and finish_dump:
            self.dump.finish(pipeline=[str(p) for p in self.passes])
        return stages

    def _say(self, line: str) -> None:
        if self.note is not None:
            self.note(line)

    @staticmethod
    def _check_inlining(program: Program, inlined_outputs: list[Leaves], batches: list[tuple[str, Batch]],
                        what: str, suffix: str) -> None:
        """The stages are checked as delivered (inlined); the dialect program itself must agree, bit for bit.

        Run on the last stage: a wrong inlining would otherwise shift every stage alike and
        pass the stage-to-stage checks unnoticed.
        """
        if lowering.inline_dialect(program) is program:  # delivers itself (e.g. offloaded): nothing inlined
            return
        for (label, batch), inlined in zip(batches, inlined_outputs):
            dev, problem = _compare(_outputs(program, batch, delivered=False), inlined, None)
            if problem:
                raise PassError(f"the delivered (inlined) program{suffix} differs from {what} by up to {dev:.3g} "
                                f"on {label}: {problem}; this is a bug in an op's inlining rule")

    def _check_contract(self, p: Pass, index: int, before: Program, after: Program) -> None:
        """The declared contract: ``provides`` keys present; signature unchanged unless declared."""
        missing = [k for k in type(p).provides if k not in after.metadata]
        if missing:
            raise PassError(f"{self._where(index)} declares provides={tuple(type(p).provides)} but its program has "
                            f"no metadata {missing[0]!r}; set it in the returned program's metadata or drop it from "
                            f"provides")
        old_sig, new_sig = _signature(before), _signature(after)
        if type(p).changes_signature or new_sig == old_sig:
            return
        if new_sig[:2] != old_sig[:2]:
            what, old, new = "input", f"{before.signature()} {before.in_tree}", f"{after.signature()} {after.in_tree}"
        elif new_sig[2] != old_sig[2]:
            what, old, new = "output structure", str(before.out_tree), str(after.out_tree)
        else:
            what, old, new = "output", _out_signature(before), _out_signature(after)
        raise PassError(f"{self._where(index)} changed the program's {what} signature from {old} to {new}; a pass "
                        f"must keep the signature the model was traced with (or declare changes_signature = True)")

    def _check_weights(self, program: Program, previous: Program | None, index: int, suffix: str) -> None:
        """NaN/Inf in the weights this stage added or replaced (all of them for the input)."""
        changed = {path: w for path, w in program.weights.items()
                   if previous is None or previous.weights.get(path) is not w}
        try:
            numerics.check_finite_weights(changed, "the input program" + suffix if index == 0 else
                                          f"the program after {self._where(index)}{suffix}")
        except NonFiniteError as e:
            raise NonFiniteStageError(str(e)) from None

    def _check_outputs(self, outputs: list[Leaves], batches: list[tuple[str, Batch]], index: int,
                       suffix: str) -> None:
        """Stop at the first stage whose outputs hold NaN/Inf, naming it."""
        for leaves, (label, _) in zip(outputs, batches):
            bad = [(name or "output", n) for name, a in leaves if (n := numerics.count_nonfinite(a))]
            if not bad:
                continue
            where = f"output {numerics.describe(bad)} on {label}"
            if index == 0:
                raise NonFiniteStageError(
                    f"the traced program{suffix} already produces NaN/Inf before any pass ran: {where}; the model "
                    f"or its example inputs are broken (check the weights, e.g. reload the checkpoint)")
            raise NonFiniteStageError(
                f"NaN/Inf outputs first appear after {self._where(index)}{suffix}: {where}; every earlier stage "
                f"was finite, so this pass introduced them")

    def _check_exact(self, p: Pass, index: int, before: list[Leaves], after: list[Leaves],
                     batches: list[tuple[str, Batch]], suffix: str) -> float:
        worst = 0.0
        for b, a, (label, _) in zip(before, after, batches):
            dev, problem = _compare(b, a, type(p).tolerance)
            if problem:
                raise PassError(f"exactness check of pass {p}: outputs differ by up to {dev:.3g} on {label}{suffix}: "
                                f"{problem} ({self._where(index)}); fix the pass, declare it lossy (exact = False), "
                                f"or declare tolerance = Tolerance(rtol, atol, reason)")
            worst = max(worst, dev)
        return worst

    def _check_needs(self, p: Pass, program: Program, index: int) -> None:
        if p.needs_stacked_experts and any(expert_layout.is_split(w) for w in program.weights.values()):
            raise PassError(f"pass {p} (#{index}) needs stacked expert weights, but an earlier select-impl stored "
                            f"them one buffer per expert (the CPU layout); run {p.name} before select-impl, or "
                            f"use select-impl(layout=stacked)")
        for need in p.required():
            if need not in program.metadata:
                providers = [name for name, cls in registered_passes().items() if need in cls.provides]
                fix = f"add {' or '.join(providers)} before it" if providers else "run a pass that provides it first"
                raise PassError(f"pass {p} (#{index}) needs {need!r}, which no earlier pass provided; {fix}, "
                                f"e.g. '{providers[0] + ',' if providers else ''}{p}'")

    def _dump(self, stage: Stage, index: int, label: str) -> None:
        if self.dump is not None:
            self.dump.write_stage(label or "forward", index, stage)
