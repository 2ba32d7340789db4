"""Expert offloading at run time: a resident expert cache, a slow tier, next-layer prefetch.

The ``offload`` pass (:mod:`moejax.passes.offload`) returns an
:class:`OffloadedProgram`: the same jaxpr, run as the parts
:func:`moejax.partition.partition` cuts at the expert ops. Between the parts,
:class:`OffloadRuntime` reads which experts the layer routed to (the group
sizes), makes them resident (cache hits, or reads from the slow tier that
evict what the cache policy picks) and runs the expert op on exactly those
experts, in the op's own implementation. Prefetch applies the *next* layer's
router to the current layer's router input and loads its predicted experts on
a background thread while the current layer computes (the mixtral-offloading /
ProMoE predictor).

Exactness: the expert op runs with the same implementation on the routed
experts only, listed in expert order with their group sizes, so every row
meets the same weights in the same order as in the full program; padding
groups are empty. Outputs are checked bit for bit by the pass manager.

Nothing recompiles per step: the parts, the predictor and the expert op are
compiled once per traced signature; the op always receives
``min(num_experts, rows)`` experts (unused entries repeat a routed one and have
empty groups).

One runtime serves all the signatures one ``optimize`` call traces (forward,
prefill, decode): they share the store and the cache. Counters are kept per
program (:class:`OffloadCounters`), so a report can show the decode steps alone.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from moejax import dialect, expert_layout
from moejax.expert_cache import ExpertCache
from moejax.expert_store import ExpertStore
from moejax.partition import ExpertSite, Partition
from moejax.program import Program

__all__ = ["OffloadCounters", "OffloadRuntime", "OffloadedProgram", "offloaded_programs", "report_fields",
           "reset_counters"]


READ_THREADS = 4  # measured on this VM's disk (O_DIRECT, 384 KiB reads): 294 MB/s at 1 outstanding, 744 at 4


@dataclasses.dataclass
class OffloadCounters:
    """What one program's calls did: expert lookups, bytes moved from the slow tier, prefetch quality."""

    tokens: int = 0
    calls: int = 0
    hits: dict[int, int] = dataclasses.field(default_factory=dict)  # per site
    misses: dict[int, int] = dataclasses.field(default_factory=dict)
    bytes_moved: int = 0  # demand reads + prefetch reads
    prefetch_bytes: int = 0
    predicted: int = 0  # experts predicted (per site and call, distinct)
    predicted_used: int = 0  # of those, routed to
    used_with_prediction: int = 0  # experts routed to at sites that had a prediction

    def _add(self, table: dict[int, int], site: int) -> None:
        table[site] = table.get(site, 0) + 1

    def hit_rate(self, site: int | None = None) -> float | None:
        h = self.hits.get(site, 0) if site is not None else sum(self.hits.values())
        m = self.misses.get(site, 0) if site is not None else sum(self.misses.values())
        return h / (h + m) if h + m else None

    @property
    def prefetch_recall(self) -> float | None:
        return self.predicted_used / self.used_with_prediction if self.used_with_prediction else None

    @property
    def prefetch_precision(self) -> float | None:
        return self.predicted_used / self.predicted if self.predicted else None

    @property
    def bytes_moved_per_token(self) -> float | None:
        return self.bytes_moved / self.tokens if self.tokens else None

    def as_dict(self) -> dict[str, Any]:
        sites = sorted(set(self.hits) | set(self.misses))
        return {"tokens": self.tokens, "calls": self.calls, "expert_cache_hit_rate": self.hit_rate(),
                "hit_rate_per_layer": [self.hit_rate(s) for s in sites], "bytes_moved": self.bytes_moved,
                "bytes_moved_per_token": self.bytes_moved_per_token, "prefetch_bytes": self.prefetch_bytes,
                "prefetch_recall": self.prefetch_recall, "prefetch_precision": self.prefetch_precision}


def _compact_expert_op(site: ExpertSite) -> Any:
    """The site's expert op on a compact list of experts: ``(rows, group sizes [G], experts) -> out``."""
    kwargs = {k: v for k, v in site.params.items() if k not in ("weights_tree", "weight_format")}
    split = tuple(expert_layout.is_split(w) for w in site.weights)

    def run(grouped, group_sizes, experts):
        weights = []
        for j, per_expert in enumerate(split):
            values = expert_layout.PerExpertWeights(tuple(x[j] for x in experts))
            weights.append(values if per_expert else expert_layout.stack_experts(values))
        return dialect.moe_expert_ffn(grouped, group_sizes, tuple(weights), **kwargs)

    return run


@dataclasses.dataclass(frozen=True, eq=False)
class _Step:
    """One jitted call: site ``k-1``'s expert op, then segment ``k`` (fused: half the calls per layer)."""

    fn: Any
    segment_inputs: tuple[Any, ...]  # segment k's inputs, less site k-1's output (computed inside)


def _make_step(part: Partition, k: int) -> _Step:
    seg = part.segments[k]
    prev = part.sites[k - 1] if k else None
    op = _compact_expert_op(prev) if prev is not None else None
    inputs = tuple(v for v in seg.inputs if prev is None or v is not prev.output)

    def step(seg_args, expert_args):
        values = dict(zip(inputs, seg_args))
        out = None
        if op is not None:
            out = values[prev.output] = op(*expert_args)
        return out, seg.fn(*[values[v] for v in seg.inputs])

    return _Step(jax.jit(step), inputs)


@functools.partial(jax.jit, static_argnames="routing")
def _predict(x, *router_weights, routing: dialect.Routing):
    """Expert ids ``[T, K]`` that ``routing`` with ``router_weights`` picks for tokens ``x``.

    A call of its own, not fused into the parts: the parts compile the same with or
    without prefetch, so every policy and option gives the same bits.
    """
    return dialect.route_reference(x, *router_weights, routing=routing)[1]


@functools.lru_cache(maxsize=256)  # once per layer routing, not per decode step
def _prediction_routing(routing: dialect.Routing, prefetch_k: int) -> dialect.Routing:
    """The next layer's routing, with static top-``prefetch_k`` if set (more recall, more reads).

    Merged layers (an ``expert_map``) keep their own routing.
    """
    if not prefetch_k or routing.expert_map is not None:
        return routing
    if routing.score == "sparsemixer":
        # SparseMixer's two picks are the two largest logits, so softmax top-k names them (and more when k > 2).
        return dataclasses.replace(routing, k=prefetch_k, gating="topk", max_k=None, score="softmax")
    return dataclasses.replace(routing, k=prefetch_k, gating="topk", max_k=None)


class OffloadRuntime:
    """The slow tier, the resident cache and the prefetcher shared by the programs of one pipeline."""

    def __init__(self, store: ExpertStore, capacity_bytes: int, policy: str = "lru", prefetch: bool = True,
                 profile: dict[tuple[int, int], float] | None = None, prefetch_k: int = 0):
        self.store = store
        self.prefetch_k = prefetch_k
        self.cache = ExpertCache(capacity_bytes, policy, profile)
        self.prefetch = prefetch
        self.resident: dict[tuple[int, int], Any] = {}
        self.inflight: dict[tuple[int, int], concurrent.futures.Future] = {}
        # reads (demand and prefetch) run on a few threads: pread releases the GIL, disks like queue depth
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="moejax-read")

    def pin(self, keys: list[tuple[int, int]]) -> None:
        """Load ``keys`` now and keep them resident for good (never evicted); they count in the budget."""
        for key in keys:
            if self.cache.admit(key, self.store.expert_nbytes(key[0]), protected=self.cache.pinned) is None:
                raise ValueError(f"pinned experts do not fit the resident budget of {self.cache.capacity} bytes "
                                 f"(expert {key[1]} of layer {key[0]} does not); pin fewer or raise resident")
            self.cache.pinned.add(key)
            self.resident[key] = self.store.read(*key)

    @property
    def capacity_bytes(self) -> int:
        return self.cache.capacity

    def describe(self) -> dict[str, Any]:
        """The plan, as program metadata (JSON-able)."""
        return {"resident_expert_bytes": self.cache.capacity, "expert_bytes": self.store.total_bytes,
                "policy": self.cache.policy, "prefetch": self.prefetch, **self.store.describe()}

    # ---- making experts resident -------------------------------------------
    def _evict(self, keys: list[tuple[int, int]]) -> None:
        for k in keys:
            self.resident.pop(k, None)
            self.inflight.pop(k, None)

    def _value(self, key: tuple[int, int]) -> Any:
        future = self.inflight.pop(key, None)
        if future is not None:
            self.resident[key] = future.result()
        return self.resident[key]

    def _fetch(self, site: int, experts: list[int], counters: OffloadCounters,
               then: Callable[[], None] = lambda: None) -> list[Any]:
        """Device values of ``experts`` of ``site``: cached, prefetched, or read now (evicting per policy).

        Misses are submitted first and read in parallel (a disk serves several outstanding
        reads faster than one); ``then`` (the next layer's prefetch) is started after them,
        so predictions never queue ahead of what this layer needs.
        """
        keys = [(site, e) for e in experts]
        reads = {}
        for key in keys:
            if self.cache.lookup(key):
                counters._add(counters.hits, site)
            else:
                counters._add(counters.misses, site)
                reads[key] = self._pool.submit(self.store.read, *key)
        then()
        values = {key: self._value(key) for key in keys if key not in reads}
        for key, future in reads.items():
            values[key] = future.result()
            counters.bytes_moved += self.store.expert_nbytes(site)
            # this layer's experts and the next layer's prefetches stay
            evicted = self.cache.admit(key, self.store.expert_nbytes(site),
                                       protected=keys + [k for k in self.inflight if k[0] == site + 1])
            if evicted is not None:  # None: no room beside this layer's experts; used once, not kept
                self._evict(evicted)
                self.resident[key] = values[key]
        return [values[k] for k in keys]

    def _start_prefetch(self, site: int, experts: set[int], protected: list[tuple[int, int]],
                        counters: OffloadCounters) -> None:
        for e in sorted(experts):
            key = (site, e)
            if key in self.cache:
                continue
            evicted = self.cache.admit(key, self.store.expert_nbytes(site),
                                       protected=[*protected, *(k for k in self.inflight if k[0] == site)], cold=True)
            if evicted is None:
                continue
            self._evict(evicted)
            self.inflight[key] = self._pool.submit(self.store.read, site, e)
            counters.bytes_moved += self.store.expert_nbytes(site)
            counters.prefetch_bytes += self.store.expert_nbytes(site)

    # ---- one call -------------------------------------------------------------
    def steps(self, part: Partition) -> list[_Step]:
        """The fused calls for ``part`` (built once per program)."""
        return [_make_step(part, k) for k in range(len(part.segments))]

    def run(self, part: Partition, steps: list[_Step], inputs: list[Any], counters: OffloadCounters) -> list[Any]:
        """Run ``part`` on ``inputs``, bringing each layer's routed experts in on demand."""
        env = dict(part.initial)
        env.update(zip(part.input_vars, inputs))
        predicted: dict[int, set[int]] = {}
        expert_args = None
        counters.calls += 1
        for k, step in enumerate(steps):
            out, seg_out = step.fn([_read(env, v) for v in step.segment_inputs], expert_args)
            if k:
                env[part.sites[k - 1].output] = out
            env.update(zip(part.segments[k].outputs, seg_out))
            if k == len(part.sites):
                break
            expert_args = self._layer(part, k, env, predicted, counters)
            for v in part.release_after[k]:
                env.pop(v, None)
        return [_read(env, v) for v in part.outvars]

    def _layer(self, part: Partition, k: int, env: dict[Any, Any], predicted: dict[int, set[int]],
               counters: OffloadCounters) -> tuple[Any, ...]:
        """Between segment ``k`` and expert op ``k``: route, predict the next layer, bring experts in."""
        site = part.sites[k]
        nxt = part.sites[k + 1] if k + 1 < len(part.sites) else None
        guess = None
        if self.prefetch and nxt is not None and nxt.router is not None and site.router is not None:
            # the next layer's router on this layer's router input
            guess = _predict(env[site.router.x], *nxt.router.weights,
                             routing=_prediction_routing(nxt.router.routing, self.prefetch_k))
        self.cache.cursor = (k, len(part.sites))
        sizes, guess = jax.device_get((env[site.group_sizes], guess))  # one host round trip per layer
        used = [int(e) for e in np.flatnonzero(sizes)]
        if k == 0 and site.router is not None:
            counters.tokens += int(site.router.x.aval.shape[0])
        if k in predicted:
            counters.predicted += len(predicted[k])
            counters.predicted_used += len(predicted[k] & set(used))
            counters.used_with_prediction += len(used)
        prefetch = lambda: None  # noqa: E731
        if guess is not None:  # the next layer's reads overlap this layer's compute
            predicted[k + 1] = {int(e) for e in np.ravel(guess) if e >= 0}
            prefetch = functools.partial(self._start_prefetch, k + 1, predicted[k + 1], [(k, e) for e in used],
                                         counters)
        return self._expert_args(site, env[site.grouped], sizes, used, self._fetch(k, used, counters, prefetch))

    def _expert_args(self, site: ExpertSite, grouped, sizes: np.ndarray, used: list[int], values: list[Any]):
        """Arguments of the compact expert op: the routed experts in expert order, padded with empty groups."""
        g = min(site.num_experts, int(grouped.shape[0]))
        compact = np.zeros((g,), np.int32)
        compact[:len(used)] = sizes[used]
        if not values:  # every slot dropped: any weights of the right type, with empty groups
            values = [self._zeros(site.index)]
        return grouped, compact, tuple(values) + (values[-1],) * (g - len(values))

    def _zeros(self, site: int) -> Any:
        layout = self.store.layouts[site]
        return jax.tree_util.tree_unflatten(layout.treedef, [jnp.zeros(s, d) for s, d in
                                                              zip(layout.shapes, layout.dtypes)])

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclasses.dataclass(frozen=True, eq=False)
class OffloadedProgram(Program):
    """A program whose experts live in a slow tier; calls run through its :class:`OffloadRuntime`.

    It is delivered as is (its parts compile the dialect ops' implementations);
    rewriting it is refused: ``offload`` must be the last pass.
    """

    partition: Partition | None = None
    runtime: OffloadRuntime | None = None
    counters: OffloadCounters = dataclasses.field(default_factory=OffloadCounters)

    delivers_itself = True  # moejax.lowering returns it unchanged

    @functools.cached_property
    def _steps(self) -> list[_Step]:
        return self.runtime.steps(self.partition)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs = self.check_inputs(args, kwargs)
        outs = self.runtime.run(self.partition, self._steps, inputs, self.counters)
        return jax.tree_util.tree_unflatten(self.out_tree, outs)

    def rewrite(self, *args: Any, **kwargs: Any) -> Program:
        raise ValueError("the program is offloaded; run offload as the last pass of the pipeline")


def _read(env: dict[Any, Any], var: Any) -> Any:
    return var.val if isinstance(var, jcore.Literal) else env[var]


def offloaded_programs(model: Any) -> list[OffloadedProgram]:
    """The offloaded programs an :class:`~moejax.optimize.OptimizedModel` delivers (empty if none)."""
    return [p for p in getattr(model, "_final", []) if isinstance(p, OffloadedProgram)]


def reset_counters(model: Any) -> None:
    """Zero the counters of every offloaded program of ``model``."""
    for p in offloaded_programs(model):
        p.counters.__init__()


def report_fields(model: Any, program: Program | None = None) -> dict[str, Any]:
    """Offload fields for a report row: the plan plus what ``program``'s calls measured.

    ``program`` defaults to the decode program when the model has one (decode is
    where offloading costs time), else the main one. Empty when nothing is offloaded.
    """
    programs = offloaded_programs(model)
    if not programs:
        return {}
    if program is None:
        program = model.delivered("decode") if "decode" in getattr(model, "signatures", ()) else programs[0]
    fields = {"resident_expert_bytes": program.runtime.capacity_bytes}
    fields.update(program.counters.as_dict())
    return fields
