"""``ep``: expert parallelism as a pass (survey section 4.1).

Each MoE layer's ``moe_dispatch -> moe_expert_ffn -> moe_combine`` run becomes
one ``shard_map`` region over the mesh's expert axis (see
:mod:`moejax.sharding.exchange`); the routed expert weights are laid out by a
:class:`~moejax.sharding.placement.Placement` and stored with a
``NamedSharding`` along their expert dimension (axis 1 for layers stacked under
``scan``). The router stays outside the region, unchanged, and the expert op
stays visible inside it, so later passes (quantization, kernel selection) still
apply to it.

Usage::

    mesh = moejax.sharding.expert_mesh(8)               # or any Mesh with an "expert" axis
    opt = moejax.optimize(model, (tokens,), [ExpertParallel(mesh=mesh, overlap_chunks=2)])
    # pipeline string: "profile,ep(num_devices=8,overlap_chunks=2,replicate_hot=2)"
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import analysis, dataflow, dialect, rewrite
from moejax import weight_formats as wf
from moejax.pipeline import Pass, PassContext, PassError, Tolerance, register_pass
from moejax.program import Program
from moejax.sharding import mesh as mesh_lib
from moejax.sharding.exchange import EPConfig, capacity_for, ep_moe
from moejax.sharding.placement import (Placement, PlacementError, balanced_placement, contiguous_placement,
                                       load_summary)

__all__ = ["ExpertParallel", "LayerInfo", "moe_layers", "expert_parallel_program", "count_dropped"]

LAYOUTS = ("auto", "shard", "replicate")
EXCHANGES = ("auto", "dense", "ragged", "ragged_emulated")
RAGGED_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")
PLACEMENTS = ("auto", "contiguous", "balanced")
# Below this many tokens per device the replicated (decode) layout is used by layout="auto".
MIN_TOKENS_PER_DEVICE = 4


# --------------------------------------------------------------------------
# Finding MoE layers and the weights feeding their expert ops.
# --------------------------------------------------------------------------
@dataclasses.dataclass
class LayerInfo:
    """One MoE layer of a program (a stacked scanned layer counts once)."""

    name: str
    num_experts: int
    tokens: int
    k: int
    trip_count: int
    # weight path -> {leaf position within that weight: axis of the expert dim in the stored leaf}
    weights: dict[str, dict[int, int]] = dataclasses.field(default_factory=dict)


def moe_layers(program: Program) -> dict[str, LayerInfo]:
    """The program's MoE layers by name, with the weight leaves feeding each expert op."""
    layers: dict[str, LayerInfo] = {}
    for site in rewrite.dialect_sites(program.jaxpr, dialect.dispatch_p.name):
        x_aval, ids_aval = (v.aval for v in site.eqn.invars[:2])
        name = site.name
        if name in layers:
            raise PassError(f"ep: two MoE layers share the name {name!r}; layer names must be unique")
        layers[name] = LayerInfo(name, int(site.eqn.params["num_experts"]), int(x_aval.shape[0]),
                                 int(ids_aval.shape[1]), site.trip_count)
    owners = dataflow.leaf_owners(program)
    for read in dataflow.weight_reads(program, lambda e: e.primitive is dialect.expert_ffn_p):
        for _pos, src in read.sources(start=2):  # operands 0, 1: grouped rows, group sizes
            if read.name not in layers:
                raise PassError(f"ep: expert op of layer {read.name!r} has no moe_dispatch; expert parallelism "
                                "rewrites dispatch -> expert ffn -> combine runs (was ep applied already?)")
            owner = owners[src.input]
            # each scan slicing the weight on the way removed one leading axis before the expert axis
            layers[read.name].weights.setdefault(owner.path, {})[owner.position] = src.sliced_axes
    for info in layers.values():
        if not info.weights:
            raise PassError(f"ep: the expert weights of layer {info.name!r} are not program weights (they are "
                            "computed inside the program); expert parallelism needs stored expert weights")
    return layers


# --------------------------------------------------------------------------
# The rewrite: sentinels carry dispatch/ffn operands to the combine, which builds the region.
# --------------------------------------------------------------------------
class _Dispatched:
    """Stands for dispatch's outputs until the combine: the tokens and their expert ids."""

    def __init__(self, x, ids):
        self.x, self.ids = x, ids


class _Computed:
    """Stands for the expert op's output until the combine: dispatch operands plus expert weights."""

    def __init__(self, dispatched: _Dispatched, weights: tuple, params: dict[str, Any]):
        self.dispatched, self.weights, self.params = dispatched, weights, params


def _only(eqns, prim, what, name):
    if len(eqns) != 1 or eqns[0].primitive is not prim:
        got = [e.primitive.name for e in eqns]
        raise PassError(f"ep: layer {name!r}: {what} is read by {got}, expected only {prim.name}; expert "
                        "parallelism rewrites a plain dispatch -> expert ffn -> combine run (apply ep before "
                        "passes that tap or reuse the dispatch outputs)")
    return eqns[0]


def _rules(configs: Mapping[str, EPConfig], placed: bool, tap: bool) -> dict[str, rewrite.Rule]:
    """Rules turning each named layer into its expert-parallel region.

    ``placed``: the expert weights reaching the expert op are already laid out
    by the placement (the real pass); else they are gathered in the rule
    (measuring drops on the original program).
    """

    def dispatch_rule(ctx: rewrite.RuleContext):
        cfg = configs.get(ctx.name)
        if cfg is None:
            return None
        grouped, sizes, order = ctx.eqn.outvars
        ffn = _only(ctx.consumers(grouped), dialect.expert_ffn_p, "the grouped rows", ctx.name)
        if any(e is not ffn for e in ctx.consumers(sizes)):
            raise PassError(f"ep: layer {ctx.name!r}: group sizes are read outside the expert op")
        combine = _only(ctx.consumers(ffn.outvars[0]), dialect.combine_p, "the expert outputs", ctx.name)
        _only(ctx.consumers(order), dialect.combine_p, "the dispatch order", ctx.name)
        if combine.invars[1] is not order:
            raise PassError(f"ep: layer {ctx.name!r}: the combine does not use this dispatch's order")
        x, ids = (rewrite.materialize(v) for v in ctx.invals)
        pending = _Dispatched(x, ids)
        return [pending, pending, pending]

    def ffn_rule(ctx: rewrite.RuleContext):
        if not isinstance(ctx.invals[0], _Dispatched):
            return None
        leaves = ctx.invals[2:]
        if any(wf.is_structured(v) for v in leaves):
            weights = tuple(leaves)
        else:
            weights = tuple(jax.tree_util.tree_unflatten(ctx.params["weights_tree"], leaves))
        if not placed:
            table = jnp.asarray(configs[ctx.name].placement.slot_expert, jnp.int32)
            weights = jax.tree_util.tree_map(lambda w: jnp.take(w, table, axis=0), weights)
        params = {k: ctx.params[k] for k in ("activation", "impl", "name")}
        return _Computed(ctx.invals[0], weights, params)

    def combine_rule(ctx: rewrite.RuleContext):
        computed = ctx.invals[0]
        if not isinstance(computed, _Computed):
            return None
        cfg = configs[ctx.name]
        d = computed.dispatched
        y, dropped = ep_moe(d.x, d.ids, ctx.invals[2], computed.weights, computed.params, cfg)
        if tap and dropped is not None:
            ctx.tap(f"ep_dropped:{ctx.name}", dropped)
        return y

    return {dialect.dispatch_p.name: dispatch_rule, dialect.expert_ffn_p.name: ffn_rule,
            dialect.combine_p.name: combine_rule}


# --------------------------------------------------------------------------
# Weights: lay out by placement, shard along the expert dim.
# --------------------------------------------------------------------------
def _weights_mesh(program: Program) -> Mesh | None:
    """The device mesh the program's weights are sharded over, if any (the first one found)."""
    for leaf in program.weight_leaves:
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def _place_leaf(leaf, axis: int, placement: Placement, mesh, expert_axis: str, path: str):
    if leaf.ndim <= axis or leaf.shape[axis] != placement.num_experts:
        raise PassError(f"ep: weight {path!r} of shape {tuple(leaf.shape)} has no expert dimension of size "
                        f"{placement.num_experts} at axis {axis}")
    spec = P(*([None] * axis), expert_axis)
    shape = list(leaf.shape)
    shape[axis] = placement.num_slots
    sharding = NamedSharding(mesh, spec)
    if isinstance(mesh, AbstractMesh) or isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(shape), leaf.dtype, sharding=sharding)
    if isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) > 1:
        # Already on several devices (loaded with from_pretrained(mesh=...)): gather the slots on the
        # devices, as one collective program that every process joins, never through one host (it may
        # not see the weight whole, and a host copy would double the resident experts).
        slots = np.asarray(placement.slot_expert)
        return jax.jit(lambda a: jnp.take(a, slots, axis=axis), out_shardings=sharding)(leaf)
    host = np.asarray(leaf)
    if not placement.is_identity:
        host = np.take(host, np.asarray(placement.slot_expert), axis=axis)
    # make_array_from_callback works for meshes spanning several processes too.
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _place_weight(value, leaf_axes: dict[int, int], placement: Placement, mesh, expert_axis: str, path: str):
    leaves, tree = jax.tree_util.tree_flatten(value)
    if set(leaf_axes) != set(range(len(leaves))):
        raise PassError(f"ep: weight {path!r}: only some of its leaves feed the expert op; cannot shard it")
    placed = [_place_leaf(l, leaf_axes[i], placement, mesh, expert_axis, path) for i, l in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(tree, placed)


# --------------------------------------------------------------------------
# Placement from the routing profile.
# --------------------------------------------------------------------------
def _profile_loads(profile: analysis.RoutingProfile | None, info: LayerInfo) -> np.ndarray | None:
    layer = profile.layers.get(info.name) if profile is not None else None
    if layer is None:
        return None
    counts = layer.counts
    if counts.ndim != 2 or counts.shape[1] != info.num_experts:
        return None  # profile of another expert count (e.g. taken before merging): not usable
    return counts.sum(0)


def _placement_for(info: LayerInfo, n: int, mode: str, replicate_hot: int, loads: np.ndarray | None) -> Placement:
    try:
        if mode == "balanced" or (mode == "auto" and loads is not None):
            if loads is None:
                raise PassError(f"ep: placement='balanced' needs a routing profile for layer {info.name!r}; run "
                                "the profile pass first ('profile,ep(placement=balanced)')")
            return balanced_placement(loads, n, replicate_hot)
        return contiguous_placement(info.num_experts, n, replicate_hot, loads)
    except PlacementError as e:
        raise PassError(f"ep: layer {info.name!r}: {e}") from None


# --------------------------------------------------------------------------
# The transformation as a function (used by the pass and by export).
# --------------------------------------------------------------------------
def expert_parallel_program(program: Program, mesh: Mesh | AbstractMesh, *, axis: str = "expert",
                            data_axis: str | None = None, capacity_factor: float | None = None,
                            overlap_chunks: int = 1, replicate_hot: int = 0, placement: str = "auto",
                            layout: str = "auto", profile: analysis.RoutingProfile | Mapping[str, Any] | None = None,
                            exchange: str = "dense") -> Program:
    """``program`` with every MoE layer expert-parallel over ``mesh[axis]``.

    With an :class:`~jax.sharding.AbstractMesh` the weights become abstract
    (``ShapeDtypeStruct`` with shardings): the program can be lowered and
    exported (:func:`moejax.sharding.export_program`) but not run.
    """
    mesh_lib.check_axes(mesh, axis, data_axis)
    if exchange not in EXCHANGES[1:]:
        raise PassError(f"ep: exchange must be one of {EXCHANGES[1:]}, got {exchange!r}")
    mesh = mesh_lib.auto_axes(mesh)
    layers = moe_layers(program)
    if not layers:
        raise PassError("ep: the program has no MoE layer (no moe_dispatch); nothing to distribute")
    n = int(mesh.shape[axis])
    n_data = int(mesh.shape[data_axis]) if data_axis else 1
    profile = (analysis.RoutingProfile.from_metadata(profile) if profile is not None
               else analysis.read(program.metadata, analysis.RoutingProfile))
    configs: dict[str, EPConfig] = {}
    report: dict[str, Any] = {}
    new_weights: dict[str, Any] = {}
    for name, info in layers.items():
        loads = _profile_loads(profile, info)
        place = _placement_for(info, n, placement, replicate_hot, loads)
        lay = layout
        if lay == "auto":
            lay = "replicate" if info.tokens < MIN_TOKENS_PER_DEVICE * n * n_data else "shard"
        chunks = overlap_chunks if lay == "shard" else 1
        cfg = EPConfig(mesh, axis, data_axis, place, lay, chunks, capacity_factor, exchange=exchange)
        configs[name] = cfg
        per_chunk = -(-info.tokens // (n * n_data * chunks)) if lay == "shard" else info.tokens
        entry: dict[str, Any] = {
            "layout": lay, "chunks": chunks, "slots_per_device": place.slots_per_device,
            "slot_expert": list(place.slot_expert), "device_experts": place.device_experts(),
            "capacity": capacity_for(per_chunk, info.k, n, place.slots_per_device, capacity_factor)
            if lay == "shard" else None,
            "dropless": capacity_factor is None or lay == "replicate",
            "exchange": exchange if lay == "shard" else "psum",
            "weights": sorted(info.weights),
        }
        if loads is not None:
            naive = contiguous_placement(info.num_experts, n, 0 if info.num_experts % n == 0 else replicate_hot)
            entry["load_before"] = load_summary(naive, loads)
            entry["load_after"] = load_summary(place, loads)
        report[name] = entry
        for path, leaf_axes in info.weights.items():
            new_weights[path] = _place_weight(program.weights[path], leaf_axes, place, mesh, axis, path)
    out = program.rewrite(_rules(configs, placed=True, tap=False), weights=new_weights)
    meta = {"axis": axis, "data_axis": data_axis, "mesh": mesh_lib.describe_mesh(mesh), "layers": report,
            "capacity_factor": capacity_factor, "overlap_chunks": overlap_chunks, "_configs": configs}
    return out.replace(metadata={**program.metadata, "expert_parallel": meta,
                                 "device_mesh": mesh_lib.describe_mesh(mesh)})


def count_dropped(original: Program, ep_program: Program, *args: Any, **kwargs: Any) -> dict[str, int]:
    """Token slots dropped by ``ep_program``'s capacity limits on inputs ``args`` (per layer).

    Runs ``original`` (the program before ``ep``) with the same expert-parallel
    regions, counting instead of discarding: scanned layers report the sum over
    their stacked layers.
    """
    meta = ep_program.metadata.get("expert_parallel")
    if not meta:
        raise ValueError("count_dropped: the second program was not made by the ep pass")
    configs = {k: dataclasses.replace(c, count_dropped=True) for k, c in meta["_configs"].items()}
    _, taps = original.run_with_taps(_rules(configs, placed=False, tap=True), *args, **kwargs)
    out = {}
    for name in configs:
        v = taps.get(f"ep_dropped:{name}")
        out[name] = int(np.sum(np.asarray(v))) if v is not None else 0
    return out


# --------------------------------------------------------------------------
# The pass.
# --------------------------------------------------------------------------
@register_pass
@dataclasses.dataclass(frozen=True)
class ExpertParallel(Pass):
    """Expert parallelism over a mesh axis with all-to-all token exchange (exact when dropless).

    Options:
      mesh: the device mesh (Python API only); None builds one from
        ``num_devices`` devices.
      axis: the expert mesh axis (the axis experts are sharded over).
      data_axis: an optional batch axis of ``mesh`` alongside the expert axis.
      capacity_factor: None = dropless fixed-size buffers, else buffers of
        ``ceil(cf * tokens * K / n)`` rows per device pair. Dropped slots are
        counted on the example and calibration inputs, stored in
        ``metadata["expert_parallel"]["dropped_slots"]`` and warned about.
      overlap_chunks: c chunks per layer, pipelined (2*c all-to-alls per layer).
        See :func:`moejax.sharding.suggest_overlap_chunks`.
      replicate_hot: extra expert replicas (for the hottest experts); also lets
        an expert count that does not divide the devices fill every device.
      placement: ``auto`` (balanced when a routing profile exists), ``contiguous``
        or ``balanced`` (greedy LPT on the profile's expert loads).
      layout: ``shard`` tokens across devices (prefill), ``replicate`` them
        (decode: no forward exchange, one psum), or ``auto`` (replicate below
        4 tokens per device).
      exchange: ``dense`` (fixed-size ``all_to_all`` buffers), ``ragged``
        (``ragged_all_to_all``: GPU/TPU only), or ``auto`` (ragged when the
        platform being optimised for is a GPU or TPU, dense otherwise).
        ``ragged_emulated`` runs the ragged exchange with an all_gather (for tests).
      num_devices: devices of the mesh built when ``mesh`` is None (default: all
        visible devices); ignored when a mesh is given.
    """

    name: ClassVar[str] = "ep"
    needs_stacked_experts: ClassVar[bool] = True
    needs_weight_values: ClassVar[bool] = False  # abstract weights become sharded ShapeDtypeStructs
    provides: ClassVar[tuple[str, ...]] = ("expert_parallel", "device_mesh")
    lossy_options: ClassVar[tuple[str, ...]] = ("capacity_factor",)  # dropless (None) is exact; a capacity drops slots
    # Measured on CPU (2-4 virtual devices, shard/replicate): tiny Mixtral up to 5.0e-7 of max|logit|, default model 8.4e-7.
    tolerance: ClassVar[Tolerance | None] = Tolerance(1e-5, 1e-7, "each device multiplies the rows it received for its experts: other row counts than one device, so XLA blocks the f32 sums differently")
    # What __post_init__, check and resolve_* accept; shown by `moejax passes`.
    option_ranges: ClassVar[Mapping[str, str]] = {
        "mesh": "a Mesh or AbstractMesh that has the axis named by axis, or none",
        "axis": "a mesh axis name (any name when mesh is none)",
        "data_axis": "none, or an axis of mesh other than axis (needs mesh)",
        "capacity_factor": "number > 0, or none (dropless, exact)",
        "overlap_chunks": "integer >= 1",
        "replicate_hot": "integer >= 0",
        "placement": "auto, contiguous or balanced (balanced needs a routing profile)",
        "layout": "auto, shard or replicate",
        "num_devices": "integer >= 1 up to the visible devices, or none",
        "exchange": "auto, dense, ragged (GPU/TPU only) or ragged_emulated",
    }
    mesh: Mesh | AbstractMesh | None = None
    axis: str = "expert"
    data_axis: str | None = None
    capacity_factor: float | None = None
    overlap_chunks: int = 1
    replicate_hot: int = 0
    placement: str = "auto"
    layout: str = "auto"
    num_devices: int | None = None
    exchange: str = "auto"

    @property
    def exact(self) -> bool:  # type: ignore[override]
        """Dropless expert parallelism computes the same function; a capacity factor may drop slots."""
        return self.capacity_factor is None

    def __post_init__(self):
        if self.overlap_chunks < 1:
            raise ValueError(f"overlap_chunks must be >= 1, got {self.overlap_chunks}")
        if self.replicate_hot < 0:
            raise ValueError(f"replicate_hot must be >= 0, got {self.replicate_hot}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got {self.capacity_factor}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {self.exchange!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.mesh is not None:
            mesh_lib.check_axes(self.mesh, self.axis, self.data_axis)
        elif self.num_devices is not None and self.num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {self.num_devices}")

    def resolve_mesh(self, program: Program | None = None) -> Mesh | AbstractMesh:
        """``mesh``; else the mesh ``program``'s weights already live on (``from_pretrained(mesh=...)``)
        if it has this pass's expert axis (of ``num_devices`` devices, when given); else one over
        ``num_devices`` devices: an AbstractMesh for an abstract program (shapes only: it is
        never run, so it may plan for more devices than this host has)."""
        if self.mesh is not None:
            return self.mesh
        abstract = program is not None and program.is_abstract
        loaded = _weights_mesh(program) if program is not None else None
        if loaded is not None and self.axis in loaded.axis_names and (
                self.num_devices is None or int(loaded.shape[self.axis]) == self.num_devices):
            return mesh_lib.auto_axes(loaded)
        if self.data_axis is not None:
            raise PassError("ep: data_axis needs an explicit mesh with that axis (mesh=expert_mesh(n, data=m))")
        if abstract and self.num_devices is not None:
            return mesh_lib.abstract_expert_mesh(self.num_devices, axis=self.axis)
        return mesh_lib.expert_mesh(self.num_devices, axis=self.axis)

    def resolve_exchange(self, platform: str) -> str:
        """``auto`` -> ``ragged`` on GPU/TPU (where XLA implements ragged_all_to_all), else ``dense``."""
        if self.exchange != "auto":
            if self.exchange == "ragged" and platform not in RAGGED_PLATFORMS:
                raise PassError(f"ep: exchange=ragged needs a GPU or TPU (ragged_all_to_all is not implemented on "
                                f"{platform}); use exchange=dense or auto")
            return self.exchange
        return "ragged" if platform in RAGGED_PLATFORMS else "dense"

    def _profile(self, program: Program, ctx: PassContext) -> analysis.RoutingProfile | None:
        return (analysis.read(program.metadata, analysis.RoutingProfile)
                or ctx.analysis.latest(analysis.RoutingProfile))

    def check(self, program: Program, ctx: PassContext) -> None:
        mesh = self.resolve_mesh(program)
        try:
            mesh_lib.check_axes(mesh, self.axis, self.data_axis)
        except (TypeError, ValueError) as e:
            raise PassError(str(e)) from None
        n = int(mesh.shape[self.axis])
        for path, w in program.weights.items():
            # Its parts stack a different subset of experts per width: no one expert axis to shard.
            if isinstance(w, wf.MixedExpertTensor):
                raise PassError(f"ep: expert weight {path} is stored with a width per expert ({w.format}), which "
                                f"cannot be split along one expert axis; run ep before quantize(mixed=true), or "
                                f"quantize with one width (mixed=false)")
        for info in moe_layers(program).values():
            if info.num_experts % n and not self.replicate_hot:
                raise PassError(
                    f"ep: layer {info.name!r} has {info.num_experts} experts, which do not divide evenly over the "
                    f"{n} devices of mesh axis {self.axis!r}; use a mesh axis whose size divides "
                    f"{info.num_experts}, or replicate_hot >= {n - info.num_experts % n}")
        if self.placement == "balanced" and not self._profile(program, ctx):
            raise PassError("ep: placement=balanced needs a routing profile; add the profile pass before it, e.g. "
                            "'profile,ep(placement=balanced)'")

    def run(self, program: Program, ctx: PassContext) -> Program:
        out = expert_parallel_program(
            program, self.resolve_mesh(program), axis=self.axis, data_axis=self.data_axis,
            capacity_factor=self.capacity_factor, overlap_chunks=self.overlap_chunks,
            replicate_hot=self.replicate_hot, placement=self.placement, layout=self.layout,
            profile=self._profile(program, ctx), exchange=self.resolve_exchange(ctx.platform))
        if self.capacity_factor is not None:
            out = self._report_drops(program, out, ctx)
        return out

    def _report_drops(self, program: Program, out: Program, ctx: PassContext) -> Program:
        """Count dropped slots on the example and (same-shape) calibration inputs; warn if any."""
        runs = [(tuple(ctx.example_args), dict(ctx.example_kwargs))] if ctx.example_args else []
        for batch in ctx.calibration or ():
            if not ctx.example_kwargs and len(program.in_avals) == 1 and \
                    tuple(np.shape(batch)) == tuple(program.in_avals[0].shape):
                runs.append(((batch,), {}))
        totals: dict[str, int] = {}
        for args, kwargs in runs:
            for name, v in count_dropped(program, out, *args, **kwargs).items():
                totals[name] = totals.get(name, 0) + v
        meta = dict(out.metadata["expert_parallel"])
        meta["dropped_slots"] = totals
        meta["dropped_measured_on"] = len(runs)
        if any(totals.values()):
            warnings.warn(f"ep(capacity_factor={self.capacity_factor}): dropped token slots "
                          f"{ {k: v for k, v in totals.items() if v} } on {len(runs)} measured input batch(es); "
                          "raise capacity_factor or use the dropless default (capacity_factor=None)",
                          stacklevel=2)
        return out.replace(metadata={**out.metadata, "expert_parallel": meta})
