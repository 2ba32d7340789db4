"""Passes, the pass registry, pipeline strings and the pass manager.

A pass is a small frozen dataclass: its fields are its options, ``name`` is its
pipeline spelling, ``exact`` says whether outputs must stay unchanged (checked
after it runs), ``needs`` lists metadata keys an earlier pass must provide::

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
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from moejax import expert_layout, inspection, stats
from moejax.program import Program

__all__ = ["Pass", "PassError", "PassContext", "Stage", "PassManager", "register_pass", "registered_passes",
           "parse_pipeline", "pipeline_to_str", "check_outputs_close"]


class PassError(ValueError):
    """A pass cannot run: unmet needs, options that do not fit the program, bad order."""


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


def _load_builtin_passes() -> None:
    # The core must not import the pass packages at import time (they import the core);
    # they register themselves when imported here, on first use.
    import importlib

    for mod in ("moejax.passes", "moejax.sharding", "moejax.pallas_kernels"):
        try:
            importlib.import_module(mod)
        except ImportError as e:  # pragma: no cover - optional components
            if mod == "moejax.passes":
                raise
            del e


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What passes may use besides the program itself.

    ``example_args``/``example_kwargs`` are the inputs exactness is checked on;
    ``calibration`` is a list of token batches analysis passes run on;
    ``analysis`` is shared between the programs one pipeline optimizes
    (prefill and decode), keyed like the program metadata, so a profile
    measured once serves both.
    """

    example_args: tuple[Any, ...] = ()
    example_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    calibration: Sequence[Any] | None = None
    analysis: dict[str, Any] = dataclasses.field(default_factory=dict)
    platform: str = dataclasses.field(default_factory=lambda: jax.default_backend())
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def derived_weight(self, kind: str, source: Any, make: Callable[[], Any]) -> Any:
        """``make()`` once per ``(kind, source)`` for all programs sharing ``analysis``.

        The programs one pipeline optimizes (prefill, decode ...) share their
        weight arrays; a pass that derives a new weight from one (quantized,
        re-laid-out) uses this so the derived buffers are shared too, instead
        of one copy per program. ``kind`` must name everything ``make`` depends on.
        """
        memo = self.analysis.setdefault("derived_weights", {})
        key = (kind, id(source))
        if key not in memo or memo[key][0] is not source:
            memo[key] = (source, make())  # holding `source` keeps its id from being reused
        return memo[key][1]


@dataclasses.dataclass(frozen=True)
class Pass:
    """Base class of passes (subclasses are frozen dataclasses; fields are options)."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    needs: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    # Passes that read or reshape expert weights as stacked [E, k, n] arrays set this.
    needs_stacked_experts: ClassVar[bool] = False

    def run(self, program: Program, ctx: PassContext) -> Program:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, program: Program, ctx: PassContext) -> None:
        """Raise :class:`PassError` if this pass cannot apply to ``program`` (default: no check)."""

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}

    def __str__(self) -> str:
        changed = []
        for f in dataclasses.fields(self):
            if not f.repr:
                continue
            v = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else object())
            if v != default:
                changed.append(f"{f.name}={_fmt_value(v)}")
        return self.name + (f"({','.join(changed)})" if changed else "")


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
        if default is not dataclasses.MISSING and default is not None and val is not None:
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
        raise PassError(f"pass {cls.name}: {e}") from None


def pipeline_to_str(passes: Sequence["Pass"]) -> str:
    return ",".join(str(p) for p in passes)


# --------------------------------------------------------------------------
# The pass manager.
# --------------------------------------------------------------------------
@dataclasses.dataclass
class Stage:
    """The program after one pass, with its statistics."""

    name: str
    program: Program
    stats: dict[str, Any]
    seconds: float
    exact: bool | None = None
    max_deviation: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        return f"== stage {self.name} ==\n{self.program}"


def _tolerance(dtype) -> tuple[float, float]:
    return (2e-2, 2e-2) if jnp.dtype(dtype).itemsize <= 2 else (1e-4, 1e-4)


def check_outputs_close(before: Any, after: Any, what: str) -> float:
    """Largest deviation between two output pytrees; raises PassError past tolerance."""
    worst = 0.0
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise PassError(f"{what}: output shape changed from {a.shape} to {b.shape}")
        if not np.issubdtype(a.dtype, np.floating) and a.dtype != jnp.bfloat16:
            if not np.array_equal(a, b):
                raise PassError(f"{what}: integer output changed")
            continue
        a32, b32 = a.astype(np.float32), b.astype(np.float32)
        dev = float(np.max(np.abs(a32 - b32))) if a.size else 0.0
        atol, rtol = _tolerance(a.dtype)
        scale = float(np.max(np.abs(a32))) if a.size else 0.0
        if not np.isfinite(dev) or dev > atol + rtol * scale:
            raise PassError(f"{what}: outputs differ by up to {dev:.3g} (allowed {atol + rtol * scale:.3g} for "
                            f"outputs of magnitude {scale:.3g}); the pass is declared exact but changed the result")
        worst = max(worst, dev)
    return worst


class PassManager:
    """Runs passes in order, checking and recording a :class:`Stage` after each."""

    def __init__(self, passes: str | Sequence[Pass | str], *, dump_dir: str | Path | None = None,
                 check_exact: bool = True, verbose: Callable[[str], None] | None = None):
        items: list[Pass] = []
        for p in [passes] if isinstance(passes, str) else passes:
            items.extend(parse_pipeline(p) if isinstance(p, str) else [p])
        for p in items:
            if not isinstance(p, Pass):
                raise PassError(f"pipeline item {p!r} is not a Pass (or a pipeline string)")
        self.passes = items
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.check_exact = check_exact
        self.verbose = verbose

    def run(self, program: Program, ctx: PassContext, *, label: str = "") -> list[Stage]:
        stages = [Stage("input", program, stats.program_stats(program), 0.0)]
        self._dump(stages[-1], 0, label)
        reference = None
        for i, p in enumerate(self.passes, start=1):
            self._check_needs(p, program, i)
            p.check(program, ctx)
            if self.verbose:
                self.verbose(f"[{i}/{len(self.passes)}] {p}{' (' + label + ')' if label else ''}")
            t0 = time.perf_counter()
            try:
                new = p.run(program, ctx)
            except PassError:
                raise
            except Exception as e:
                raise PassError(f"pass {p} failed: {type(e).__name__}: {e}") from e
            seconds = time.perf_counter() - t0
            if not isinstance(new, Program):
                raise PassError(f"pass {p} returned {type(new).__name__}, not a Program")
            try:
                jcore.check_jaxpr(new.jaxpr.jaxpr)
            except Exception as e:
                raise PassError(f"pass {p} produced an ill-typed program: {e}") from e
            deviation = None
            if p.exact and self.check_exact and ctx.example_args:
                if reference is None:
                    reference = program(*ctx.example_args, **ctx.example_kwargs)
                after = new(*ctx.example_args, **ctx.example_kwargs)
                deviation = check_outputs_close(reference, after, f"exactness check of pass {p}")
            if not p.exact:
                reference = None  # later exact passes compare against this lossy stage
            stage = Stage(str(p), new, stats.program_stats(new), seconds, exact=p.exact, max_deviation=deviation)
            stages.append(stage)
            self._dump(stage, i, label)
            program = new
        return stages

    def _check_needs(self, p: Pass, program: Program, index: int) -> None:
        if p.needs_stacked_experts and any(expert_layout.is_split(w) for w in program.weights.values()):
            raise PassError(f"pass {p} (#{index}) needs stacked expert weights, but an earlier select-impl stored "
                            f"them one buffer per expert (the CPU layout); run {p.name} before select-impl, or "
                            f"use select-impl(layout=stacked)")
        for need in p.needs:
            if need not in program.metadata:
                providers = [name for name, cls in registered_passes().items() if need in cls.provides]
                fix = f"add {' or '.join(providers)} before it" if providers else "run a pass that provides it first"
                raise PassError(f"pass {p} (#{index}) needs {need!r}, which no earlier pass provided; {fix}, "
                                f"e.g. '{providers[0] + ',' if providers else ''}{p}'")

    def _dump(self, stage: Stage, index: int, label: str) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{index:02d}_{_slug(stage.name)}" + (f".{label}" if label else "")
        (self.dump_dir / f"{stem}.txt").write_text(str(stage.program))
        inspection.render_dot(inspection.moe_graph_dot(stage.program, stage.name), self.dump_dir / f"{stem}.dot")
        meta = {"index": index, "pass": stage.name, "label": label, "seconds": stage.seconds,
                "exact": stage.exact, "max_deviation": stage.max_deviation, "stats": stage.stats}
        (self.dump_dir / f"{stem}.json").write_text(json.dumps(meta, indent=2, default=str))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_")[:60] or "stage"
