"""Analysis results as typed data, and the store the programs of one ``optimize`` call share.

Analysis passes measure or decide something once and later passes (and the
other programs of the same ``optimize`` call: prefill, decode) read it:

* :class:`RoutingProfile` (a :class:`LayerRouting` per layer), key ``routing_profile``:
  measured by ``profile``, re-measured by ``gating``, ``prune`` and ``merge``;
* :class:`PrunePlan`, key ``prune_plan``: the experts ``prune`` keeps;
* :class:`MergePlan`, key ``merge_plan``: the clusters ``merge`` joins;
* :class:`BitAllocation`, key ``bit_allocation``: bits per expert of ``quantize(mixed=true)``.

Each result is readable from a stage's program metadata with :func:`read`
(``analysis.read(stage.program.metadata, RoutingProfile)``) and round-trips
through JSON (``to_json()`` / ``from_json()``, arrays as nested lists).

Program metadata holds each result's *plain* form (``to_metadata()``: dicts,
lists and numpy arrays), not the object: a saved program's structure file may
only name allow-listed classes (:mod:`moejax.serialization`), and the plain
form keeps the long-standing read access ``metadata["routing_profile"][layer]["counts"]``.
The typed objects also keep that read access (``profile[layer]["counts"]``),
so code may be handed either.

:class:`AnalysisStore` is ``PassContext.analysis``: results by (class, pipeline
step), where a step is a pass's spelling plus how many times an equal pass
ran before it on that program (``profile#0``, ``prune(num_experts=6)#0``), so
the decode program's ``prune`` finds the plan its prefill ``prune`` made, and
a pipeline that profiles twice keeps both profiles apart.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np

__all__ = ["AnalysisResult", "LayerRouting", "RoutingProfile", "LayerPrune", "PrunePlan", "MergePlan",
           "BitAllocation", "RouterCalibration", "DistilledWeights", "RESULT_TYPES", "read", "write", "AnalysisStore",
           "DerivedWeights"]

T = TypeVar("T", bound="AnalysisResult")


def _to_list(a: Any) -> Any:
    return None if a is None else np.asarray(a).tolist()


def _array(a: Any, dtype: Any, ndim: int | None = None, trailing: tuple[int, ...] = ()) -> np.ndarray | None:
    """``a`` as an array of ``dtype`` (no copy when it already is one); empty lists regain ``trailing`` dims."""
    if a is None:
        return None
    arr = np.asarray(a, dtype)
    if ndim is not None and arr.ndim < ndim and arr.size == 0:  # [[]] from JSON lost the trailing dims
        arr = arr.reshape(arr.shape + (0,) * (ndim - arr.ndim - len(trailing)) + trailing)
    return arr


class AnalysisResult:
    """Base of typed analysis results: a declared metadata ``key``, a plain form and JSON."""

    key: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe plain data (arrays as nested lists)."""
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        raise NotImplementedError

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return cls.from_dict(json.loads(text))

    def to_metadata(self) -> Any:
        """The plain form stored in program metadata under ``key``."""
        return self.to_dict()

    @classmethod
    def from_metadata(cls: type[T], value: Any) -> T:
        """The result from its plain form in metadata (or the result itself)."""
        return value if isinstance(value, cls) else cls.from_dict(value)


class _FieldAccess:
    """``entry["counts"]`` read access to a result's non-None array fields (the pre-typed spelling)."""

    def __getitem__(self, key: str) -> Any:
        if key in self:
            return getattr(self, key)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._fields() and getattr(self, key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def keys(self) -> list[str]:
        return [k for k in self._fields() if k in self]

    @classmethod
    def _fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]


class _LayerMap:
    """Read-only mapping access ``result[layer]`` over a result's ``layers`` dict."""

    layers: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.layers[name]

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def get(self, name: str, default: Any = None) -> Any:
        return self.layers.get(name, default)

    def keys(self):
        return self.layers.keys()

    def values(self):
        return self.layers.values()

    def items(self):
        return self.layers.items()


# --------------------------------------------------------------------------
# The routing profile.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class LayerRouting(_FieldAccess):
    """How one MoE layer routed the calibration tokens; ``S`` = stacked layers (1 unrolled), ``E`` experts.

    Only ``counts`` is required: hand-made profiles (tests, placement) may give
    just that; the profile pass fills every field.
    """

    counts: np.ndarray  # [S, E] float64: routing slots per expert
    frequency: np.ndarray | None = None  # [S, E] float64: counts / slots
    mass: np.ndarray | None = None  # [S, E] float64: summed combine weights
    coactivation: np.ndarray | None = None  # [S, E, E] float64: tokens routed to both (diagonal = counts)
    output_mean: np.ndarray | None = None  # [S, E, d] float32: mean expert output over its rows
    inputs: np.ndarray | None = None  # [S, n, d] float32: a sample of the layer's input tokens
    tokens: int | None = None  # calibration tokens counted
    mean_active: float | None = None  # measured experts per token

    _DTYPES: ClassVar[dict[str, tuple[Any, int]]] = {
        "counts": (np.float64, 2), "frequency": (np.float64, 2), "mass": (np.float64, 2),
        "coactivation": (np.float64, 3), "output_mean": (np.float32, 3), "inputs": (np.float32, 3)}

    @property
    def stack(self) -> int:
        return int(np.shape(self.counts)[0])

    @property
    def num_experts(self) -> int:
        return int(np.shape(self.counts)[-1])

    def _plain(self, arrays: Callable[[Any], Any]) -> dict[str, Any]:
        out: dict[str, Any] = {k: arrays(getattr(self, k)) for k in self._DTYPES if getattr(self, k) is not None}
        if self.tokens is not None:
            out["tokens"] = int(self.tokens)
        if self.mean_active is not None:
            out["mean_active"] = float(self.mean_active)
        return out

    def to_dict(self) -> dict[str, Any]:
        return self._plain(_to_list)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerRouting":
        if isinstance(data, LayerRouting):
            return data
        if "counts" not in data:
            raise ValueError(f"a routing-profile layer needs 'counts'; got keys {sorted(data)}")
        counts = np.asarray(data["counts"], np.float64)
        if counts.ndim == 1:  # one unstacked layer written without the stack axis
            counts = counts[None]
        d = np.shape(data["output_mean"])[-1] if data.get("output_mean") is not None else None
        fields = {}
        for k, (dtype, ndim) in cls._DTYPES.items():
            if k == "counts":
                continue
            trailing = (d,) if k == "inputs" and d is not None else ()
            fields[k] = _array(data.get(k), dtype, ndim, trailing)
        tokens = data.get("tokens")
        mean_active = data.get("mean_active")
        return cls(counts=counts, tokens=None if tokens is None else int(tokens),
                   mean_active=None if mean_active is None else float(mean_active), **fields)


@dataclasses.dataclass(frozen=True, eq=False)
class RoutingProfile(_LayerMap, AnalysisResult):
    """The routing profile of a program: per MoE layer name, a :class:`LayerRouting`.

    ``profile.layers["layers/*/mlp"].counts``; ``profile["layers/*/mlp"]["counts"]`` reads the same.
    """

    key: ClassVar[str] = "routing_profile"
    layers: dict[str, LayerRouting]
    source: str = ""  # what it was measured on (metadata keeps it as "routing_profile_source")

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "layers": {name: layer.to_dict() for name, layer in self.layers.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RoutingProfile":
        return cls({name: LayerRouting.from_dict(entry) for name, entry in data["layers"].items()},
                   str(data.get("source", "")))

    @classmethod
    def from_metadata(cls, value: Any) -> "RoutingProfile":
        """From the metadata form ``{layer: {"counts": ..., ...}}`` (or the profile itself)."""
        if isinstance(value, cls):
            return value
        return cls({name: LayerRouting.from_dict(entry) for name, entry in value.items()})

    @functools.cached_property
    def _metadata(self) -> dict[str, dict[str, Any]]:
        return {name: layer._plain(lambda a: a) for name, layer in self.layers.items()}

    def to_metadata(self) -> dict[str, dict[str, Any]]:
        """``{layer: {"counts": ndarray, ...}}``, built once so programs sharing this profile share one dict."""
        return self._metadata

    def mean_active(self) -> float:
        """Token-weighted mean active experts per token over every profiled layer (0 without measurements)."""
        num = den = 0.0
        for layer in self.layers.values():
            if layer.mean_active is None or layer.tokens is None:
                continue
            num += layer.mean_active * layer.tokens * layer.stack
            den += layer.tokens * layer.stack
        return num / den if den else 0.0


# --------------------------------------------------------------------------
# Plans.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerPrune:
    """Kept expert ids per stack row (sorted) and, for ``reconstruction``, each row's relative error."""

    kept: tuple[tuple[int, ...], ...]
    relative_error: tuple[float | None, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"kept": [list(k) for k in self.kept], "relative_error": list(self.relative_error)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerPrune":
        return cls(tuple(tuple(int(e) for e in row) for row in data["kept"]),
                   tuple(None if e is None else float(e) for e in data["relative_error"]))


@dataclasses.dataclass(frozen=True)
class PrunePlan(_LayerMap, AnalysisResult):
    """Which experts ``prune`` keeps in each layer."""

    key: ClassVar[str] = "prune_plan"
    method: str
    num_experts: int
    layers: dict[str, LayerPrune]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "num_experts": self.num_experts,
                "layers": {n: p.to_dict() for n, p in self.layers.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PrunePlan":
        return cls(str(data["method"]), int(data["num_experts"]),
                   {n: LayerPrune.from_dict(p) for n, p in data["layers"].items()})


@dataclasses.dataclass(frozen=True)
class MergePlan(_LayerMap, AnalysisResult):
    """The clusters ``merge`` joins in each layer: per layer, per stack row, clusters of expert ids."""

    key: ClassVar[str] = "merge_plan"
    similarity: str
    num_experts: int
    layers: dict[str, tuple[tuple[tuple[int, ...], ...], ...]]

    @staticmethod
    def clusters_of(rows: Any) -> tuple[tuple[tuple[int, ...], ...], ...]:
        """Nested lists of expert ids as the plan's tuples."""
        return tuple(tuple(tuple(int(e) for e in c) for c in row) for row in rows)

    def to_dict(self) -> dict[str, Any]:
        return {"similarity": self.similarity, "num_experts": self.num_experts,
                "layers": {n: [[list(c) for c in row] for row in rows] for n, rows in self.layers.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MergePlan":
        return cls(str(data["similarity"]), int(data["num_experts"]),
                   {n: cls.clusters_of(rows) for n, rows in data["layers"].items()})


@dataclasses.dataclass(frozen=True, eq=False)
class BitAllocation(_LayerMap, AnalysisResult):
    """Bits per expert, ``int [S, E]`` per layer, chosen by ``quantize(mixed=true)`` under ``budget``.

    ``measured_kl[layer][bits]``: the end-to-end KL (nats per token) measured with
    only that layer's experts quantized at ``bits``, which weighs the layers against
    each other; ``candidate_kl[name]``: the measured KL of each whole allocation
    tried (the chosen one is the least). Both empty when nothing could be measured.
    """

    key: ClassVar[str] = "bit_allocation"
    budget: float
    layers: dict[str, np.ndarray]
    measured_kl: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)
    candidate_kl: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"budget": float(self.budget), "layers": {n: _to_list(b) for n, b in self.layers.items()},
                **self._measurements()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BitAllocation":
        return cls(float(data["budget"]), {n: np.asarray(b, np.int64) for n, b in data["layers"].items()},
                   {n: {int(b): float(v) for b, v in kl.items()} for n, kl in data.get("measured_kl", {}).items()},
                   {n: float(v) for n, v in data.get("candidate_kl", {}).items()})

    def _measurements(self) -> dict[str, Any]:
        return {"measured_kl": {n: {str(b): float(v) for b, v in kl.items()} for n, kl in self.measured_kl.items()},
                "candidate_kl": {n: float(v) for n, v in self.candidate_kl.items()}}

    @functools.cached_property
    def _metadata(self) -> dict[str, Any]:
        return {"budget": float(self.budget), "layers": dict(self.layers), **self._measurements()}

    def to_metadata(self) -> dict[str, Any]:
        """``{"budget": float, "layers": {layer: int ndarray [S, E]}, "measured_kl": {layer: {"bits": kl}},
        "candidate_kl": {name: kl}}`` (built once)."""
        return self._metadata


@dataclasses.dataclass(frozen=True, eq=False)
class DistilledWeights(AnalysisResult):
    """What ``distill`` trained: weights by path, the held-out KL to the source before/after (nats per token),
    and which calibration text it trained on.

    Shared by the programs of one optimize call (they get the same weights); the
    metadata form keeps only the figures.
    """

    key: ClassVar[str] = "distilled_weights"
    weights: dict[str, Any]
    error_before: float
    error_after: float
    calibration: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"error_before": self.error_before, "error_after": self.error_after, "weights": sorted(self.weights),
                "calibration": self.calibration}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DistilledWeights":
        return cls({}, float(data["error_before"]), float(data["error_after"]), str(data.get("calibration", "")))


@dataclasses.dataclass(frozen=True, eq=False)
class RouterCalibration(DistilledWeights):
    """What ``recalibrate-router`` trained: router weights by path, and its error vs the source before/after."""

    key: ClassVar[str] = "router_calibration"


RESULT_TYPES: dict[str, type[AnalysisResult]] = {
    cls.key: cls for cls in (RoutingProfile, PrunePlan, MergePlan, BitAllocation, RouterCalibration,
                             DistilledWeights)}


def _declared(cls: type) -> str:
    """``cls.key`` if ``cls`` is a declared result type, else a KeyError naming the declared ones."""
    key = getattr(cls, "key", None)
    if not isinstance(key, str) or RESULT_TYPES.get(key) is not cls:
        raise KeyError(f"{cls.__name__} is not a declared analysis result ({sorted(RESULT_TYPES)})")
    return key


def read(metadata: Mapping[str, Any], cls: type[T]) -> T | None:
    """The ``cls`` result stored in program ``metadata`` (under ``cls.key``), or None."""
    value = metadata.get(_declared(cls))
    return None if value is None else cls.from_metadata(value)


def write(metadata: Mapping[str, Any], *results: AnalysisResult) -> dict[str, Any]:
    """A copy of ``metadata`` with each result's plain form under its key."""
    out = dict(metadata)
    for r in results:
        out[_declared(type(r))] = r.to_metadata()
    return out


# --------------------------------------------------------------------------
# The store shared by the programs of one optimize call.
# --------------------------------------------------------------------------
class DerivedWeights:
    """Weights derived from a source weight (quantized, re-laid-out), made once per (kind, source).

    Sources are matched by identity; an entry is dropped when its source is
    garbage collected (sources that take no weak reference are held instead),
    so a recycled ``id`` never returns another weight's result.
    """

    def __init__(self) -> None:
        self._memo: dict[tuple[str, int], tuple[Callable[[], Any], Any]] = {}

    def get(self, kind: str, source: Any, make: Callable[[], Any]) -> Any:
        key = (kind, id(source))
        hit = self._memo.get(key)
        if hit is not None and hit[0]() is source:
            return hit[1]
        value = make()
        try:
            ref: Callable[[], Any] = weakref.ref(source)
            weakref.finalize(source, self._memo.pop, key, None)
        except TypeError:  # no weak references: hold the source so its id stays unique
            ref = lambda source=source: source  # noqa: E731
        self._memo[key] = (ref, value)
        return value

    def __len__(self) -> int:
        return len(self._memo)


class AnalysisStore:
    """``PassContext.analysis``: typed results by (class, pipeline step), plus derived weights.

    ``put(step, result)`` records a result; ``get(cls, step)`` finds what the
    same step stored (for another program of the same optimize call);
    ``latest(cls)`` is the most recent result of a class from any step.
    """

    def __init__(self) -> None:
        self._results: dict[tuple[str, str], AnalysisResult] = {}
        self._latest: dict[str, AnalysisResult] = {}
        self.derived_weights = DerivedWeights()
        self._sources: dict[str, Any] = {}  # program signature -> the program the pipeline started from

    def keep_source(self, program: Any) -> None:
        """Remember the first program of each signature (distillation passes use it as the teacher)."""
        self._sources.setdefault(program.signature(), program)

    def source_of(self, program: Any) -> Any:
        """The program this pipeline started from with ``program``'s signature, or None."""
        return self._sources.get(program.signature())

    def put(self, step: str, result: T) -> T:
        key = _declared(type(result))
        self._results[(key, step)] = result
        self._latest[key] = result
        return result

    def get(self, cls: type[T], step: str) -> T | None:
        return self._results.get((_declared(cls), step))  # type: ignore[return-value]

    def latest(self, cls: type[T]) -> T | None:
        return self._latest.get(_declared(cls))  # type: ignore[return-value]

    def steps(self, cls: type[AnalysisResult]) -> list[str]:
        """The steps that stored a ``cls`` result, in order."""
        key = _declared(cls)
        return [s for k, s in self._results if k == key]

    def __repr__(self) -> str:
        return f"AnalysisStore({[f'{k}@{s}' for k, s in self._results]}, derived={len(self.derived_weights)})"
