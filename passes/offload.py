"""``offload``: keep experts in a slow tier with a resident cache and next-layer prefetch (exact).

Survey section 4.2 (expert offloading: mixtral-offloading, MoE-Infinity,
ProMoE, HOBBIT). The program's function is unchanged; how it runs changes:
see :mod:`moejax.offload`.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from moejax import analysis, expert_layout, stats
from moejax.expert_cache import POLICIES
from moejax.expert_store import TIERS, DiskExpertStore, HostExpertStore, split_site_experts
from moejax.offload import OffloadedProgram, OffloadRuntime
from moejax.partition import partition
from moejax.pipeline import Pass, PassContext, PassError, Tolerance, register_pass
from moejax.program import Program
from moejax.weight_formats import MixedExpertTensor, format_of, nbytes_of

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def resident_bytes(resident: float | int | str, expert_bytes: int) -> int:
    """The cache budget in bytes: a fraction in [0, 1] of ``expert_bytes``, or a size (``"64MB"``, ``2**26``)."""
    if isinstance(resident, str):
        m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", resident)
        if not m or m.group(2).lower() not in _UNITS:
            raise PassError(f"offload: resident={resident!r} is not a fraction (0.25) or a size (64MB, 1.5GiB)")
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if isinstance(resident, bool) or resident < 0:
        raise PassError(f"offload: resident must be a fraction in [0, 1] or a size in bytes, got {resident!r}")
    if resident <= 1:
        return int(resident * expert_bytes)
    return int(resident)


@register_pass
@dataclasses.dataclass(frozen=True)
class Offload(Pass):
    """Keep experts in a slow tier (disk or host memory) with a resident cache and prefetch (exact).

    Options:
      resident: the cache budget: a fraction of the expert bytes (0.25) or a
        size ("64MB"); 0 reads every routed expert from the slow tier each time.
      policy: which expert to evict: ``lru``, ``lfu``, ``profile`` (lowest
        routing-profile load; needs ``profile`` earlier in the pipeline) or
        ``next-use`` (the expert whose layer runs furthest ahead).
      prefetch: predict the next layer's experts with its router on the current
        layer's input and load them on a background thread meanwhile.
      prefetch_k: experts predicted per token (0: as many as the router selects);
        more raise recall and cost reads.
      pin: keep the ``pin`` most loaded experts of the routing profile (over all
        layers) resident for good; needs ``profile`` earlier.
      tier: ``disk`` (a safetensors file read with O_DIRECT), ``host`` (pinned
        host memory), or ``auto``: host on GPU/TPU, disk on CPU.
      dir: folder for the disk tier's file (default: a fresh temporary folder,
        removed with the program).
    """

    name: ClassVar[str] = "offload"
    exact: ClassVar[bool] = True
    # The parts compile separately: XLA:CPU's LLVM backend may vectorize or contract the ops next to a cut
    # differently than inside the whole program (bit-exact at --xla_backend_optimization_level=0). Measured:
    # 0.0 on the default model, 8.3e-7 (~2e-7 of max|logit|) on a 3-layer tiny Mixtral. Offloading itself
    # (cache, budget, policy, prefetch) adds nothing: every option gives the bits of resident=1.0 (tested).
    tolerance: ClassVar[Tolerance | None] = Tolerance(1e-5, 1e-7, "the program runs as separately compiled parts; "
                                                      "XLA may vectorize the ops next to a cut differently")
    provides: ClassVar[tuple[str, ...]] = ("offload",)
    # An abstract program gets the plan only (budget and expert bytes in its metadata): see run().
    needs_weight_values: ClassVar[bool] = False
    # What __post_init__, check and resident_bytes (when the pass runs) accept; shown by `moejax passes`.
    option_ranges: ClassVar[Mapping[str, str]] = {
        "resident": "fraction in [0, 1], bytes > 1, or a size such as 64MB or 1.5GiB (b, kb, mb, gb, kib, mib, gib)",
        "policy": "lru, lfu, profile or next-use (profile needs a routing profile)",
        "prefetch": "true or false",
        "prefetch_k": "integer >= 0",
        "pin": "integer >= 0 (above 0 needs a routing profile)",
        "tier": "disk, host or auto",
        "dir": "a folder path, or none",
    }
    resident: float | str = 0.25
    policy: str = "lru"
    prefetch: bool = True
    prefetch_k: int = 0
    pin: int = 0
    tier: str = "auto"
    dir: str | None = None

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.tier not in (*TIERS, "auto"):
            raise ValueError(f"tier={self.tier!r} is not one of {', '.join(TIERS)}, auto")
        if isinstance(self.resident, (int, float)) and not isinstance(self.resident, bool) and self.resident < 0:
            raise ValueError(f"resident must be >= 0, got {self.resident}")
        if self.prefetch_k < 0 or self.pin < 0:
            raise ValueError(f"prefetch_k and pin must be >= 0, got prefetch_k={self.prefetch_k}, pin={self.pin}")

    def check(self, program: Program, ctx: PassContext) -> None:
        if isinstance(program, OffloadedProgram):
            raise PassError("offload: the program is already offloaded; give the pipeline one offload pass")
        if "expert_parallel" in program.metadata:
            raise PassError("offload: an expert-parallel program keeps its experts sharded over devices; "
                            "offloading them is not supported: drop ep or offload")
        for path in stats.expert_weight_sites(program):
            if _holds_mixed(program.weights[path]):
                raise PassError(f"offload: {path} holds mixed-precision experts; offloading needs one format per "
                                f"layer: use quantize(bits=N) without mixed, or offload before quantize(mixed=true)")
        if (self.policy == "profile" or self.pin) and analysis.read(program.metadata, analysis.RoutingProfile) is None:
            what = "policy=profile" if self.policy == "profile" else "pin"
            raise PassError(f"offload: {what} needs a routing profile; add profile before offload, "
                            f"e.g. 'profile,offload({what if what != 'pin' else 'pin=4'})'")

    def run(self, program: Program, ctx: PassContext) -> Program:
        if program.is_abstract:
            return self._plan_only(program, ctx)
        try:
            part = partition(program)
        except ValueError as e:
            raise PassError(f"offload: {e}") from None
        step = ctx.step(self)
        paths = sorted(stats.expert_weight_sites(program))
        source = program.weights[paths[0]] if paths else program
        # One runtime (store + cache) for every program of this optimize call: they share the experts.
        runtime = ctx.derived_weight(f"offload-runtime:{step}", source,
                                     lambda: self._runtime(part, program, ctx))
        if len(runtime.store.layouts) != len(part.sites) or any(
                runtime.store.num_experts[s.index] != s.num_experts for s in part.sites):
            raise PassError("offload: this program's expert ops differ from those of the first program this "
                            "pipeline offloaded; trace every signature from the same model")
        metadata = {**program.metadata, "offload": runtime.describe()}
        fields = {f.name: getattr(program, f.name) for f in dataclasses.fields(Program)}
        fields["metadata"] = metadata
        return OffloadedProgram(**fields, partition=part, runtime=runtime)

    def _tier(self, ctx: PassContext) -> str:
        return self.tier if self.tier != "auto" else ("disk" if ctx.platform == "cpu" else "host")

    def _plan_only(self, program: Program, ctx: PassContext) -> Program:
        """An abstract (shapes-only) program: nothing to store or run, so only the plan goes into its
        metadata, with the keys a real offload describes (``resident_expert_bytes``, ``expert_bytes``);
        the program is unchanged."""
        expert_bytes = sum(nbytes_of(program.weights[p]) for p in stats.expert_weight_sites(program))
        plan = {"resident_expert_bytes": min(resident_bytes(self.resident, expert_bytes), expert_bytes),
                "expert_bytes": expert_bytes, "policy": self.policy, "prefetch": self.prefetch,
                "tier": self._tier(ctx), "abstract": True}
        return program.replace(metadata={**program.metadata, "offload": plan})

    def _runtime(self, part, program: Program, ctx: PassContext) -> OffloadRuntime:
        sites = [split_site_experts(s.weights, s.num_experts) for s in part.sites]
        tier = self._tier(ctx)
        store = DiskExpertStore(sites, self.dir) if tier == "disk" else HostExpertStore(sites)
        capacity = resident_bytes(self.resident, store.total_bytes)
        profile = _profile_loads(program, part) if self.policy == "profile" or self.pin else None
        runtime = OffloadRuntime(store, capacity, self.policy, self.prefetch, profile, self.prefetch_k)
        if self.pin:  # the most loaded experts of the profile, across layers
            hottest = sorted(profile, key=lambda key: -profile[key])[: self.pin]
            try:
                runtime.pin(hottest)
            except ValueError as e:
                raise PassError(f"offload: {e}") from None
        return runtime


def _holds_mixed(w: Any) -> bool:
    if isinstance(w, MixedExpertTensor):
        return True
    return expert_layout.is_split(w) and len({format_of(x) for x in w.experts}) > 1


def _profile_loads(program: Program, part) -> dict[tuple[int, int], float]:
    """``(site, expert) -> share of the layer's routing slots`` from the routing profile."""
    profile = analysis.read(program.metadata, analysis.RoutingProfile)
    loads: dict[tuple[int, int], float] = {}
    seen: dict[str, int] = {}
    for site in part.sites:
        layer = profile.layers.get(site.name)
        occurrence = seen.get(site.name, 0)
        seen[site.name] = occurrence + 1
        if layer is None or occurrence >= layer.stack:
            continue
        counts = np.asarray(layer.counts[occurrence], np.float64)
        share = counts / max(counts.sum(), 1.0)
        loads.update({(site.index, e): float(share[e]) for e in range(len(share))})
    return loads
